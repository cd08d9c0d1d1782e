"""The desired state of one namespace: ConfigMaps, workload annotations, route statuses; pure.

Routes, credentials and workloads of a namespace go in (as the operator's indexes hold
them); out comes what should exist. The handlers compare and write only differences,
which is what makes restarts and repeated events cheap.

Rules, in one place:

* A workload is served by the oldest route whose `workloadSelector` matches its pod
  template labels (same second: first name). The others report a conflict.
* A route that cannot produce a sidecar plan (its credential is missing or invalid, or
  its namespace is one the webhook never injects) freezes its workloads: nothing is
  rolled until it can; the webhook injects nothing.
* A served workload's pod template carries `config-hash` = the plan's hash and `route`;
  a workload no route serves any more gets `config-hash: none` (rolls to no sidecar).
  Routes with `rolloutStrategy: None` never touch workloads.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Iterable, Mapping

from vertex_operator import conditions as cond
from vertex_operator import fleet, inject, render
from vertex_operator.crd import (
    CONFIG_HASH_ANNOTATION, REMOVED_HASH, ROUTE_ANNOTATION, Credential, Route, SpecError,
    parse_credential, parse_route,
)
from vertex_operator.policy import Policy, route_refusal
from vertex_operator.tracing import TracingDefaults
from vertex_operator.selection import LabelSelector, Workload, precedence, selecting

MAX_LISTED = 50  # workloads listed by name in a route's status


@dataclass(frozen=True)
class RouteRecord:
    """A VertexRoute as indexed: parsed, or the reason it could not be."""

    namespace: str
    name: str
    uid: str
    generation: int
    created: str
    deleting: bool
    route: Route | None
    error: str | None
    status: Mapping[str, Any] = field(default_factory=dict)

    @property
    def selector(self) -> LabelSelector:
        assert self.route is not None, "only parsed routes select"
        return self.route.selector


@dataclass(frozen=True)
class CredentialRecord:
    namespace: str
    name: str
    credential: Credential | None
    error: str | None
    deleting: bool = False


def route_record(body: Mapping[str, Any]) -> RouteRecord:
    meta = body.get("metadata") or {}
    try:
        route, error = parse_route(body), None
    except SpecError as exc:
        route, error = None, str(exc)
    return RouteRecord(
        namespace=meta.get("namespace") or "", name=meta.get("name") or "",
        uid=meta.get("uid") or "", generation=int(meta.get("generation") or 0),
        created=meta.get("creationTimestamp") or "", deleting=bool(meta.get("deletionTimestamp")),
        route=route, error=error, status=dict(body.get("status") or {}),
    )


def credential_record(body: Mapping[str, Any]) -> CredentialRecord:
    meta = body.get("metadata") or {}
    try:
        credential, error = parse_credential(body), None
    except SpecError as exc:
        credential, error = None, str(exc)
    return CredentialRecord(meta.get("namespace") or "", meta.get("name") or "", credential, error,
                            deleting=bool(meta.get("deletionTimestamp")))


@dataclass(frozen=True)
class Options:
    default_image: str
    server_version: tuple[int, int] | None = None
    namespace_excluded: bool = False  # a namespace the webhook never injects (system, the operator's own)
    policy: Policy = field(default_factory=Policy)  # the platform team's bounds (upstreams, images)
    namespace_unwritable: bool = False  # the operator's RBAC does not let it write there (--write-namespace)
    missing_label: tuple[str, str] | None = None  # the injection label the namespace lacks (--injection-label)
    tracing: TracingDefaults = field(default_factory=TracingDefaults)  # chart sidecar.tracing.*
    store: fleet.StoreSettings | None = None  # shared counters of fleet-scoped limits and budgets


def unwritable_message(namespace: str) -> str:
    return (f"The operator may not write in namespace {namespace!r} (its RBAC grants that per namespace): "
            "nothing is rendered, injected or created here. The platform team adds the namespace to the chart "
            "value rbac.workloadNamespaces.")


@dataclass
class RouteState:
    """One route evaluated against its credential: can it serve, and what it renders."""

    record: RouteRecord
    credential: Credential | None = None
    plan: inject.SidecarPlan | None = None
    rendered: render.Rendered | None = None
    config_error: tuple[str, str] | None = None  # (reason, message) why there is no config
    blocked: tuple[str, str] | None = None  # (reason, message) why there is no plan


def evaluate(record: RouteRecord, credentials: Iterable[CredentialRecord], options: Options,
             *, with_config: bool = True) -> RouteState:
    """Resolve the credential, plan the sidecar and (unless `with_config` is off) render."""
    state = RouteState(record)
    route = record.route
    if route is None:
        state.blocked = state.config_error = ("InvalidSpec", f"The route's spec is invalid: {record.error}")
        return state
    if options.namespace_excluded:
        message = (f"Namespace {record.namespace!r} is never injected (a system namespace, or the operator's "
                   "own): its pods never get the sidecar, so this route serves nothing and its workloads are "
                   "left alone. Run the workloads in another namespace.")
        state.blocked = state.config_error = ("NamespaceExcluded", message)
        return state
    if options.namespace_unwritable:
        state.blocked = state.config_error = ("NamespaceNotEnabled", unwritable_message(record.namespace))
        return state
    if options.missing_label is not None:
        key, value = options.missing_label
        message = (f"Namespace {record.namespace!r} has not opted in to injection: the webhook only sees pods of "
                   f"namespaces labelled {key}={value}, so this route serves nothing and its workloads are left "
                   f"alone. kubectl label namespace {record.namespace} {key}={value}")
        state.blocked = state.config_error = ("NamespaceNotOptedIn", message)
        return state
    found = next((c for c in credentials if c.name == route.credential_name), None)
    if found is None:
        message = (f"VertexCredential {route.credential_name!r} does not exist in namespace "
                   f"{record.namespace!r}. Create it, or set spec.credentialRef.name to an existing "
                   f"one (kubectl get vertexcredentials -n {record.namespace}). Selected pods get no "
                   "sidecar until then.")
        state.blocked = state.config_error = ("CredentialNotFound", message)
        return state
    if found.deleting:
        message = (f"VertexCredential {route.credential_name!r} is being deleted: its IAM bindings and "
                   "service account are being removed, so the sidecar cannot get Google tokens. Point "
                   "spec.credentialRef.name at another VertexCredential, or delete this route. Selected "
                   "pods get no sidecar until then.")
        state.blocked = state.config_error = ("CredentialDeleted", message)
        return state
    if found.credential is None:
        message = (f"VertexCredential {route.credential_name!r} is invalid: {found.error}. "
                   "Fix its spec; selected pods get no sidecar until then.")
        state.blocked = state.config_error = ("InvalidCredential", message)
        return state
    if refusal := route_refusal(options.policy, route, options.default_image):
        state.blocked = state.config_error = ("NotAllowed", refusal.message)
        return state
    state.credential = found.credential
    state.plan = inject.plan_sidecar(route, found.credential, default_image=options.default_image,
                                     server_version=options.server_version, tracing_defaults=options.tracing,
                                     store=options.store)
    if not with_config:
        return state
    try:
        state.rendered = render.render(route, found.credential, state.plan.tracing, store=options.store)
    except render.RenderError as exc:
        state.config_error = ("InvalidConfig", f"{exc}. The previous config (if any) stays in place.")
    return state


@dataclass(frozen=True)
class WorkloadPatch:
    workload: Workload
    annotations: Mapping[str, str | None]  # None deletes the annotation
    reason: str  # "configure" or "rollback", for logs and metrics


@dataclass
class NamespacePlan:
    states: dict[str, RouteState] = field(default_factory=dict)
    workload_patches: list[WorkloadPatch] = field(default_factory=list)
    statuses: dict[str, dict[str, Any]] = field(default_factory=dict)


def _workload_decision(w: Workload, chosen: list[RouteRecord], states: Mapping[str, RouteState],
                       records: Mapping[str, RouteRecord]) -> WorkloadPatch | None:
    current = (w.template_annotations.get(CONFIG_HASH_ANNOTATION), w.template_annotations.get(ROUTE_ANNOTATION))
    if chosen:
        state = states[chosen[0].name]
        route = chosen[0].route
        assert route is not None
        if state.plan is None or route.sidecar.rollout_strategy == "None":
            return None  # frozen, or the route's owner restarts workloads themselves
        if inject.blockers(w.template_spec, state.plan):
            return None  # its pods would not get the sidecar anyway; reported in the status
        desired = (state.plan.config_hash, route.name)
        if current == desired:
            return None
        return WorkloadPatch(w, {CONFIG_HASH_ANNOTATION: desired[0], ROUTE_ANNOTATION: desired[1]}, "configure")
    if current[0] in (None, REMOVED_HASH):
        return None  # never had a sidecar from us, or already rolled back
    previous = records.get(current[1] or "")
    if previous is not None and not previous.deleting and previous.route is None:
        return None  # its route is invalid right now: wait rather than guess
    if previous is not None and previous.route is not None and previous.route.sidecar.rollout_strategy == "None":
        return None
    return WorkloadPatch(w, {CONFIG_HASH_ANNOTATION: REMOVED_HASH, ROUTE_ANNOTATION: None}, "rollback")


def plan_namespace(records: Iterable[RouteRecord], credentials: Iterable[CredentialRecord],
                   workloads: Iterable[Workload], options: Options) -> NamespacePlan:
    records = sorted(records, key=precedence)
    credentials = list(credentials)
    by_name = {r.name: r for r in records}
    plan = NamespacePlan()
    for record in records:
        plan.states[record.name] = evaluate(record, credentials, options)
    active = [r for r in records if r.route is not None and not r.deleting]

    served: dict[str, list[str]] = {r.name: [] for r in records}
    lost: dict[str, list[tuple[str, str]]] = {r.name: [] for r in records}  # (workload, winner)
    shared: dict[str, list[tuple[str, str]]] = {r.name: [] for r in records}  # (workload, loser)
    warnings: dict[str, list[str]] = {r.name: [] for r in records}
    for w in sorted(workloads, key=lambda w: (w.kind, w.name)):
        if inject.opted_out(w.template_annotations):
            continue  # its pods opt out of injection: not ours to count or roll
        chosen = selecting(active, w.template_labels)
        if chosen:
            win = chosen[0]
            served[win.name].append(w.ref)
            for loser in chosen[1:]:
                lost[loser.name].append((w.ref, win.name))
                shared[win.name].append((w.ref, loser.name))
            state = plan.states[win.name]
            if state.plan is not None:
                warnings[win.name].extend(f"{w.ref}: {p}" for p in inject.blockers(w.template_spec, state.plan))
                warnings[win.name].extend(f"{w.ref}: {p}"
                                          for p in inject.interception_warnings(w.template_spec, state.plan))
        patch = _workload_decision(w, chosen, plan.states, by_name)
        if patch is not None:
            plan.workload_patches.append(patch)

    for record in records:
        if record.deleting:
            continue
        plan.statuses[record.name] = route_status(
            plan.states[record.name], served[record.name], lost[record.name],
            shared[record.name], warnings[record.name], store=options.store)
    return plan


def config_not_written(status: Mapping[str, Any], error: str) -> dict[str, Any]:
    """`status` (from `route_status`) for a route whose ConfigMap write failed: neither
    ConfigReady nor Ready, and its workloads are not rolled until the write succeeds."""
    result = dict(status)
    gen = result.get("observedGeneration")
    message = (f"Writing ConfigMap {result.get('configMap')} failed: {error}. Selected workloads are not "
               "rolled out until it is written; the operator retries.")
    replaced = {t: cond.condition(t, False, "ConfigMapNotWritten", message, gen) for t in ("Ready", "ConfigReady")}
    result["conditions"] = [replaced.get(c["type"], c) for c in status["conditions"]]
    return result


def _refs(items: list[tuple[str, str]], limit: int = 5) -> str:
    names = [w for w, _ in items]
    more = f" and {len(names) - limit} more" if len(names) > limit else ""
    return ", ".join(names[:limit]) + more


def route_status(state: RouteState, served: list[str], lost: list[tuple[str, str]],
                 shared: list[tuple[str, str]], warnings: list[str],
                 store: fleet.StoreSettings | None = None) -> dict[str, Any]:
    """The full status of a route (conditions without transition times)."""
    record = state.record
    gen = record.generation
    conditions: list[cond.Condition] = []

    if state.config_error is not None:
        reason, message = state.config_error
        conditions.append(cond.condition("ConfigReady", False, reason, message, gen))
    else:
        assert state.rendered is not None and record.route is not None
        conditions.append(cond.condition(
            "ConfigReady", True, "Rendered",
            f"ConfigMap {record.route.config_map_name} holds the sidecar config "
            f"(content hash {state.rendered.hash}).", gen))

    if lost:
        winners = sorted({winner for _, winner in lost})
        conflict = cond.condition(
            "Conflict", True, "SelectedByOlderRoute",
            f"{_refs(lost)} also selected by VertexRoute {', '.join(map(repr, winners))}, which "
            "takes precedence (the oldest route wins). Narrow spec.workloadSelector so that each "
            "workload is selected by one route.", gen)
    elif shared:
        losers = sorted({loser for _, loser in shared})
        conflict = cond.condition(
            "Conflict", True, "AlsoSelectedByNewerRoute",
            f"{_refs(shared)} also selected by VertexRoute {', '.join(map(repr, losers))}; this "
            "route takes precedence (it is older) and serves them.", gen)
    else:
        conflict = cond.condition("Conflict", False, "NoOverlap",
                                  "No other route selects this route's workloads.", gen)

    credential = state.credential
    if state.blocked is not None:
        ready = cond.condition("Ready", False, *state.blocked, gen)
    elif state.config_error is not None:
        ready = cond.condition("Ready", False, *state.config_error, gen)
    elif lost:
        ready = cond.condition("Ready", False, "Conflict", conflict["message"], gen)
    elif credential is not None and not credential.ready:
        ready = cond.condition(
            "Ready", False, "CredentialNotReady",
            f"VertexCredential {credential.name!r} {credential.ready_message}. Pods get the sidecar, "
            "but it cannot obtain Google tokens (and stays unready) until the credential is Ready: "
            f"kubectl describe vertexcredential {credential.name} -n {record.namespace}.", gen)
    else:
        ready = cond.condition("Ready", True, "Ready",
                               f"Serving {len(served)} workload(s) with the sidecar config.", gen)

    status: dict[str, Any] = {
        "observedGeneration": gen,
        "selectedWorkloads": len(served),
        "workloads": served[:MAX_LISTED],
        "conditions": [ready, conditions[0], conflict],
    }
    if record.route is not None:
        status["configMap"] = record.route.config_map_name
        status.update(fleet.route_status(record.route, store))
    if state.plan is not None:
        status["configHash"] = state.plan.config_hash
    status["warnings"] = warnings[:MAX_LISTED]
    return status
