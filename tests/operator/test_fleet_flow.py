"""Fleet-wide limits, budgets and showback through the real operator (kopf) and its webhook,
against the emulated API server."""

from __future__ import annotations

from typing import Any, Awaitable, Callable

import yaml

from tests.operator import objects as o
from tests.operator.conftest import OPERATOR_AGENTS, Cluster, OperatorThread, eventually
from tests.operator.harness import KubeEmulator
from tests.operator.test_fleet import STORE
from tests.operator.test_reconcile_flow import wait_condition
from tests.operator.test_webhook import Admission

TEAM_LABEL = "example.com/team"
FLEET = {"limits": {"requestsPerMinute": 600, "scope": "fleet"}, "budget": {"usdPerDay": 25}}


async def start(start_operator: Callable[..., Awaitable[OperatorThread]], tls_files: dict[str, Any],
                **overrides: Any) -> Admission:
    return Admission(await start_operator(**overrides), str(tls_files["ca"]))


def replica_set_pod() -> dict[str, Any]:
    return {"apiVersion": "v1", "kind": "Pod",
            "metadata": {"generateName": "chat-6f7b9d-", "labels": {"app": "chat", "pod-template-hash": "6f7b9d"},
                         "ownerReferences": [{"apiVersion": "apps/v1", "kind": "ReplicaSet", "name": "chat-6f7b9d",
                                              "uid": "rs-1", "controller": True, "blockOwnerDeletion": True}]},
            "spec": {"containers": [{"name": "app", "image": "app:1"}]}}


async def test_fleet_route_with_a_store(cluster: Cluster, kube: KubeEmulator, tls_files: dict[str, Any],
                                        start_operator: Callable[..., Awaitable[OperatorThread]]) -> None:
    admission = await start(start_operator, tls_files, store=STORE, team_label=TEAM_LABEL)
    namespace = o.namespace()
    namespace["metadata"]["labels"] = {TEAM_LABEL: "search"}
    await cluster.create(namespace)
    await cluster.create(o.credential())
    await cluster.create(o.route(**FLEET))

    route = await wait_condition(cluster, "gemini", "ConfigReady", "True")
    assert route["status"]["limits"]["scope"] == "fleet"
    assert route["status"]["budget"] == {"scope": "fleet", "budgets": ["gemini: $25/day (deny)"], "message": (
        "Spend is counted once for every sidecar of the route through the store.")}
    config_map = await cluster.get("ConfigMap", o.NS, "vertex-sidecar-gemini")
    assert config_map is not None
    assert config_map["data"]["redis-ca.crt"] == STORE.tls_ca_pem
    config = yaml.safe_load(config_map["data"]["config.yaml"])
    assert config["store"]["redis"]["key_prefix"] == "vxp.team-a.gemini"
    assert config["routes"][0]["budget"] == {"usd_per_day": 25.0, "action": "deny"}

    result, answer = await admission.admit(replica_set_pod())
    assert "warnings" not in answer
    (sidecar,) = result["spec"]["initContainers"]
    assert [e for e in sidecar["env"] if e["name"] != "VERTEX_SIDECAR_ADMIN_HOST"] == [
        {"name": "VERTEX_SIDECAR_NAMESPACE", "valueFrom": {"fieldRef": {"fieldPath": "metadata.namespace"}}},
        {"name": "VERTEX_SIDECAR_WORKLOAD", "value": "chat"},
        {"name": "VERTEX_SIDECAR_TEAM", "value": "search"},
    ]
    volumes = {v["name"]: v for v in result["spec"]["volumes"]}
    assert volumes["vertex-store-password"]["secret"]["secretName"] == "vertex-redis"
    # The team was read from the Namespace (once: a second pod is answered from the cache).
    await admission.admit(replica_set_pod())
    reads = [r for r in kube.api_requests(OPERATOR_AGENTS) if r == ("", "namespaces", "get")]
    assert reads == [("", "namespaces", "get")]


async def test_fleet_scope_without_a_store_says_per_pod(
        cluster: Cluster, tls_files: dict[str, Any],
        start_operator: Callable[..., Awaitable[OperatorThread]]) -> None:
    admission = await start(start_operator, tls_files)  # no store, no team label
    await cluster.create(o.namespace())
    await cluster.create(o.credential())
    await cluster.create(o.route(**FLEET))
    route = await wait_condition(cluster, "gemini", "ConfigReady", "True")
    assert route["status"]["limits"]["scope"] == "pod"
    assert "no store configured" in route["status"]["limits"]["message"]
    assert route["status"]["budget"]["scope"] == "pod"
    config_map = await cluster.get("ConfigMap", o.NS, "vertex-sidecar-gemini")
    assert config_map is not None and "store" not in yaml.safe_load(config_map["data"]["config.yaml"])
    result, _ = await admission.admit(replica_set_pod())
    (sidecar,) = result["spec"]["initContainers"]
    assert [e["name"] for e in sidecar["env"]] == ["VERTEX_SIDECAR_ADMIN_HOST", "VERTEX_SIDECAR_NAMESPACE",
                                                   "VERTEX_SIDECAR_WORKLOAD"]
    assert all(v["name"] != "vertex-store-password" for v in result["spec"]["volumes"])


async def test_budget_the_schema_would_refuse_is_reported(
        cluster: Cluster, operator: OperatorThread) -> None:
    """An API server without the schema (an old CRD) lets a route-level budget with rules through:
    the route says Ready=False and why."""
    await cluster.create(o.namespace())
    await cluster.create(o.credential())
    await cluster.create(o.route(budget={"usdPerDay": 5}, rules=[{"name": "pro"}]))
    route = await wait_condition(cluster, "gemini", "Ready", "False", "InvalidSpec")
    ready = [c for c in route["status"]["conditions"] if c["type"] == "Ready"][0]
    assert "spec.budget: a route with rules sets its budgets per rule" in ready["message"]


async def test_unselected_pods_cost_no_namespace_reads(
        cluster: Cluster, kube: KubeEmulator, tls_files: dict[str, Any],
        start_operator: Callable[..., Awaitable[OperatorThread]]) -> None:
    admission = await start(start_operator, tls_files, team_label=TEAM_LABEL)
    await cluster.create(o.namespace())
    other = replica_set_pod()
    other["metadata"]["labels"]["app"] = "other"
    result, _ = await admission.admit(other)
    assert result == other

    async def no_reads() -> bool:
        return ("", "namespaces", "get") not in kube.api_requests(OPERATOR_AGENTS)
    assert await eventually(no_reads)
