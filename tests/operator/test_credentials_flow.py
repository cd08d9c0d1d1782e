"""The real operator (kopf) on the emulated API server, with emulated IAM and Resource Manager:
VertexCredential → service account, IAM grants (each backend), status, deletion."""

from __future__ import annotations

import json
from typing import Any

import pytest

from tests.emulators.iam_policy import project_resource, service_account_resource
from tests.operator import objects as o
from tests.operator.conftest import Cluster, Google, OperatorThread, eventually
from tests.operator.harness import KubeEmulator
from tests.operator.test_webhook import Admission, pod

ROLE = "roles/aiplatform.user"
WIU = "roles/iam.workloadIdentityUser"
GSA = "caller@my-vertex.iam.gserviceaccount.com"
DIRECT = ("principal://iam.googleapis.com/projects/123456789012/locations/global/workloadIdentityPools/"
          "my-gke.svc.id.goog/subject/ns/team-a/sa/vertex")
GKE_MEMBER = "serviceAccount:my-gke.svc.id.goog[team-a/vertex]"
PROVIDER = "https://iam.googleapis.com/projects/42/locations/global/workloadIdentityPools/k8s/providers/c1"
CONDITIONAL = {"role": ROLE, "members": [DIRECT],
               "condition": {"title": "until-2030", "expression": "request.time < timestamp('2030-01-01T00:00:00Z')"}}
GSA_ANNOTATION = "iam.gke.io/gcp-service-account"


def direct(**binding: Any) -> dict[str, Any]:
    """Direct Workload Identity; the project number is looked up unless given."""
    spec: dict[str, Any] = {"workloadIdentity": {"projectId": "my-gke"}, "binding": {"backend": "iamApi", **binding}}
    return spec


def condition(obj: dict[str, Any] | None, type_: str) -> dict[str, Any]:
    assert obj is not None, "the object does not exist"
    found = [c for c in (obj.get("status") or {}).get("conditions") or [] if c["type"] == type_]
    assert found, f"no {type_} condition in {obj.get('status')}"
    return found[0]


async def wait_for(cluster: Cluster, kind: str, name: str, type_: str, status: str, reason: str | None = None,
                   message: str = "", timeout: float = 15.0) -> dict[str, Any]:
    async def check() -> dict[str, Any]:
        obj = await cluster.get(kind, o.NS, name)
        found = condition(obj, type_)
        assert found["status"] == status and (reason is None or found["reason"] == reason), found
        assert message in found["message"], found
        return obj  # type: ignore[return-value]
    return await eventually(check, timeout=timeout)


async def gone(cluster: Cluster, kind: str, name: str) -> None:
    async def check() -> bool:
        return await cluster.get(kind, o.NS, name) is None
    await eventually(check)


async def create(cluster: Cluster, *objects: dict[str, Any]) -> None:
    for obj in objects:
        await cluster.create(obj)


def google_projects(google: Google, vertex_bindings: list[dict[str, Any]] | None = None) -> None:
    google.store.add_project("my-gke", "123456789012")
    google.store.add_project("my-vertex", "222", vertex_bindings, version=3 if vertex_bindings else 1)


# ---------------------------------------------------------------- manual


async def test_manual_backend_creates_the_account_and_shows_the_commands(
        kube: KubeEmulator, cluster: Cluster, operator: OperatorThread) -> None:
    await create(cluster, o.namespace(), o.credential(workloadIdentity={
        "projectId": "my-gke", "projectNumber": "123456789012"}, binding={"projects": ["my-vertex"]}))
    credential = await wait_for(cluster, "VertexCredential", "vertex", "Ready", "True", "ManualBinding")
    assert condition(credential, "BindingReady")["status"] == "Unknown"
    status = credential["status"]
    assert status["serviceAccountName"] == "vertex" and status["member"] == DIRECT
    assert status["commands"] == [f"gcloud projects add-iam-policy-binding my-vertex --member={DIRECT} "
                                  "--role=roles/aiplatform.user --condition=None"]
    assert status["bindings"] == [] and status["observedGeneration"] == 1
    ksa = await cluster.get("ServiceAccount", o.NS, "vertex")
    assert ksa is not None
    assert ksa["metadata"]["ownerReferences"] == [{
        "apiVersion": "vertex.passthrough.dev/v1alpha1", "kind": "VertexCredential", "name": "vertex",
        "uid": credential["metadata"]["uid"], "controller": True}]
    assert ksa["metadata"]["labels"]["vertex.passthrough.dev/credential"] == "vertex"

    await cluster.delete("VertexCredential", o.NS, "vertex")
    await gone(cluster, "VertexCredential", "vertex")
    await gone(cluster, "ServiceAccount", "vertex")


# ---------------------------------------------------------------- iamApi


async def test_iam_api_grants_propagates_and_revokes_only_its_member(
        kube: KubeEmulator, cluster: Cluster, google: Google, start_operator: Any) -> None:
    foreign = {"role": ROLE, "members": ["group:ml@example.com"]}
    google_projects(google, [foreign, CONDITIONAL])
    await start_operator(iam_propagation_seconds=1.5, **google.endpoints)
    await create(cluster, o.namespace(), o.credential(**direct(projects=["my-vertex"])), o.route())

    credential = await wait_for(cluster, "VertexCredential", "vertex", "BindingReady", "Unknown", "Propagating")
    assert "not an error" in condition(credential, "BindingReady")["message"]
    assert condition(credential, "Ready")["reason"] == "Propagating"
    credential = await wait_for(cluster, "VertexCredential", "vertex", "Ready", "True", "Ready")
    assert condition(credential, "BindingReady")["reason"] == "Bound"
    assert credential["status"]["member"] == DIRECT  # with the number from Resource Manager
    assert credential["status"]["bindings"] == [
        {"resource": "projects/my-vertex", "role": ROLE, "member": DIRECT, "backend": "iamApi"}]
    project = project_resource("my-vertex")
    assert google.store.members(project, ROLE) == ["group:ml@example.com", DIRECT]
    assert google.store.members(project, ROLE, conditional=True) == [DIRECT]
    assert google.store.policy(project)["version"] == 3
    await wait_for(cluster, "VertexRoute", "gemini", "Ready", "True")

    await cluster.delete("VertexCredential", o.NS, "vertex")
    await gone(cluster, "VertexCredential", "vertex")
    assert google.store.members(project, ROLE) == ["group:ml@example.com"]
    assert google.store.members(project, ROLE, conditional=True) == [DIRECT]  # not ours to remove
    assert await cluster.get("ServiceAccount", o.NS, "vertex") is None
    route = await wait_for(cluster, "VertexRoute", "gemini", "Ready", "False", "CredentialNotFound")
    assert "VertexCredential 'vertex' does not exist" in condition(route, "Ready")["message"]


async def test_grant_that_existed_before_is_left_alone(
        kube: KubeEmulator, cluster: Cluster, google: Google, start_operator: Any) -> None:
    google_projects(google, [{"role": ROLE, "members": [DIRECT]}])
    await start_operator(**google.endpoints)
    await create(cluster, o.namespace(), o.credential(**direct(projects=["my-vertex"])))
    credential = await wait_for(cluster, "VertexCredential", "vertex", "Ready", "True", "Ready")
    assert credential["status"]["bindings"] == []  # not made by the operator
    await cluster.delete("VertexCredential", o.NS, "vertex")
    await gone(cluster, "VertexCredential", "vertex")
    assert google.store.members(project_resource("my-vertex"), ROLE) == [DIRECT]
    assert [c[0] for c in google.store.calls].count("setIamPolicy") == 0


async def test_google_service_account_mode_adopts_an_existing_account(
        kube: KubeEmulator, cluster: Cluster, google: Google, start_operator: Any) -> None:
    google.store.add_service_account(GSA, [{"role": WIU, "members": ["serviceAccount:other.svc.id.goog[x/y]"]}])
    await start_operator(**google.endpoints)
    await create(cluster, o.namespace(), {"apiVersion": "v1", "kind": "ServiceAccount", "metadata": {
        "name": "vertex", "namespace": o.NS, "annotations": {"team": "a"}}})
    await cluster.create(o.credential(workloadIdentity={"projectId": "my-gke", "gcpServiceAccount": GSA},
                                      binding={"backend": "iamApi"}))
    credential = await wait_for(cluster, "VertexCredential", "vertex", "Ready", "True", "Ready")
    assert credential["status"]["member"] == GKE_MEMBER
    resource = service_account_resource(GSA)
    assert google.store.members(resource, WIU) == ["serviceAccount:other.svc.id.goog[x/y]", GKE_MEMBER]
    ksa = await cluster.get("ServiceAccount", o.NS, "vertex")
    assert ksa["metadata"]["annotations"] == {  # type: ignore[index]
        "team": "a", GSA_ANNOTATION: GSA, "vertex.passthrough.dev/credential": "vertex",
        "vertex.passthrough.dev/added-annotations": GSA_ANNOTATION}
    assert not ksa["metadata"].get("ownerReferences")  # type: ignore[index]

    await cluster.delete("VertexCredential", o.NS, "vertex")
    await gone(cluster, "VertexCredential", "vertex")
    assert google.store.members(resource, WIU) == ["serviceAccount:other.svc.id.goog[x/y]"]
    ksa = await cluster.get("ServiceAccount", o.NS, "vertex")
    assert ksa is not None and ksa["metadata"]["annotations"] == {"team": "a"}  # adopted: kept, as it was


async def test_missing_google_service_account(
        kube: KubeEmulator, cluster: Cluster, google: Google, start_operator: Any) -> None:
    await start_operator(**google.endpoints)
    await create(cluster, o.namespace(), o.credential(
        workloadIdentity={"projectId": "my-gke", "gcpServiceAccount": GSA}, binding={"backend": "iamApi"}))
    credential = await wait_for(cluster, "VertexCredential", "vertex", "Ready", "False", "ServiceAccountNotFound")
    assert f"Google service account {GSA} does not exist" in condition(credential, "Ready")["message"]
    ksa = await cluster.get("ServiceAccount", o.NS, "vertex")
    assert ksa is not None and ksa["metadata"]["annotations"][GSA_ANNOTATION] == GSA


async def test_concurrent_foreign_edit_between_get_and_set(
        kube: KubeEmulator, cluster: Cluster, google: Google, start_operator: Any) -> None:
    google_projects(google)
    project = project_resource("my-vertex")
    google.store.after_get(project, lambda store: store.add_member(project, ROLE, "user:someone@example.com"))
    await start_operator(**google.endpoints)
    await create(cluster, o.namespace(), o.credential(**direct(projects=["my-vertex"])))
    await wait_for(cluster, "VertexCredential", "vertex", "Ready", "True", "Ready")
    assert google.store.members(project, ROLE) == ["user:someone@example.com", DIRECT]
    sets = [c for c in google.store.calls if c[0] == "setIamPolicy"]
    assert sets == [("setIamPolicy", project, 409), ("setIamPolicy", project, 200)]


async def test_operator_restart_between_steps_adds_no_duplicates(
        kube: KubeEmulator, cluster: Cluster, google: Google, start_operator: Any) -> None:
    google_projects(google)
    google.store.add_project("other-vertex", "333")
    # The second project's write fails (no answer from Google's side): the operator stops there.
    google.store.fail_next("setIamPolicy", project_resource("other-vertex"), 503, times=1000)
    first = await start_operator(**google.endpoints)
    await create(cluster, o.namespace(), o.credential(**direct(projects=["my-vertex", "other-vertex"])))
    credential = await wait_for(cluster, "VertexCredential", "vertex", "Ready", "False", "GoogleUnavailable")
    # Both were recorded before they were written: the failed one may have been applied.
    assert [b["resource"] for b in credential["status"]["bindings"]] == ["projects/my-vertex", "projects/other-vertex"]
    await first.stop()

    google.store.clear_failures()
    await start_operator(**google.endpoints)
    await wait_for(cluster, "VertexCredential", "vertex", "Ready", "True", "Ready")
    for project in ("my-vertex", "other-vertex"):
        assert google.store.members(project_resource(project), ROLE) == [DIRECT]

    await cluster.delete("VertexCredential", o.NS, "vertex")
    await gone(cluster, "VertexCredential", "vertex")
    for project in ("my-vertex", "other-vertex"):
        assert google.store.members(project_resource(project), ROLE) == []


async def test_permission_denied_is_reported_and_retried(
        kube: KubeEmulator, cluster: Cluster, google: Google, start_operator: Any) -> None:
    google_projects(google)
    google.store.deny("resourcemanager.projects.setIamPolicy", "projects/my-vertex")
    await start_operator(**google.endpoints)
    await create(cluster, o.namespace(), o.credential(**direct(projects=["my-vertex"])), o.route())
    credential = await wait_for(cluster, "VertexCredential", "vertex", "Ready", "False", "PermissionDenied")
    message = condition(credential, "BindingReady")["message"]
    assert "lacks permission resourcemanager.projects.setIamPolicy on project my-vertex" in message
    assert "roles/resourcemanager.projectIamAdmin" in message
    assert credential["status"]["bindings"] == []  # refused for sure: not recorded
    await wait_for(cluster, "VertexRoute", "gemini", "Ready", "False", "CredentialNotReady",
                   message="is not Ready (PermissionDenied): The operator's Google identity lacks permission")

    google.store.allow("resourcemanager.projects.setIamPolicy", "projects/my-vertex")
    await wait_for(cluster, "VertexCredential", "vertex", "Ready", "True", "Ready")
    await wait_for(cluster, "VertexRoute", "gemini", "Ready", "True")


async def test_spec_changes_move_the_grants(
        kube: KubeEmulator, cluster: Cluster, google: Google, start_operator: Any) -> None:
    google_projects(google)
    await start_operator(**google.endpoints)
    await create(cluster, o.namespace(), o.credential(**direct(projects=["my-vertex"])))
    await wait_for(cluster, "VertexCredential", "vertex", "Ready", "True", "Ready")
    project = project_resource("my-vertex")

    # Another service account name: the old account goes, its member's grant too.
    await cluster.patch("VertexCredential", o.NS, "vertex", {"spec": {"serviceAccountName": "vertex-v2"}})
    renamed = DIRECT.replace("/sa/vertex", "/sa/vertex-v2")

    async def moved() -> bool:
        return google.store.members(project, ROLE) == [renamed]
    await eventually(moved)
    await gone(cluster, "ServiceAccount", "vertex")
    assert await cluster.get("ServiceAccount", o.NS, "vertex-v2") is not None

    # Switching to manual: what the operator granted is revoked; the status says what to run.
    await cluster.patch("VertexCredential", o.NS, "vertex", {"spec": {
        "binding": {"backend": "manual"}, "workloadIdentity": {"projectNumber": "123456789012"}}})
    credential = await wait_for(cluster, "VertexCredential", "vertex", "Ready", "True", "ManualBinding")
    assert google.store.members(project, ROLE) == []
    assert credential["status"]["bindings"] == [] and renamed in credential["status"]["commands"][0]


async def test_deleting_waits_for_the_revocation(
        kube: KubeEmulator, cluster: Cluster, google: Google, start_operator: Any) -> None:
    google_projects(google)
    await start_operator(**google.endpoints)
    await create(cluster, o.namespace(), o.credential(**direct(projects=["my-vertex"])), o.route())
    await wait_for(cluster, "VertexRoute", "gemini", "Ready", "True")

    google.store.deny("resourcemanager.projects.setIamPolicy", "projects/my-vertex")
    await cluster.delete("VertexCredential", o.NS, "vertex")
    credential = await wait_for(cluster, "VertexCredential", "vertex", "Ready", "False", "DeletionBlocked")
    assert "kubectl patch vertexcredential vertex -n team-a" in condition(credential, "Ready")["message"]
    route = await wait_for(cluster, "VertexRoute", "gemini", "Ready", "False", "CredentialDeleted")
    assert "VertexCredential 'vertex' is being deleted" in condition(route, "Ready")["message"]

    google.store.allow("resourcemanager.projects.setIamPolicy", "projects/my-vertex")
    await gone(cluster, "VertexCredential", "vertex")
    assert google.store.members(project_resource("my-vertex"), ROLE) == []
    await wait_for(cluster, "VertexRoute", "gemini", "Ready", "False", "CredentialNotFound")


# ---------------------------------------------------------------- configConnector


async def test_config_connector_objects_and_their_readiness(
        kube: KubeEmulator, cluster: Cluster, start_operator: Any) -> None:
    kube.declare("iam.cnrm.cloud.google.com", "v1beta1", "iampolicymembers", "IAMPolicyMember")
    await start_operator()
    await create(cluster, o.namespace(), o.credential(
        workloadIdentity={"projectId": "my-gke", "gcpServiceAccount": GSA}, binding={"backend": "configConnector"}))
    credential = await wait_for(cluster, "VertexCredential", "vertex", "BindingReady", "Unknown", "Waiting")
    (entry,) = credential["status"]["bindings"]
    assert entry["backend"] == "configConnector"

    async def member_object() -> dict[str, Any]:
        found = kube.objects_of("iam.cnrm.cloud.google.com", "iampolicymembers")
        assert len(found) == 1
        return found[0]
    obj = await eventually(member_object)
    assert obj["spec"] == {"member": GKE_MEMBER, "role": WIU, "resourceRef": {
        "kind": "IAMServiceAccount", "external": f"projects/my-vertex/serviceAccounts/{GSA}"}}
    assert obj["metadata"]["ownerReferences"][0]["uid"] == credential["metadata"]["uid"]
    name = obj["metadata"]["name"]

    # Config Connector reports a failure, then success: mirrored into BindingReady.
    failed = {"conditions": [{"type": "Ready", "status": "False", "reason": "UpdateFailed",
                              "message": "Error 403: Permission iam.serviceAccounts.setIamPolicy denied"}]}
    await cluster.patch("IAMPolicyMember", o.NS, name, {"status": failed}, status=True)
    credential = await wait_for(cluster, "VertexCredential", "vertex", "Ready", "False", "ConfigConnectorNotReady")
    assert "Permission iam.serviceAccounts.setIamPolicy denied" in condition(credential, "Ready")["message"]
    ready = {"conditions": [{"type": "Ready", "status": "True", "reason": "UpToDate"}]}
    await cluster.patch("IAMPolicyMember", o.NS, name, {"status": ready}, status=True)
    await wait_for(cluster, "VertexCredential", "vertex", "Ready", "True", "Ready")

    await cluster.delete("VertexCredential", o.NS, "vertex")
    await gone(cluster, "VertexCredential", "vertex")
    assert await cluster.get("IAMPolicyMember", o.NS, name) is None
    assert await cluster.get("ServiceAccount", o.NS, "vertex") is None


async def test_config_connector_not_installed(kube: KubeEmulator, cluster: Cluster, operator: OperatorThread) -> None:
    await create(cluster, o.namespace(), o.credential(
        workloadIdentity={"projectId": "my-gke", "gcpServiceAccount": GSA}, binding={"backend": "configConnector"}))
    credential = await wait_for(cluster, "VertexCredential", "vertex", "Ready", "False", "ConfigConnectorMissing")
    assert "Config Connector is not installed" in condition(credential, "Ready")["message"]
    assert credential["status"]["bindings"] == []


# ---------------------------------------------------------------- federation and keys


async def test_federation_renders_its_configuration_and_pods_mount_it(
        kube: KubeEmulator, cluster: Cluster, operator: OperatorThread, tls_files: dict[str, Any]) -> None:
    await create(cluster, o.namespace(), o.credential(federation={"audience": PROVIDER}), o.route())
    credential = await wait_for(cluster, "VertexCredential", "vertex", "Ready", "True", "Ready")
    assert condition(credential, "BindingReady")["reason"] == "NothingToGrant"
    assert credential["status"]["member"].endswith("/subject/system:serviceaccount:team-a:vertex")
    cm = await cluster.get("ConfigMap", o.NS, "vertex-federation-vertex")
    assert cm is not None
    config = json.loads(cm["data"]["credential-configuration.json"])
    assert config["type"] == "external_account" and config["audience"] == PROVIDER.replace("https:", "")
    await wait_for(cluster, "VertexRoute", "gemini", "Ready", "True")

    admitted, _ = await Admission(operator, str(tls_files["ca"])).admit(pod())
    (volume,) = [v for v in admitted["spec"]["volumes"] if v["name"] == "vertex-federation"]
    sources = volume["projected"]["sources"]
    assert sources[0]["serviceAccountToken"]["audience"] == PROVIDER
    assert sources[1]["configMap"]["name"] == "vertex-federation-vertex"
    assert admitted["spec"]["serviceAccountName"] == "vertex"

    await cluster.delete("VertexCredential", o.NS, "vertex")
    await gone(cluster, "ConfigMap", "vertex-federation-vertex")  # owned: garbage-collected


async def test_federation_with_a_missing_config_map(kube: KubeEmulator, cluster: Cluster,
                                                    operator: OperatorThread) -> None:
    await create(cluster, o.namespace(), o.credential(
        federation={"audience": "my-audience", "credentialConfig": {"configMapName": "wif"}}))
    credential = await wait_for(cluster, "VertexCredential", "vertex", "Ready", "False", "CredentialConfigNotFound")
    assert "ConfigMap wif does not exist" in condition(credential, "Ready")["message"]
    await cluster.create({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "wif", "namespace": o.NS},
                          "data": {"credential-configuration.json": "{}"}})
    await wait_for(cluster, "VertexCredential", "vertex", "Ready", "True")


async def test_secret_key_works_but_is_warned(kube: KubeEmulator, cluster: Cluster, operator: OperatorThread) -> None:
    await create(cluster, o.namespace(), o.credential(secretRef={"name": "vertex-key"}))
    credential = await wait_for(cluster, "VertexCredential", "vertex", "Ready", "True", "Ready")
    assert condition(credential, "BindingReady")["reason"] == "NotApplicable"
    assert "long-lived service account key" in credential["status"]["warnings"][0]
    assert "long-lived service account key" in condition(credential, "Ready")["message"]
    assert await cluster.get("ServiceAccount", o.NS, "vertex") is not None
    await cluster.delete("VertexCredential", o.NS, "vertex")
    await gone(cluster, "ServiceAccount", "vertex")


async def test_federation_with_iam_api_grants_the_federated_principal(
        kube: KubeEmulator, cluster: Cluster, google: Google, start_operator: Any) -> None:
    google_projects(google)
    await start_operator(**google.endpoints)
    await create(cluster, o.namespace(), o.credential(
        federation={"audience": PROVIDER}, binding={"backend": "iamApi", "projects": ["my-vertex"]}))
    await wait_for(cluster, "VertexCredential", "vertex", "Ready", "True", "Ready")
    principal = ("principal://iam.googleapis.com/projects/42/locations/global/workloadIdentityPools/k8s/"
                 "subject/system:serviceaccount:team-a:vertex")
    assert google.store.members(project_resource("my-vertex"), ROLE) == [principal]
    await cluster.delete("VertexCredential", o.NS, "vertex")
    await gone(cluster, "VertexCredential", "vertex")
    assert google.store.members(project_resource("my-vertex"), ROLE) == []


@pytest.mark.parametrize("taken_by", ["annotation", "owner"])
async def test_service_account_of_another_credential(
        kube: KubeEmulator, cluster: Cluster, operator: OperatorThread, taken_by: str) -> None:
    await create(cluster, o.namespace(), o.credential("first", serviceAccountName="shared", secretRef={"name": "k"}))
    await wait_for(cluster, "VertexCredential", "first", "Ready", "True")
    if taken_by == "annotation":  # a user's account that "first" adopted
        await cluster.patch("ServiceAccount", o.NS, "shared", {"metadata": {"ownerReferences": None}})
    await cluster.create(o.credential("second", serviceAccountName="shared", secretRef={"name": "k"}))
    credential = await wait_for(cluster, "VertexCredential", "second", "Ready", "False", "ServiceAccountConflict")
    assert "'first'" in condition(credential, "Ready")["message"]
