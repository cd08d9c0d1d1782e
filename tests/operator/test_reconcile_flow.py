"""The real operator (kopf) against the emulated API server: routes, credentials, workloads."""

from __future__ import annotations

import urllib.request
from typing import Any

from tests.operator import objects as o
from tests.operator.conftest import OPERATOR_AGENTS, Cluster, OperatorThread, eventually
from tests.operator.harness import KubeEmulator

HASH = "vertex.passthrough.dev/config-hash"
ROUTE = "vertex.passthrough.dev/route"
WRITES = ("POST", "PATCH", "PUT", "DELETE")


def condition(obj: dict[str, Any] | None, type_: str) -> dict[str, Any]:
    assert obj is not None
    found = [c for c in (obj.get("status") or {}).get("conditions") or [] if c["type"] == type_]
    assert found, f"no {type_} condition in {obj.get('status')}"
    return found[0]


def template_annotations(obj: dict[str, Any] | None) -> dict[str, str]:
    assert obj is not None
    return obj["spec"]["template"]["metadata"].get("annotations") or {}


def operator_writes(kube: KubeEmulator, since: int = 0) -> list[str]:
    return [f"{r.method.value} {r.url.path}" for r in list(kube._requests)[since:]
            if r.headers.get("User-Agent", "").startswith(OPERATOR_AGENTS) and r.method.value in WRITES]


async def setup_namespace(cluster: Cluster, credential: bool = True) -> None:
    await cluster.create(o.namespace())
    if credential:
        await cluster.create(o.credential())


async def wait_annotations(cluster: Cluster, name: str, kind: str = "Deployment", **expected: str | None) -> dict[str, Any]:
    async def check() -> dict[str, Any]:
        obj = await cluster.get(kind, o.NS, name)
        annotations = template_annotations(obj)
        for key, value in expected.items():
            assert annotations.get(key) == value, (key, annotations)
        return obj  # type: ignore[return-value]
    return await eventually(check)


async def wait_condition(cluster: Cluster, name: str, type_: str, status: str, reason: str | None = None,
                         generation: int | None = None) -> dict[str, Any]:
    async def check() -> dict[str, Any]:
        route = await cluster.get("VertexRoute", o.NS, name)
        found = condition(route, type_)
        assert found["status"] == status, found
        if reason is not None:
            assert found["reason"] == reason, found
        if generation is not None:
            assert found["observedGeneration"] == generation, found
        return route  # type: ignore[return-value]
    return await eventually(check)


async def test_create_renders_config_configures_workloads_and_reports(
        kube: KubeEmulator, cluster: Cluster, operator: OperatorThread) -> None:
    await setup_namespace(cluster)
    await cluster.create(o.deployment())
    await cluster.create(o.deployment("batch", labels={"app": "chat"}, kind="StatefulSet"))
    await cluster.create(o.deployment("agent", labels={"app": "chat"}, kind="DaemonSet"))
    await cluster.create(o.deployment("other"))
    await cluster.create(o.route())

    route = await wait_condition(cluster, "gemini", "ConfigReady", "True", "Rendered")
    await eventually(lambda: _selected(cluster, 3))
    route = await cluster.get("VertexRoute", o.NS, "gemini")
    assert route["status"]["workloads"] == ["DaemonSet/agent", "Deployment/chat", "StatefulSet/batch"]
    assert route["metadata"]["finalizers"] == ["vertex.passthrough.dev/finalizer"]
    config_hash = route["status"]["configHash"]

    dep = await wait_annotations(cluster, "chat", **{HASH: config_hash, ROUTE: "gemini"})
    await wait_annotations(cluster, "batch", kind="StatefulSet", **{HASH: config_hash, ROUTE: "gemini"})
    await wait_annotations(cluster, "agent", kind="DaemonSet", **{HASH: config_hash, ROUTE: "gemini"})
    assert template_annotations(await cluster.get("Deployment", o.NS, "other")) == {}
    # Workloads are only watched: no kopf bookkeeping lands on them.
    assert not dep["metadata"].get("annotations") and not dep["metadata"].get("finalizers")

    cm = await cluster.get("ConfigMap", o.NS, "vertex-sidecar-gemini")
    assert cm is not None
    assert cm["metadata"]["labels"] == {"app.kubernetes.io/managed-by": "vertex-operator",
                                        "vertex.passthrough.dev/route": "gemini"}
    assert cm["metadata"]["ownerReferences"] == [{
        "apiVersion": "vertex.passthrough.dev/v1alpha1", "kind": "VertexRoute", "name": "gemini",
        "uid": route["metadata"]["uid"], "controller": True}]
    assert "models:\n    - gemini-*" in cm["data"]["config.yaml"]

    # The credential's own controller makes it Ready (backend manual: nothing to wait for).
    route = await wait_condition(cluster, "gemini", "Ready", "True", "Ready")
    credential = await cluster.get("VertexCredential", o.NS, "vertex")
    assert condition(credential, "Ready")["reason"] == "ManualBinding"

    # The operator's own metrics.
    from vertex_operator import metrics
    assert metrics.REGISTRY.get_sample_value(
        "vertex_operator_reconciles_total", {"trigger": "route", "result": "success"}) >= 1


async def test_policy_change_updates_config_in_place_and_pod_change_rolls_out(
        kube: KubeEmulator, cluster: Cluster, operator: OperatorThread) -> None:
    await setup_namespace(cluster)
    await cluster.create(o.deployment())
    await cluster.create(o.route())
    route = await wait_condition(cluster, "gemini", "ConfigReady", "True", generation=1)
    first_hash = route["status"]["configHash"]
    await wait_annotations(cluster, "chat", **{HASH: first_hash})
    dep_rv = (await cluster.get("Deployment", o.NS, "chat"))["metadata"]["resourceVersion"]

    # Policy only: the ConfigMap changes, the pods stay.
    await cluster.patch("VertexRoute", o.NS, "gemini", {"spec": {"match": {"models": ["claude-*"]}}})

    async def config_updated() -> bool:
        cm = await cluster.get("ConfigMap", o.NS, "vertex-sidecar-gemini")
        return "claude-*" in cm["data"]["config.yaml"]  # type: ignore[index]

    await eventually(config_updated)
    route = await wait_condition(cluster, "gemini", "ConfigReady", "True", generation=2)
    assert route["status"]["configHash"] == first_hash
    assert route["status"]["observedGeneration"] == 2
    assert (await cluster.get("Deployment", o.NS, "chat"))["metadata"]["resourceVersion"] == dep_rv

    # A new image needs new pods: the pod template annotation is bumped.
    await cluster.patch("VertexRoute", o.NS, "gemini", {"spec": {"sidecar": {"image": "registry.test/other:2"}}})
    route = await wait_condition(cluster, "gemini", "ConfigReady", "True", generation=3)
    assert route["status"]["configHash"] != first_hash
    await wait_annotations(cluster, "chat", **{HASH: route["status"]["configHash"]})


async def test_delete_rolls_back_and_collects_the_config_map(
        kube: KubeEmulator, cluster: Cluster, operator: OperatorThread) -> None:
    await setup_namespace(cluster)
    await cluster.create(o.deployment())
    await cluster.create(o.route())
    await wait_annotations(cluster, "chat", **{ROUTE: "gemini"})
    assert await cluster.get("ConfigMap", o.NS, "vertex-sidecar-gemini") is not None

    await cluster.delete("VertexRoute", o.NS, "gemini")
    await wait_annotations(cluster, "chat", **{HASH: "none", ROUTE: None})

    async def gone() -> bool:
        return (await cluster.get("VertexRoute", o.NS, "gemini") is None
                and await cluster.get("ConfigMap", o.NS, "vertex-sidecar-gemini") is None)

    await eventually(gone)


async def test_restart_resumes_without_duplicate_work(
        kube: KubeEmulator, cluster: Cluster, start_operator: Any) -> None:
    from vertex_operator import metrics

    first = await start_operator()
    await setup_namespace(cluster)
    await cluster.create(o.deployment())
    await cluster.create(o.route())
    await wait_condition(cluster, "gemini", "ConfigReady", "True")
    await wait_annotations(cluster, "chat", **{ROUTE: "gemini"})
    await eventually(lambda: _credential_ready(cluster))
    route_before = await cluster.get("VertexRoute", o.NS, "gemini")
    dep_before = await cluster.get("Deployment", o.NS, "chat")
    await first.stop()

    def resumed() -> float:
        return metrics.REGISTRY.get_sample_value(
            "vertex_operator_reconciles_total", {"trigger": "route", "result": "success"}) or 0

    count, since = resumed(), len(kube._requests)
    await start_operator()

    async def resumed_once() -> bool:
        return resumed() > count

    await eventually(resumed_once)
    assert operator_writes(kube, since) == []
    assert await cluster.get("VertexRoute", o.NS, "gemini") == route_before
    assert await cluster.get("Deployment", o.NS, "chat") == dep_before


async def test_credential_that_appears_later(kube: KubeEmulator, cluster: Cluster, operator: OperatorThread) -> None:
    await setup_namespace(cluster, credential=False)
    await cluster.create(o.deployment())
    await cluster.create(o.route())
    route = await wait_condition(cluster, "gemini", "Ready", "False", "CredentialNotFound")
    message = condition(route, "Ready")["message"]
    assert "VertexCredential 'vertex' does not exist in namespace 'team-a'" in message
    assert "kubectl get vertexcredentials -n team-a" in message
    assert await cluster.get("ConfigMap", o.NS, "vertex-sidecar-gemini") is None
    assert template_annotations(await cluster.get("Deployment", o.NS, "chat")) == {}

    await cluster.create(o.credential())
    route = await wait_condition(cluster, "gemini", "ConfigReady", "True")
    await wait_annotations(cluster, "chat", **{HASH: route["status"]["configHash"], ROUTE: "gemini"})
    assert await cluster.get("ConfigMap", o.NS, "vertex-sidecar-gemini") is not None
    await wait_condition(cluster, "gemini", "Ready", "True")


async def test_two_routes_select_the_same_workload(
        kube: KubeEmulator, cluster: Cluster, operator: OperatorThread) -> None:
    await setup_namespace(cluster)
    await cluster.create(o.deployment())
    await cluster.create(o.route("first"))
    await wait_annotations(cluster, "chat", **{ROUTE: "first"})
    # "first" is older (or, within the same second, sorts first by name).
    await cluster.create(o.route("second"))

    loser = await wait_condition(cluster, "second", "Conflict", "True", "SelectedByOlderRoute")
    assert condition(loser, "Ready")["reason"] == "Conflict"
    assert "Deployment/chat also selected by VertexRoute 'first'" in condition(loser, "Ready")["message"]
    assert loser["status"]["selectedWorkloads"] == 0
    winner = await wait_condition(cluster, "first", "Conflict", "True", "AlsoSelectedByNewerRoute")
    assert winner["status"]["selectedWorkloads"] == 1
    assert template_annotations(await cluster.get("Deployment", o.NS, "chat"))[ROUTE] == "first"

    # The winner goes away: the other route takes over, and the conflict clears.
    await cluster.delete("VertexRoute", o.NS, "first")
    await wait_annotations(cluster, "chat", **{ROUTE: "second"})
    await wait_condition(cluster, "second", "Conflict", "False", "NoOverlap")


async def test_workloads_that_come_and_go(kube: KubeEmulator, cluster: Cluster, operator: OperatorThread) -> None:
    await setup_namespace(cluster)
    await cluster.create(o.route())
    await wait_condition(cluster, "gemini", "ConfigReady", "True")

    await cluster.create(o.deployment())
    await wait_annotations(cluster, "chat", **{ROUTE: "gemini"})
    await eventually(lambda: _selected(cluster, 1))

    # Relabelled out of the route's selector: rolled back to no sidecar.
    await cluster.patch("Deployment", o.NS, "chat",
                        {"spec": {"template": {"metadata": {"labels": {"app": "elsewhere"}}}}})
    await wait_annotations(cluster, "chat", **{HASH: "none", ROUTE: None})
    await eventually(lambda: _selected(cluster, 0))


async def _credential_ready(cluster: Cluster) -> bool:
    """Ready, and kopf done with it (no more events of it to re-sync routes on)."""
    credential = await cluster.get("VertexCredential", o.NS, "vertex")
    annotations = credential["metadata"].get("annotations") or {}  # type: ignore[index]
    return (condition(credential, "Ready")["status"] == "True"
            and "vertex.passthrough.dev/last-handled-configuration" in annotations
            and not any(k.startswith("vertex.passthrough.dev/credential_") for k in annotations))


async def _selected(cluster: Cluster, count: int) -> bool:
    route = await cluster.get("VertexRoute", o.NS, "gemini")
    return route is not None and route.get("status", {}).get("selectedWorkloads") == count


async def test_rollout_strategy_none(kube: KubeEmulator, cluster: Cluster, operator: OperatorThread) -> None:
    await setup_namespace(cluster)
    await cluster.create(o.deployment())
    await cluster.create(o.route(sidecar={"rolloutStrategy": "None"}))
    await wait_condition(cluster, "gemini", "ConfigReady", "True")
    await eventually(lambda: _selected(cluster, 1))
    await cluster.delete("VertexRoute", o.NS, "gemini")
    await eventually(lambda: _gone(cluster))
    assert template_annotations(await cluster.get("Deployment", o.NS, "chat")) == {}
    assert not [w for w in operator_writes(kube) if "/deployments/" in w]


async def _gone(cluster: Cluster) -> bool:
    return await cluster.get("VertexRoute", o.NS, "gemini") is None


async def test_hand_edited_config_map_is_repaired_on_resync(
        kube: KubeEmulator, cluster: Cluster, start_operator: Any) -> None:
    await start_operator(resync_seconds=0.2)
    await setup_namespace(cluster)
    await cluster.create(o.route())
    await wait_condition(cluster, "gemini", "ConfigReady", "True")
    await cluster.patch("ConfigMap", o.NS, "vertex-sidecar-gemini", {"data": {"config.yaml": "routes: []\n"}})

    async def repaired() -> bool:
        cm = await cluster.get("ConfigMap", o.NS, "vertex-sidecar-gemini")
        return "gemini-*" in cm["data"]["config.yaml"]  # type: ignore[index]

    await eventually(repaired)


async def test_metrics_endpoint(kube: KubeEmulator, cluster: Cluster, start_operator: Any) -> None:
    from vertex_operator.metrics import MetricsServer

    server = MetricsServer("127.0.0.1", 0)
    port = server.start()
    try:
        await setup_namespace(cluster)
        await start_operator(metrics_port=None)
        await cluster.create(o.route())
        await wait_condition(cluster, "gemini", "ConfigReady", "True")
        # Closed at once: an open keep-alive connection holds the server's shutdown.
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
            text = response.read().decode()
    finally:
        server.stop()
    assert 'vertex_operator_reconciles_total{result="success",trigger="route"}' in text
    assert "vertex_operator_reconcile_duration_seconds_bucket" in text
    assert 'vertex_operator_writes_total{action="create",kind="ConfigMap"}' in text


async def test_api_errors_are_retried_and_reported_as_events(
        kube: KubeEmulator, cluster: Cluster, operator: OperatorThread) -> None:
    await setup_namespace(cluster)
    await eventually(lambda: _credential_ready(cluster))  # its status events re-sync routes too
    kube.fail("POST", r"/namespaces/team-a/configmaps$", status=500)
    await cluster.create(o.route())
    await wait_condition(cluster, "gemini", "ConfigReady", "True")  # after kopf's retry

    async def event_posted() -> bool:
        return any(r.method.value == "POST" and r.url.path.endswith("/events")
                   and r.headers.get("User-Agent", "").startswith("kopf/") for r in kube._requests)

    await eventually(event_posted)
    from vertex_operator import metrics
    assert (metrics.REGISTRY.get_sample_value("vertex_operator_errors_total", {"stage": "reconcile"}) or 0) >= 1


async def test_config_the_sidecar_refuses_keeps_the_last_good_one(
        kube: KubeEmulator, cluster: Cluster, operator: OperatorThread) -> None:
    await setup_namespace(cluster)
    await cluster.create(o.route())
    await wait_condition(cluster, "gemini", "ConfigReady", "True")
    good = (await cluster.get("ConfigMap", o.NS, "vertex-sidecar-gemini"))["data"]  # type: ignore[index]
    # Passes the CRD schema, refused by the sidecar's: the fallback is outside match.locations.
    await cluster.patch("VertexRoute", o.NS, "gemini", {"spec": {
        "match": {"models": ["gemini-*"], "locations": ["europe-*"]}, "fallbackLocations": ["us-east1"]}})
    route = await wait_condition(cluster, "gemini", "ConfigReady", "False", "InvalidConfig", generation=2)
    assert "'us-east1' is not allowed by match.locations" in condition(route, "ConfigReady")["message"]
    assert (await cluster.get("ConfigMap", o.NS, "vertex-sidecar-gemini"))["data"] == good  # type: ignore[index]


async def test_changes_made_while_the_operator_was_down(
        kube: KubeEmulator, cluster: Cluster, start_operator: Any) -> None:
    first = await start_operator()
    await setup_namespace(cluster)
    await cluster.create(o.deployment())
    await cluster.create(o.route())
    await wait_annotations(cluster, "chat", **{ROUTE: "gemini"})
    await first.stop()

    await cluster.patch("VertexRoute", o.NS, "gemini", {"spec": {"match": {"models": ["claude-*"]}}})
    await cluster.delete("Deployment", o.NS, "chat")
    await cluster.create(o.deployment("chat-v2", labels={"app": "chat"}))
    await start_operator()

    async def caught_up() -> bool:
        cm = await cluster.get("ConfigMap", o.NS, "vertex-sidecar-gemini")
        route = await cluster.get("VertexRoute", o.NS, "gemini")
        return ("claude-*" in cm["data"]["config.yaml"]  # type: ignore[index]
                and route["status"]["workloads"] == ["Deployment/chat-v2"])  # type: ignore[index]

    await eventually(caught_up)
    await wait_annotations(cluster, "chat-v2", **{ROUTE: "gemini"})


async def test_one_refused_workload_write_does_not_stop_the_rest(
        kube: KubeEmulator, cluster: Cluster, operator: OperatorThread) -> None:
    await setup_namespace(cluster)
    # An admission policy refuses every change to this one Deployment (sorted before "chat").
    kube.fail("PATCH", r"/deployments/billing$", status=403, times=10**6)
    await cluster.create(o.deployment("billing", labels={"app": "chat"}))
    await cluster.create(o.deployment())
    await cluster.create(o.route())
    route = await wait_condition(cluster, "gemini", "ConfigReady", "True")
    await wait_annotations(cluster, "chat", **{HASH: route["status"]["configHash"], ROUTE: "gemini"})
    await eventually(lambda: _selected(cluster, 2))
    assert template_annotations(await cluster.get("Deployment", o.NS, "billing")) == {}


async def test_route_deletion_is_not_held_by_a_refused_rollback(
        kube: KubeEmulator, cluster: Cluster, operator: OperatorThread) -> None:
    await setup_namespace(cluster)
    await cluster.create(o.deployment())
    await cluster.create(o.route())
    await wait_annotations(cluster, "chat", **{ROUTE: "gemini"})
    kube.fail("PATCH", r"/deployments/chat$", status=403, times=10**6)
    await cluster.delete("VertexRoute", o.NS, "gemini")
    await eventually(lambda: _gone(cluster))
    # Left as it was, and said so (an Event of the route, and the operator's log).
    assert template_annotations(await cluster.get("Deployment", o.NS, "chat"))[ROUTE] == "gemini"


async def test_a_route_in_a_namespace_that_is_never_injected_serves_nothing(
        kube: KubeEmulator, cluster: Cluster, operator: OperatorThread) -> None:
    ns = operator.options.operator_namespace
    await cluster.create(o.namespace(ns))
    await cluster.create(o.credential(ns=ns))
    await cluster.create(o.deployment(ns=ns))
    await cluster.create(o.route(ns=ns))

    async def explained() -> dict[str, Any]:
        route = await cluster.get("VertexRoute", ns, "gemini")
        ready = condition(route, "Ready")
        assert (ready["status"], ready["reason"]) == ("False", "NamespaceExcluded"), ready
        return route  # type: ignore[return-value]

    route = await eventually(explained)
    assert f"Namespace {ns!r} is never injected" in condition(route, "Ready")["message"]
    assert template_annotations(await cluster.get("Deployment", ns, "chat")) == {}  # no pointless rollout
    assert not [w for w in operator_writes(kube) if "/deployments/" in w]


async def test_a_refused_config_map_holds_the_rollout_and_is_reported(
        kube: KubeEmulator, cluster: Cluster, operator: OperatorThread) -> None:
    await setup_namespace(cluster)
    await cluster.create(o.deployment())
    kube.fail("POST", r"/namespaces/team-a/configmaps$", status=403, times=10**6)  # e.g. a quota
    await cluster.create(o.route())
    route = await wait_condition(cluster, "gemini", "ConfigReady", "False", "ConfigMapNotWritten")
    assert condition(route, "Ready")["reason"] == "ConfigMapNotWritten"
    assert "Writing ConfigMap vertex-sidecar-gemini failed: 403" in condition(route, "Ready")["message"]
    # Pods of a new rollout would wait for the missing ConfigMap: nothing is rolled.
    assert template_annotations(await cluster.get("Deployment", o.NS, "chat")) == {}
