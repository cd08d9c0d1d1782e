"""The operator policy file: parsing, and which credentials' grants it refuses (pure)."""

from __future__ import annotations

import pathlib

import pytest

from tests.operator import objects as o
from tests.operator.policies import TEST_POLICY
from vertex_operator import cli
from vertex_operator.credential_reconcile import identity_of
from vertex_operator.crd import parse_credential
from vertex_operator.policy import Policy, PolicyError, grant_refusal, load_policy, parse_policy, spec_refusal

POOL = {"poolId": "vertex-sidecar", "providerId": "prod-cluster"}


def refusal(spec: dict, policy: Policy = TEST_POLICY, ns: str = o.NS) -> tuple[str, ...]:
    credential = parse_credential(o.credential(ns=ns, **spec))
    found = spec_refusal(policy, credential, {"kube-system"})
    return (found or grant_refusal(policy, credential, identity_of(credential, "123456789012").grants)).problems


def wi(**extra: str) -> dict[str, str]:
    return {"projectId": "my-gke", "projectNumber": "123456789012", **extra}


def test_defaults_refuse_every_automatic_grant() -> None:
    assert parse_policy(None) == parse_policy({}) == Policy()
    problems = refusal({"workloadIdentity": wi(), "binding": {"backend": "iamApi"}}, Policy())
    assert problems == ("spec.workloadIdentity: no Workload Identity project is pinned "
                        "(policy.workloadIdentity.projectId), so the operator grants nothing for it",)
    pinned = parse_policy({"workloadIdentity": {"projectId": "my-gke"}})
    assert refusal({"workloadIdentity": wi(), "binding": {"backend": "iamApi"}}, pinned) == (
        "project my-gke is not allowed for namespace team-a (policy.namespaces)",)


def test_allowed_credentials_pass() -> None:
    gsa = "caller@my-vertex.iam.gserviceaccount.com"
    assert refusal({"workloadIdentity": wi(), "binding": {"backend": "iamApi", "projects": ["my-vertex"]}}) == ()
    assert refusal({"workloadIdentity": wi(gcpServiceAccount=gsa), "binding": {"backend": "configConnector",
                                                                               "projects": ["my-vertex"]}}) == ()
    assert refusal({"workloadIdentity": wi(), "isolation": "sidecarOnly", "sidecarPool": POOL,
                    "binding": {"backend": "iamApi"}}) == ()


def test_each_part_of_a_grant_is_checked() -> None:
    other_pool = {"poolId": "elsewhere", "providerId": "prod-cluster"}
    assert refusal({"workloadIdentity": wi(), "isolation": "sidecarOnly", "sidecarPool": other_pool,
                    "binding": {"backend": "iamApi"}}) == (
        "the workload identity pool projects/123456789012/locations/global/workloadIdentityPools/elsewhere is not "
        "allowed (allowed: the Workload Identity project's pool, "
        "projects/42/locations/global/workloadIdentityPools/k8s, "
        "projects/123456789012/locations/global/workloadIdentityPools/vertex-sidecar; policy.federationPools)",)
    # The Google SA's own roles on a project: the SA, the project and the role are all checked.
    gsa = "billing@team-b-prod.iam.gserviceaccount.com"
    assert refusal({"workloadIdentity": wi(gcpServiceAccount=gsa), "binding": {
        "backend": "iamApi", "projects": ["team-b-prod"]}}) == (
        "project team-b-prod is not allowed for namespace team-a (policy.namespaces)",
        f"Google service account {gsa} is not allowed for namespace team-a (policy.namespaces)")
    assert refusal({"workloadIdentity": wi(projectNumber="999"), "binding": {"backend": "iamApi"}},
                   parse_policy({"workloadIdentity": {"projectId": "my-gke", "projectNumber": "123456789012"}})) == (
        "spec.workloadIdentity.projectNumber: 999 is not the number of my-gke (123456789012)",)


def test_manual_is_unbounded_except_for_system_namespaces() -> None:
    spec = {"workloadIdentity": {"projectId": "x-project", "projectNumber": "1"},
            "binding": {"roles": ["roles/owner"], "projects": ["any-project"]}}
    assert refusal(spec, Policy()) == ()
    assert refusal(spec, Policy(), ns="kube-system") == (
        "namespace kube-system is a system namespace or the operator's own, where credentials are never served",)


@pytest.mark.parametrize("data, says", [
    ({"allowedRole": []}, "unknown key(s) allowedRole"),
    ({"federationPools": ["k8s"]}, "federationPools: 'k8s' is not a pool name"),
    ({"workloadIdentity": {"projectId": "p-1234", "projectNumber": "12a"}}, "is not a project number"),
    ({"namespaces": [{"projects": ["p"]}]}, "namespaces[0].namespaces: required"),
    ({"namespaces": [{"namespaces": "team-a"}]}, "namespaces[0].namespaces: expected a list"),
    ([], "the policy must be a mapping"),
])
def test_bad_policies_are_refused_with_the_key(data: object, says: str) -> None:
    with pytest.raises(PolicyError) as caught:
        parse_policy(data)
    assert says in str(caught.value)


def test_cli_loads_the_file_and_refuses_a_bad_one(tmp_path: pathlib.Path, capsys: pytest.CaptureFixture[str]) -> None:
    good = tmp_path / "policy.yaml"
    good.write_text("workloadIdentity: {projectId: my-gke}\nnamespaces: [{namespaces: [team-a], projects: [p-*]}]\n")
    options = cli.options_from_args(cli.build_parser().parse_args(["--policy-file", str(good)]))
    assert options.policy.workload_identity_project == "my-gke" and options.policy.projects_for("team-a") == ("p-*",)
    assert cli.options_from_args(cli.build_parser().parse_args([])).policy == Policy()
    bad = tmp_path / "bad.yaml"
    bad.write_text("allowedRoles: roles/owner\n")
    with pytest.raises(PolicyError, match="bad.yaml: allowedRoles: expected a list"):
        load_policy(str(bad))
    with pytest.raises(SystemExit):
        cli.main(["--no-webhook", "--policy-file", str(tmp_path / "absent.yaml")])
    assert "cannot read the policy file" in capsys.readouterr().err


@pytest.mark.parametrize("url, allowed", [
    ("https://{location}-aiplatform.googleapis.com", True),
    ("https://aiplatform.googleapis.com/", True),
    ("https://{location}-aiplatform-psc1.p.googleapis.com:443", True),
    ("https://vertex.psc.example.internal", True),  # listed in upstreamHosts
    ("http://aiplatform.googleapis.com", False),
    ("https://googleapis.com.evil.example", False),
    ("https://x.googleapis.com{location}", False),  # the suffix must be literal
    ("https://evil.example#.googleapis.com", False),
    ("https://evil.example\\@x.googleapis.com", False),
    ("https://user@x.googleapis.com", False),
    ("https://x.googleapis.com?u=1", False),
    ("https://{project}.googleapis.com", False),
    ("http://127.0.0.1:8080", False),  # loopback needs the development flag
    ("https://[::1]:8443", False),
])
def test_upstreams_must_be_google_over_https(url: str, allowed: bool) -> None:
    from vertex_operator.policy import RouteBounds, upstream_problem

    bounds = RouteBounds(upstream_hosts=("vertex.psc.example.internal",))
    assert (upstream_problem(bounds, "aiplatform", url) is None) is allowed
    assert upstream_problem(RouteBounds(allow_loopback=True), "discovery", "http://127.0.0.1:8080") is None


def test_sidecar_images_are_matched_by_repository_or_prefix() -> None:
    from vertex_operator.policy import image_allowed, image_repository

    assert image_repository("reg.example:5000/vertex/sidecar:1.0") == "reg.example:5000/vertex/sidecar"
    assert image_repository("reg.example/vertex/sidecar@sha256:ab") == "reg.example/vertex/sidecar"
    repo = ("reg.example/vertex/sidecar",)
    assert image_allowed(repo, "reg.example/vertex/sidecar:2") and image_allowed(repo, "reg.example/vertex/sidecar@sha256:ab")
    assert not image_allowed(repo, "reg.example/vertex/sidecar-evil:1")
    assert image_allowed(("reg.example/vertex/",), "reg.example/vertex/other:1")
    assert not image_allowed(("reg.example/vertex/",), "reg.example/vertexx/other:1")
    with pytest.raises(PolicyError, match="routes.allowLoopbackUpstreams"):
        parse_policy({"routes": {"allowLoopbackUpstreams": "yes"}})


def test_write_namespaces_from_the_command_line() -> None:
    parse = cli.build_parser().parse_args
    assert cli.options_from_args(parse([])).write_namespaces is None  # not restricted
    options = cli.options_from_args(parse(["--write-namespace", "team-a", "--write-namespace=team-b"]))
    assert options.write_namespaces == {"team-a", "team-b"} and options.may_write("team-a")
    assert not options.may_write("team-c")
    nowhere = cli.options_from_args(parse(["--write-namespace="]))  # the chart with none listed
    assert nowhere.write_namespaces == frozenset() and not nowhere.may_write("team-a")
