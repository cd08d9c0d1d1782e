"""Applies the desired state of a namespace, and answers admission questions.

The kopf handlers call into one `Controller`; it holds the few things that outlive a
handler call: the API client, per-namespace locks (one reconciliation at a time per
namespace, whatever triggered it), and caches that let repeated triggers and restarts
skip writes whose result is already in place.
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import datetime
import logging
import time
from typing import Any, Awaitable, Mapping

from kubernetes.client.exceptions import ApiException

from vertex_operator import conditions as cond
from vertex_operator import inject, metrics, reconcile, render, repair, showback
from vertex_operator.credential_controller import CredentialController
from vertex_operator.crd import (
    API_VERSION, CREDENTIAL_KIND, CREDENTIAL_PLURAL, MANAGED_BY, MANAGED_BY_LABEL, PREFIX, ROUTE_ANNOTATION, ROUTE_KIND, ROUTE_LABEL,
    ROUTE_PLURAL,
)
from vertex_operator.index_sync import IndexSync
from vertex_operator.kube import Kube
from vertex_operator.options import Options
from vertex_operator.selection import Workload, selecting
from vertex_operator.webhook import AdmissionServer, build_server

logger = logging.getLogger(__name__)

CONTENT_HASH_ANNOTATION = f"{PREFIX}/content-hash"

# kopf retries failed handlers after this delay, doubled at each retry up to the maximum.
RETRY_BACKOFF = 5.0
MAX_RETRY_DELAY = 300.0


def retry_delay(retry: int) -> float:
    """The delay before kopf's next retry of a handler that failed `retry` times already."""
    return min(MAX_RETRY_DELAY, RETRY_BACKOFF * 2.0 ** min(max(retry, 0), 10))


def is_permanent(exc: BaseException) -> bool:
    """An API answer that retrying cannot change (refused by RBAC, an admission policy, validation)."""
    return isinstance(exc, ApiException) and 400 <= (exc.status or 0) < 500 and exc.status not in (401, 409, 429)


def describe_error(exc: BaseException) -> str:
    """A one-line account of an error for logs and Events (not str(ApiException): it carries
    every response header)."""
    if isinstance(exc, ApiException):
        body = exc.body.decode(errors="replace") if isinstance(exc.body, bytes) else str(exc.body or "")
        return f"{exc.status} {exc.reason}" + (f": {body[:300]}" if body else "")
    return str(exc) or repr(exc)


class SyncError(Exception):
    """Some writes of a namespace sync failed; every other write was still made."""

    def __init__(self, failures: list[tuple[str, BaseException]]) -> None:
        self.failures = failures
        super().__init__("; ".join(f"{what}: {describe_error(exc)}" for what, exc in failures[:5])
                         + (f" (and {len(failures) - 5} more)" if len(failures) > 5 else ""))

    @property
    def permanent(self) -> bool:
        return all(is_permanent(exc) for _, exc in self.failures)


TEAM_CACHE_SECONDS = 60.0  # a namespace's team label change reaches new pods within this
TEAM_LOOKUP_SECONDS = 2.0  # admission never waits longer for a namespace's team

# Index names: kopf passes each index to handlers under its handler's name.
ROUTE_INDEX = "vertexroute_index"
CREDENTIAL_INDEX = "vertexcredential_index"
WORKLOAD_INDEXES = ("deployment_index", "statefulset_index", "daemonset_index")


class Indexes:
    """Read access to kopf's in-memory indexes (all keyed by namespace)."""

    def __init__(self, kwargs: Mapping[str, Any]) -> None:
        self._kwargs = kwargs

    def _get(self, index: str, namespace: str) -> list[Any]:
        found = self._kwargs.get(index)
        return list(found.get(namespace, [])) if found is not None else []

    def routes(self, namespace: str) -> list[reconcile.RouteRecord]:
        return self._get(ROUTE_INDEX, namespace)

    def credentials(self, namespace: str) -> list[reconcile.CredentialRecord]:
        return self._get(CREDENTIAL_INDEX, namespace)

    def workloads(self, namespace: str) -> list[Workload]:
        return [w for index in WORKLOAD_INDEXES for w in self._get(index, namespace)]

    def admission_keys(self) -> list[tuple[str, str, str]]:
        """(kind, namespace, name) of every indexed route and credential (what admission reads)."""
        keys: list[tuple[str, str, str]] = []
        for index, kind in ((ROUTE_INDEX, ROUTE_KIND), (CREDENTIAL_INDEX, CREDENTIAL_KIND)):
            found = self._kwargs.get(index)
            for records in (found.values() if found is not None else ()):
                keys.extend((kind, r.namespace, r.name) for r in records)
        return keys


def config_map_body(record: reconcile.RouteRecord, rendered: render.Rendered) -> dict[str, Any]:
    assert record.route is not None
    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": {
            "name": record.route.config_map_name,
            "namespace": record.namespace,
            "labels": {MANAGED_BY_LABEL: MANAGED_BY, ROUTE_LABEL: record.name},
            "annotations": {CONTENT_HASH_ANNOTATION: rendered.hash},
            # Owned by the route: deleting the route garbage-collects it. No
            # blockOwnerDeletion, which would need update rights on the route's finalizers.
            "ownerReferences": [{
                "apiVersion": API_VERSION, "kind": ROUTE_KIND, "name": record.name,
                "uid": record.uid, "controller": True,
            }],
        },
        "data": {render.CONFIG_FILE: rendered.text, **rendered.files},
    }


class Controller:
    def __init__(self, options: Options, kube: Kube | None = None) -> None:
        self.options = options
        self.kube = kube
        self.server_version: tuple[int, int] | None = None
        self.webhook_server: AdmissionServer | None = build_server(options)
        self._locks: dict[str, asyncio.Lock] = collections.defaultdict(asyncio.Lock)
        self._config_hashes: dict[str, str] = {}  # route uid → content hash known to be in its ConfigMap
        self._statuses: dict[str, dict[str, Any]] = {}  # route uid → the status last written
        self._workloads: dict[tuple[str, str, str], Workload] = {}  # last seen, to drop no-op events
        self.credentials = CredentialController(options, kube)
        self._teams: dict[str, tuple[float, str | None]] = {}  # namespace → (expires, team)
        self.index_sync = IndexSync(self._list_admission_keys)
        self.elector: Any = None  # the LeaderElector when leader election is on (cli.run sets it)
        self._pod_findings: dict[str, dict[str, Any]] = {}  # route uid → status.podsWithoutSidecar
        self._restarted: dict[tuple[str, str, str], float] = {}  # (kind, ns, name) → loop time
        self._scanned: dict[str, float] = {}  # namespace → loop time of its last pod check

    async def start(self) -> None:
        if self.kube is None:
            self.kube = Kube()
        self.credentials.kube = self.kube
        self.server_version = await self.kube.server_version()

    async def _list_admission_keys(self) -> set[tuple[str, str, str]]:
        assert self.kube is not None
        namespaces = () if self.options.clusterwide else self.options.namespaces
        return (await self.kube.list_custom_keys(ROUTE_PLURAL, ROUTE_KIND, namespaces)
                | await self.kube.list_custom_keys(CREDENTIAL_PLURAL, CREDENTIAL_KIND, namespaces))

    def fence(self, check: Any) -> None:
        """Make every reconciling write (Kubernetes and Google) call `check` first."""
        assert self.kube is not None
        self.kube.write_guard = check
        self.credentials.google.write_guard = check

    async def close(self) -> None:
        await self.credentials.close()
        if self.kube is not None:
            self.kube.close()

    @property
    def reconcile_options(self) -> reconcile.Options:
        return reconcile.Options(default_image=self.options.sidecar_image, server_version=self.server_version,
                                 policy=self.options.policy,
                                 tracing=self.options.tracing,
                                 store=self.options.store)

    # ---------------------------------------------------------------- reconciling

    def forget(self, uid: str) -> None:
        """Drop caches of a route, so that the next sync re-reads its ConfigMap."""
        self._config_hashes.pop(uid, None)
        self._statuses.pop(uid, None)

    def workload_changed(self, workload: Workload, deleted: bool) -> bool:
        """Whether an event changed anything routing depends on (status-only updates don't)."""
        key = (workload.kind, workload.namespace, workload.name)
        if deleted:
            self._workloads.pop(key, None)
            return True
        previous = self._workloads.get(key)
        self._workloads[key] = workload
        return previous != workload

    async def sync(self, namespace: str, indexes: Indexes, trigger: str) -> reconcile.NamespacePlan:
        assert self.kube is not None, "Controller.start() was not called"
        async with self._locks[namespace]:
            with metrics.reconciling(trigger):
                plan = reconcile.plan_namespace(
                    indexes.routes(namespace), indexes.credentials(namespace),
                    indexes.workloads(namespace), await self._sync_options(namespace, bool(indexes.routes(namespace))))
                # One refused write (an admission policy on one Deployment, a quota) must not
                # keep the rest of the namespace, statuses included, from converging.
                failures: list[tuple[str, BaseException]] = []

                async def attempt(what: str, write: Awaitable[None]) -> BaseException | None:
                    try:
                        await write
                    except Exception as exc:
                        failures.append((what, exc))
                        return exc
                    return None

                unwritten: dict[str, str] = {}  # route → why its ConfigMap could not be written
                for state in plan.states.values():
                    what = f"ConfigMap of VertexRoute {state.record.name}"
                    if (exc := await attempt(what, self._apply_config_map(state))) is not None:
                        unwritten[state.record.name] = describe_error(exc)
                for patch in plan.workload_patches:
                    if patch.annotations.get(ROUTE_ANNOTATION) in unwritten:
                        continue  # its new pods would wait for a ConfigMap that is not there
                    await attempt(patch.workload.ref, self._apply_workload(patch))
                for name, status in plan.statuses.items():
                    # None clears it once the pods are gone (and compares equal to "absent").
                    status["podsWithoutSidecar"] = self._pod_findings.get(plan.states[name].record.uid)
                    if name in unwritten:
                        status = reconcile.config_not_written(status, unwritten[name])
                    await attempt(f"status of VertexRoute {name}",
                                  self._apply_status(plan.states[name].record, status))
                if failures:
                    raise SyncError(failures) from failures[0][1]
        return plan

    async def _sync_options(self, namespace: str, has_routes: bool) -> reconcile.Options:
        options = self._options_for(namespace)
        label = self.options.injection_label
        if label is None or not has_routes or options.namespace_excluded or options.namespace_unwritable:
            return options
        assert self.kube is not None
        found = await self.kube.read_namespace(namespace)  # its labels change without an event for us
        labels = ((found or {}).get("metadata") or {}).get("labels") or {}
        if labels.get(label[0]) == label[1]:
            return options
        return dataclasses.replace(options, missing_label=label)

    def _options_for(self, namespace: str) -> reconcile.Options:
        return dataclasses.replace(self.reconcile_options,
                                   namespace_excluded=namespace in self.options.excluded_namespaces,
                                   namespace_unwritable=not self.options.may_write(namespace))

    async def _apply_config_map(self, state: reconcile.RouteState) -> None:
        record, rendered = state.record, state.rendered
        if record.deleting or record.route is None or rendered is None:
            return
        if self._config_hashes.get(record.uid) == rendered.hash:
            return
        assert self.kube is not None
        name = record.route.config_map_name
        body = config_map_body(record, rendered)
        current = await self.kube.read_config_map(record.namespace, name)
        if current is None:
            await self.kube.create_config_map(record.namespace, body)
            metrics.WRITES.labels("ConfigMap", "create").inc()
            logger.info("Created ConfigMap %s/%s for VertexRoute %s.", record.namespace, name, record.name)
        elif not _config_map_matches(current, body):
            if (current.get("metadata", {}).get("labels") or {}).get(MANAGED_BY_LABEL) != MANAGED_BY:
                logger.warning("ConfigMap %s/%s exists but was not created by the operator; taking it over.",
                               record.namespace, name)
            patch = {"metadata": {k: body["metadata"][k] for k in ("labels", "annotations", "ownerReferences")},
                     "data": body["data"]}
            await self.kube.patch_config_map(record.namespace, name, patch)
            metrics.WRITES.labels("ConfigMap", "update").inc()
            logger.info("Updated ConfigMap %s/%s (hash %s); the sidecars reload it.",
                        record.namespace, name, rendered.hash)
        self._config_hashes[record.uid] = rendered.hash

    async def _apply_workload(self, patch: reconcile.WorkloadPatch) -> None:
        assert self.kube is not None
        w = patch.workload
        done = await self.kube.patch_template_annotations(w.kind, w.namespace, w.name, patch.annotations)
        if done:
            metrics.WRITES.labels(w.kind, patch.reason).inc()
            logger.info("%s %s/%s: %s (pod template annotations %s); it rolls out new pods.",
                        w.kind, w.namespace, w.name,
                        "rolled back to no sidecar" if patch.reason == "rollback" else "sidecar configured",
                        dict(patch.annotations))

    async def _apply_status(self, record: reconcile.RouteRecord, desired: dict[str, Any]) -> None:
        # What we wrote last is fresher than the indexed copy, which lags behind our own
        # writes until their watch events arrive.
        last = self._statuses.get(record.uid)
        current = last if last is not None else record.status
        if cond.same_status(current, desired):
            return
        assert self.kube is not None
        status = dict(desired)
        status["conditions"] = cond.merge(current.get("conditions"), desired["conditions"])
        # Merge patches keep keys they do not mention: clear the ones that went away.
        for key in set(record.status) | set(last or {}):
            if key not in status:
                status[key] = None
        if await self.kube.patch_route_status(record.namespace, record.name, status):
            metrics.WRITES.labels(ROUTE_KIND, "status").inc()
            self._statuses[record.uid] = {k: v for k, v in status.items() if v is not None}

    # ---------------------------------------------------------------- repair

    async def scan_pods(self, namespace: str, indexes: Indexes) -> bool:
        """Find running pods that a route selects but that lack its (current) sidecar; report
        them (status, Event, metric) and, for routes with spec.rollout.repair, restart their
        workloads. True when a route's findings changed (its status needs writing)."""
        assert self.kube is not None
        records = [r for r in indexes.routes(namespace) if r.route is not None and not r.deleting]
        if not records or namespace in self.options.excluded_namespaces:
            return False
        now = asyncio.get_running_loop().time()
        if now - self._scanned.get(namespace, float("-inf")) < self.options.repair_seconds / 2:
            return False  # another route's daemon just checked this namespace
        self._scanned[namespace] = now
        changed = False
        states = {r.name: reconcile.evaluate(r, indexes.credentials(namespace), self.reconcile_options,
                                             with_config=False) for r in records}
        findings: dict[str, repair.Findings] = {r.name: repair.Findings() for r in records}
        for pod in await self.kube.list_pods(namespace):
            chosen = selecting(records, (pod.get("metadata") or {}).get("labels"))
            if not chosen or (plan := states[chosen[0].name].plan) is None:
                continue
            if (problem := repair.classify(pod, plan)) is not None:
                findings[chosen[0].name].add(pod, *problem)
        for record in records:
            found = findings[record.name]
            for problem, pods in (("missing", found.missing), ("outdated", found.outdated)):
                metrics.PODS_WITHOUT_SIDECAR.labels(namespace, record.name, problem).set(len(pods))
            restarted: list[str] = []
            assert record.route is not None
            if record.route.repair:
                for kind, name in sorted(found.owners):
                    key = (kind, namespace, name)
                    if now - self._restarted.get(key, float("-inf")) < self.options.repair_backoff_seconds:
                        continue
                    stamp = {repair.RESTARTED_AT_ANNOTATION: reconcile_timestamp()}
                    if await self.kube.patch_template_annotations(kind, namespace, name, stamp):
                        self._restarted[key] = now
                        restarted.append(f"{kind}/{name}")
                        metrics.REPAIRS.labels(kind).inc()
                        metrics.WRITES.labels(kind, "repair").inc()
                        logger.info("%s %s/%s restarted: its pods lack the current sidecar of VertexRoute %s.",
                                    kind, namespace, name, record.name)
            summary = found.status(restarted) if found.count else None
            previous = self._pod_findings.get(record.uid)
            changed = changed or previous != summary
            if summary is None:
                self._pod_findings.pop(record.uid, None)
            else:
                self._pod_findings[record.uid] = summary
            if summary is not None and (previous is None or previous["pods"] != summary["pods"] or restarted):
                message = found.message() + (f" Restarted: {', '.join(restarted)}." if restarted else "")
                await self._post_event(record, "PodsWithoutSidecar", message)
        return changed

    async def _post_event(self, record: reconcile.RouteRecord, reason: str, message: str) -> None:
        assert self.kube is not None
        now = reconcile_timestamp()
        try:
            await self.kube.create_event(record.namespace, {
                "apiVersion": "v1", "kind": "Event",
                "metadata": {"generateName": f"{record.name}.", "namespace": record.namespace},
                "involvedObject": {"apiVersion": API_VERSION, "kind": ROUTE_KIND, "name": record.name,
                                   "namespace": record.namespace, "uid": record.uid},
                "reason": reason, "message": message[:1000], "type": "Warning",
                "firstTimestamp": now, "lastTimestamp": now, "count": 1,
                "source": {"component": "vertex-operator"}, "reportingComponent": "vertex-operator",
            })
        except Exception as exc:  # an Event is a courtesy: the status and the metric say it too
            logger.warning("Posting an Event of VertexRoute %s/%s failed: %s", record.namespace, record.name,
                           describe_error(exc))

    # ---------------------------------------------------------------- admission

    async def pull_secrets(self, namespace: str, account: str) -> tuple[list[str], str | None]:
        """The imagePullSecrets of a service account, and a warning when they cannot be read."""
        assert self.kube is not None
        try:
            # Bounded well below the API server's webhook timeout (default 5 s).
            found = await asyncio.wait_for(self.kube.read_service_account(namespace, account), 2.0)
        except Exception as exc:
            return [], (f"could not read ServiceAccount {account} ({describe_error(exc)}): its imagePullSecrets "
                        "were not copied into the pod")
        if found is None:
            return [], None  # the API server refuses the pod itself (its service account does not exist)
        return [s["name"] for s in found.get("imagePullSecrets") or [] if isinstance(s, Mapping) and s.get("name")], None

    def selects(self, pod: Mapping[str, Any], namespace: str, indexes: Indexes) -> bool:
        """Whether a route would inject this pod (so the admission needs its namespace's team)."""
        if namespace in self.options.excluded_namespaces:
            return False
        labels = (pod.get("metadata") or {}).get("labels") or {}
        active = [r for r in indexes.routes(namespace) if r.route is not None and not r.deleting]
        return bool(selecting(active, labels))

    async def namespace_team(self, namespace: str) -> str | None:
        """The showback team of a namespace (its `--showback-team-label` label), cached briefly.
        Never fails an admission: without an answer the pod simply has no team."""
        label = self.options.team_label
        if not label or self.kube is None:
            return None
        now = time.monotonic()
        cached = self._teams.get(namespace)
        if cached is not None and cached[0] > now:
            return cached[1]
        try:
            found = await asyncio.wait_for(self.kube.read_namespace(namespace), TEAM_LOOKUP_SECONDS)
        except Exception as exc:
            logger.warning("Cannot read Namespace %s for its showback team label %s (%s); the pod gets no team.",
                           namespace, label, describe_error(exc))
            return None
        team = showback.team_of(found, label)
        self._teams[namespace] = (now + TEAM_CACHE_SECONDS, team)
        return team

    def admit(self, pod: Mapping[str, Any], namespace: str, indexes: Indexes,
              pull_secrets: list[str] | None = None, team: str | None = None) -> inject.Injection:
        """Decide on one pod at creation: a JSON patch, or why none (and warnings).

        `pull_secrets`: those of the account the pod is switched to (see `pull_secrets`); `team`: the
        showback team of the namespace (see `namespace_team`)."""
        if namespace in self.options.excluded_namespaces:
            return inject.Injection(reason=f"namespace {namespace} is never injected")
        if not self.options.may_write(namespace):  # its ConfigMap cannot exist: the pod would not start
            return inject.Injection(reason=reconcile.unwritable_message(namespace))
        labels = (pod.get("metadata") or {}).get("labels") or {}
        active = [r for r in indexes.routes(namespace) if r.route is not None and not r.deleting]
        chosen = selecting(active, labels)
        if not chosen:
            return inject.Injection(reason="no VertexRoute selects it")
        state = reconcile.evaluate(chosen[0], indexes.credentials(namespace), self.reconcile_options,
                                   with_config=False)
        if state.plan is None:
            assert state.blocked is not None
            if inject.opted_out((pod.get("metadata") or {}).get("annotations")):
                return inject.Injection(reason="opted out")
            return inject.Injection(
                reason=state.blocked[1],
                warnings=[f"VertexRoute {chosen[0].name!r} selects this pod but cannot inject "
                          f"its sidecar: {state.blocked[1]}"])
        result = inject.inject(pod, state.plan, pull_secrets or (), team=team)
        if result.injected and len(chosen) > 1:
            others = ", ".join(repr(r.name) for r in chosen[1:])
            result.warnings.append(f"VertexRoute(s) {others} also select this pod; "
                                   f"VertexRoute {chosen[0].name!r} (the oldest) was applied.")
        return result


def reconcile_timestamp() -> str:
    return datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def _config_map_matches(current: Mapping[str, Any], desired: Mapping[str, Any]) -> bool:
    meta, want = current.get("metadata") or {}, desired["metadata"]
    return (
        (current.get("data") or {}) == desired["data"]
        and all((meta.get("labels") or {}).get(k) == v for k, v in want["labels"].items())
        and all((meta.get("annotations") or {}).get(k) == v for k, v in want["annotations"].items())
        and any(ref.get("uid") == want["ownerReferences"][0]["uid"] for ref in meta.get("ownerReferences") or [])
    )

