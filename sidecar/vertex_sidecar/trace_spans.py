"""The sidecar's spans and their attributes, from the per-request record. Pure.

Conventions: the OpenTelemetry GenAI semantic conventions as they stand in the
`semantic-conventions-genai` repository (Development status). They name the provider
`gen_ai.provider.name` (which replaced `gen_ai.system` after v1.36); the sidecar uses
`gen_ai.provider.name` = ``gcp.vertex_ai`` — the value those conventions list for Vertex AI
and the one our Prometheus metrics already use — and does not emit the deprecated name.

- A relayed REST request is one CLIENT span ``{gen_ai.operation.name} {gen_ai.request.model}``
  (the sidecar calls Vertex AI on the app's behalf; the conventions recommend CLIENT for a
  model reached over HTTP). Its id is the parent that Google sees in `traceparent`.
- A Live session is one CLIENT span ``live_session {model}``; each turn is a child span
  ``realtime_inference {model}`` (the conventions' realtime span) from the caller's input
  to the turn's completion, with the time to the first server message.
- Prompts and completions are never recorded; neither are headers, tokens or keys. The
  credential appears by its config name only.

Attributes of our own live under ``vertex_passthrough.*``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

from .observe import RequestRecord
from .usage import Usage, operation_from_method

PROVIDER = "gcp.vertex_ai"
OURS = "vertex_passthrough."

# Span kinds and status codes, numbered as in the OTLP protobuf.
KIND_CLIENT = 3
STATUS_UNSET, STATUS_OK, STATUS_ERROR = 0, 1, 2

AttributeValue = str | bool | int | float | tuple[str, ...]


@dataclass(slots=True)
class SharedAttributes:
    """Attributes that many spans have in common (route, model, host, outcome...): built once
    per group of alike requests, and encoded once (`otlp_export` keeps the bytes in `encoded`)."""

    items: dict[str, AttributeValue]
    encoded: bytes | None = None


@dataclass(slots=True)
class SpanData:
    """One finished span, ready to be encoded (`otlp_export`): `shared` and `attributes`
    together are its attributes (no key in both)."""

    trace_id: bytes
    span_id: bytes
    parent_span_id: bytes
    name: str
    start_ns: int
    end_ns: int
    attributes: dict[str, AttributeValue]
    trace_state: str = ""
    kind: int = KIND_CLIENT
    status: int = STATUS_UNSET
    status_message: str = ""
    events: list[tuple[int, str, dict[str, AttributeValue]]] = field(default_factory=list)
    shared: SharedAttributes | None = None


@dataclass(slots=True)
class SpanContext:
    """The sidecar's span for one request, started when the request arrived."""

    trace_id: bytes
    span_id: bytes
    parent_span_id: bytes  # b"" for a root span
    trace_state: str
    baggage: dict[str, str]


def operation_name(record: RequestRecord) -> str | None:
    if record.service != "aiplatform" or not record.operation:
        return None
    return operation_from_method(record.operation, record.publisher or "", record.model or "")


def is_stream(record: RequestRecord) -> bool:
    content_type = record.response_content_type
    return ((record.operation or "").startswith("stream")
            or (content_type is not None and content_type.startswith("text/event-stream")))


def usage_attributes(tokens: Mapping[str, Any] | Usage | None) -> dict[str, AttributeValue]:
    """Token counts under the conventions' names (from a `Usage` or its log dict)."""
    if tokens is None:
        return {}
    get = tokens.get if isinstance(tokens, Mapping) else (lambda name, default=0: getattr(tokens, name, default))
    attributes: dict[str, AttributeValue] = {
        "gen_ai.usage.input_tokens": int(get("input_tokens", 0) or 0),
        "gen_ai.usage.output_tokens": int(get("output_tokens", 0) or 0),
    }
    cached = int(get("cached_input_tokens", 0) or 0)
    if cached:
        attributes["gen_ai.usage.cache_read.input_tokens"] = cached
    written = int(get("cache_write_tokens", 0) or 0)
    if written:
        attributes["gen_ai.usage.cache_creation.input_tokens"] = written
    reasoning = int(get("reasoning_tokens", 0) or 0)
    if reasoning:
        attributes["gen_ai.usage.reasoning.output_tokens"] = reasoning
    return attributes


def _common(record: RequestRecord, credential: str | None, server: tuple[str, int] | None,
            baggage: Mapping[str, str]) -> dict[str, AttributeValue]:
    attributes: dict[str, AttributeValue] = {}
    for key, value in baggage.items():
        attributes[key] = value  # first, so that none of ours can be overwritten by a caller
    if record.service == "aiplatform":
        attributes["gen_ai.provider.name"] = PROVIDER
    if record.model:
        attributes["gen_ai.request.model"] = record.model
    if server is not None:
        attributes["server.address"], attributes["server.port"] = server
    attributes[OURS + "request_id"] = record.request_id
    attributes[OURS + "service"] = record.service
    if record.route:
        attributes[OURS + "route"] = record.route
    if credential:
        attributes[OURS + "credential"] = credential
    if record.project:
        attributes[OURS + "project"] = record.project
    if record.location:
        attributes[OURS + "location"] = record.location
    if record.answered_location:
        attributes[OURS + "answered_location"] = record.answered_location
    caller = record.extra.get("caller")
    if isinstance(caller, str):
        attributes[OURS + "caller"] = caller  # the caller key's name, never the key
    return attributes


def _error(record: RequestRecord) -> str | None:
    """`error.type`: the sidecar's reason (e.g. NO_MATCHING_ROUTE) or Google's status code."""
    if record.error_reason:
        return record.error_reason
    if record.status >= 400:
        return str(record.status)
    return None


@dataclass(slots=True)
class RestGroup:
    """What alike REST requests share: the span's name and status, and most attributes."""

    name: str
    stream: bool
    status: int
    status_message: str
    shared: SharedAttributes


# The attributes a REST span has of its own (the others come from its group) and their
# types, in the order of `request_values`.
REQUEST_ATTRIBUTES: tuple[tuple[str, type], ...] = (
    (OURS + "request_id", str), ("gen_ai.response.time_to_first_chunk", float),
    ("gen_ai.usage.input_tokens", int), ("gen_ai.usage.output_tokens", int),
    ("gen_ai.usage.cache_read.input_tokens", int), ("gen_ai.usage.cache_creation.input_tokens", int),
    ("gen_ai.usage.reasoning.output_tokens", int), ("gen_ai.response.model", str), (OURS + "cost_usd", float),
)
RequestValues = tuple[AttributeValue | None, ...]


def request_values(record: RequestRecord, group: RestGroup) -> RequestValues:
    """The values of `REQUEST_ATTRIBUTES` for one request (None: the span has no such attribute)."""
    extra = record.extra
    first_chunk = float(round(record.first_byte_s, 6)) if group.stream and record.first_byte_s is not None else None
    tokens = extra.get("tokens")
    if tokens.__class__ is dict:  # telemetry's log dict (an exact type test: ABC checks are slow)
        input_tokens, output_tokens = int(tokens.get("input_tokens") or 0), int(tokens.get("output_tokens") or 0)
        # The optional counts (0 or absent: no attribute).
        cached = int(tokens.get("cached_input_tokens") or 0) or None
        written = int(tokens.get("cache_write_tokens") or 0) or None
        reasoning = int(tokens.get("reasoning_tokens") or 0) or None
    else:
        input_tokens = output_tokens = cached = written = reasoning = None
    response_model = extra.get("response_model")
    cost = extra.get("cost_usd")
    return (record.request_id, first_chunk, input_tokens, output_tokens, cached, written, reasoning,
            response_model if response_model.__class__ is str else None,
            cost if cost.__class__ is float and cost else None)


def span_times(record: RequestRecord) -> tuple[int, int]:
    """A request's span start and end, in ns since the epoch."""
    start_ns = int(record.wall_time * 1e9)
    return start_ns, start_ns + int((record.duration_s or 0.0) * 1e9)


class RestSpans:
    """Builds the span of each relayed REST request from its finished record.

    Requests of the same route, model, location, outcome... share most attributes: those are
    built (and later encoded) once per such group (`group`); a span then costs its ids,
    times and `request_values`. The memo is bounded (cleared when full). The tracer encodes
    a request's span straight from these (`otlp_export.SpanEncoder.rest_span`); `span`
    builds the same span as a `SpanData`.
    """

    MAX_GROUPS = 1024

    def __init__(self, *, credential: Callable[[str | None], str | None],
                 server: Callable[[RequestRecord], tuple[str, int] | None]) -> None:
        """`credential` (route name → credential name) and `server` (the answering host and
        port) are asked once per group: a memo must not outlive the config they answer from."""
        self._credential = credential
        self._server = server
        self._groups: dict[tuple[Any, ...], RestGroup] = {}

    def group(self, record: RequestRecord) -> RestGroup:
        extra = record.extra
        fallbacks = int(extra.get("fallbacks") or 0)
        token_retry = bool(extra.get("token_retry"))
        caller = extra.get("caller")
        stream = is_stream(record)
        key = (record.service, record.method, record.route, record.model, record.publisher, record.operation,
               record.project, record.location, record.answered_location, record.status, record.upstream_status,
               record.error_reason, stream, fallbacks, token_retry, caller if isinstance(caller, str) else None)
        group = self._groups.get(key)
        if group is None:
            if len(self._groups) >= self.MAX_GROUPS:
                self._groups.clear()
            group = self._groups[key] = _rest_group(record, self._credential(record.route), self._server(record),
                                                    stream, fallbacks, token_retry)
        return group

    def span(self, record: RequestRecord, context: SpanContext) -> SpanData:
        group = self.group(record)
        shared = group.shared.items
        attributes: dict[str, AttributeValue] = {
            name: value for name, value in context.baggage.items()
            if name not in shared}  # a caller's baggage never replaces one of ours
        for (name, _), value in zip(REQUEST_ATTRIBUTES, request_values(record, group)):
            if value is not None:
                attributes[name] = value
        start_ns, end_ns = span_times(record)
        return SpanData(
            trace_id=context.trace_id, span_id=context.span_id, parent_span_id=context.parent_span_id,
            trace_state=context.trace_state, name=group.name, start_ns=start_ns, end_ns=end_ns,
            attributes=attributes, status=group.status, status_message=group.status_message, shared=group.shared,
        )


def _rest_group(record: RequestRecord, credential: str | None, server: tuple[str, int] | None, stream: bool,
                fallbacks: int, token_retry: bool) -> RestGroup:
    operation = operation_name(record)
    attributes = _common(record, credential, server, {})
    del attributes[OURS + "request_id"]  # per request, not shared
    if operation is not None:
        attributes["gen_ai.operation.name"] = operation
    attributes["http.request.method"] = record.method
    if record.status:
        attributes["http.response.status_code"] = record.status
    if record.upstream_status is not None and record.upstream_status != record.status:
        attributes[OURS + "upstream_status"] = record.upstream_status
    resends = fallbacks + int(token_retry)
    if resends:
        attributes["http.request.resend_count"] = resends
        attributes[OURS + "retry_reasons"] = tuple(
            reason for reason, happened in (("token_refused", token_retry), ("fallback", bool(fallbacks))) if happened)
    if record.service == "aiplatform" and operation is not None:
        attributes["gen_ai.request.stream"] = stream
    error = _error(record)
    if error is not None:
        attributes["error.type"] = error
    return RestGroup(name=_span_name(operation, record), stream=stream,
                     status=STATUS_ERROR if error is not None else STATUS_UNSET, status_message=error or "",
                     shared=SharedAttributes(attributes))


def rest_span(record: RequestRecord, context: SpanContext, *, credential: str | None,
              server: tuple[str, int] | None) -> SpanData:
    """The span of one relayed REST request (without the group memo of `RestSpans`)."""
    return RestSpans(credential=lambda _: credential, server=lambda _: server).span(record, context)


def _span_name(operation: str | None, record: RequestRecord) -> str:
    if operation is not None:
        return f"{operation} {record.model}" if record.model else operation
    return f"{record.method} {record.service}"


def live_session_span(record: RequestRecord, context: SpanContext, *, credential: str | None,
                      server: tuple[str, int] | None, turns: int, usage: Usage | None,
                      ended_by: str | None, close_code: int | None) -> SpanData:
    """The span of one Live session (the turns are its children)."""
    attributes = _common(record, credential, server, context.baggage)
    attributes["gen_ai.realtime_session.id"] = record.request_id
    attributes[OURS + "live.turns"] = turns
    if ended_by is not None:
        attributes[OURS + "live.ended_by"] = ended_by
    if close_code is not None:
        attributes[OURS + "live.close_code"] = close_code
    if usage is not None and usage.found:
        attributes.update(usage_attributes(usage))
    start_ns = int(record.wall_time * 1e9)
    span = SpanData(
        trace_id=context.trace_id, span_id=context.span_id, parent_span_id=context.parent_span_id,
        trace_state=context.trace_state, name=f"live_session {record.model}" if record.model else "live_session",
        start_ns=start_ns, end_ns=start_ns + int((record.duration_s or 0.0) * 1e9), attributes=attributes,
    )
    error = _error(record)
    if error is not None:
        attributes["error.type"] = error
        span.status, span.status_message = STATUS_ERROR, error
    return span


def live_turn_span(record: RequestRecord, session: SpanContext, span_id: bytes, *, start_ns: int, end_ns: int,
                   first_chunk_ns: int | None, usage: Usage, index: int,
                   server: tuple[str, int] | None) -> SpanData:
    """One Live turn: from the caller's input to the turn's completion."""
    attributes: dict[str, AttributeValue] = {"gen_ai.operation.name": "realtime_inference",
                                             "gen_ai.provider.name": PROVIDER,
                                             "gen_ai.realtime_session.id": record.request_id}
    if record.model:
        attributes["gen_ai.request.model"] = record.model
    if server is not None:
        attributes["server.address"], attributes["server.port"] = server
    if record.route:
        attributes[OURS + "route"] = record.route
    attributes[OURS + "live.turn"] = index
    if first_chunk_ns is not None:
        attributes["gen_ai.response.time_to_first_chunk"] = round((first_chunk_ns - start_ns) / 1e9, 6)
    attributes.update(usage_attributes(usage))
    return SpanData(
        trace_id=session.trace_id, span_id=span_id, parent_span_id=session.span_id, trace_state=session.trace_state,
        name=f"realtime_inference {record.model}" if record.model else "realtime_inference",
        start_ns=start_ns, end_ns=max(end_ns, start_ns), attributes=attributes,
    )
