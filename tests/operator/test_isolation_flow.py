"""sidecarOnly with the real operator against the emulated IAM and Resource Manager:
the dedicated pool's principal is bound, plain-KSA grants turn Isolated False, deleting the
credential removes only what the operator added."""

from __future__ import annotations

import json
from typing import Any

from tests.emulators.iam_policy import project_resource, service_account_resource
from tests.operator import objects as o
from tests.operator.conftest import Cluster, Google
from tests.operator.harness import KubeEmulator
from tests.operator.test_credentials_flow import condition, create, gone, wait_for

ROLE = "roles/aiplatform.user"
WIU = "roles/iam.workloadIdentityUser"
GSA = "caller@my-gke.iam.gserviceaccount.com"
POOL = {"poolId": "vertex-sidecar", "providerId": "prod-cluster"}
PRINCIPAL = ("principal://iam.googleapis.com/projects/123456789012/locations/global/workloadIdentityPools/"
             "vertex-sidecar/subject/system:serviceaccount:team-a:vertex")
GKE_PRINCIPAL = ("principal://iam.googleapis.com/projects/123456789012/locations/global/workloadIdentityPools/"
                 "my-gke.svc.id.goog/subject/ns/team-a/sa/vertex")
GKE_MEMBER = "serviceAccount:my-gke.svc.id.goog[team-a/vertex]"


def sidecar_only(gsa: str | None = None) -> dict[str, Any]:
    wi: dict[str, Any] = {"projectId": "my-gke", "projectNumber": "123456789012"}
    if gsa:
        wi["gcpServiceAccount"] = gsa
    return {"workloadIdentity": wi, "isolation": "sidecarOnly", "sidecarPool": POOL, "binding": {"backend": "iamApi"}}


async def test_pool_principal_is_bound_and_a_plain_grant_is_reported(
        kube: KubeEmulator, cluster: Cluster, google: Google, start_operator: Any) -> None:
    assert o.NS == "team-a"
    plain = {"role": ROLE, "members": ["group:ml@example.com", GKE_PRINCIPAL]}
    google.store.add_project("my-gke", "123456789012", [plain])
    await start_operator(resync_seconds=0.3, **google.endpoints)
    await create(cluster, o.namespace(), o.credential(**sidecar_only()))

    credential = await wait_for(cluster, "VertexCredential", "vertex", "Isolated", "False", "PlainPrincipalHasAccess")
    message = condition(credential, "Isolated")["message"]
    assert f"{ROLE} on projects/my-gke for {GKE_PRINCIPAL}" in message and "group:ml" not in message
    credential = await wait_for(cluster, "VertexCredential", "vertex", "Ready", "True", "Ready")
    assert "Warning: Containers other than the sidecar" in condition(credential, "Ready")["message"]
    assert credential["status"]["member"] == PRINCIPAL
    assert credential["status"]["bindings"] == [
        {"resource": "projects/my-gke", "role": ROLE, "member": PRINCIPAL, "backend": "iamApi"}]
    project = project_resource("my-gke")
    assert google.store.members(project, ROLE) == ["group:ml@example.com", GKE_PRINCIPAL, PRINCIPAL]
    config_map = await cluster.get("ConfigMap", o.NS, "vertex-federation-vertex")
    assert config_map is not None
    config = json.loads(config_map["data"]["credential-configuration.json"])
    assert config["audience"].endswith("/workloadIdentityPools/vertex-sidecar/providers/prod-cluster")

    # The platform team removes the plain grant: the next check says so.
    with google.store.lock:
        google.store.policies[project]["bindings"][0]["members"].remove(GKE_PRINCIPAL)
    credential = await wait_for(cluster, "VertexCredential", "vertex", "Isolated", "True", "NoPlainGrant")

    await cluster.delete("VertexCredential", o.NS, "vertex")
    await gone(cluster, "VertexCredential", "vertex")
    assert google.store.members(project, ROLE) == ["group:ml@example.com"]


async def test_google_service_account_through_the_pool(
        kube: KubeEmulator, cluster: Cluster, google: Google, start_operator: Any) -> None:
    google.store.add_project("my-gke", "123456789012")
    google.store.add_service_account(GSA, [{"role": WIU, "members": [GKE_MEMBER]}])
    await start_operator(**google.endpoints)
    await create(cluster, o.namespace(), o.credential(**sidecar_only(GSA)))
    credential = await wait_for(cluster, "VertexCredential", "vertex", "Isolated", "False", "PlainPrincipalHasAccess")
    assert GKE_MEMBER in condition(credential, "Isolated")["message"]
    resource = service_account_resource(GSA)
    assert google.store.members(resource, WIU) == [GKE_MEMBER, PRINCIPAL]
    ksa = await cluster.get("ServiceAccount", o.NS, "vertex")
    assert ksa is not None and "iam.gke.io/gcp-service-account" not in ksa["metadata"]["annotations"]

    await cluster.delete("VertexCredential", o.NS, "vertex")
    await gone(cluster, "VertexCredential", "vertex")
    assert google.store.members(resource, WIU) == [GKE_MEMBER]  # not ours: left alone


async def test_manual_backend_prints_setup_grants_and_check(
        kube: KubeEmulator, cluster: Cluster, start_operator: Any) -> None:
    await start_operator()
    spec = sidecar_only()
    spec["binding"] = {"backend": "manual"}
    spec["sidecarPool"] = {**POOL, "issuer": "https://issuer.example/c1"}
    await create(cluster, o.namespace(), o.credential(**spec))
    credential = await wait_for(cluster, "VertexCredential", "vertex", "Isolated", "Unknown", "Manual")
    commands = credential["status"]["commands"]
    assert commands[0].startswith("gcloud iam workload-identity-pools create vertex-sidecar")
    assert "--issuer-uri=https://issuer.example/c1" in commands[1]
    assert commands[2] == (f"gcloud projects add-iam-policy-binding my-gke --member={PRINCIPAL} "
                           f"--role={ROLE} --condition=None")
    assert commands[3].startswith("gcloud projects get-iam-policy my-gke")
