"""Tracing for injected sidecars: the effective settings of a route, its sidecar config
section, and the resource attributes of the pod; pure.

A route's `spec.sidecar.tracing` wins field by field over the operator's defaults (the
chart's `sidecar.tracing.*` values, passed as `--tracing*` flags). Turning tracing on or off
or changing the endpoint restarts the selected workloads (it is part of the sidecar plan's
hash): the sidecar starts its exporter at start-up, and the pod's resource attributes come
from env the webhook sets at admission. The sample ratio and baggage keys are hot-reloaded.

Resource attributes follow the OpenTelemetry Kubernetes conventions: `k8s.pod.name`,
`k8s.pod.uid`, `k8s.namespace.name` and `k8s.node.name` through the downward API (the pod
may not have its name yet at admission), `k8s.container.name`, and the owning workload
(`k8s.deployment.name`, `k8s.statefulset.name`, ...) from the pod's ownerReferences. They
reach the sidecar as `OTEL_RESOURCE_ATTRIBUTES`, with Kubernetes' `$(VAR)` expansion of the
downward-API variables listed before it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping, Sequence

from vertex_operator import showback
from vertex_operator.crd import Tracing

POD_NAME_ENV = "VERTEX_SIDECAR_POD_NAME"
POD_UID_ENV = "VERTEX_SIDECAR_POD_UID"
NODE_NAME_ENV = "VERTEX_SIDECAR_NODE_NAME"
NAMESPACE_ENV = showback.NAMESPACE_ENV  # the showback env's downward-API namespace, reused

_WORKLOAD_KINDS = {"ReplicaSet": "replicaset", "StatefulSet": "statefulset", "DaemonSet": "daemonset",
                   "Job": "job", "ReplicationController": "replicationcontroller"}


@dataclass(frozen=True)
class TracingDefaults:
    """The operator's defaults for routes that do not say (chart values sidecar.tracing.*)."""

    enabled: bool = False
    endpoint: str | None = None
    sample_ratio: float | None = None


@dataclass(frozen=True)
class EffectiveTracing:
    """Tracing as a route's sidecars get it (only built when enabled)."""

    endpoint: str | None
    sample_ratio: float | None
    baggage_keys: tuple[str, ...]

    def config_section(self) -> dict[str, Any]:
        """The sidecar config's `tracing:` section."""
        section: dict[str, Any] = {"enabled": True}
        if self.endpoint:
            section["endpoint"] = self.endpoint
        if self.sample_ratio is not None:
            section["sample_ratio"] = self.sample_ratio
        if self.baggage_keys:
            section["baggage_keys"] = list(self.baggage_keys)
        return section

    @property
    def restart_key(self) -> list[Any]:
        """What new pods are needed for (in the plan's hash)."""
        return [True, self.endpoint]


def effective_tracing(route: Tracing, defaults: TracingDefaults) -> EffectiveTracing | None:
    enabled = defaults.enabled if route.enabled is None else route.enabled
    if not enabled:
        return None
    return EffectiveTracing(
        endpoint=route.endpoint or defaults.endpoint,
        sample_ratio=route.sample_ratio if route.sample_ratio is not None else defaults.sample_ratio,
        baggage_keys=route.baggage_keys,
    )


def workload_attributes(pod: Mapping[str, Any]) -> dict[str, str]:
    """`k8s.<kind>.name` of the workload that owns the pod: a ReplicaSet also names its
    Deployment, a Job its CronJob — the showback workload name (`showback.workload_name`:
    the ReplicaSet less its pod-template-hash, the Job less the CronJob's run suffix) when it
    differs from the owner's."""
    meta = pod.get("metadata") or {}
    owner = showback.controller(meta)
    if owner is None:
        return {}
    kind, name = _WORKLOAD_KINDS.get(str(owner.get("kind"))), str(owner["name"])
    if kind is None:
        return {}
    attributes = {f"k8s.{kind}.name": name}
    workload = showback.workload_name(pod)
    if workload and workload != name:
        attributes["k8s.deployment.name" if kind == "replicaset" else "k8s.cronjob.name"] = workload
    return attributes


def tracing_env(pod: Mapping[str, Any], container_name: str,
                existing: Sequence[Mapping[str, Any]] = ()) -> list[dict[str, Any]]:
    """Env for the sidecar container: the downward-API variables it lacks, then
    OTEL_RESOURCE_ATTRIBUTES built from them."""
    present = {entry.get("name") for entry in existing}
    env: list[dict[str, Any]] = []
    for name, path in ((POD_NAME_ENV, "metadata.name"), (POD_UID_ENV, "metadata.uid"),
                       (NAMESPACE_ENV, "metadata.namespace"), (NODE_NAME_ENV, "spec.nodeName")):
        if name not in present:
            env.append({"name": name, "valueFrom": {"fieldRef": {"fieldPath": path}}})
    attributes = {
        "k8s.pod.name": f"$({POD_NAME_ENV})",
        "k8s.pod.uid": f"$({POD_UID_ENV})",
        "k8s.namespace.name": f"$({NAMESPACE_ENV})",
        "k8s.node.name": f"$({NODE_NAME_ENV})",
        "k8s.container.name": container_name,
        **workload_attributes(pod),
    }
    env.append({"name": "OTEL_RESOURCE_ATTRIBUTES",
                "value": ",".join(f"{key}={value}" for key, value in attributes.items())})
    return env
