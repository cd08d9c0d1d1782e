"""Kubernetes label selectors and which route serves which workload; pure.

The same matching is used by the reconciler (against a workload's pod-template labels)
and by the admission webhook (against a new pod's labels), so that a workload and its
pods always agree on the route that serves them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Iterable, Literal, Mapping, Protocol, TypeVar

from vertex_operator import interception

Operator = Literal["In", "NotIn", "Exists", "DoesNotExist"]
OPERATORS: tuple[str, ...] = ("In", "NotIn", "Exists", "DoesNotExist")


class SelectorError(ValueError):
    """A label selector is malformed; the message names the field."""


@dataclass(frozen=True)
class Requirement:
    key: str
    operator: Operator
    values: tuple[str, ...] = ()

    def matches(self, labels: Mapping[str, str]) -> bool:
        if self.operator == "Exists":
            return self.key in labels
        if self.operator == "DoesNotExist":
            return self.key not in labels
        if self.operator == "In":
            return self.key in labels and labels[self.key] in self.values
        # NotIn also matches objects without the key, as in Kubernetes.
        return self.key not in labels or labels[self.key] not in self.values


@dataclass(frozen=True)
class LabelSelector:
    """`metav1.LabelSelector`: all of `match_labels` and all requirements must hold."""

    match_labels: Mapping[str, str] = field(default_factory=dict)
    match_expressions: tuple[Requirement, ...] = ()

    @property
    def empty(self) -> bool:
        return not self.match_labels and not self.match_expressions

    def matches(self, labels: Mapping[str, str] | None) -> bool:
        labels = labels or {}
        if any(labels.get(key) != value for key, value in self.match_labels.items()):
            return False
        return all(req.matches(labels) for req in self.match_expressions)

    def __str__(self) -> str:
        """The selector in `kubectl -l` syntax, for messages."""
        parts = [f"{k}={v}" for k, v in sorted(self.match_labels.items())]
        for req in self.match_expressions:
            if req.operator == "Exists":
                parts.append(req.key)
            elif req.operator == "DoesNotExist":
                parts.append(f"!{req.key}")
            else:
                op = "in" if req.operator == "In" else "notin"
                parts.append(f"{req.key} {op} ({','.join(req.values)})")
        return ",".join(parts) or "<everything>"


def parse_selector(data: Any, where: str = "selector") -> LabelSelector:
    """Build a `LabelSelector` from its API form; raises `SelectorError`."""
    if data is None:
        data = {}
    if not isinstance(data, Mapping):
        raise SelectorError(f"{where}: expected a label selector (matchLabels / matchExpressions)")
    labels = data.get("matchLabels") or {}
    if not isinstance(labels, Mapping) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in labels.items()
    ):
        raise SelectorError(f"{where}.matchLabels: expected a mapping of label names to string values")
    exprs_raw = data.get("matchExpressions") or []
    if not isinstance(exprs_raw, list):
        raise SelectorError(f"{where}.matchExpressions: expected a list")
    exprs: list[Requirement] = []
    for i, item in enumerate(exprs_raw):
        at = f"{where}.matchExpressions[{i}]"
        if not isinstance(item, Mapping) or not isinstance(item.get("key"), str):
            raise SelectorError(f"{at}: expected {{key, operator, values}}")
        op = item.get("operator")
        if op not in OPERATORS:
            raise SelectorError(f"{at}.operator: {op!r} is not one of {', '.join(OPERATORS)}")
        values = item.get("values") or []
        if not isinstance(values, list) or not all(isinstance(v, str) for v in values):
            raise SelectorError(f"{at}.values: expected a list of strings")
        if op in ("In", "NotIn") and not values:
            raise SelectorError(f"{at}.values: required (non-empty) for operator {op}")
        if op in ("Exists", "DoesNotExist") and values:
            raise SelectorError(f"{at}.values: must be empty for operator {op}")
        exprs.append(Requirement(item["key"], op, tuple(values)))
    return LabelSelector(dict(labels), tuple(exprs))


# ----------------------------------------------------------------------- workloads

C = TypeVar("C", bound="Candidate")


@dataclass(frozen=True)
class Workload:
    """What the operator needs to know of a Deployment/StatefulSet/DaemonSet."""

    kind: str
    namespace: str
    name: str
    template_labels: Mapping[str, str] = field(default_factory=dict)
    template_annotations: Mapping[str, str] = field(default_factory=dict)
    template_spec: Mapping[str, Any] = field(default_factory=dict)

    @property
    def ref(self) -> str:
        return f"{self.kind}/{self.name}"


def workload_from_body(kind: str, body: Mapping[str, Any]) -> Workload:
    """Snapshot a workload object (as the API returns it) into a `Workload`."""
    meta = body.get("metadata") or {}
    template = (body.get("spec") or {}).get("template") or {}
    tmeta = template.get("metadata") or {}
    spec = template.get("spec") or {}
    # Only the pod-spec fields that decide whether injection is possible are kept,
    # so that the index stays small and event comparisons stay cheap.
    kept: dict[str, Any] = {k: spec[k] for k in ("hostNetwork", "serviceAccountName", "serviceAccount") if k in spec}
    if spec.get("volumes"):
        kept["volumes"] = [{"name": v.get("name")} for v in spec["volumes"]]
    # Containers' own proxy / CA settings (they override interception: the route's status warns).
    for key in ("containers", "initContainers"):
        own = [{"name": c.get("name"), "env": [e for e in c.get("env") or [] if e.get("name") in interception.ALL_VARS]}
               for c in spec.get(key) or []]
        if any(c["env"] for c in own):
            kept[key] = own
    return Workload(
        kind=kind,
        namespace=meta.get("namespace") or "",
        name=meta.get("name") or "",
        template_labels=dict(tmeta.get("labels") or {}),
        template_annotations=dict(tmeta.get("annotations") or {}),
        template_spec=kept,
    )


class Candidate(Protocol):
    """Anything that can select workloads: a route (parsed or as indexed)."""

    @property
    def name(self) -> str: ...

    @property
    def created(self) -> str: ...  # RFC 3339, so that string order is time order

    @property
    def selector(self) -> LabelSelector: ...


def precedence(candidate: Candidate) -> tuple[str, str]:
    """Sort key: the oldest route wins; same second → the alphabetically first name.

    Age first, so that creating a new route can never take over workloads that an
    existing route already serves.
    """
    return (candidate.created or "9999", candidate.name)


def selecting(candidates: Iterable[C], labels: Mapping[str, str] | None) -> list[C]:
    """The candidates whose selector matches `labels`, winner first."""
    return sorted((c for c in candidates if c.selector.matches(labels)), key=precedence)
