"""Token and cost accounting per request, turned into metrics and access-log fields.

`Telemetry` is the proxy's `Observer` (see `observe`): on `response_started` it picks
the usage parser for the request (publisher, method, model, content encoding), the proxy
feeds it every response chunk, and on `request_finished` the usage is priced, the metrics
are updated and tokens/cost/pricing are added to the record's access-log entry. It is
also the credentials' `RefreshObserver` (`token_refreshed`), the Live relay's hook
(`live_session_started/ended`, `live_turn_usage`) and the config reloader's
(`config_reloaded`, `apply_config`), and renders `/metrics`.

Hot path: this runs for every request. Label values are resolved through small dicts
and the label children of each (route, model, operation, header labels) are cached, so a
request costs a handful of dict lookups plus the metric updates themselves.

Cardinality: routes come from the config; model labels are the pricing table's families
(`gemini-2.0-flash-001` → `gemini-2.0-flash`), other model ids only once they answered
successfully and at most `MAX_MODEL_LABELS` of them, then `other`; requests the sidecar
could not route are `route="none"`; header-label values are sanitised and capped.
"""

from __future__ import annotations

import logging
import re
from typing import Any, Callable, Final, Mapping

from prometheus_client import CollectorRegistry, disable_created_metrics

from .config import Config
from .metrics import ProcessMetrics, TrafficMetrics, render
from .observe import AccessLog, ChunkParser, Observers, RequestRecord
from .pricing import PricingTable, model_id
from .showback import SHOWBACK_LABELS
from .usage import GzipUsageParser, NullUsageParser, Usage, UsageParser, new_usage_parser, operation_from_method

__all__ = ["MAX_LABEL_VALUES", "MAX_MODEL_LABELS", "NONE", "OTHER", "Telemetry"]

log = logging.getLogger("vertex_sidecar.telemetry")

NONE: Final = "none"  # no route / no model in the path
OTHER: Final = "other"  # a value beyond the caps, or not a sane name
MAX_MODEL_LABELS: Final = 100  # distinct model ids outside the pricing table
MAX_LABEL_VALUES: Final = 100  # distinct values per configured header label
_MAX_CACHE: Final = 4096  # memo dicts are cleared beyond this (odd inputs cannot grow them)
_LABEL_VALUE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.:/-]{0,63}")
_OPENAI_METHODS: Final = frozenset({"chat/completions", "completions", "embeddings"})
_UPSTREAM_REASONS: Final = {
    "UPSTREAM_TIMEOUT": "timeout",
    "UPSTREAM_UNREACHABLE": "unreachable",
    "UPSTREAM_FAILED": "failed",
    "UPSTREAM_STREAM_BROKEN": "stream_broken",
}


class Telemetry:
    """Accounting, metrics and the Observer hooks of one sidecar process."""

    def __init__(self, config: Config, *, registry: CollectorRegistry | None = None,
                 showback: Mapping[str, str] | None = None) -> None:
        # `*_created` series double the exposition and Prometheus 2.x ignores them.
        disable_created_metrics()  # type: ignore[no-untyped-call]
        self.registry = registry or CollectorRegistry()
        self.process = ProcessMetrics(self.registry)
        self._inflight = self.process.inflight
        self._header_labels: tuple[tuple[bytes, str], ...] = ()
        self._header_index: dict[bytes, int] = {}
        self._showback_all = dict(showback or {})  # namespace / workload / team of the pod (showback.py)
        self._showback_labels, self._showback, self._showback_fields = _showback_for(self._showback_all, ())
        self.traffic = TrafficMetrics(self.registry, self._showback_labels)
        self.pricing = PricingTable.default()
        # Label budgets: what was admitted stays admitted for the life of the process (its
        # series outlive a reload), so a reload must not hand out a fresh budget.
        self._admitted_models: set[str] = set()
        self._header_values: list[dict[str, str]] = []
        self._reset_caches()
        self.apply_config(config)

    # ------------------------------------------------------------------ wiring
    def observers(self, access_log: AccessLog | None = None) -> Observers:
        """Telemetry first, so the access log line carries tokens and cost."""
        return Observers(self, access_log or AccessLog())

    def set_ready_probe(self, probe: Callable[[], bool]) -> None:
        self.process.set_ready_probe(probe)

    def render(self) -> tuple[bytes, str]:
        return render(self.registry)

    def apply_config(self, config: Config) -> None:
        """Adopt a (re)loaded config: pricing overrides and header labels."""
        self.pricing = PricingTable.load(config.pricing)
        header_labels = tuple((name.encode("latin-1"), label) for name, label in config.metrics.header_labels.items())
        if header_labels != self._header_labels:
            self.traffic.unregister()
            self._header_labels = header_labels
            self._header_index = {name: index for index, (name, _) in enumerate(header_labels)}
            names = tuple(label for _, label in header_labels)
            self._showback_labels, self._showback, self._showback_fields = _showback_for(self._showback_all, names)
            self.traffic = TrafficMetrics(self.registry, names + self._showback_labels)
            self._header_values = [{} for _ in header_labels]  # the old label families are gone
        self._reset_caches()

    def config_reloaded(self, result: str, config: Config | None = None) -> None:
        """Count a config reload ("success" | "failure"); on success adopt `config` (the new one)."""
        if result == "success" and config is not None:
            self.apply_config(config)
        self.process.config_reloads.labels(result).inc()

    def _reset_caches(self) -> None:
        """Forget memos that depend on the config (pricing families, the traffic metrics' children)."""
        self._series: dict[tuple[str, ...], _Series] = {}
        self._models: dict[str, str] = {}
        self._operations: dict[tuple[str | None, str | None, str | None], str] = {}
        self._refresh_children: dict[tuple[str, str], Any] = {}

    # --------------------------------------------------------- Observer (HTTP)
    def request_started(self, record: RequestRecord) -> None:
        self._inflight.value += 1

    def response_started(self, record: RequestRecord) -> ChunkParser | None:
        try:
            return self._parser_for(record)
        except Exception:  # accounting must never break the relay
            log.exception("telemetry: no usage parser for request %s", record.request_id)
            return None

    def _parser_for(self, record: RequestRecord) -> ChunkParser | None:
        if not 200 <= record.status < 300 or record.service != "aiplatform":
            return None  # error bodies carry no usage
        method = record.operation
        if not method:
            return None
        publisher = record.publisher or ""
        model = record.model or ""
        openai = not publisher and method in _OPENAI_METHODS
        parser: UsageParser = new_usage_parser(publisher, method, openai, model=model)
        if isinstance(parser, NullUsageParser):
            return None
        if openai and not model:
            parser = _ModelSniffer(parser)  # the OpenAI-compatible endpoint names its model in the body
        encoding = (record.response_content_encoding or "").strip().lower()
        if encoding in ("gzip", "x-gzip", "deflate"):
            parser = GzipUsageParser(parser)
        elif encoding in ("", "identity"):
            parser = _SniffCompression(parser)  # the proxy may not tell us the encoding
        else:
            return None  # br, zstd: not readable here
        record.parser = parser
        return parser

    def request_finished(self, record: RequestRecord) -> None:
        self._inflight.value -= 1
        try:
            self._account_request(record)
        except Exception:  # the access log line must still be written
            log.exception("telemetry: accounting failed for request %s", record.request_id)

    def _account_request(self, record: RequestRecord) -> None:
        parser = record.parser
        usage: Usage | None = None
        if parser is not None:
            usage = parser.result()  # type: ignore[attr-defined]
            if not usage.found:
                usage = None
            if record.model is None:
                record.model = _sniffed_model(parser)
        status = record.status
        route = record.route or NONE
        model = self._model_label(record.model, status < 400)
        operation = self._operation_label(record.operation, record.publisher, record.model)
        extras = (self._extras(record.request_headers) if self._header_labels else ()) + self._showback
        if self._showback_fields:
            record.extra.update(self._showback_fields)
        series = self._series_for(route, model, operation, extras)
        series.request(status).inc()
        duration = record.duration_s
        if duration is not None:
            series.histogram(_DURATION).observe(duration)
        if usage is not None:
            cost = self.pricing.cost(record.model or "", usage)
            if usage.billable:  # countTokens reports tokens nobody consumed: logged, not counted
                series.account(usage, cost.usd)
            extra = record.extra
            extra["tokens"] = usage.as_log_dict()
            extra["cost_usd"] = round(cost.usd, 9)
            extra["pricing"] = cost.pricing
            if usage.response_model is not None:
                extra["response_model"] = usage.response_model
            first_byte = record.first_byte_s
            if (200 <= status < 300 and first_byte is not None and duration is not None
                    and _is_stream(record)):
                series.histogram(_TTFT).observe(first_byte)
                if usage.output_tokens > 1:
                    series.histogram(_TPOT).observe((duration - first_byte) / (usage.output_tokens - 1))
        if record.extra.get("token_retry"):
            self.traffic.retries.labels(route, "token_refused", NONE).inc()  # no caller-chosen label values
        if record.extra.get("fallbacks"):
            # The location label is bounded: only configured fallback locations can answer.
            self.traffic.retries.labels(route, "fallback", record.answered_location or NONE).inc()
        reason = _upstream_error_reason(record)
        if reason is not None:
            self.traffic.upstream_errors.labels(route, reason).inc()
        elif record.error_reason is not None:
            self.traffic.errors.labels(route, _reason_label(record.error_reason)).inc()

    # ------------------------------------------------------------ credentials
    def token_refreshed(self, credential: str, result: str) -> None:
        """`RefreshObserver` for `TokenSource`: result is "success" or "failure"."""
        key = (credential, result)
        child = self._refresh_children.get(key)
        if child is None:
            child = self._refresh_children[key] = self.process.token_refresh.labels(credential, result)
        child.inc()

    # ----------------------------------------------------------- forward proxy
    def proxy_connect(self, outcome: str, reason: str) -> None:
        """`forward_proxy.ProxyObserver`: one CONNECT's outcome (reasons are a fixed set)."""
        self.process.proxy_connects.labels(outcome, reason).inc()

    def proxy_tunnel_closed(self, bytes_up: int, bytes_down: int) -> None:
        self.process.proxy_tunnel_bytes.labels("up").inc(bytes_up)
        self.process.proxy_tunnel_bytes.labels("down").inc(bytes_down)

    # -------------------------------------------------------------------- Live
    def live_session_started(self, route: str | None) -> None:
        route = route or NONE
        self.process.live_sessions.labels(route).inc()
        self.process.live_sessions_started.labels(route).inc()

    def live_session_ended(self, route: str | None, duration_s: float | None = None) -> None:
        route = route or NONE
        self.process.live_sessions.labels(route).dec()
        if duration_s is not None:
            self.process.live_session_duration.labels(route).observe(duration_s)

    def live_turn_usage(self, route: str | None, model: str | None, usage: Usage,
                        headers: list[tuple[bytes, bytes]] | None = None) -> dict[str, Any]:
        """Account one Live turn's usage; returns the fields for the session's log line."""
        route = route or NONE
        label = self._model_label(model, True)
        process = self.process
        process.live_turns.labels(route, label).inc()
        for token_type, count in (("input", usage.input_tokens), ("output", usage.output_tokens),
                                  ("cached_input", usage.cached_input_tokens), ("reasoning", usage.reasoning_tokens)):
            if count:
                process.live_tokens.labels(route, label, token_type).inc(count)
        extras = (self._extras(headers) if self._header_labels else ()) + self._showback
        series = self._series_for(route, label, "generate_content", extras)
        cost = self.pricing.cost(model or "", usage)
        series.account(usage, cost.usd)
        return {"tokens": usage.as_log_dict(), "cost_usd": round(cost.usd, 9), "pricing": cost.pricing}

    # ------------------------------------------------------------------ labels
    def _series_for(self, route: str, model: str, operation: str, extras: tuple[str, ...]) -> _Series:
        key = (route, model, operation, *extras)
        series = self._series.get(key)
        if series is None:
            if len(self._series) >= _MAX_CACHE:
                self._series.clear()
            series = self._series[key] = _Series(self.traffic, route, model, operation, extras)
        return series

    def _model_label(self, model: str | None, ok: bool) -> str:
        if not model:
            return NONE
        label = self._models.get(model)
        if label is not None:
            return label
        if model.startswith("endpoints/"):
            label = "endpoint"  # deployed-endpoint ids are unbounded
        else:
            label = self.pricing.family(model) or model_id(model) or OTHER
            if label != OTHER and label not in self._admitted_models and self.pricing.lookup(model) is None:
                if not ok or len(self._admitted_models) >= MAX_MODEL_LABELS:
                    return OTHER  # not cached: a later success may still admit it
                self._admitted_models.add(label)
        if len(self._models) >= _MAX_CACHE:
            self._models.clear()
        self._models[model] = label
        return label

    def _operation_label(self, method: str | None, publisher: str | None, model: str | None) -> str:
        key = (method, publisher, model)
        label = self._operations.get(key)
        if label is None:
            label = operation_from_method(method, publisher or "", model or "") if method else OTHER
            if len(self._operations) >= _MAX_CACHE:
                self._operations.clear()
            self._operations[key] = label
        return label

    def _extras(self, headers: list[tuple[bytes, bytes]] | None) -> tuple[str, ...]:
        """Values of the configured header labels ("" when absent)."""
        values = [""] * len(self._header_labels)
        if headers:
            wanted = self._header_index
            for name, raw in headers:
                index = wanted.get(name.lower())
                if index is not None:
                    values[index] = self._header_value(index, raw)
        return tuple(values)

    def _header_value(self, index: int, raw: bytes) -> str:
        seen = self._header_values[index]
        text = raw.decode("latin-1").strip()
        label = seen.get(text)
        if label is not None:
            return label
        if not _LABEL_VALUE.fullmatch(text) or len(seen) >= MAX_LABEL_VALUES:
            return OTHER
        seen[text] = text
        return text


def _showback_for(showback: Mapping[str, str], header_labels: tuple[str, ...]
                  ) -> tuple[tuple[str, ...], tuple[str, ...], dict[str, str]]:
    """Showback labels that are set and not taken by a header label (that one wins): names,
    values, and the access-log fields."""
    names = tuple(label for label in SHOWBACK_LABELS if showback.get(label) and label not in header_labels)
    return names, tuple(showback[label] for label in names), {label: showback[label] for label in SHOWBACK_LABELS
                                                              if showback.get(label)}


_DURATION, _TTFT, _TPOT = 0, 1, 2


class _Series:
    """The label children of one (route, model, operation, header labels), created on first use
    (an empty histogram child would show up as a NaN quantile)."""

    __slots__ = ("_traffic", "_requests_by_code", "_extras", "_route", "_model", "_operation", "_histograms",
                 "_tokens", "_cost")

    def __init__(self, traffic: TrafficMetrics, route: str, model: str, operation: str,
                 extras: tuple[str, ...]) -> None:
        self._traffic = traffic
        self._route, self._model, self._operation, self._extras = route, model, operation, extras
        self._requests_by_code: dict[int, Any] = {}
        self._histograms: list[Any] = [None, None, None]
        self._tokens: dict[str, Any] = {}
        self._cost: Any = None

    def histogram(self, which: int) -> Any:
        child = self._histograms[which]
        if child is None:
            traffic = self._traffic
            family = (traffic.request_duration, traffic.time_to_first_token, traffic.time_per_output_token)[which]
            child = self._histograms[which] = family.labels(self._model, self._operation, self._route)
        return child

    def request(self, status: int) -> Any:
        child = self._requests_by_code.get(status)
        if child is None:
            child = self._traffic.requests.labels(self._route, self._model, self._operation, str(status),
                                                  *self._extras)
            self._requests_by_code[status] = child
        return child

    def tokens(self, token_type: str) -> Any:
        child = self._tokens.get(token_type)
        if child is None:
            child = self._traffic.token_usage.labels(token_type, self._model, self._operation, self._route,
                                                     *self._extras)
            self._tokens[token_type] = child
        return child

    def account(self, usage: Usage, usd: float) -> None:
        self.tokens("input").observe(usage.input_tokens)
        self.tokens("output").observe(usage.output_tokens)
        if usage.cached_input_tokens:
            self.tokens("cached_input").observe(usage.cached_input_tokens)
        if usage.reasoning_tokens:
            self.tokens("reasoning").observe(usage.reasoning_tokens)
        if usd > 0:
            if self._cost is None:
                self._cost = self._traffic.cost.labels(self._route, self._model, *self._extras)
            self._cost.inc(usd)


def _is_stream(record: RequestRecord) -> bool:
    content_type = record.response_content_type
    return ((record.operation or "").startswith("stream")
            or (content_type is not None and content_type.startswith("text/event-stream")))


_REASON = re.compile(r"[A-Z][A-Z0-9_]{0,39}")


def _reason_label(reason: str) -> str:
    """The sidecar's own error reasons are code constants; anything else collapses to one value."""
    return reason.lower() if _REASON.fullmatch(reason) else OTHER


def _upstream_error_reason(record: RequestRecord) -> str | None:
    if record.error_reason is not None:
        reason = _UPSTREAM_REASONS.get(record.error_reason)
        if reason is not None:
            return reason
    upstream = record.upstream_status
    if upstream is not None and (upstream == 429 or upstream >= 500):
        return f"status_{upstream}"
    return None


# ------------------------------------------------------------------ parser wrappers

_GZIP_MAGIC: Final = b"\x1f\x8b"
_MODEL_KEY = re.compile(rb'"model"\s*:\s*"([^"\\]{1,128})"')
_SNIFF_LIMIT: Final = 4096


class _SniffCompression:
    """Inflates the body when its first bytes are a gzip or zlib header.

    JSON and SSE bodies never start with those bytes, so this is safe without the
    Content-Encoding header.
    """

    __slots__ = ("_inner", "_target")

    def __init__(self, inner: UsageParser) -> None:
        self._inner = inner
        self._target: UsageParser | None = None

    @property
    def inner(self) -> UsageParser:
        return self._inner

    @property
    def buffered_bytes(self) -> int:
        return (self._target or self._inner).buffered_bytes

    def feed(self, chunk: bytes) -> None:
        target = self._target
        if target is None:
            if not chunk:
                return
            target = self._target = GzipUsageParser(self._inner) if _compressed(chunk) else self._inner
        target.feed(chunk)

    def result(self) -> Usage:
        return self._inner.result()


def _compressed(head: bytes) -> bool:
    if head[:2] == _GZIP_MAGIC:
        return True
    # zlib: deflate method, a window of at most 32 KiB, header checksum divisible by 31
    return len(head) >= 2 and head[0] & 0x0F == 8 and head[0] >> 4 <= 7 and (head[0] << 8 | head[1]) % 31 == 0


class _ModelSniffer:
    """Usage parser wrapper that also reads the answering model from the body's head."""

    __slots__ = ("_inner", "_head", "model")

    def __init__(self, inner: UsageParser) -> None:
        self._inner = inner
        self._head: bytes | None = b""
        self.model: str | None = None

    @property
    def buffered_bytes(self) -> int:
        return self._inner.buffered_bytes + len(self._head or b"")

    def feed(self, chunk: bytes) -> None:
        self._inner.feed(chunk)
        head = self._head
        if head is None:
            return
        head += chunk[:_SNIFF_LIMIT]
        match = _MODEL_KEY.search(head)
        if match is not None:
            self.model = match.group(1).decode("utf-8", "replace")
            self._head = None
        else:
            self._head = head if len(head) < _SNIFF_LIMIT else None

    def result(self) -> Usage:
        return self._inner.result()


def _sniffed_model(parser: Any) -> str | None:
    """The model a `_ModelSniffer` somewhere in the wrapper chain found, if any."""
    for _ in range(3):
        if isinstance(parser, _ModelSniffer):
            return parser.model
        parser = getattr(parser, "inner", None) or getattr(parser, "_inner", None)
        if parser is None:
            return None
    return None
