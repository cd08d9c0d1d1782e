"""The sidecar's Prometheus metrics (design §3): names, labels, buckets. No request logic.

Names follow the OpenTelemetry GenAI semantic conventions in Prometheus form, so
dashboards built for other GenAI gateways carry over; the rest are `vertex_sidecar_*`.
Everything lives in a dedicated `CollectorRegistry` (never the process-global one), so
tests and several sidecars in one process do not share counters.

Two groups:
- `ProcessMetrics`: in-flight requests, credential refreshes, Live sessions, config
  reloads, readiness, build info. Created once; they survive config reloads.
- `TrafficMetrics`: per-request series. Their label names include the configured
  header labels (`metrics.header_labels`), so a reload that changes those rebuilds this
  group (Prometheus treats the restart of a counter as a reset, which rate() handles).

Per-request series use `FastCounter`/`FastHistogram` rather than prometheus_client's
classes: a child is a plain object updated without a lock (a histogram observation is one
C bisect), about ten times cheaper per request. They are updated and collected only on
the event loop thread (the admin port's /metrics runs on the same loop), so no lock is
needed. prometheus_client still renders the exposition.

Label values are bounded by the caller of these classes (`telemetry`): model names are
normalised and capped, unknown paths collapse to one value.
"""

from __future__ import annotations

import bisect
import platform
from typing import Callable, Final, Generic, Iterator, Sequence, TypeVar

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info
from prometheus_client.exposition import generate_latest
from prometheus_client.metrics_core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString

from . import __version__

__all__ = [
    "CONTENT_TYPE",
    "DURATION_BUCKETS",
    "TOKEN_BUCKETS",
    "TOKEN_TYPES",
    "TPOT_BUCKETS",
    "TTFT_BUCKETS",
    "FastCounter",
    "FastHistogram",
    "ProcessMetrics",
    "TrafficMetrics",
    "render",
]

# Bucket boundaries advised by the OpenTelemetry GenAI conventions.
TOKEN_BUCKETS: Final = (1, 4, 16, 64, 256, 1024, 4096, 16384, 65536, 262144, 1048576, 4194304, 16777216, 67108864)
DURATION_BUCKETS: Final = (0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.28, 2.56, 5.12, 10.24, 20.48, 40.96, 81.92)
# OTel's advice stops at 10 s; thinking models often take longer, and a p95 alert at 10 s
# needs buckets above it.
TTFT_BUCKETS: Final = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
                       15.0, 30.0, 60.0)
TPOT_BUCKETS: Final = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5)
LIVE_SESSION_BUCKETS: Final = (1, 5, 15, 30, 60, 120, 300, 600, 1200, 1800, 3600)

# The classic text format: every Prometheus 2.x parses it (Debian's is 2.42).
# (recent prometheus_client releases default to version=1.0.0.)
CONTENT_TYPE: Final = "text/plain; version=0.0.4; charset=utf-8"

TOKEN_TYPES: Final = ("input", "output", "cached_input", "reasoning")

# OTel attribute names, Prometheus-style.
MODEL: Final = "gen_ai_request_model"
OPERATION: Final = "gen_ai_operation_name"
TOKEN_TYPE: Final = "gen_ai_token_type"


# ------------------------------------------------------------------ fast families

class CounterChild:
    __slots__ = ("value",)

    def __init__(self) -> None:
        self.value = 0.0

    def inc(self, amount: float = 1.0) -> None:
        self.value += amount


class HistogramChild:
    __slots__ = ("_bounds", "counts", "sum")

    def __init__(self, bounds: tuple[float, ...]) -> None:
        self._bounds = bounds
        self.counts = [0] * (len(bounds) + 1)  # per bucket, not cumulative; the last is +Inf
        self.sum = 0.0

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self._bounds, value)] += 1  # `le` is inclusive
        self.sum += value


Child = TypeVar("Child", CounterChild, HistogramChild)


class _Family(Collector, Generic[Child]):
    def __init__(self, name: str, documentation: str, labelnames: Sequence[str]) -> None:
        self.name = name
        self.documentation = documentation
        self.labelnames = tuple(labelnames)
        self._children: dict[tuple[str, ...], Child] = {}

    def labels(self, *values: str) -> Child:
        child = self._children.get(values)
        if child is None:
            if len(values) != len(self.labelnames):
                raise ValueError(f"{self.name}: expected labels {self.labelnames}, got {values}")
            child = self._children[values] = self._new_child()
        return child

    def _new_child(self) -> Child:
        raise NotImplementedError

    def describe(self) -> list[Metric]:
        return [self._family()]

    def _family(self) -> Metric:
        raise NotImplementedError


class FastCounter(_Family[CounterChild]):
    """A labelled counter; `name` without `_total` (it is added, as prometheus_client does)."""

    def _new_child(self) -> CounterChild:
        return CounterChild()

    def _family(self) -> CounterMetricFamily:
        return CounterMetricFamily(self.name, self.documentation, labels=self.labelnames)

    def collect(self) -> Iterator[Metric]:
        family = self._family()
        for values, child in list(self._children.items()):
            family.add_metric(values, child.value)
        yield family


class FastHistogram(_Family[HistogramChild]):
    def __init__(self, name: str, documentation: str, labelnames: Sequence[str], buckets: Sequence[float]) -> None:
        super().__init__(name, documentation, labelnames)
        self.buckets = tuple(float(b) for b in buckets)
        self._le = [floatToGoString(b) for b in self.buckets] + ["+Inf"]  # type: ignore[no-untyped-call]

    def _new_child(self) -> HistogramChild:
        return HistogramChild(self.buckets)

    def _family(self) -> HistogramMetricFamily:
        return HistogramMetricFamily(self.name, self.documentation, labels=self.labelnames)

    def collect(self) -> Iterator[Metric]:
        family = self._family()
        for values, child in list(self._children.items()):
            cumulative, buckets = 0, []
            for le, count in zip(self._le, child.counts):
                cumulative += count
                buckets.append((le, float(cumulative)))
            family.add_metric(values, buckets, child.sum)
        yield family


class _InflightGauge(Collector):
    """In-flight requests as a plain int, inc/dec on every request without a lock."""

    def __init__(self) -> None:
        self.value = 0

    def describe(self) -> list[Metric]:
        return [GaugeMetricFamily("vertex_sidecar_inflight_requests", "HTTP requests being proxied right now.")]

    def collect(self) -> Iterator[Metric]:
        yield GaugeMetricFamily("vertex_sidecar_inflight_requests", "HTTP requests being proxied right now.",
                                value=self.value)


# ------------------------------------------------------------------------ groups

class ProcessMetrics:
    """Series that describe the process rather than one request; never rebuilt."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.inflight = _InflightGauge()
        registry.register(self.inflight)
        self.token_refresh = Counter(
            "vertex_sidecar_token_refresh", "Google access token refreshes, by credential and result.",
            ["credential", "result"], registry=registry)
        self.live_sessions = Gauge(
            "vertex_sidecar_live_sessions", "Open Live API (WebSocket) sessions.", ["route"], registry=registry)
        self.live_sessions_started = Counter(
            "vertex_sidecar_live_sessions_started", "Live API sessions opened.", ["route"], registry=registry)
        self.live_session_duration = Histogram(
            "vertex_sidecar_live_session_duration_seconds", "Duration of closed Live API sessions.", ["route"],
            buckets=LIVE_SESSION_BUCKETS, registry=registry)
        self.live_turns = Counter(
            "vertex_sidecar_live_turns", "Live API turns that reported usage.", ["route", "model"], registry=registry)
        self.live_tokens = Counter(
            "vertex_sidecar_live_tokens", "Tokens of Live API turns (also counted in gen_ai_client_token_usage).",
            ["route", "model", TOKEN_TYPE], registry=registry)
        self.proxy_connects = Counter(
            "vertex_sidecar_proxy_connects", "Forward-proxy CONNECT requests, by outcome (intercepted|tunnelled|"
            "refused) and reason (the refusal's, or the outcome).", ["outcome", "reason"], registry=registry)
        self.proxy_tunnel_bytes = Counter(
            "vertex_sidecar_proxy_tunnel_bytes", "Bytes relayed through blind tunnels, by direction (up|down).",
            ["direction"], registry=registry)
        self.config_reloads = Counter(
            "vertex_sidecar_config_reloads", "Config file reloads, by result (success|failure).", ["result"],
            registry=registry)
        self.ready = Gauge(
            "vertex_sidecar_ready", "1 when the sidecar is ready to serve (first tokens fetched), else 0.",
            registry=registry)
        self.build = Info("vertex_sidecar_build", "Version of the running sidecar.", registry=registry)
        self.build.info({"version": __version__, "python": platform.python_version()})

    def set_ready_probe(self, probe: Callable[[], bool]) -> None:
        """Readiness is read at scrape time from the sidecar's state."""
        self.ready.set_function(lambda: 1.0 if probe() else 0.0)


class TrafficMetrics:
    """Per-request series; `extra_labels` are the configured header labels, in order."""

    def __init__(self, registry: CollectorRegistry, extra_labels: tuple[str, ...] = ()) -> None:
        self.registry = registry
        self.extra_labels = extra_labels
        extra = list(extra_labels)
        self.requests = FastCounter(
            "vertex_sidecar_requests", "Proxied requests, by route, model, operation and HTTP status code.",
            ["route", "model", "operation", "code", *extra])
        self.token_usage = FastHistogram(
            "gen_ai_client_token_usage", "Tokens per request, by token type (input|output|cached_input|reasoning).",
            [TOKEN_TYPE, MODEL, OPERATION, "route", *extra], TOKEN_BUCKETS)
        self.cost = FastCounter(
            "vertex_sidecar_cost_usd", "Estimated cost in USD at list prices (the pricing table).",
            ["route", "model", *extra])
        self.request_duration = FastHistogram(
            "gen_ai_server_request_duration_seconds", "Time from the request's arrival to the response's last byte.",
            [MODEL, OPERATION, "route"], DURATION_BUCKETS)
        self.time_to_first_token = FastHistogram(
            "gen_ai_server_time_to_first_token_seconds",
            "Time to the first response byte of successful streaming responses.",
            [MODEL, OPERATION, "route"], TTFT_BUCKETS)
        self.time_per_output_token = FastHistogram(
            "gen_ai_server_time_per_output_token_seconds",
            "Streaming time after the first byte, per output token after the first.",
            [MODEL, OPERATION, "route"], TPOT_BUCKETS)
        self.upstream_errors = FastCounter(
            "vertex_sidecar_upstream_errors",
            "Upstream failures: reason timeout|unreachable|failed|stream_broken, or status_429 / status_5xx "
            "answered by Google.",
            ["route", "reason"])
        self.errors = FastCounter(
            "vertex_sidecar_errors", "Errors the sidecar answered itself (or a caller that went away), by reason: "
            "credentials_unavailable, no_matching_route, invalid_path, body_too_large, client_disconnected, ...",
            ["route", "reason"])
        self.retries = FastCounter(
            "vertex_sidecar_upstream_retries",
            "Requests the sidecar sent again: reason token_refused (Google answered 401 to a sidecar token; "
            "refreshed and replayed once) or fallback (429/503, answered by `location`, a configured fallback).",
            ["route", "reason", "location"])
        for collector in self.collectors():
            registry.register(collector)

    def collectors(self) -> tuple[Collector, ...]:
        return (self.requests, self.token_usage, self.cost, self.request_duration, self.time_to_first_token,
                self.time_per_output_token, self.upstream_errors, self.errors, self.retries)

    def unregister(self) -> None:
        for collector in self.collectors():
            self.registry.unregister(collector)


def render(registry: CollectorRegistry) -> tuple[bytes, str]:
    """The exposition for the admin port's /metrics: (body, content type)."""
    return generate_latest(registry), CONTENT_TYPE
