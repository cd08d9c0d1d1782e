"""Who spends: the showback env of the sidecar (namespace, workload, team); pure.

The sidecar reads them once at start (`vertex_sidecar.showback`) and puts them on its
cost and token metrics and its access log. They stay low-cardinality on purpose:

* namespace: from the downward API (`metadata.namespace`);
* workload: the name of the controller that owns the pod, known at admission from its
  ownerReferences: a ReplicaSet's name without the pod-template-hash suffix (so the
  Deployment's name), a StatefulSet, DaemonSet or Job name, and for a CronJob's Job the
  CronJob's name (its Jobs are named CRONJOB-<minutes since the epoch>);
* team: the value of a namespace label the chart names (`showback.teamLabel`).
"""

from __future__ import annotations

import re
from typing import Any, Mapping

from vertex_sidecar.showback import SHOWBACK_ENV

NAMESPACE_ENV = SHOWBACK_ENV["namespace"]
WORKLOAD_ENV = SHOWBACK_ENV["workload"]
TEAM_ENV = SHOWBACK_ENV["team"]

# The CronJob controller names a run's Job "<cronjob>-<scheduled time in minutes since the epoch>".
_CRONJOB_RUN = re.compile(r"^(?P<cronjob>.+)-[0-9]{8,10}$")


def controller(meta: Mapping[str, Any]) -> Mapping[str, Any] | None:
    """The ownerReference that controls the pod (or its first owner), if any."""
    owners = [o for o in meta.get("ownerReferences") or [] if isinstance(o, Mapping) and o.get("name")]
    return next((o for o in owners if o.get("controller")), owners[0] if owners else None)


def workload_name(pod: Mapping[str, Any]) -> str | None:
    """The name of the workload that owns the pod (None for a pod without a name or owner)."""
    meta = pod.get("metadata") or {}
    owner = controller(meta)
    if owner is None:
        # A bare pod: its own name, or its generateName stem.
        return meta.get("name") or (meta.get("generateName") or "").rstrip("-") or None
    kind, name = owner.get("kind"), str(owner["name"])
    if kind == "ReplicaSet":
        pod_hash = (meta.get("labels") or {}).get("pod-template-hash")
        if pod_hash and name.endswith(f"-{pod_hash}"):
            return name[: -len(pod_hash) - 1]
        return name
    if kind == "Job":
        found = _CRONJOB_RUN.match(name)
        return found["cronjob"] if found else name
    return name


def sidecar_env(pod: Mapping[str, Any], team: str | None) -> list[dict[str, Any]]:
    """The env of the sidecar container that names who spends."""
    env: list[dict[str, Any]] = [
        {"name": NAMESPACE_ENV, "valueFrom": {"fieldRef": {"fieldPath": "metadata.namespace"}}},
    ]
    if workload := workload_name(pod):
        env.append({"name": WORKLOAD_ENV, "value": workload})
    if team:
        env.append({"name": TEAM_ENV, "value": team})
    return env


def team_of(namespace: Mapping[str, Any] | None, label: str | None) -> str | None:
    """The team of a Namespace object: its `label` value, if any."""
    if namespace is None or not label:
        return None
    value = ((namespace.get("metadata") or {}).get("labels") or {}).get(label)
    return str(value) if value else None
