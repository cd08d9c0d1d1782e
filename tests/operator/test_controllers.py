"""`Controller` and `CredentialController` driven directly (no kopf), through the operator's
own `Kube` client against the emulated API server, and the emulated Google APIs: the
orderings that kopf makes possible but hard to hit in a flow test."""

from __future__ import annotations

import asyncio
import copy
from typing import Any, AsyncIterator

import kubernetes.client
import pytest
import pytest_asyncio
from kubernetes.client.exceptions import ApiException

from tests.emulators.iam_policy import project_resource
from tests.operator import objects as o
from tests.operator.conftest import Cluster, Google
from tests.operator.harness import KubeEmulator
from tests.operator.policies import TEST_POLICY
from vertex_operator import conditions as cond
from vertex_operator.controller import Controller, SyncError, retry_delay
from vertex_operator.credential_controller import CleanupPending, CredentialController
from vertex_operator.credential_reconcile import KCC_GROUP, KCC_PLURAL, KCC_VERSION, identity_of, policy_member_name
from vertex_operator.crd import FINALIZER, parse_credential
from vertex_operator.kube import Kube
from vertex_operator.options import Options
from vertex_operator.reconcile import route_record

ROLE = "roles/aiplatform.user"
MEMBER = ("principal://iam.googleapis.com/projects/123456789012/locations/global/workloadIdentityPools/"
          "my-gke.svc.id.goog/subject/ns/team-a/sa/vertex")


@pytest_asyncio.fixture()
async def api(kube: KubeEmulator) -> AsyncIterator[Kube]:
    configuration = kubernetes.client.Configuration()
    configuration.host = str(kube.url).rstrip("/")
    client = Kube(configuration)
    yield client
    client.close()


def options(google: Google | None = None, **extra: Any) -> Options:
    endpoints = google.endpoints if google is not None else {}
    return Options(webhook=False, metrics_port=None, binding_recheck_seconds=0.2, resync_seconds=60,
                   iam_propagation_seconds=0, iam_retry_seconds=0.01, policy=TEST_POLICY, **endpoints, **extra)


# ---------------------------------------------------------------- route status


def status(selected: int) -> dict[str, Any]:
    return {"observedGeneration": 1, "selectedWorkloads": selected,
            "conditions": [cond.condition("Ready", True, "Ready", f"Serving {selected} workload(s).", 1)]}


async def test_route_status_is_not_skipped_because_the_index_lags(cluster: Cluster, api: Kube) -> None:
    await cluster.create(o.namespace())
    body = await cluster.create(o.route())
    controller = Controller(options(), kube=api)
    indexed = route_record(body)  # the index has not seen any status write yet
    await controller._apply_status(indexed, status(1))
    # The index catches up with the first write, then the workload goes away: 0 is written.
    indexed = route_record(await cluster.get("VertexRoute", o.NS, "gemini"))  # type: ignore[arg-type]
    await controller._apply_status(indexed, status(0))
    # The workload is back before the index saw the second write: its copy still says 1,
    # which is no reason to skip writing 1 over the 0 that is stored.
    await controller._apply_status(indexed, status(1))
    stored = await cluster.get("VertexRoute", o.NS, "gemini")
    assert stored is not None and stored["status"]["selectedWorkloads"] == 1


# ---------------------------------------------------------------- sync errors


def test_retry_delays_grow_to_a_ceiling() -> None:
    delays = [retry_delay(n) for n in range(10)]
    assert delays[:4] == [5.0, 10.0, 20.0, 40.0]
    assert delays == sorted(delays) and delays[-1] == 300.0


def test_which_sync_failures_are_permanent() -> None:
    refused = [("Deployment/a", ApiException(status=403)), ("Deployment/b", ApiException(status=422))]
    assert SyncError(refused).permanent
    for transient in (ApiException(status=409), ApiException(status=429), ApiException(status=500),
                      ApiException(status=401), ConnectionError("reset")):
        assert not SyncError([*refused, ("x", transient)]).permanent
    message = str(SyncError(refused))
    assert message.startswith("Deployment/a: 403") and "Deployment/b: 422" in message


# ---------------------------------------------------------------- credential deletion


async def created_credential(cluster: Cluster, **spec: Any) -> dict[str, Any]:
    await cluster.create(o.namespace())
    body = o.credential(**spec)
    body["metadata"]["finalizers"] = [FINALIZER]  # as kopf sets it
    return await cluster.create(body)


async def deleting(cluster: Cluster) -> dict[str, Any]:
    await cluster.delete("VertexCredential", o.NS, "vertex")
    found = await cluster.get("VertexCredential", o.NS, "vertex")
    assert found is not None and found["metadata"]["deletionTimestamp"]
    return found


def direct(projects: list[str]) -> dict[str, Any]:
    return {"workloadIdentity": {"projectId": "my-gke", "projectNumber": "123456789012"},
            "binding": {"backend": "iamApi", "projects": projects}}


async def test_a_reconcile_queued_behind_the_finalizer_grants_nothing(
        cluster: Cluster, api: Kube, google: Google) -> None:
    google.store.add_project("my-vertex", "222")
    body = await created_credential(cluster, **direct(["my-vertex"]))
    controller = CredentialController(options(google), kube=api)
    try:
        await controller.reconcile(body)
        project = project_resource("my-vertex")
        assert google.store.members(project, ROLE) == [MEMBER]
        gone = await deleting(cluster)
        # The credential's daemon woke up just before the deletion and waits for the lock
        # that the finalizer holds; kopf gives both the same (live) body.
        finalizing = asyncio.ensure_future(controller.finalize(gone))
        await asyncio.sleep(0)
        late = asyncio.ensure_future(controller.reconcile(gone, trigger="credential-recheck"))
        await asyncio.gather(finalizing, late)
    finally:
        await controller.close()
    assert google.store.members(project, ROLE) == []
    assert await cluster.get("ServiceAccount", o.NS, "vertex") is None


async def test_blocked_deletion_backs_off_and_reports_once(
        kube: KubeEmulator, cluster: Cluster, api: Kube, google: Google) -> None:
    google.store.add_project("my-vertex", "222")
    body = await created_credential(cluster, **direct(["my-vertex"]))
    controller = CredentialController(options(google), kube=api)
    try:
        await controller.reconcile(body)
        google.store.deny("resourcemanager.projects.setIamPolicy", "projects/my-vertex")
        gone = await deleting(cluster)
        delays, writes = [], []
        for _ in range(3):
            since = len(kube._requests)
            with pytest.raises(CleanupPending) as pending:
                await controller.finalize(gone)
            delays.append(pending.value.delay)
            writes.append(sum(1 for r in list(kube._requests)[since:] if r.method.value == "PATCH"))
    finally:
        await controller.close()
    assert delays == [0.2, 0.4, 0.8]
    assert writes == [1, 0, 0]  # the first retry says why; the next ones change nothing
    stored = await cluster.get("VertexCredential", o.NS, "vertex")
    ready = cond.find(stored["status"]["conditions"], "Ready")  # type: ignore[index]
    assert ready is not None and ready["reason"] == "DeletionBlocked"


async def test_deletion_waiting_for_config_connector_says_how_to_give_up(
        kube: KubeEmulator, cluster: Cluster, api: Kube) -> None:
    kube.declare(KCC_GROUP, KCC_VERSION, KCC_PLURAL, "IAMPolicyMember")
    gsa = "caller@my-vertex.iam.gserviceaccount.com"
    body = await created_credential(cluster, workloadIdentity={"projectId": "my-gke", "gcpServiceAccount": gsa},
                                    binding={"backend": "configConnector"})
    controller = CredentialController(options(), kube=api)
    await controller.reconcile(body)
    # Config Connector's own finalizer, which it never removes (it lacks the permission, or
    # was uninstalled): the object stays, and so does the grant in the ledger.
    (grant,) = identity_of(parse_credential(body)).grants
    name = policy_member_name("vertex", grant)
    await cluster.patch("IAMPolicyMember", o.NS, name, {"metadata": {"finalizers": ["cnrm.cloud.google.com/finalizer"]}})
    gone = await deleting(cluster)
    delays = []
    for _ in range(2):
        with pytest.raises(CleanupPending) as pending:
            await controller.finalize(copy.deepcopy(gone))
        delays.append(pending.value.delay)
    assert delays == [0.2, 0.4]
    stored = await cluster.get("VertexCredential", o.NS, "vertex")
    ready = cond.find(stored["status"]["conditions"], "Ready")  # type: ignore[index]
    assert ready is not None and ready["reason"] == "DeletionBlocked"
    assert f"IAMPolicyMember {name}" in ready["message"] and "remove the finalizer" in ready["message"]


async def test_failed_handlers_are_retried_later_and_later() -> None:
    import kopf

    from vertex_operator.handlers import credentials, routes

    class Failing:
        options = options()

        async def sync(self, *args: Any, **kwargs: Any) -> None:
            raise ApiException(status=500, reason="Internal Server Error")

        @property
        def credentials(self) -> "Failing":
            return self

        async def reconcile(self, *args: Any, **kwargs: Any) -> None:
            raise ApiException(status=503, reason="Service Unavailable")

    memo = kopf.Memo(controller=Failing())
    for retry, delay in ((0, 5.0), (3, 40.0), (20, 300.0)):
        with pytest.raises(kopf.TemporaryError) as caught:
            await routes.route_changed(namespace=o.NS, retry=retry, memo=memo)
        assert caught.value.delay == delay and "500 Internal Server Error" in str(caught.value)
        with pytest.raises(kopf.TemporaryError) as caught:
            await credentials.credential_reconcile(body=o.credential(), retry=retry, memo=memo, logger=None)
        assert caught.value.delay == delay and "503 Service Unavailable" in str(caught.value)
