"""The operator's own Prometheus metrics (kopf has none), on a port of their own.

A private registry keeps them apart from anything else imported into the process.
"""

from __future__ import annotations

import contextlib
import threading
import time
from typing import Iterator

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

REGISTRY = CollectorRegistry(auto_describe=True)

RECONCILES = Counter(
    "vertex_operator_reconciles_total", "Namespace reconciliations, by trigger and result.",
    ["trigger", "result"], registry=REGISTRY)
ERRORS = Counter(
    "vertex_operator_errors_total", "Errors while reconciling or admitting, by stage.",
    ["stage"], registry=REGISTRY)
DURATION = Histogram(
    "vertex_operator_reconcile_duration_seconds", "Time to reconcile one namespace, by trigger.",
    ["trigger"], registry=REGISTRY,
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30))
WRITES = Counter(
    "vertex_operator_writes_total", "Objects the operator wrote, by kind and action.",
    ["kind", "action"], registry=REGISTRY)
ADMISSIONS = Counter(
    "vertex_operator_admissions_total", "Pods seen by the injection webhook, by result.",
    ["result"], registry=REGISTRY)
ADMISSION_DURATION = Histogram(
    "vertex_operator_admission_duration_seconds", "Time to answer one AdmissionReview of the injection webhook.",
    registry=REGISTRY, buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5))
ADMISSION_PATCHES = Counter(
    "vertex_operator_admission_patch_operations_total",
    "JSON patch operations the injection webhook returned (sidecar, volumes, env, ...).", registry=REGISTRY)
# Leadership: every replica serves the webhook; only the holder of the Lease reconciles.
LEADER = Gauge(
    "vertex_operator_leader", "1 while this replica holds the leader Lease (reconciles), else 0.",
    registry=REGISTRY)
LEADERSHIP_CHANGES = Counter(
    "vertex_operator_leadership_changes_total", "Times this replica acquired or lost the leader Lease.",
    ["change"], registry=REGISTRY)
PODS_WITHOUT_SIDECAR = Gauge(
    "vertex_operator_pods_without_sidecar",
    "Running pods a route selects that lack the sidecar (missing) or carry an outdated one (outdated).",
    ["namespace", "route", "problem"], registry=REGISTRY)
REPAIRS = Counter(
    "vertex_operator_repair_restarts_total", "Workloads restarted because their pods lacked the (current) sidecar.",
    ["kind"], registry=REGISTRY)
FENCED_WRITES = Counter(
    "vertex_operator_fenced_writes_total",
    "Writes refused locally because this replica did not (surely) hold the leader Lease.", registry=REGISTRY)


@contextlib.contextmanager
def reconciling(trigger: str) -> Iterator[None]:
    """Count and time one reconciliation; an exception counts as an error and propagates."""
    started = time.perf_counter()
    try:
        yield
    except BaseException:
        RECONCILES.labels(trigger, "error").inc()
        ERRORS.labels("reconcile").inc()
        raise
    else:
        RECONCILES.labels(trigger, "success").inc()
    finally:
        DURATION.labels(trigger).observe(time.perf_counter() - started)


class MetricsServer:
    """`/metrics` on addr:port in a background thread; port 0 picks a free one."""

    def __init__(self, addr: str, port: int) -> None:
        self.addr = addr
        self.requested_port = port
        self.port: int | None = None
        self._server: object | None = None
        self._thread: threading.Thread | None = None

    def start(self) -> int:
        server, thread = start_http_server(self.requested_port, addr=self.addr, registry=REGISTRY)
        self._server, self._thread = server, thread
        self.port = int(server.server_port)
        return self.port

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()  # type: ignore[attr-defined]
            self._server.server_close()  # type: ignore[attr-defined]
            self._server = None
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None
