"""OTLP/HTTP protobuf export of the sidecar's spans: a bounded queue, batches, one POST at a time.

Imported only when tracing is on (opentelemetry-proto is a dependency of the `sidecar` extra).

Why not the OpenTelemetry SDK: measured on this machine, an SDK span with the sidecar's
~18 attributes costs ~20 µs to record and ~105 µs more to encode with the SDK's OTLP
encoder, and the SDK (with its exporter) adds ~5 MB of RSS. The sidecar serves a request in
~200 µs of CPU, so that alone would cost more than half its throughput. Here each span is
encoded when its request ends, into the bytes of its `ScopeSpans.spans` field, and those
bytes wait in a deque (bytes: nothing for the garbage collector to walk). Encoding uses the
opentelemetry-proto messages for everything that repeats (a group's name, kind, status and
shared attributes, serialized once) and joins the pieces — protobuf's wire format defines a
message's serialization as the concatenation of its fields', repeated fields appended —
writing only the per-span ids, times and per-request values directly, from precomputed
heads (`rest_span`: ~2.5 µs a span, against ~6.8 µs for building a `SpanData` and encoding
it, measured in one run on this machine). An export batch is assembled in one join.

Never blocking a request: `accepting` is a length test (a full queue is a counted drop,
before any encoding); `enqueue` is an append; one export is in flight at a time, bounded by
the configured timeout; a failed batch is dropped and counted, not retried (a collector
that is down must not pile spans up in the sidecar's memory). The POST goes through the
sidecar's own HTTP/1.1 client (`upstream_client`), one kept-alive connection.
"""

from __future__ import annotations

import asyncio
import gzip
import logging
import ssl
import struct
import time
from collections import deque
from dataclasses import dataclass
from typing import Any, Mapping
from urllib.parse import urlsplit

from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)
from opentelemetry.proto.common.v1.common_pb2 import AnyValue, ArrayValue, InstrumentationScope, KeyValue
from opentelemetry.proto.resource.v1.resource_pb2 import Resource
from opentelemetry.proto.trace.v1.trace_pb2 import ResourceSpans, ScopeSpans, Span

from . import __version__
from .headers import header_value
from .routing import Origin
from .observe import RequestRecord
from .trace_spans import (
    KIND_CLIENT,
    OURS,
    REQUEST_ATTRIBUTES,
    AttributeValue,
    RestGroup,
    SpanContext,
    SharedAttributes,
    SpanData,
    request_values,
    span_times,
)
from .upstream_client import UpstreamError, UpstreamPool

log = logging.getLogger("vertex_sidecar.tracing")

_MAX_CACHED = 8192  # serialized attribute fragments kept (bounded whatever the values)
# Attributes unique to each span: encoded every time, never cached.
_UNIQUE = frozenset({OURS + "request_id", OURS + "cost_usd", "gen_ai.response.time_to_first_chunk"})
_FAILURE_LOG_INTERVAL_S = 60.0


@dataclass(frozen=True)
class ExportSettings:
    endpoint: str  # the full URL, e.g. http://collector:4318/v1/traces
    headers: Mapping[str, str]
    timeout_s: float = 10.0
    compression: str = "none"  # or "gzip"
    ca_file: str | None = None
    client_cert_file: str | None = None
    client_key_file: str | None = None
    max_queue: int = 2048
    max_batch: int = 512
    schedule_delay_s: float = 5.0


def _tag(message: Any, field_name: str, wire_type: int = 2) -> bytes:
    """A field's key (length-delimited by default), numbered from the message's descriptor."""
    return _varint(message.DESCRIPTOR.fields_by_name[field_name].number << 3 | wire_type)


_ONE_BYTE = [bytes((value,)) for value in range(128)]


def _varint(value: int) -> bytes:
    if value < 128:  # most lengths and tags: one byte
        return _ONE_BYTE[value]
    if value < 16384:
        return bytes((value & 0x7F | 0x80, value >> 7))
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        if value:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def _field(tag: bytes, payload: bytes) -> bytes:
    return tag + _varint(len(payload)) + payload


_SPAN_ATTRIBUTE = _tag(Span, "attributes")
_SCOPE_SPANS_SPAN = _tag(ScopeSpans, "spans")
_RESOURCE_SPANS_SCOPE = _tag(ResourceSpans, "scope_spans")
_REQUEST_RESOURCE_SPANS = _tag(ExportTraceServiceRequest, "resource_spans")
_SPAN_TRACE_ID = _tag(Span, "trace_id")
_SPAN_SPAN_ID = _tag(Span, "span_id")
_SPAN_PARENT = _tag(Span, "parent_span_id")
_SPAN_TRACE_STATE = _tag(Span, "trace_state")
_SPAN_START = _tag(Span, "start_time_unix_nano", 1)  # fixed64
_SPAN_END = _tag(Span, "end_time_unix_nano", 1)
_KEY_VALUE_KEY = _tag(KeyValue, "key")
_KEY_VALUE_VALUE = _tag(KeyValue, "value")
_ANY_STRING = _tag(AnyValue, "string_value")
_ANY_DOUBLE = _tag(AnyValue, "double_value", 1)  # fixed64
_ANY_INT = _tag(AnyValue, "int_value", 0)  # varint


def _key_prefix(key: str) -> bytes:
    """A KeyValue's key field followed by its value field's tag."""
    return _field(_KEY_VALUE_KEY, key.encode()) + _KEY_VALUE_VALUE


def _value_head(prefix: bytes, kind: type, size: int) -> bytes:
    """Everything of a `Span.attributes` field that precedes its value's `size` bytes (an
    int's varint, a float's 8 bytes, a string's UTF-8): the attribute's tag and length, the
    key (`prefix`), the AnyValue's length and tag (and a string's length)."""
    if kind is str:
        tag = _ANY_STRING + _varint(size)
    else:
        tag = _ANY_DOUBLE if kind is float else _ANY_INT
    payload_length = len(tag) + size
    inner = len(prefix) + len(_varint(payload_length)) + payload_length
    return _SPAN_ATTRIBUTE + _varint(inner) + prefix + _varint(payload_length) + tag


_INT64 = (1 << 64) - 1  # a negative int64 is the varint of its two's complement
_pack_double = struct.Struct("<d").pack
_pack_fixed64 = struct.Struct("<Q").pack


def _int_bytes(value: int) -> bytes:
    """An AnyValue.int_value's varint."""
    return _ONE_BYTE[value] if 0 <= value < 128 else _varint(value & _INT64)


def _unique_attribute(key: str, value: AttributeValue, keys: dict[str, bytes]) -> bytes:
    """A `Span.attributes` field for a value seen once (a request id, a cost): the common
    scalar kinds written directly (building a KeyValue message would cost most of a span's
    encoding), anything else through the library."""
    kind = value.__class__
    if kind is str:
        encoded = value.encode()  # type: ignore[union-attr]
    elif kind is float:
        encoded = _pack_double(value)
    elif kind is int:
        encoded = _int_bytes(value)  # type: ignore[arg-type]
    else:
        return _field(_SPAN_ATTRIBUTE, KeyValue(key=key, value=any_value(value)).SerializeToString())
    prefix = keys.get(key)
    if prefix is None:
        prefix = keys[key] = _key_prefix(key)
    return _value_head(prefix, kind, len(encoded)) + encoded


_STRING_HEADS = 256  # strings up to this many bytes find their head in the table (request ids: 128 characters)


def _request_attribute_heads(name: str, kind: type) -> tuple[bytes, ...]:
    """`_value_head` for each length a value of `kind` may have, so that encoding one costs a
    table lookup and no arithmetic (ints: a varint's 1 to 10 bytes; floats: 8)."""
    prefix = _key_prefix(name)
    sizes = range(_STRING_HEADS) if kind is str else (8,) if kind is float else range(1, 11)
    heads = [b""] * (max(sizes) + 1)
    for size in sizes:
        heads[size] = _value_head(prefix, kind, size)
    return tuple(heads)


_REQUEST_HEADS = tuple(_request_attribute_heads(name, kind) for name, kind in REQUEST_ATTRIBUTES)
# One table per attribute, by name, for `rest_span`'s unrolled writing (a loop over the
# attributes, with its type dispatch, cost a quarter of the span's encoding).
(_REQUEST_ID, _TIME_TO_FIRST_CHUNK, _INPUT_TOKENS, _OUTPUT_TOKENS, _CACHE_READ_TOKENS, _CACHE_CREATION_TOKENS,
 _REASONING_TOKENS, _RESPONSE_MODEL, _COST) = _REQUEST_HEADS
# The key prefixes of the two string attributes, for a value longer than their tables.
_REQUEST_ID_KEY, _RESPONSE_MODEL_KEY = (_key_prefix(name) for name, kind in REQUEST_ATTRIBUTES if kind is str)


def _append_int(parts: list[bytes], heads: tuple[bytes, ...], value: int) -> None:
    encoded = _int_bytes(value)
    parts += (heads[len(encoded)], encoded)


def _append_string(parts: list[bytes], heads: tuple[bytes, ...], key_prefix: bytes, value: str) -> None:
    encoded = value.encode()
    size = len(encoded)
    parts += (heads[size] if size < _STRING_HEADS else _value_head(key_prefix, str, size), encoded)


# 16- and 8-byte ids: their length prefixes are single bytes.
_FIXED_IDS = _SPAN_TRACE_ID + b"\x10"
_SPAN_ID_8 = _SPAN_SPAN_ID + b"\x08"


def _ids_and_times(trace_id: bytes, span_id: bytes, parent_span_id: bytes, trace_state: str,
                   start_ns: int, end_ns: int) -> list[bytes]:
    """A span's ids, trace state and times, written directly (the first parts of its fields)."""
    parts = [_FIXED_IDS, trace_id, _SPAN_ID_8, span_id, _SPAN_START, _pack_fixed64(start_ns),
             _SPAN_END, _pack_fixed64(end_ns)]
    if parent_span_id:
        parts.append(_field(_SPAN_PARENT, parent_span_id))
    if trace_state:
        parts.append(_field(_SPAN_TRACE_STATE, trace_state.encode()))
    return parts


def any_value(value: AttributeValue) -> AnyValue:
    if isinstance(value, bool):
        return AnyValue(bool_value=value)
    if isinstance(value, int):
        return AnyValue(int_value=value)
    if isinstance(value, float):
        return AnyValue(double_value=value)
    if isinstance(value, tuple):
        return AnyValue(array_value=ArrayValue(values=[AnyValue(string_value=str(item)) for item in value]))
    return AnyValue(string_value=str(value))


def key_values(attributes: Mapping[str, AttributeValue]) -> list[KeyValue]:
    return [KeyValue(key=key, value=any_value(value)) for key, value in attributes.items()]


class SpanEncoder:
    """`ExportTraceServiceRequest` bytes for a batch of spans under one resource."""

    def __init__(self, resource: Mapping[str, AttributeValue]) -> None:
        resource_message = ResourceSpans(resource=Resource(attributes=key_values(resource)))
        self._resource = resource_message.SerializeToString()
        scope = ScopeSpans(scope=InstrumentationScope(name="vertex_sidecar", version=__version__))
        self._scope = scope.SerializeToString()
        self._fragments: dict[tuple[str, AttributeValue], bytes] = {}
        self._keys: dict[str, bytes] = {}  # serialized KeyValue.key fields of the unique attributes
        self._heads: dict[tuple[str, int, int, str], bytes] = {}  # name, kind and status, serialized

    def span(self, span: SpanData) -> bytes:
        """One span as a `ScopeSpans.spans` field.

        The ids and times are written directly; name, kind and status (alike for many spans)
        are serialized by the library once and reused; events, which are rare, go through it.
        """
        parts = _ids_and_times(span.trace_id, span.span_id, span.parent_span_id, span.trace_state,
                               span.start_ns, span.end_ns)
        shared = span.shared
        if shared is None:
            parts.append(self._head(span.name, span.kind, span.status, span.status_message))
        else:
            parts.append(self._shared(shared, span.name, span.kind, span.status, span.status_message))
        if span.events:
            events = Span()
            for at, name, attrs in span.events:
                events.events.append(Span.Event(time_unix_nano=at, name=name, attributes=key_values(attrs)))
            parts.append(events.SerializeToString())
        fragment = self._fragment
        for item in span.attributes.items():
            parts.append(fragment(item))
        return _field(_SCOPE_SPANS_SPAN, b"".join(parts))

    def rest_span(self, context: SpanContext, group: RestGroup, record: RequestRecord) -> bytes:
        """A relayed REST request's span, encoded straight from its group and record (the same
        bytes as `span(RestSpans.span(...))` without building the `SpanData`: this runs once
        per request)."""
        start_ns, end_ns = span_times(record)
        parts = _ids_and_times(context.trace_id, context.span_id, context.parent_span_id, context.trace_state,
                               start_ns, end_ns)
        shared = group.shared
        parts.append(self._shared(shared, group.name, KIND_CLIENT, group.status, group.status_message))
        if context.baggage:
            for item in context.baggage.items():
                if item[0] not in shared.items:  # a caller's baggage never replaces one of ours
                    parts.append(self._fragment(item))
        (request_id, first_chunk, input_tokens, output_tokens, cache_read, cache_creation, reasoning,
         response_model, cost) = request_values(record, group)
        _append_string(parts, _REQUEST_ID, _REQUEST_ID_KEY, request_id)  # type: ignore[arg-type]
        if first_chunk is not None:
            parts += (_TIME_TO_FIRST_CHUNK[8], _pack_double(first_chunk))
        if input_tokens is not None:
            _append_int(parts, _INPUT_TOKENS, input_tokens)  # type: ignore[arg-type]
        if output_tokens is not None:
            _append_int(parts, _OUTPUT_TOKENS, output_tokens)  # type: ignore[arg-type]
        if cache_read is not None:
            _append_int(parts, _CACHE_READ_TOKENS, cache_read)  # type: ignore[arg-type]
        if cache_creation is not None:
            _append_int(parts, _CACHE_CREATION_TOKENS, cache_creation)  # type: ignore[arg-type]
        if reasoning is not None:
            _append_int(parts, _REASONING_TOKENS, reasoning)  # type: ignore[arg-type]
        if response_model is not None:
            _append_string(parts, _RESPONSE_MODEL, _RESPONSE_MODEL_KEY, response_model)  # type: ignore[arg-type]
        if cost is not None:
            parts += (_COST[8], _pack_double(cost))
        return _field(_SCOPE_SPANS_SPAN, b"".join(parts))

    def _shared(self, shared: SharedAttributes, name: str, kind: int, status: int, status_message: str) -> bytes:
        """A group's name, kind, status and attributes: serialized once for all its spans."""
        if shared.encoded is None:
            shared.encoded = self._head(name, kind, status, status_message) + \
                b"".join(self._fragment(item) for item in shared.items.items())
        return shared.encoded

    def _head(self, name: str, kind: int, status: int, status_message: str) -> bytes:
        """Name, kind and status, serialized by the library (cached: alike for many spans)."""
        key = (name, kind, status, status_message)
        head = self._heads.get(key)
        if head is None:
            message = Span(name=name, kind=kind)  # type: ignore[arg-type]
            if status:
                message.status.code, message.status.message = status, status_message  # type: ignore[assignment]
            head = message.SerializeToString()
            if len(self._heads) >= _MAX_CACHED:
                self._heads.clear()
            self._heads[key] = head
        return head

    def _fragment(self, item: tuple[str, AttributeValue]) -> bytes:
        """One attribute as a `Span.attributes` field; repeated ones come from the cache."""
        if item[0] in _UNIQUE:
            return _unique_attribute(item[0], item[1], self._keys)
        fragments = self._fragments
        try:
            fragment = fragments.get(item)
        except TypeError:  # an unhashable value: encoded without the cache
            return _field(_SPAN_ATTRIBUTE, KeyValue(key=item[0], value=any_value(item[1])).SerializeToString())
        if fragment is None:
            fragment = _field(_SPAN_ATTRIBUTE, KeyValue(key=item[0], value=any_value(item[1])).SerializeToString())
            if len(fragments) >= _MAX_CACHED:
                fragments.clear()
            fragments[item] = fragment
        return fragment

    def request(self, encoded_spans: list[bytes]) -> bytes:
        """The request around the spans, in one join: a batch is hundreds of kilobytes, and
        every intermediate copy of that size costs fresh pages (measured: a 512-span batch
        took ~450 µs with the fields nested by concatenation, ~30 µs in one join)."""
        scope_spans_length = len(self._scope) + sum(map(len, encoded_spans))
        scope_head = _RESOURCE_SPANS_SCOPE + _varint(scope_spans_length)
        resource_spans_length = len(self._resource) + len(scope_head) + scope_spans_length
        return b"".join([_REQUEST_RESOURCE_SPANS, _varint(resource_spans_length), self._resource, scope_head,
                         self._scope, *encoded_spans])


class SpanExporter:
    """The bounded span queue and its export task; counters for the metrics."""

    def __init__(self, settings: ExportSettings, resource: Mapping[str, AttributeValue]) -> None:
        self.settings = settings
        self.encoder = SpanEncoder(resource)
        self.queue: deque[bytes] = deque()  # encoded spans (bytes: no work for the garbage collector)
        self.exported = 0
        self.dropped_queue_full = 0
        self.dropped_export_failed = 0
        self.exports_failed = 0
        self._task: asyncio.Task[None] | None = None
        self._timer: asyncio.TimerHandle | None = None  # armed while spans wait for the schedule
        self._last_export = time.monotonic()
        self._pool: UpstreamPool | None = None  # the sidecar's own HTTP/1.1 client (no aiohttp to import)
        self._origin, self._target = _split_endpoint(settings.endpoint)
        self._last_failure_log = -_FAILURE_LOG_INTERVAL_S
        self._closed = False

    # ------------------------------------------------------------ request path
    def accepting(self) -> bool:
        """Whether the queue takes one more span; a refusal is counted as a drop (ask before
        encoding: a collector that is down must not cost the encoding of spans it never gets)."""
        if len(self.queue) >= self.settings.max_queue or self._closed:
            self.dropped_queue_full += 1
            return False
        return True

    def submit(self, span: SpanData) -> None:
        if self.accepting():
            self.enqueue(self.encoder.span(span))

    def enqueue(self, encoded_span: bytes) -> None:
        """Queue a span the encoder wrote (after `accepting` said yes)."""
        queue = self.queue
        queue.append(encoded_span)
        if self._task is None:
            if len(queue) >= self.settings.max_batch:
                self._start_export()
            elif self._timer is None:
                self._arm_timer()

    def tick(self) -> None:
        """Export now if the schedule is due (the timer normally does this)."""
        if self.queue and self._task is None and (
                time.monotonic() - self._last_export >= self.settings.schedule_delay_s
                or len(self.queue) >= self.settings.max_batch):
            self._start_export()

    def _arm_timer(self) -> None:
        """One timer while spans wait: an idle sidecar has none (it never wakes up for tracing)."""
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:  # outside the event loop (tools, unit tests)
            return
        self._timer = loop.call_later(self.settings.schedule_delay_s, self._timer_fired)

    def _timer_fired(self) -> None:
        self._timer = None
        if self.queue and self._task is None:
            self._start_export()

    def _start_export(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._task = asyncio.ensure_future(self._export_batches())

    # ------------------------------------------------------------------ export
    async def _export_batches(self) -> None:
        try:
            while self.queue:
                await self.export_once()
                if len(self.queue) < self.settings.max_batch:
                    break  # the rest waits for the schedule
        except Exception:  # never let the export task die silently with spans counted nowhere
            log.exception("trace export failed")
        finally:
            self._last_export = time.monotonic()
            self._task = None
            if self.queue and not self._closed:
                self._arm_timer()  # what is left waits for the next scheduled export

    async def export_once(self) -> None:
        queue = self.queue
        batch = [queue.popleft() for _ in range(min(len(queue), self.settings.max_batch))]
        if not batch:
            return
        rejected = await self._post(self.encoder.request(batch))
        if rejected is None:
            self.dropped_export_failed += len(batch)
        else:
            self.exported += len(batch) - rejected
            self.dropped_export_failed += rejected

    async def _post(self, body: bytes) -> int | None:
        """POST one request; the number of spans the collector rejected, or None on failure."""
        settings = self.settings
        headers = [(b"content-type", b"application/x-protobuf")]
        headers += [(name.lower().encode("latin-1"), value.encode("latin-1")) for name, value in settings.headers.items()]
        if settings.compression == "gzip":
            body = gzip.compress(body, compresslevel=1)
            headers.append((b"content-encoding", b"gzip"))
        timeout = settings.timeout_s
        try:
            pool = self._pool
            if pool is None:
                # Plain http: a bare context that is never used (the default one would load the CA store).
                context = self._ssl_context() if self._origin.scheme == "https" else ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
                pool = self._pool = UpstreamPool(ssl_context=context, max_idle_per_origin=1)
            response = await pool.request(self._origin, "POST", self._target, headers, body, connect_timeout=timeout,
                                          first_byte_timeout=timeout, total_timeout=timeout)
            try:
                payload = await response.read()
            finally:
                await response.aclose()
        except (UpstreamError, OSError, ssl.SSLError) as exc:
            self._failed(f"{type(exc).__name__}: {exc}")
            return None
        if not 200 <= response.status < 300:
            self._failed(f"the collector answered HTTP {response.status}")
            return None
        if (header_value(response.headers, b"content-encoding") or b"").lower() == b"gzip":
            payload = gzip.decompress(payload)
        return _rejected_spans(payload)

    def _ssl_context(self) -> ssl.SSLContext:
        settings = self.settings
        context = ssl.create_default_context(cafile=settings.ca_file)
        if settings.client_cert_file:
            context.load_cert_chain(settings.client_cert_file, settings.client_key_file)
        return context

    def _failed(self, why: str) -> None:
        self.exports_failed += 1
        now = time.monotonic()
        if now - self._last_failure_log >= _FAILURE_LOG_INTERVAL_S:
            self._last_failure_log = now
            log.warning("trace export to %s failed (%s); spans are dropped and counted in "
                        "vertex_sidecar_trace_spans_dropped_total", self.settings.endpoint, why)

    async def aclose(self, timeout_s: float = 2.0) -> None:
        """Export what is queued (bounded in time), then close the HTTP session."""
        self._closed = True
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        try:
            if self._task is not None:
                await asyncio.wait_for(asyncio.shield(self._task), timeout_s)
            deadline = time.monotonic() + timeout_s
            while self.queue and time.monotonic() < deadline:
                await asyncio.wait_for(self.export_once(), max(deadline - time.monotonic(), 0.01))
        except (asyncio.TimeoutError, Exception):
            pass
        self.dropped_export_failed += len(self.queue)
        self.queue.clear()
        if self._pool is not None:
            await self._pool.aclose()


def _split_endpoint(url: str) -> tuple[Origin, str]:
    """The collector's origin and request target (path and query) from its URL."""
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"the trace endpoint {url!r} is not an http(s) URL")
    port = parts.port or (443 if parts.scheme == "https" else 80)
    target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    return Origin(parts.scheme, parts.hostname, port), target


def _rejected_spans(payload: bytes) -> int:
    if not payload:
        return 0
    try:
        return int(ExportTraceServiceResponse.FromString(payload).partial_success.rejected_spans)
    except Exception:  # a collector that answers 200 with something else: count the batch as taken
        return 0
