"""W3C Trace Context and Baggage for the sidecar's spans: parse, decide, propagate. Pure.

- `traceparent` (https://www.w3.org/TR/trace-context/): ``VV-TTTT…(32 hex)-PPPP…(16 hex)-FF``.
  A malformed header is ignored (the request starts a new trace), as the spec asks.
- `tracestate` is kept as received (it is forwarded unchanged and recorded on the span).
- `baggage` (https://www.w3.org/TR/baggage/): only the configured keys are read.
- Sampling: parent-based by default — a caller's sampled flag is followed; a request
  without a caller context is sampled when its trace id falls under the ratio (the
  OpenTelemetry TraceIdRatioBased rule on the trace id's lower 64 bits).

Nothing here imports OpenTelemetry: this runs on the request path.
"""

from __future__ import annotations

import random
import re
from binascii import unhexlify
from dataclasses import dataclass
from typing import Iterable
from urllib.parse import unquote

TRACEPARENT = b"traceparent"
TRACESTATE = b"tracestate"
BAGGAGE = b"baggage"
MAX_TRACESTATE = 512  # the spec's limit a vendor must propagate; longer values are dropped
MAX_BAGGAGE_VALUE = 256  # per recorded entry (span attributes stay small)

# version-traceid-parentid-flags, lower-case hex; a later version may append "-..." fields.
_TRACEPARENT = re.compile(rb"([0-9a-f]{2})-([0-9a-f]{32})-([0-9a-f]{16})-([0-9a-f]{2})(-.*)?")
_ZERO_TRACE = b"0" * 32
_ZERO_SPAN = b"0" * 16
_BAGGAGE_KEY = re.compile(r"^[!#$%&'*+\-.^_`|~0-9A-Za-z]+$")
_random = random.Random()  # ids need uniqueness, not secrecy (the SDK uses the same kind)


@dataclass(frozen=True, slots=True)
class ParentContext:
    """The caller's span, from its `traceparent`."""

    trace_id: bytes  # 16 bytes
    span_id: bytes  # 8 bytes
    sampled: bool
    trace_state: str = ""


def parse_traceparent(value: bytes) -> ParentContext | None:
    """The caller's context, or None when the header is absent in effect or malformed."""
    match = _TRACEPARENT.fullmatch(value) or _TRACEPARENT.fullmatch(value.strip())
    if match is None:
        return None
    version, trace_hex, span_hex, flags_hex, rest = match.groups()
    if version == b"ff" or trace_hex == _ZERO_TRACE or span_hex == _ZERO_SPAN:
        return None
    if rest is not None and version == b"00":
        return None  # version 00 has exactly four fields
    return ParentContext(unhexlify(trace_hex), unhexlify(span_hex), bool(int(flags_hex, 16) & 1))


def format_traceparent(trace_id: bytes, span_id: bytes, sampled: bool) -> bytes:
    return b"00-" + trace_id.hex().encode() + b"-" + span_id.hex().encode() + (b"-01" if sampled else b"-00")


def new_trace_id() -> bytes:
    return (_random.getrandbits(128) or 1).to_bytes(16, "big")


def new_span_id() -> bytes:
    return (_random.getrandbits(64) or 1).to_bytes(8, "big")


@dataclass(frozen=True, slots=True)
class Sampler:
    """`ratio` for requests without a caller context; `parent_based`: follow the caller's flag."""

    ratio: float = 1.0
    parent_based: bool = True

    def sampled(self, trace_id: bytes, parent: ParentContext | None) -> bool:
        if parent is not None and self.parent_based:
            return parent.sampled
        if self.ratio >= 1.0:
            return True
        if self.ratio <= 0.0:
            return False
        return int.from_bytes(trace_id[8:], "big") < int(self.ratio * (1 << 64))


def sampler_from_env(name: str | None, arg: str | None) -> Sampler:
    """OTEL_TRACES_SAMPLER / OTEL_TRACES_SAMPLER_ARG; unknown names fall back to the default
    (parentbased_always_on), as the SDKs do."""
    name = (name or "parentbased_always_on").strip().lower()
    ratio = 1.0
    if name.endswith("traceidratio"):
        try:
            ratio = min(max(float(arg if arg not in (None, "") else 1.0), 0.0), 1.0)
        except ValueError:
            ratio = 1.0
    table = {
        "always_on": Sampler(1.0, False), "always_off": Sampler(0.0, False),
        "traceidratio": Sampler(ratio, False),
        "parentbased_always_on": Sampler(1.0, True), "parentbased_always_off": Sampler(0.0, True),
        "parentbased_traceidratio": Sampler(ratio, True),
    }
    return table.get(name, Sampler())


def parse_baggage(value: bytes, keys: Iterable[str]) -> dict[str, str]:
    """The entries of a `baggage` header whose keys are in `keys` (values percent-decoded,
    properties dropped, capped in length)."""
    wanted = set(keys)
    found: dict[str, str] = {}
    for member in value.decode("latin-1").split(","):
        entry = member.split(";", 1)[0]
        key, sep, raw = entry.partition("=")
        key = key.strip()
        if not sep or key not in wanted or not _BAGGAGE_KEY.match(key):
            continue
        found.setdefault(key, unquote(raw.strip())[:MAX_BAGGAGE_VALUE])
    return found


def parse_key_values(text: str) -> dict[str, str]:
    """``k1=v1,k2=v2`` with percent-encoded values: OTEL_RESOURCE_ATTRIBUTES and
    OTEL_EXPORTER_OTLP_HEADERS. Members without "=" are skipped."""
    result: dict[str, str] = {}
    for member in text.split(","):
        key, sep, value = member.partition("=")
        key = key.strip()
        if sep and key:
            result[key] = unquote(value.strip())
    return result


def caller_context(headers: list[tuple[bytes, bytes]], *, read_baggage: bool,
                   baggage_keys: tuple[str, ...]) -> tuple[ParentContext | None, int | None, dict[str, str]]:
    """The caller's context: its parent (with tracestate), the index of its traceparent
    header in `headers` (None if absent) and the wanted baggage entries."""
    parent: ParentContext | None = None
    index: int | None = None
    state = ""
    baggage: dict[str, str] = {}
    for position, (name, value) in enumerate(headers):
        if len(name) not in (7, 10, 11):  # traceparent, tracestate, baggage: a cheap first test
            continue
        name = name.lower()
        if name == TRACEPARENT and index is None:
            index, parent = position, parse_traceparent(value)
        elif name == TRACESTATE and len(value) <= MAX_TRACESTATE:
            state = value.decode("latin-1").strip() if not state else f"{state},{value.decode('latin-1').strip()}"
        elif name == BAGGAGE and read_baggage and baggage_keys:
            for key, entry in parse_baggage(value, baggage_keys).items():
                baggage.setdefault(key, entry)
    if parent is not None and state and len(state) <= MAX_TRACESTATE:
        parent = ParentContext(parent.trace_id, parent.span_id, parent.sampled, state)
    return parent, index, baggage


def propagate(headers: list[tuple[bytes, bytes]], index: int | None, traceparent: bytes) -> None:
    """Make the request's `traceparent` name the sidecar's span, in place: the proxy and the
    Live relay build Google's request headers from this list, so Google sees the sidecar's
    span as the parent. `tracestate` and `baggage` pass unchanged."""
    if index is None:
        headers.append((TRACEPARENT, traceparent))
    else:
        headers[index] = (TRACEPARENT, traceparent)
