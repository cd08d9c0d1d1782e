"""Running pods that slipped through: selected by a route, but without its (current) sidecar; pure.

A pod can start without the sidecar when no webhook answered at its creation (with
`failurePolicy: Ignore`), or keep an outdated one when its workload was not rolled
(`rolloutStrategy: None`, a failed patch). `classify` says what is wrong with one pod,
`owner` which workload to restart, `summarize` what goes into the route's status.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Iterable, Literal, Mapping

from vertex_operator import inject
from vertex_operator.crd import CONFIG_HASH_ANNOTATION, PREFIX

Problem = Literal["missing", "outdated"]
RESTARTED_AT_ANNOTATION = f"{PREFIX}/restartedAt"
LISTED = 5  # pod names in the status


def sidecar_of(spec: Mapping[str, Any]) -> Mapping[str, Any] | None:
    for container in list(spec.get("initContainers") or []) + list(spec.get("containers") or []):
        if container.get("name") == inject.CONTAINER_NAME:
            return container  # type: ignore[no-any-return]
    return None


def classify(pod: Mapping[str, Any], plan: inject.SidecarPlan) -> tuple[Problem, str] | None:
    """What is wrong with a running pod that `plan`'s route selects (None: nothing)."""
    meta = pod.get("metadata") or {}
    spec = pod.get("spec") or {}
    if meta.get("deletionTimestamp") or (pod.get("status") or {}).get("phase") != "Running":
        return None
    if inject.opted_out(meta.get("annotations")) or inject.blockers(spec, plan):
        return None  # never gets the sidecar by design (reported as a warning of the route)
    sidecar = sidecar_of(spec)
    if sidecar is None:
        return "missing", "no sidecar"
    if sidecar.get("image") != plan.image:
        return "outdated", f"sidecar image {sidecar.get('image')}"
    stamped = (meta.get("annotations") or {}).get(CONFIG_HASH_ANNOTATION)
    if stamped is not None and stamped != plan.config_hash:
        return "outdated", f"config hash {stamped}"
    return None


def owner(pod: Mapping[str, Any]) -> tuple[str, str] | None:
    """(kind, name) of the workload that owns a pod, through its ReplicaSet for Deployments."""
    meta = pod.get("metadata") or {}
    for ref in meta.get("ownerReferences") or []:
        if not ref.get("controller"):
            continue
        kind, name = ref.get("kind"), ref.get("name") or ""
        if kind in ("StatefulSet", "DaemonSet"):
            return kind, name
        if kind == "ReplicaSet":
            # A Deployment's ReplicaSets are named <deployment>-<pod-template-hash>.
            template_hash = (meta.get("labels") or {}).get("pod-template-hash")
            if template_hash and name.endswith(f"-{template_hash}"):
                return "Deployment", name[: -len(template_hash) - 1]
    return None


@dataclass
class Findings:
    """The pods of one route that lack the (current) sidecar."""

    missing: list[str] = field(default_factory=list)
    outdated: list[str] = field(default_factory=list)
    described: list[str] = field(default_factory=list)
    owners: set[tuple[str, str]] = field(default_factory=set)

    @property
    def count(self) -> int:
        return len(self.missing) + len(self.outdated)

    def add(self, pod: Mapping[str, Any], problem: Problem, detail: str) -> None:
        name = (pod.get("metadata") or {}).get("name") or "?"
        (self.missing if problem == "missing" else self.outdated).append(name)
        self.described.append(f"{name} ({detail})")
        if (found := owner(pod)) is not None:
            self.owners.add(found)

    def status(self, restarted: Iterable[str] = ()) -> dict[str, Any]:
        return {"count": self.count, "missing": len(self.missing), "outdated": len(self.outdated),
                "pods": sorted(self.described)[:LISTED], "restarted": sorted(restarted)}

    def message(self) -> str:
        more = f" and {self.count - LISTED} more" if self.count > LISTED else ""
        return (f"{self.count} running pod(s) selected by this route lack the sidecar or carry an outdated one: "
                f"{', '.join(sorted(self.described)[:LISTED])}{more}. They were created while no webhook answered "
                "(failurePolicy Ignore) or not rolled since a change; restart their workloads, or set "
                "spec.rollout.repair: true to let the operator do it.")
