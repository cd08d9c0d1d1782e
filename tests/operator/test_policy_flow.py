"""The platform team's policy against the real operator, emulated IAM and Resource Manager:
a VertexCredential outside the bounds is Ready=False (NotAllowed) and nothing is granted —
no setIamPolicy, no IAMPolicyMember, no service account; tightening the policy revokes."""

from __future__ import annotations

import dataclasses
from typing import Any

import pytest

from tests.emulators.iam_policy import project_resource, service_account_resource
from tests.operator import objects as o
from tests.operator.conftest import Cluster, Google, eventually
from tests.operator.harness import KubeEmulator
from tests.operator.policies import TEST_POLICY
from tests.operator.test_credentials_flow import DIRECT, ROLE, condition, create, google_projects, wait_for

OTHER_GSA = "billing@team-b-prod.iam.gserviceaccount.com"
FOREIGN_POOL = "https://iam.googleapis.com/projects/999/locations/global/workloadIdentityPools/mine/providers/p"


def sets(google: Google) -> list[tuple[str, str, int]]:
    return [c for c in google.store.calls if c[0] == "setIamPolicy"]


@pytest.mark.parametrize("spec, says", [
    ({"workloadIdentity": {"projectId": "my-gke", "projectNumber": "123456789012"},
      "binding": {"backend": "iamApi", "roles": ["roles/owner"], "projects": ["my-vertex"]}},
     "spec.binding.roles: roles/owner is not an allowed role (allowed: roles/aiplatform.user)"),
    ({"workloadIdentity": {"projectId": "my-gke", "projectNumber": "123456789012"},
      "binding": {"backend": "iamApi", "projects": ["team-b-prod"]}},
     "project team-b-prod is not allowed for namespace team-a"),
    ({"workloadIdentity": {"projectId": "my-gke", "gcpServiceAccount": OTHER_GSA},
      "binding": {"backend": "iamApi"}},
     f"Google service account {OTHER_GSA} is not allowed for namespace team-a"),
    ({"workloadIdentity": {"projectId": "attacker-gke", "projectNumber": "999"},
      "binding": {"backend": "iamApi", "projects": ["my-vertex"]}},
     "spec.workloadIdentity.projectId: attacker-gke is not this cluster's Workload Identity project (my-gke)"),
    ({"federation": {"audience": FOREIGN_POOL}, "binding": {"backend": "iamApi", "projects": ["my-vertex"]}},
     "the workload identity pool projects/999/locations/global/workloadIdentityPools/mine is not allowed"),
    ({"workloadIdentity": {"projectId": "my-gke", "gcpServiceAccount": OTHER_GSA},
      "binding": {"backend": "configConnector"}},
     f"Google service account {OTHER_GSA} is not allowed for namespace team-a"),
], ids=["role", "project", "google-sa", "wi-project", "pool", "config-connector"])
async def test_out_of_bounds_credential_grants_nothing(
        kube: KubeEmulator, cluster: Cluster, google: Google, start_operator: Any,
        spec: dict[str, Any], says: str) -> None:
    google_projects(google)
    google.store.add_project("team-b-prod", "444")
    google.store.add_service_account(OTHER_GSA)
    await start_operator(**google.endpoints)
    await create(cluster, o.namespace(), o.credential(**spec))
    credential = await wait_for(cluster, "VertexCredential", "vertex", "Ready", "False", "NotAllowed", says)
    message = condition(credential, "Ready")["message"]
    assert message.startswith("Refused by the operator's policy") and message.endswith("Nothing was granted.")
    assert condition(credential, "BindingReady")["reason"] == "NotAllowed"
    assert credential["status"]["bindings"] == []
    assert sets(google) == []
    assert google.store.members(project_resource("my-vertex"), "roles/owner") == []
    assert google.store.members(service_account_resource(OTHER_GSA), "roles/iam.workloadIdentityUser") == []
    assert await cluster.get("ServiceAccount", o.NS, "vertex") is None
    assert not [r for r in kube.api_requests(("kopf/", "vertex-operator/")) if r[1] == "iampolicymembers"]


async def test_another_namespace_gets_nothing_of_team_a(
        kube: KubeEmulator, cluster: Cluster, google: Google, start_operator: Any) -> None:
    google_projects(google)
    await start_operator(**google.endpoints)
    await create(cluster, o.namespace("team-b"), o.credential(ns="team-b", workloadIdentity={
        "projectId": "my-gke", "projectNumber": "123456789012"}, binding={"backend": "iamApi", "projects": ["my-vertex"]}))

    async def refused() -> dict[str, Any]:
        found = await cluster.get("VertexCredential", "team-b", "vertex")
        ready = condition(found, "Ready")
        assert ready["reason"] == "NotAllowed" and "not allowed for namespace team-b" in ready["message"], ready
        return ready
    await eventually(refused)
    assert sets(google) == []


async def test_tightened_policy_revokes_what_was_granted(
        kube: KubeEmulator, cluster: Cluster, google: Google, start_operator: Any) -> None:
    google_projects(google)
    first = await start_operator(**google.endpoints)
    await create(cluster, o.namespace(), o.credential(workloadIdentity={
        "projectId": "my-gke", "projectNumber": "123456789012"}, binding={"backend": "iamApi", "projects": ["my-vertex"]}))
    await wait_for(cluster, "VertexCredential", "vertex", "Ready", "True", "Ready")
    assert google.store.members(project_resource("my-vertex"), ROLE) == [DIRECT]
    await first.stop()

    # The platform team drops my-vertex from team-a's projects (helm upgrade restarts the operator).
    allowance = dataclasses.replace(TEST_POLICY.namespaces[0], projects=("my-gke",))
    await start_operator(policy=dataclasses.replace(TEST_POLICY, namespaces=(allowance,)), **google.endpoints)
    credential = await wait_for(cluster, "VertexCredential", "vertex", "Ready", "False", "NotAllowed",
                                "project my-vertex is not allowed for namespace team-a")
    assert google.store.members(project_resource("my-vertex"), ROLE) == []
    assert credential["status"]["bindings"] == []


async def test_manual_backend_is_not_bounded_but_system_namespaces_are(
        kube: KubeEmulator, cluster: Cluster, start_operator: Any) -> None:
    # manual grants nothing itself: whoever runs the printed commands uses their own rights.
    await start_operator()
    await create(cluster, o.namespace(), o.credential(workloadIdentity={
        "projectId": "elsewhere", "projectNumber": "7"}, binding={"roles": ["roles/owner"], "projects": ["any-project"]}))
    await wait_for(cluster, "VertexCredential", "vertex", "Ready", "True", "ManualBinding")
    await create(cluster, o.namespace("kube-system"), o.credential(ns="kube-system", secretRef={"name": "k"}))

    async def refused() -> dict[str, Any]:
        ready = condition(await cluster.get("VertexCredential", "kube-system", "vertex"), "Ready")
        assert ready["reason"] == "NotAllowed" and "system namespace" in ready["message"], ready
        return ready
    await eventually(refused)
    assert await cluster.get("ServiceAccount", "kube-system", "vertex") is None


# ---------------------------------------------------------------- routes


@pytest.mark.parametrize("extra, says", [
    ({"upstreams": {"aiplatform": "http://{location}-aiplatform.googleapis.com"}}, "is not https"),
    ({"upstreams": {"aiplatformGlobal": "https://collector.example.com"}}, "is not on *.googleapis.com"),
    ({"upstreams": {"discovery": "http://127.0.0.1:9999"}}, "is a loopback address"),
    ({"sidecar": {"image": "docker.io/someone/tool:1"}}, "spec.sidecar.image: docker.io/someone/tool:1 is not"),
], ids=["http", "foreign-host", "loopback", "image"])
async def test_out_of_bounds_route_renders_and_injects_nothing(
        kube: KubeEmulator, cluster: Cluster, operator: Any, tls_files: dict[str, Any],
        extra: dict[str, Any], says: str) -> None:
    from tests.operator.test_webhook import Admission, pod

    await create(cluster, o.namespace(), o.credential(), o.deployment(), o.route(**extra))

    async def refused() -> dict[str, Any]:
        ready = condition(await cluster.get("VertexRoute", o.NS, "gemini"), "Ready")
        assert ready["status"] == "False" and ready["reason"] == "NotAllowed" and says in ready["message"], ready
        return ready
    ready = await eventually(refused)
    assert "Nothing is rendered or injected with it" in ready["message"]
    assert await cluster.get("ConfigMap", o.NS, "vertex-sidecar-gemini") is None
    deployment = await cluster.get("Deployment", o.NS, "chat")
    assert not (deployment["spec"]["template"]["metadata"].get("annotations") or {})  # type: ignore[index]
    admitted, answer = await Admission(operator, str(tls_files["ca"])).admit(pod())
    assert "patch" not in answer and [c["name"] for c in admitted["spec"]["containers"]] == ["app"]
    assert any("NotAllowed" in w or "policy" in w for w in answer.get("warnings", [])), answer


async def test_allowed_overrides_are_rendered(
        kube: KubeEmulator, cluster: Cluster, start_operator: Any) -> None:
    bounds = dataclasses.replace(TEST_POLICY.routes, upstream_hosts=("vertex.psc.example.internal",),
                                 allow_loopback=True)
    await start_operator(policy=dataclasses.replace(TEST_POLICY, routes=bounds))
    upstreams = {"aiplatform": "https://vertex.psc.example.internal", "discovery": "http://127.0.0.1:9999",
                 "aiplatformGlobal": "https://aiplatform.googleapis.com"}
    await create(cluster, o.namespace(), o.credential(), o.route(upstreams=upstreams))

    async def rendered() -> dict[str, Any]:
        config_map = await cluster.get("ConfigMap", o.NS, "vertex-sidecar-gemini")
        assert config_map is not None
        return config_map
    config_map = await eventually(rendered)
    assert "https://vertex.psc.example.internal" in config_map["data"]["config.yaml"]


# ---------------------------------------------------------------- namespaces the operator may write in


async def test_namespace_without_write_access_gets_nothing(
        kube: KubeEmulator, cluster: Cluster, start_operator: Any, tls_files: dict[str, Any]) -> None:
    from tests.operator.test_webhook import Admission, pod

    op = await start_operator(write_namespaces=frozenset({"team-b"}))
    await create(cluster, o.namespace(), o.credential(secretRef={"name": "k"}), o.deployment(), o.route())

    async def route_refused() -> dict[str, Any]:
        ready = condition(await cluster.get("VertexRoute", o.NS, "gemini"), "Ready")
        assert ready["reason"] == "NamespaceNotEnabled" and "rbac.workloadNamespaces" in ready["message"], ready
        return ready

    async def credential_refused() -> dict[str, Any]:
        ready = condition(await cluster.get("VertexCredential", o.NS, "vertex"), "Ready")
        assert ready["reason"] == "NotAllowed" and "may not write in namespace team-a" in ready["message"], ready
        return ready
    await eventually(route_refused)
    await eventually(credential_refused)
    assert await cluster.get("ConfigMap", o.NS, "vertex-sidecar-gemini") is None
    assert await cluster.get("ServiceAccount", o.NS, "vertex") is None
    deployment = await cluster.get("Deployment", o.NS, "chat")
    assert not (deployment["spec"]["template"]["metadata"].get("annotations") or {})  # type: ignore[index]
    _, answer = await Admission(op, str(tls_files["ca"])).admit(pod())
    assert "patch" not in answer
    writes = [r for r in kube.api_requests(("kopf/", "vertex-operator/"))
              if r[1] in ("configmaps", "serviceaccounts", "deployments") and r[2] in ("create", "patch", "delete")]
    assert writes == []


async def test_route_in_a_namespace_that_did_not_opt_in_says_so(
        kube: KubeEmulator, cluster: Cluster, start_operator: Any) -> None:
    await start_operator(injection_label=("vertex.passthrough.dev/injection", "enabled"), resync_seconds=0.3)
    await create(cluster, o.namespace(), o.credential(), o.deployment(), o.route())

    async def not_opted_in() -> dict[str, Any]:
        ready = condition(await cluster.get("VertexRoute", o.NS, "gemini"), "Ready")
        assert ready["reason"] == "NamespaceNotOptedIn", ready
        return ready
    ready = await eventually(not_opted_in)
    assert "kubectl label namespace team-a vertex.passthrough.dev/injection=enabled" in ready["message"]
    deployment = await cluster.get("Deployment", o.NS, "chat")
    assert not (deployment["spec"]["template"]["metadata"].get("annotations") or {})  # type: ignore[index]

    # Labelled: the next resync serves it.
    await cluster._call(cluster.core.patch_namespace, o.NS,
                        {"metadata": {"labels": {"vertex.passthrough.dev/injection": "enabled"}}},
                        _content_type="application/merge-patch+json")

    async def served() -> dict[str, Any]:
        ready = condition(await cluster.get("VertexRoute", o.NS, "gemini"), "ConfigReady")
        assert ready["status"] == "True", ready
        return ready
    await eventually(served)
    assert await cluster.get("ConfigMap", o.NS, "vertex-sidecar-gemini") is not None
