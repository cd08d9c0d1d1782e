"""`isolation: sidecarOnly`: the spec, the grants, the Isolated check and the pod patch; pure."""

from __future__ import annotations

import copy
import json
from typing import Any

import jsonpatch
import pytest

from tests.operator import objects as o
from tests.operator.test_inject import IMAGE, make_pod, sidecar_of
from vertex_operator import inject, isolation, render
from vertex_operator.credential_reconcile import federation_config_map, identity_of, service_account_body
from vertex_operator.crd import SpecError, parse_credential, parse_route
from vertex_operator.identity import WORKLOAD_IDENTITY_USER

NUMBER = "123456789012"
POOL = {"poolId": "vertex-sidecar", "providerId": "prod-cluster",
        "issuer": "https://container.googleapis.com/v1/projects/my-project/locations/europe-west4/clusters/prod"}
AUDIENCE = ("https://iam.googleapis.com/projects/123456789012/locations/global/workloadIdentityPools/"
            "vertex-sidecar/providers/prod-cluster")
PRINCIPAL = ("principal://iam.googleapis.com/projects/123456789012/locations/global/workloadIdentityPools/"
             "vertex-sidecar/subject/system:serviceaccount:team-a:vertex")
GSA = "caller@my-project.iam.gserviceaccount.com"


def spec(gsa: str | None = None, **extra: Any) -> dict[str, Any]:
    wi: dict[str, Any] = {"projectId": "my-project", "projectNumber": NUMBER}
    if gsa:
        wi["gcpServiceAccount"] = gsa
    return {"workloadIdentity": wi, "isolation": "sidecarOnly", "sidecarPool": dict(POOL), **extra}


def plan(credential_spec: dict[str, Any], native: bool = True) -> inject.SidecarPlan:
    route = parse_route(o.route())
    credential = parse_credential(o.credential(**credential_spec))
    return inject.plan_sidecar(route, credential, default_image=IMAGE, server_version=(1, 31) if native else (1, 27))


def apply(pod: dict[str, Any], p: inject.SidecarPlan) -> dict[str, Any]:
    result = inject.inject(pod, p)
    assert result.injected, result.reason
    return jsonpatch.apply_patch(copy.deepcopy(pod), result.patch)


def token_volumes(pod: dict[str, Any]) -> set[str]:
    return {v["name"] for v in pod["spec"].get("volumes") or []
            if any("serviceAccountToken" in s for s in (v.get("projected") or {}).get("sources") or [])}


def containers(pod: dict[str, Any]) -> list[dict[str, Any]]:
    s = pod["spec"]
    return [*s.get("initContainers", []), *s["containers"], *s.get("ephemeralContainers", [])]


def holders(pod: dict[str, Any]) -> list[str]:
    """Names of the containers that mount a service-account token volume."""
    tokens = token_volumes(pod)
    return [c["name"] for c in containers(pod) if any(m["name"] in tokens for m in c.get("volumeMounts") or [])]


# ------------------------------------------------------------------ the spec


def test_default_is_cooperative_and_unchanged() -> None:
    credential = parse_credential(o.credential())
    assert credential.isolation == "cooperative" and credential.sidecar_pool is None
    assert credential.sidecar_type == "adc" and credential.federation is None


def test_sidecar_only_derives_the_audience_and_the_sidecar_credential() -> None:
    credential = parse_credential(o.credential(**spec()))
    assert credential.sidecar_pool is not None and credential.sidecar_pool.audience == AUDIENCE
    assert credential.sidecar_type == "external_account_file"
    assert credential.federation is not None and credential.federation.audience == AUDIENCE
    route = parse_route(o.route())
    assert render.render(route, credential).config["credentials"]["vertex"] == {
        "type": "external_account_file", "path": "/var/run/secrets/vertex/federation/credential-configuration.json"}


@pytest.mark.parametrize(("body", "message"), [
    ({"secretRef": {"name": "key"}, "isolation": "sidecarOnly"}, "needs workloadIdentity or federation"),
    ({"workloadIdentity": {"projectId": "my-project"}, "isolation": "sidecarOnly",
      "sidecarPool": {"poolId": "vertex-sidecar", "providerId": "prod-cluster"}}, "sidecarPool.projectNumber"),
    ({"workloadIdentity": {"projectId": "my-project", "projectNumber": NUMBER}, "isolation": "sidecarOnly"},
     "sidecarPool.poolId"),
    ({"workloadIdentity": {"projectId": "my-project", "projectNumber": NUMBER}, "sidecarPool": POOL},
     "only used with spec.isolation"),
    ({"workloadIdentity": {"projectId": "my-project", "projectNumber": NUMBER}, "isolation": "strict"},
     "not one of cooperative, sidecarOnly"),
])
def test_bad_specs_name_the_field(body: dict[str, Any], message: str) -> None:
    with pytest.raises(SpecError, match=message):
        parse_credential(o.credential(**body))


def test_federation_provider_is_the_pool() -> None:
    credential = parse_credential(o.credential(federation={"audience": AUDIENCE}, isolation="sidecarOnly"))
    assert credential.sidecar_pool is not None and credential.sidecar_pool.pool_id == "vertex-sidecar"
    assert identity_of(credential).member == PRINCIPAL


# ------------------------------------------------------------------ grants and objects


def test_direct_grant_goes_to_the_pool_principal_never_the_gke_pool() -> None:
    identity = identity_of(parse_credential(o.credential(**spec())))
    assert identity.member == PRINCIPAL
    assert [(g.resource, g.role, g.member) for g in identity.grants] == [
        ("projects/my-project", "roles/aiplatform.user", PRINCIPAL)]
    assert all("svc.id.goog" not in g.member for g in identity.grants)


def test_google_service_account_is_impersonated_through_the_pool() -> None:
    credential = parse_credential(o.credential(**spec(gsa=GSA)))
    identity = identity_of(credential)
    assert [(g.role, g.member) for g in identity.grants] == [(WORKLOAD_IDENTITY_USER, PRINCIPAL)]
    # No GKE annotation: the metadata server would otherwise act as the GSA for every container.
    assert "iam.gke.io/gcp-service-account" not in service_account_body(credential)["metadata"]["annotations"]
    config_map = federation_config_map(credential)
    assert config_map is not None
    config = json.loads(config_map["data"]["credential-configuration.json"])
    assert config["audience"] == AUDIENCE.removeprefix("https:")
    assert config["credential_source"] == {"file": "/var/run/secrets/vertex/federation/token",
                                           "format": {"type": "text"}}
    assert config["service_account_impersonation_url"].endswith(f"/serviceAccounts/{GSA}:generateAccessToken")
    assert "private_key" not in config_map["data"]["credential-configuration.json"]


# ------------------------------------------------------------------ the Isolated check


GKE_PRINCIPAL = ("principal://iam.googleapis.com/projects/123456789012/locations/global/workloadIdentityPools/"
                 "my-project.svc.id.goog/subject/ns/team-a/sa/vertex")
SET_BASE = "principalSet://iam.googleapis.com/projects/123456789012/locations/global/workloadIdentityPools/my-project.svc.id.goog"


@pytest.mark.parametrize(("role", "member", "exposed"), [
    ("roles/aiplatform.user", GKE_PRINCIPAL, True),
    ("roles/editor", "serviceAccount:my-project.svc.id.goog[team-a/vertex]", True),
    ("roles/aiplatform.admin", f"{SET_BASE}/namespace/team-a", True),
    ("roles/owner", f"{SET_BASE}/*", True),
    ("roles/aiplatform.user", f"{SET_BASE}/namespace/team-b", False),
    ("roles/aiplatform.user", GKE_PRINCIPAL.replace("sa/vertex", "sa/other"), False),
    ("roles/storage.admin", GKE_PRINCIPAL, False),
    ("roles/aiplatform.user", PRINCIPAL, False),  # the dedicated pool: that is the point
])
def test_project_exposures(role: str, member: str, exposed: bool) -> None:
    policy = {"bindings": [{"role": role, "members": ["user:alice@example.com", member]}]}
    found = isolation.exposures(policy, "projects/my-project", "my-project", "team-a", "vertex")
    assert [e.member for e in found] == ([member] if exposed else [])


def test_service_account_exposures_and_the_condition() -> None:
    policy = {"bindings": [
        {"role": WORKLOAD_IDENTITY_USER, "members": ["serviceAccount:my-project.svc.id.goog[team-a/vertex]", PRINCIPAL]},
        {"role": "roles/aiplatform.user", "members": [GKE_PRINCIPAL]},  # meaningless on a service account
    ]}
    found = isolation.exposures(policy, f"serviceAccounts/{GSA}", "my-project", "team-a", "vertex", act_as=True)
    assert [e.role for e in found] == [WORKLOAD_IDENTITY_USER]
    condition = isolation.isolated_condition(found, [f"serviceAccounts/{GSA}"])
    assert condition["status"] == "False" and "my-project.svc.id.goog[team-a/vertex]" in condition["message"]
    assert isolation.isolated_condition([], ["projects/my-project"])["status"] == "True"


def test_manual_commands_create_the_pool_and_check() -> None:
    pool = parse_credential(o.credential(**spec())).sidecar_pool
    assert pool is not None
    setup = isolation.setup_commands(pool, "my-project")
    assert "workload-identity-pools create vertex-sidecar" in setup[0]
    assert f"--issuer-uri={POOL['issuer']}" in setup[1] and "google.subject=assertion.sub" in setup[1]
    check = isolation.check_commands(["my-project"], GSA, "my-project", "team-a", "vertex")
    assert check[0].startswith("gcloud projects get-iam-policy my-project") and GSA in check[1]


# ------------------------------------------------------------------ the pod


@pytest.mark.parametrize("native", [True, False])
def test_token_and_config_go_into_the_sidecar_only(native: bool) -> None:
    p = plan(spec(), native=native)
    pod = apply(make_pod(initContainers=[{"name": "migrate", "image": "app:1"}],
                         containers=[{"name": "app", "image": "app:1"}, {"name": "worker", "image": "app:1"}]), p)
    assert holders(pod) == ["vertex-sidecar"]
    volume = next(v for v in pod["spec"]["volumes"] if v["name"] in token_volumes(pod))
    sources = volume["projected"]["sources"]
    assert sources[0]["serviceAccountToken"]["audience"] == AUDIENCE
    assert sources[1]["configMap"]["name"] == "vertex-federation-vertex"
    assert (sidecar_of(pod) in pod["spec"].get("initContainers", [])) is native
    for container in containers(pod):
        if container["name"] != "vertex-sidecar":
            env = {e["name"] for e in container.get("env") or []}
            assert not env & {"GOOGLE_APPLICATION_CREDENTIALS"}, container


def test_reinvocation_strips_mounts_another_webhook_copied() -> None:
    p = plan(spec())
    pod = apply(make_pod(), p)
    # Another webhook (reinvocationPolicy IfNeeded on ours) adds a container that mounts every volume.
    copied = [{"name": v["name"], "mountPath": f"/copied/{v['name']}"} for v in pod["spec"]["volumes"]]
    pod["spec"]["containers"].append({"name": "mesh-proxy", "image": "mesh:1", "volumeMounts": copied})
    pod["spec"]["initContainers"].append({"name": "late-init", "image": "x:1", "volumeMounts": list(copied)})
    assert set(holders(pod)) == {"vertex-sidecar", "mesh-proxy", "late-init"}
    again = apply(pod, p)
    assert holders(again) == ["vertex-sidecar"]
    mesh = next(c for c in again["spec"]["containers"] if c["name"] == "mesh-proxy")
    assert {m["name"] for m in mesh["volumeMounts"]} == {v["name"] for v in pod["spec"]["volumes"]} - token_volumes(pod)
    assert inject.inject(again, p).patch == []  # and then nothing more


def test_reinvocation_with_a_new_plain_container_changes_nothing() -> None:
    p = plan(spec())
    pod = apply(make_pod(), p)
    pod["spec"]["containers"].append({"name": "late", "image": "x:1"})
    assert inject.inject(pod, p).patch == []
    assert holders(pod) == ["vertex-sidecar"]


@pytest.mark.parametrize("extra", [
    {"shareProcessNamespace": True},
    {"hostPID": True},
    {"volumes": [{"name": "mine", "projected": {"sources": [{"serviceAccountToken": {"audience": AUDIENCE,
                                                                                     "path": "t"}}]}}]},
])
def test_pods_that_would_leak_the_token_are_not_injected(extra: dict[str, Any]) -> None:
    result = inject.inject(make_pod(**extra), plan(spec()))
    assert not result.injected and "sidecarOnly" in result.reason
    assert result.warnings


def test_cooperative_pods_may_share_process_namespaces() -> None:
    assert inject.inject(make_pod(shareProcessNamespace=True), plan({})).injected
