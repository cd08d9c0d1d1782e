"""OpenTelemetry traces for the sidecar: settings, the per-request hooks, the Live hooks.

Off by default. When off nothing of this module runs and OpenTelemetry is never imported
(`cli.build_sidecar` asks `tracing_settings` first, which is pure). When on:

- `Tracer` is one more `Observer` of the proxy: at arrival it reads the caller's
  `traceparent`/`tracestate`/`baggage`, decides sampling and points the request's
  `traceparent` at the sidecar's span (Google sees the sidecar as the parent); when the
  request ends it turns the record into a span (`trace_spans`) and hands it to the
  exporter's queue (`otlp_export`). The access log line gets `trace_id`/`span_id`.
- `LiveTrace` follows one Live session: a session span and one span per turn.

Settings: the config's `tracing:` section switches tracing on and may set the endpoint,
the sample ratio and the baggage keys to record; everything else comes from the standard
`OTEL_*` variables (endpoint, headers, timeout, compression, certificates, sampler,
batch/queue sizes, service name and resource attributes, propagators).
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Iterator, Mapping

from . import __version__
from .config import Config, TracingConfig
from .observe import ChunkParser, RequestRecord
from .routing import RoutingError, origin_for, upstream_template
from .trace_context import (
    Sampler,
    caller_context,
    new_span_id,
    new_trace_id,
    parse_key_values,
    propagate,
    sampler_from_env,
)
from .trace_spans import RestSpans, SpanContext, live_session_span, live_turn_span
from .usage import Usage

if TYPE_CHECKING:
    from prometheus_client import CollectorRegistry
    from prometheus_client.metrics_core import Metric

    from .otlp_export import ExportSettings, SpanExporter
    from .state import SidecarState

log = logging.getLogger("vertex_sidecar.tracing")

DEFAULT_ENDPOINT = "http://localhost:4318"
TRACES_PATH = "/v1/traces"
SUPPORTED_PROTOCOL = "http/protobuf"


class TracingSetupError(ValueError):
    """The OTEL_* settings ask for something the sidecar cannot do (e.g. OTLP over gRPC)."""


@dataclass(frozen=True)
class TracingSettings:
    enabled: bool
    sampler: Sampler = field(default_factory=Sampler)
    baggage_keys: tuple[str, ...] = ()
    continue_caller: bool = True  # OTEL_PROPAGATORS has tracecontext
    read_baggage: bool = True  # OTEL_PROPAGATORS has baggage
    endpoint: str = DEFAULT_ENDPOINT + TRACES_PATH
    resource: Mapping[str, str] = field(default_factory=dict)
    environ: Mapping[str, str] = field(default_factory=dict)  # the OTEL_* variables read

    def export_settings(self) -> "ExportSettings":
        from .otlp_export import ExportSettings

        env = self.environ
        return ExportSettings(
            endpoint=self.endpoint,
            headers=parse_key_values(_signal(env, "HEADERS") or ""),
            timeout_s=_millis(_signal(env, "TIMEOUT"), 10_000) / 1000,
            compression=(_signal(env, "COMPRESSION") or "none").strip().lower(),
            ca_file=_signal(env, "CERTIFICATE"),
            client_cert_file=_signal(env, "CLIENT_CERTIFICATE"),
            client_key_file=_signal(env, "CLIENT_KEY"),
            max_queue=_positive(env.get("OTEL_BSP_MAX_QUEUE_SIZE"), 2048),
            max_batch=_positive(env.get("OTEL_BSP_MAX_EXPORT_BATCH_SIZE"), 512),
            schedule_delay_s=_millis(env.get("OTEL_BSP_SCHEDULE_DELAY"), 5000) / 1000,
        )


def _signal(env: Mapping[str, str], name: str) -> str | None:
    """OTEL_EXPORTER_OTLP_TRACES_<name>, else OTEL_EXPORTER_OTLP_<name>."""
    return env.get(f"OTEL_EXPORTER_OTLP_TRACES_{name}") or env.get(f"OTEL_EXPORTER_OTLP_{name}") or None


def _millis(text: str | None, default: int) -> float:
    try:
        value = float(text) if text else default
    except ValueError:
        return default
    return value if value > 0 else default


def _positive(text: str | None, default: int) -> int:
    try:
        value = int(text) if text else default
    except ValueError:
        return default
    return value if value > 0 else default


def tracing_settings(config: TracingConfig, environ: Mapping[str, str] | None = None) -> TracingSettings:
    """The effective settings: the config's `tracing:` section over the standard OTEL_* variables.

    Raises `TracingSetupError` for a protocol the sidecar does not speak.
    """
    env = {key: value for key, value in (os.environ if environ is None else environ).items()
           if key.startswith("OTEL_")}
    disabled = (env.get("OTEL_SDK_DISABLED", "").strip().lower() == "true"
                or env.get("OTEL_TRACES_EXPORTER", "").strip().lower() == "none")
    if not config.enabled or disabled:
        return TracingSettings(enabled=False)
    protocol = (_signal(env, "PROTOCOL") or SUPPORTED_PROTOCOL).strip().lower()
    if protocol != SUPPORTED_PROTOCOL:
        raise TracingSetupError(
            f"OTEL_EXPORTER_OTLP_PROTOCOL={protocol} is not supported: the sidecar exports OTLP over HTTP with "
            "protobuf (http/protobuf, the collector's port 4318)")
    if config.endpoint is not None:
        endpoint = _traces_url(config.endpoint)
    elif env.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"):
        endpoint = env["OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"].strip()  # used as is, per the spec
    else:
        endpoint = _traces_url(env.get("OTEL_EXPORTER_OTLP_ENDPOINT") or DEFAULT_ENDPOINT)
    if config.sample_ratio is not None:
        sampler = Sampler(config.sample_ratio, parent_based=True)
    else:
        sampler = sampler_from_env(env.get("OTEL_TRACES_SAMPLER"), env.get("OTEL_TRACES_SAMPLER_ARG"))
    propagators = {name.strip().lower() for name in env.get("OTEL_PROPAGATORS", "tracecontext,baggage").split(",")}
    return TracingSettings(
        enabled=True, sampler=sampler, baggage_keys=config.baggage_keys,
        continue_caller="tracecontext" in propagators, read_baggage="baggage" in propagators,
        endpoint=endpoint, resource=resource_attributes(env), environ=env,
    )


def _traces_url(base: str) -> str:
    """OTEL_EXPORTER_OTLP_ENDPOINT is a base URL: the signal path is appended."""
    base = base.strip().rstrip("/")
    return base if base.endswith(TRACES_PATH) else base + TRACES_PATH


def resource_attributes(env: Mapping[str, str]) -> dict[str, str]:
    """OTEL_RESOURCE_ATTRIBUTES (the webhook puts the pod's k8s.* attributes there), the
    service name (OTEL_SERVICE_NAME wins) and the sidecar's version."""
    resource = {"service.name": "vertex-sidecar", "service.version": __version__,
                "telemetry.sdk.name": "vertex_sidecar", "telemetry.sdk.language": "python"}
    resource.update(parse_key_values(env.get("OTEL_RESOURCE_ATTRIBUTES", "")))
    if env.get("OTEL_SERVICE_NAME"):
        resource["service.name"] = env["OTEL_SERVICE_NAME"].strip()
    return resource


class Tracer:
    """The proxy's tracing `Observer` and the Live relay's tracing hooks."""

    def __init__(self, settings: TracingSettings, state: "SidecarState", exporter: "SpanExporter") -> None:
        self.settings = settings
        self.state = state
        self.exporter = exporter
        self._credentials: tuple[Config | None, dict[str, str]] = (None, {})
        self._rest_spans = RestSpans(credential=self._credential, server=self._server)
        self._rest_spans_config: Config | None = None  # the config its memo was built under

    def apply_config(self, config: Config, environ: Mapping[str, str] | None = None) -> None:
        """A reload may change the sample ratio, the baggage keys or switch tracing off (the
        exporter and its endpoint stay as started; a new endpoint needs a restart)."""
        try:
            settings = tracing_settings(config.tracing, environ)
        except TracingSetupError:
            return
        self.settings = replace(self.settings, enabled=settings.enabled, sampler=settings.sampler,
                                baggage_keys=settings.baggage_keys) if settings.enabled else \
            replace(self.settings, enabled=False)

    # ------------------------------------------------------------ Observer
    def request_started(self, record: RequestRecord) -> None:
        context = self._start(record)
        if context is not None:
            record.trace = context

    def response_started(self, record: RequestRecord) -> ChunkParser | None:
        return None

    def request_finished(self, record: RequestRecord) -> None:
        context = record.trace
        if context is None:
            return
        config = self.state.snapshot.config
        if config is not self._rest_spans_config:  # a reload: credentials or hosts may differ
            self._rest_spans = RestSpans(credential=self._credential, server=self._server)
            self._rest_spans_config = config
        exporter = self.exporter
        if not exporter.accepting():
            return
        try:
            encoded = exporter.encoder.rest_span(context, self._rest_spans.group(record), record)
        except Exception:  # tracing must never break the relay
            log.exception("tracing: no span for request %s", record.request_id)
            return
        exporter.enqueue(encoded)

    def flush(self) -> None:
        self.exporter.tick()

    async def aclose(self) -> None:
        await self.exporter.aclose()

    # ------------------------------------------------------------------ Live
    def live_started(self, record: RequestRecord) -> "LiveTrace | None":
        context = self._start(record)
        return LiveTrace(self, record, context) if context is not None else None

    # ------------------------------------------------------------- internals
    def _start(self, record: RequestRecord) -> SpanContext | None:
        settings = self.settings
        if not settings.enabled:
            return None
        headers = record.request_headers
        if headers is None:
            return None
        if settings.continue_caller:
            parent, index, baggage = caller_context(headers, read_baggage=settings.read_baggage,
                                                    baggage_keys=settings.baggage_keys)
        else:
            parent, index, baggage = None, None, {}
        trace_id = parent.trace_id if parent is not None else new_trace_id()
        if not settings.sampler.sampled(trace_id, parent):
            return None  # not recorded; the caller's traceparent (if any) goes on unchanged
        span_id = new_span_id()
        trace_hex, span_hex = trace_id.hex(), span_id.hex()
        if settings.continue_caller:
            propagate(headers, index, f"00-{trace_hex}-{span_hex}-01".encode())
        extra = record.extra
        extra["trace_id"] = trace_hex  # the access log line joins the trace
        extra["span_id"] = span_hex
        if parent is not None:
            return SpanContext(trace_id, span_id, parent.span_id, parent.trace_state, baggage)
        return SpanContext(trace_id, span_id, b"", "", baggage)

    def _credential(self, route: str | None) -> str | None:
        config = self.state.snapshot.config
        cached_for, names = self._credentials
        if cached_for is not config:
            names = {r.name: r.credential for r in config.routes}
            names[config.default_route.name] = config.default_route.credential
            self._credentials = (config, names)
        return names.get(route) if route else None

    def _server(self, record: RequestRecord) -> tuple[str, int] | None:
        location = record.answered_location
        if not location:
            return None
        try:
            origin = origin_for(upstream_template(record.service, location,  # type: ignore[arg-type]
                                                  self.state.snapshot.config.upstreams), location)
        except RoutingError:
            return None
        return origin.host, origin.port


class LiveTrace:
    """One Live session's spans: the session, and each turn from the caller's input to its end."""

    __slots__ = ("tracer", "record", "context", "_turn_start_ns", "_first_chunk_ns", "_last_end_ns", "_turns")

    def __init__(self, tracer: Tracer, record: RequestRecord, context: SpanContext) -> None:
        self.tracer = tracer
        self.record = record
        self.context = context
        self._turn_start_ns: int | None = None
        self._first_chunk_ns: int | None = None
        self._last_end_ns = int(record.wall_time * 1e9)
        self._turns = 0

    def client_message(self) -> None:
        if self._turn_start_ns is None:
            self._turn_start_ns = time.time_ns()

    def server_message(self) -> None:
        if self._first_chunk_ns is None and self._turn_start_ns is not None:
            self._first_chunk_ns = time.time_ns()

    def turn(self, usage: Usage) -> None:
        """A turn completed with `usage`: emit its span."""
        now = time.time_ns()
        self._turns += 1
        start = self._turn_start_ns if self._turn_start_ns is not None else self._last_end_ns
        try:
            span = live_turn_span(self.record, self.context, new_span_id(), start_ns=start, end_ns=now,
                                  first_chunk_ns=self._first_chunk_ns, usage=usage, index=self._turns,
                                  server=self.tracer._server(self.record))
        except Exception:
            log.exception("tracing: no span for a turn of Live session %s", self.record.request_id)
        else:
            self.tracer.exporter.submit(span)
        self._turn_start_ns = self._first_chunk_ns = None
        self._last_end_ns = now

    def finish(self, turns: int, usage: Usage | None, ended_by: str | None, close_code: int | None) -> None:
        """The session ended (its record is finished): emit the session span."""
        record = self.record
        try:
            span = live_session_span(record, self.context, credential=self.tracer._credential(record.route),
                                     server=self.tracer._server(record), turns=turns, usage=usage,
                                     ended_by=ended_by, close_code=close_code)
        except Exception:
            log.exception("tracing: no span for Live session %s", record.request_id)
            return
        self.tracer.exporter.submit(span)


class TraceMetrics:
    """Prometheus view of the exporter: spans exported, dropped (by reason), queued."""

    def __init__(self, exporter: "SpanExporter") -> None:
        self.exporter = exporter

    def describe(self) -> list["Metric"]:
        return list(self.collect())

    def collect(self) -> Iterator["Metric"]:
        from prometheus_client.metrics_core import CounterMetricFamily, GaugeMetricFamily

        exporter = self.exporter
        yield CounterMetricFamily("vertex_sidecar_trace_spans_exported", "Spans the collector accepted.",
                                  value=exporter.exported)
        dropped = CounterMetricFamily(
            "vertex_sidecar_trace_spans_dropped",
            "Spans lost: queue_full (the export queue was full: collector slow or down), export_failed "
            "(the collector refused or could not be reached).", labels=["reason"])
        dropped.add_metric(["queue_full"], exporter.dropped_queue_full)
        dropped.add_metric(["export_failed"], exporter.dropped_export_failed)
        yield dropped
        yield GaugeMetricFamily("vertex_sidecar_trace_queue_spans", "Spans waiting to be exported.",
                                value=len(exporter.queue))


def start_tracing(settings: TracingSettings, state: "SidecarState", registry: "CollectorRegistry") -> Tracer:
    """Build the tracer and its exporter (this imports opentelemetry-proto) and register the metrics."""
    from .otlp_export import SpanExporter

    exporter = SpanExporter(settings.export_settings(), settings.resource)
    registry.register(TraceMetrics(exporter))  # type: ignore[arg-type]
    log.info("tracing on: OTLP/HTTP to %s, sampler ratio %g (%s)", settings.endpoint, settings.sampler.ratio,
             "parent-based" if settings.sampler.parent_based else "ignoring the caller's flag")
    return Tracer(settings, state, exporter)
