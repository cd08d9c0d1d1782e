"""The repair loop: running pods a route selects without its (current) sidecar are found,
reported (status, Event, metric) and, with spec.rollout.repair, their workload restarted."""

from __future__ import annotations

import asyncio
from typing import Any

from tests.operator import objects as o
from tests.operator.conftest import Cluster, eventually
from tests.operator.harness import KubeEmulator
from vertex_operator import inject, repair
from vertex_operator.crd import CONFIG_HASH_ANNOTATION, parse_credential, parse_route

IMAGE = "registry.test/vertex-sidecar:test"


def plan() -> inject.SidecarPlan:
    route = parse_route({**o.route(), "metadata": {"name": "gemini", "namespace": o.NS, "uid": "u"}})
    credential = parse_credential({**o.credential(), "metadata": {"name": "vertex", "namespace": o.NS}})
    return inject.plan_sidecar(route, credential, default_image=IMAGE, server_version=(1, 31))


def pod(name: str = "chat-abc12-x1y2z", *, sidecar_image: str | None = None, phase: str = "Running",
        config_hash: str | None = None, owner: tuple[str, str] | None = ("ReplicaSet", "chat-abc12"),
        **annotations: str) -> dict[str, Any]:
    containers: list[dict[str, Any]] = [{"name": "app", "image": "app:1"}]
    if sidecar_image is not None:
        containers.append({"name": inject.CONTAINER_NAME, "image": sidecar_image})
    if config_hash is not None:
        annotations[CONFIG_HASH_ANNOTATION] = config_hash
    meta: dict[str, Any] = {"name": name, "namespace": o.NS, "annotations": annotations,
                            "labels": {"app": "chat", "pod-template-hash": "abc12"}}
    if owner is not None:
        meta["ownerReferences"] = [{"apiVersion": "apps/v1", "kind": owner[0], "name": owner[1],
                                    "uid": "rs-uid", "controller": True}]
    return {"apiVersion": "v1", "kind": "Pod", "metadata": meta,
            "spec": {"containers": containers}, "status": {"phase": phase}}


# ---------------------------------------------------------------- pure


def test_what_is_wrong_with_a_pod() -> None:
    p = plan()
    assert repair.classify(pod(), p) == ("missing", "no sidecar")
    assert repair.classify(pod(sidecar_image="old:1"), p) == ("outdated", "sidecar image old:1")
    assert repair.classify(pod(sidecar_image=IMAGE, config_hash="0ld"), p) == ("outdated", "config hash 0ld")
    assert repair.classify(pod(sidecar_image=IMAGE, config_hash=p.config_hash), p) is None
    assert repair.classify(pod(phase="Pending"), p) is None  # not running (yet)
    assert repair.classify(pod(**{"vertex.passthrough.dev/inject": "false"}), p) is None  # opted out


def test_the_workload_to_restart() -> None:
    assert repair.owner(pod()) == ("Deployment", "chat")
    assert repair.owner(pod(owner=("StatefulSet", "db"))) == ("StatefulSet", "db")
    assert repair.owner(pod(owner=("ReplicaSet", "handmade"))) is None  # not a Deployment's
    assert repair.owner(pod(owner=None)) is None


def test_findings_list_a_few_pods_and_say_what_to_do() -> None:
    found = repair.Findings()
    for i in range(7):
        found.add(pod(f"chat-abc12-{i}"), "missing", "no sidecar")
    status = found.status()
    assert (status["count"], status["missing"], len(status["pods"])) == (7, 7, repair.LISTED)
    assert "and 2 more" in found.message() and "spec.rollout.repair: true" in found.message()


# ---------------------------------------------------------------- against the API server


async def create_running(cluster: Cluster, body: dict[str, Any]) -> None:
    status = body.pop("status")
    await cluster.create(body)
    meta = body["metadata"]
    await cluster._call(cluster.core.patch_namespaced_pod_status, meta["name"], meta["namespace"],
                        {"status": status}, _content_type="application/merge-patch+json")


def gauge(route: str, problem: str) -> float | None:
    from vertex_operator import metrics

    return metrics.REGISTRY.get_sample_value("vertex_operator_pods_without_sidecar",
                                             {"namespace": o.NS, "route": route, "problem": problem})


def restarts(kind: str) -> float:
    from vertex_operator import metrics

    return metrics.REGISTRY.get_sample_value("vertex_operator_repair_restarts_total", {"kind": kind}) or 0.0


async def test_a_pod_that_started_without_the_sidecar_is_reported_then_repaired(
        kube: KubeEmulator, cluster: Cluster, start_operator: Any) -> None:
    await start_operator(repair_seconds=0.2, repair_backoff_seconds=3600)
    await cluster.create(o.namespace())
    await cluster.create(o.credential())
    await cluster.create(o.deployment())
    await cluster.create(o.route())

    async def config_hash() -> str:
        route = await cluster.get("VertexRoute", o.NS, "gemini")
        assert route is not None and (route.get("status") or {}).get("configHash")
        return str(route["status"]["configHash"])
    current = await eventually(config_hash)
    # The emulated API server calls no webhook: these pods are what a cluster gets when the
    # webhook did not answer (failurePolicy Ignore) — and one healthy pod for comparison.
    await create_running(cluster, pod("chat-abc12-bare1"))
    await create_running(cluster, pod("chat-abc12-good1", sidecar_image=IMAGE, config_hash=current))

    async def reported() -> dict[str, Any]:
        route = await cluster.get("VertexRoute", o.NS, "gemini")
        found = (route or {}).get("status", {}).get("podsWithoutSidecar")
        assert found is not None and found["count"] == 1, found
        return found  # type: ignore[no-any-return]
    found = await eventually(reported)
    assert found == {"count": 1, "missing": 1, "outdated": 0, "pods": ["chat-abc12-bare1 (no sidecar)"],
                     "restarted": []}
    assert gauge("gemini", "missing") == 1 and gauge("gemini", "outdated") == 0
    events = [e for e in kube.objects_of("", "events") if e.get("reason") == "PodsWithoutSidecar"]
    assert events and events[0]["involvedObject"]["name"] == "gemini" and events[0]["type"] == "Warning"
    assert "chat-abc12-bare1" in events[0]["message"]
    # Without spec.rollout.repair nothing is restarted.
    await asyncio.sleep(0.6)
    dep = await cluster.get("Deployment", o.NS, "chat")
    assert dep is not None and repair.RESTARTED_AT_ANNOTATION not in dep["spec"]["template"]["metadata"]["annotations"]

    restarts_before = restarts("Deployment")
    await cluster.patch("VertexRoute", o.NS, "gemini", {"spec": {"rollout": {"repair": True}}})

    async def restarted() -> dict[str, Any]:
        dep = await cluster.get("Deployment", o.NS, "chat")
        assert dep is not None
        annotations = dep["spec"]["template"]["metadata"]["annotations"]
        assert repair.RESTARTED_AT_ANNOTATION in annotations, annotations
        return dep
    await eventually(restarted)
    found = await eventually(reported)
    assert found["restarted"] == ["Deployment/chat"]
    assert restarts("Deployment") - restarts_before == 1
    # The rollout replaces the pod; once it is gone the route is clean again.
    await cluster.delete("Pod", o.NS, "chat-abc12-bare1")

    async def clean() -> bool:
        route = await cluster.get("VertexRoute", o.NS, "gemini")
        return route is not None and "podsWithoutSidecar" not in (route.get("status") or {})
    await eventually(clean)
    assert gauge("gemini", "missing") == 0
    # Backoff: restarted once, not at every check.
    patches = [r for r in list(kube._requests)
               if r.method.value == "PATCH" and r.url.path.endswith("/deployments/chat")
               and repair.RESTARTED_AT_ANNOTATION in str(r.data)]
    assert len(patches) == 1
