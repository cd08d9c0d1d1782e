"""Token usage accounting over response bodies as they stream through the proxy.

Pure: no I/O, no asyncio. Every parser sees the response bytes chunk by chunk, keeps a
bounded amount of state (a few dozen bytes between chunks, at most `MAX_VALUE_BYTES` while
capturing one usage object) and never raises from `feed`.

Public API
----------
``Usage``
    Token counts of one response. Conventions, the same for every API:

    - ``input_tokens``  every token billed as input: Gemini ``promptTokenCount +
      toolUsePromptTokenCount``; OpenAI ``prompt_tokens``; Anthropic ``input_tokens +
      cache_read_input_tokens + cache_creation_input_tokens``.
      ``cached_input_tokens``, ``cache_write_tokens`` and ``tool_use_prompt_tokens`` are
      *parts* of it.
    - ``output_tokens`` every token billed as output: Gemini ``candidatesTokenCount +
      thoughtsTokenCount``; OpenAI ``completion_tokens``; Anthropic ``output_tokens``.
      ``reasoning_tokens`` is a *part* of it.
    - ``total_tokens`` as reported, else input + output. ``images`` counts generated
      images (Imagen), ``billable_characters`` is reported by text-embedding models (which
      Vertex bills per character).
    - ``input_by_modality`` / ``output_by_modality``: ``{"TEXT": n, "AUDIO": m, ...}``.
    - ``found``: some usage was seen. ``billable``: False for countTokens (free calls).

``UsageParser`` (protocol)
    ``feed(chunk: bytes) -> None``, ``result() -> Usage``, ``buffered_bytes: int``.

``new_usage_parser(publisher, method, is_openai_compat=False, *, model="",
content_encoding="") -> UsageParser``
    Picks the semantics from the request path:

    ====================================================  =================================
    method (path ``:method`` or OpenAI path)              parser
    ====================================================  =================================
    generateContent, streamGenerateContent                 ``usageMetadata``, last one wins
    countTokens                                            ``totalTokens``, not billable
    predict, embedContent, batchEmbedContents              sums embedding ``token_count``s,
                                                           counts Imagen images
    rawPredict, streamRawPredict (model count-tokens)      ``input_tokens``, not billable
    rawPredict, streamRawPredict                           ``usage`` (Anthropic or OpenAI
                                                           shape); streams merge fields
    chat/completions, completions, embeddings (OpenAI)     ``usage``, last one wins
    anything else                                          none (``found`` stays False)
    ====================================================  =================================

    ``content_encoding`` ``gzip``/``deflate`` wraps the parser in ``GzipUsageParser``; any
    other non-identity encoding gets the null parser.

``GzipUsageParser(inner)``
    Inflates incrementally (bounded output per step) and feeds ``inner``.

``operation_from_method(method_segment, publisher="", model="") -> str``
    Low-cardinality operation names, OpenTelemetry GenAI ``gen_ai.operation.name`` values
    where one exists:

    ====================================================  =================================
    generateContent, streamGenerateContent,               ``generate_content`` (OTel)
    BidiGenerateContent (Live)
    chat/completions; rawPredict/streamRawPredict of a    ``chat`` (OTel)
    non-Google publisher (Anthropic, Mistral, ...)
    completions (OpenAI-compatible)                       ``text_completion`` (OTel)
    embedContent, batchEmbedContents, embeddings,         ``embeddings`` (OTel)
    predict of an ``*embedding*`` model
    predict of an ``imagen-*`` model                      ``generate_image``
    predictLongRunning (Veo)                              ``generate_video``
    countTokens; Anthropic ``count-tokens`` model         ``count_tokens``
    computeTokens                                         ``compute_tokens``
    other predict / rawPredict (Google, endpoints)        ``predict``
    anything else                                         ``other``
    ====================================================  =================================

``usage_from_live_message(message: dict) -> Usage | None``
    The usage a parsed Live API server message carries (``usageMetadata``), if any.

How the scanner works
---------------------
Inside a JSON string every ``"`` is escaped, so the bytes ``"usageMetadata"`` followed by
optional whitespace and ``:`` (and not preceded by a backslash) can only be an object key.
``bytes.find`` locates such keys at C speed, across chunk boundaries thanks to a short tail
kept from the previous chunk; only the value that follows is captured (balanced ``{...}``
with string/escape tracking, or a number) and decoded. So one scanner serves plain JSON
bodies, SSE ``data:`` frames and the JSON-array stream form alike, and the cost per byte is
a ``find``, never a Python loop. Objects larger than ``MAX_VALUE_BYTES`` are abandoned.
"""

from __future__ import annotations

import json
import re
import zlib
from dataclasses import dataclass, field
from typing import Any, Final, Protocol

__all__ = [
    "MAX_VALUE_BYTES",
    "CountTokensParser",
    "GeminiUsageParser",
    "GzipUsageParser",
    "NullUsageParser",
    "PredictUsageParser",
    "Usage",
    "UsageObjectParser",
    "UsageParser",
    "new_usage_parser",
    "operation_from_method",
    "usage_from_live_message",
]

MAX_VALUE_BYTES: Final = 64 * 1024
"""Largest usage object captured; a bigger value is abandoned (hostile or not usage)."""

_MAX_COUNT: Final = 1 << 53  # beyond this a "count" is junk, not tokens
_MAX_MODALITIES: Final = 16


# --------------------------------------------------------------------------- Usage


@dataclass(slots=True)
class Usage:
    """Token usage of one response; see the module docstring for the conventions."""

    input_tokens: int = 0
    output_tokens: int = 0
    cached_input_tokens: int = 0
    cache_write_tokens: int = 0
    reasoning_tokens: int = 0
    tool_use_prompt_tokens: int = 0
    total_tokens: int = 0
    images: int = 0
    billable_characters: int = 0
    input_by_modality: dict[str, int] = field(default_factory=dict)
    output_by_modality: dict[str, int] = field(default_factory=dict)
    found: bool = False
    billable: bool = True
    response_model: str | None = None  # the model that answered (Gemini's modelVersion), if given

    def as_log_dict(self) -> dict[str, Any]:
        """Compact form for the access log: the three main counts, then non-zero extras."""
        out: dict[str, Any] = {
            "input_tokens": self.input_tokens,
            "output_tokens": self.output_tokens,
            "total_tokens": self.total_tokens,
        }
        for name in (
            "cached_input_tokens",
            "cache_write_tokens",
            "reasoning_tokens",
            "tool_use_prompt_tokens",
            "images",
            "billable_characters",
        ):
            value = getattr(self, name)
            if value:
                out[name] = value
        if self.input_by_modality:
            out["input_by_modality"] = dict(self.input_by_modality)
        if self.output_by_modality:
            out["output_by_modality"] = dict(self.output_by_modality)
        if not self.billable:
            out["billable"] = False
        return out


def _count(value: object) -> int:
    """A token count from JSON, or 0 for anything that is not a sane non-negative integer."""
    if type(value) is int:
        return value if 0 <= value < _MAX_COUNT else 0
    if type(value) is float and value.is_integer() and 0 <= value < _MAX_COUNT:
        return int(value)
    return 0


_MODALITY = re.compile(r"[A-Z][A-Z_]{0,31}")


def _add_modalities(details: object, into: dict[str, int]) -> None:
    """Adds ``[{"modality": "TEXT", "tokenCount": n}, ...]`` into ``into``."""
    if not isinstance(details, list):
        return
    for item in details[:_MAX_MODALITIES]:
        if not isinstance(item, dict):
            continue
        modality = item.get("modality")
        if not isinstance(modality, str) or not _MODALITY.fullmatch(modality):
            continue
        if modality == "MODALITY_UNSPECIFIED":  # documented as "treated as TEXT"
            modality = "TEXT"
        tokens = _count(item.get("tokenCount"))
        if tokens and (modality in into or len(into) < _MAX_MODALITIES):
            into[modality] = into.get(modality, 0) + tokens


_GEMINI_COUNTS: Final = (
    "promptTokenCount",
    "candidatesTokenCount",
    "responseTokenCount",
    "thoughtsTokenCount",
    "cachedContentTokenCount",
    "toolUsePromptTokenCount",
    "totalTokenCount",
)


def _gemini_usage(meta: object) -> Usage | None:
    """Usage from a Gemini ``usageMetadata`` object (generateContent or Live)."""
    if not isinstance(meta, dict) or not any(key in meta for key in _GEMINI_COUNTS):
        return None
    prompt = _count(meta.get("promptTokenCount"))
    tool_use = _count(meta.get("toolUsePromptTokenCount"))
    # Live on the Gemini Developer API says "response", Vertex says "candidates".
    if "candidatesTokenCount" in meta:
        candidates = _count(meta.get("candidatesTokenCount"))
        candidate_details = meta.get("candidatesTokensDetails")
    else:
        candidates = _count(meta.get("responseTokenCount"))
        candidate_details = meta.get("responseTokensDetails")
    thoughts = _count(meta.get("thoughtsTokenCount"))
    usage = Usage(
        input_tokens=prompt + tool_use,
        output_tokens=candidates + thoughts,
        cached_input_tokens=min(_count(meta.get("cachedContentTokenCount")), prompt),
        reasoning_tokens=thoughts,
        tool_use_prompt_tokens=tool_use,
        total_tokens=_count(meta.get("totalTokenCount")),
        found=True,
    )
    if not usage.total_tokens:
        usage.total_tokens = usage.input_tokens + usage.output_tokens
    _add_modalities(meta.get("promptTokensDetails"), usage.input_by_modality)
    _add_modalities(meta.get("toolUsePromptTokensDetails"), usage.input_by_modality)
    _add_modalities(candidate_details, usage.output_by_modality)
    return usage


def _usage_object_usage(obj: object) -> Usage | None:
    """Usage from a ``usage`` object in the OpenAI or the Anthropic shape."""
    if not isinstance(obj, dict):
        return None
    if "prompt_tokens" in obj or "completion_tokens" in obj:  # OpenAI / Mistral / vLLM
        prompt_details = obj.get("prompt_tokens_details")
        completion_details = obj.get("completion_tokens_details")
        prompt_details = prompt_details if isinstance(prompt_details, dict) else {}
        completion_details = completion_details if isinstance(completion_details, dict) else {}
        usage = Usage(
            input_tokens=_count(obj.get("prompt_tokens")),
            output_tokens=_count(obj.get("completion_tokens")),
            total_tokens=_count(obj.get("total_tokens")),
            found=True,
        )
        usage.cached_input_tokens = min(
            _count(prompt_details.get("cached_tokens")), usage.input_tokens
        )
        usage.reasoning_tokens = min(
            _count(completion_details.get("reasoning_tokens")), usage.output_tokens
        )
        audio_in = _count(prompt_details.get("audio_tokens"))
        if audio_in:
            usage.input_by_modality["AUDIO"] = audio_in
        audio_out = _count(completion_details.get("audio_tokens"))
        if audio_out:
            usage.output_by_modality["AUDIO"] = audio_out
    elif "input_tokens" in obj or "output_tokens" in obj:  # Anthropic
        cache_read = _count(obj.get("cache_read_input_tokens"))
        cache_write = _count(obj.get("cache_creation_input_tokens"))
        usage = Usage(
            input_tokens=_count(obj.get("input_tokens")) + cache_read + cache_write,
            output_tokens=_count(obj.get("output_tokens")),
            cached_input_tokens=cache_read,
            cache_write_tokens=cache_write,
            found=True,
        )
    else:
        return None
    if not usage.total_tokens:
        usage.total_tokens = usage.input_tokens + usage.output_tokens
    return usage


_USAGE_KEYS: Final = frozenset(
    {
        "prompt_tokens",
        "completion_tokens",
        "total_tokens",
        "prompt_tokens_details",
        "completion_tokens_details",
        "input_tokens",
        "output_tokens",
        "cache_read_input_tokens",
        "cache_creation_input_tokens",
    }
)


def _short_string(raw: bytes) -> str | None:
    """A JSON string literal's value (the answering model's name), if it is a clean one."""
    try:
        value = json.loads(raw)
    except ValueError:
        return None
    return value if isinstance(value, str) and value.isprintable() else None


def _loads_object(raw: bytes) -> dict[str, Any] | None:
    try:
        value = json.loads(raw)
    except (ValueError, RecursionError):  # ValueError includes UnicodeDecodeError
        return None
    return value if isinstance(value, dict) else None


def usage_from_live_message(message: dict[str, Any]) -> Usage | None:
    """Usage carried by one parsed Live API server message, or None.

    Vertex sends ``candidatesTokenCount``/``candidatesTokensDetails``; the Gemini Developer
    API's Live sends ``responseTokenCount``/``responseTokensDetails``: both are accepted.
    """
    if not isinstance(message, dict):
        return None
    return _gemini_usage(message.get("usageMetadata"))


# --------------------------------------------------------------------------- operations

_OPERATIONS: Final = {
    "generateContent": "generate_content",
    "streamGenerateContent": "generate_content",
    "BidiGenerateContent": "generate_content",
    "countTokens": "count_tokens",
    "computeTokens": "compute_tokens",
    "embedContent": "embeddings",
    "batchEmbedContents": "embeddings",
    "predictLongRunning": "generate_video",
    "chat/completions": "chat",
    "completions": "text_completion",
    "embeddings": "embeddings",
}


def _model_id(model: str) -> str:
    """``publishers/x/models/claude-3-haiku@20240307`` → ``claude-3-haiku``."""
    return model.rsplit("/", 1)[-1].split("@", 1)[0].split(":", 1)[0].lower()


def _method_name(method_segment: str) -> str:
    """``:generateContent`` → ``generateContent``; ``endpoints/openapi/chat/completions`` →
    ``chat/completions``."""
    method = method_segment.lstrip(":/")
    _, sep, rest = method.partition("openapi/")
    return rest if sep else method


def operation_from_method(method_segment: str, publisher: str = "", model: str = "") -> str:
    """Low-cardinality operation name for a request (table in the module docstring)."""
    method = _method_name(method_segment)
    operation = _OPERATIONS.get(method)
    if operation is not None:
        return operation
    model_id = _model_id(model)
    if method in ("rawPredict", "streamRawPredict"):
        if model_id == "count-tokens":
            return "count_tokens"
        if publisher and publisher != "google":
            return "chat"
        return "predict"
    if method == "predict":
        if model_id.startswith("imagen"):
            return "generate_image"
        if "embedding" in model_id:
            return "embeddings"
        return "predict"
    return "other"


# --------------------------------------------------------------------------- scanner

_WS: Final = re.compile(rb"[ \t\r\n]*")
_NUMBER: Final = re.compile(rb"-?[0-9]+(?:\.[0-9]+)?(?:[eE][+-]?[0-9]+)?")
_STRUCTURAL: Final = re.compile(rb'[{}"]')
_IN_STRING: Final = re.compile(rb'["\\]')
# A complete object nested at most three braces deep, matched in C. Possessive
# quantifiers keep it linear on any input; deeper or partial objects take the slow path.
_STR = rb'"(?:[^"\\]++|\\.)*+"'
_FLAT = rb'\{(?:[^{}"]++|' + _STR + rb")*+\}"
_DEPTH2 = rb'\{(?:[^{}"]++|' + _STR + rb"|" + _FLAT + rb")*+\}"
_OBJECT: Final = re.compile(rb'\{(?:[^{}"]++|' + _STR + rb"|" + _DEPTH2 + rb")*+\}", re.DOTALL)

_QUOTE: Final = 0x22
_BACKSLASH: Final = 0x5C
_COLON: Final = 0x3A
_LBRACE: Final = 0x7B
_NUMBER_START: Final = frozenset(b"-0123456789")
_MAX_GAP: Final = 64  # whitespace tolerated between a key, its colon and its value
_MAX_NUMBER: Final = 32
# A short string value read whole when it lies in one chunk (e.g. ``modelVersion``).
_MAX_STRING: Final = 200
_SHORT_STRING: Final = re.compile(rb'"(?:[^"\\\n]|\\.){0,%d}"' % _MAX_STRING)


class _KeyScanner:
    """Finds ``"key": value`` for a few keys in a JSON byte stream fed chunk by chunk.

    Subclasses receive each value in `_on_value(key, raw)`: ``raw`` is the complete object
    (``{...}``), the number's bytes, or ``b'"'`` for a string value — except for
    `string_keys`, whose short string values come whole (quotes included) when they are not
    cut by a chunk boundary (best effort: streams repeat them in every chunk).
    """

    __slots__ = (
        "_needles",
        "_keep",
        "_carry_limit",
        "_cap",
        "_tail",
        "_parts",
        "_key",
        "_size",
        "_depth",
        "_in_str",
        "_skip",
        "_string_keys",
    )

    def __init__(self, keys: tuple[bytes, ...], cap: int = MAX_VALUE_BYTES,
                 string_keys: frozenset[bytes] = frozenset()) -> None:
        self._string_keys = string_keys
        self._needles = tuple((b'"' + key + b'"', key) for key in keys + tuple(string_keys))
        longest = max(len(needle) for needle, _ in self._needles)
        self._keep = longest  # a needle cut by the chunk end, plus the byte before it
        self._carry_limit = longest + 2 * _MAX_GAP + (_MAX_STRING + 2 if string_keys else _MAX_NUMBER)
        self._cap = cap
        self._tail = b""  # unsearched end of the previous chunk
        self._parts: list[bytes] | None = None  # a capture in progress
        self._key = b""
        self._size = 0
        self._depth = 0
        self._in_str = False
        self._skip = 0  # bytes of the next chunk already consumed by an escape

    @property
    def buffered_bytes(self) -> int:
        """Bytes held between chunks (the tail plus any partial capture)."""
        return len(self._tail) + self._size

    def _on_value(self, key: bytes, raw: bytes) -> None:
        raise NotImplementedError

    def _reset(self) -> None:
        self._tail = b""
        self._parts = None
        self._size = 0

    def _scan(self, chunk: bytes) -> None:
        if self._parts is not None:
            resume = self._capture(chunk, 0)
            if resume < 0:
                return
            self._search(chunk, resume)
        elif self._tail:
            self._search(self._tail + chunk, 0)
        else:
            self._search(chunk, 0)

    def _search(self, data: bytes, start: int) -> None:
        needles = self._needles
        end = len(data)
        pos = start
        nexts = [data.find(needle, pos) for needle, _ in needles]
        while True:
            found = -1
            which = 0
            for index, at in enumerate(nexts):
                if at >= 0 and (found < 0 or at < found):
                    found, which = at, index
            if found < 0:
                self._tail = data[max(pos, end - self._keep) :]
                return
            needle, key = needles[which]
            pos = self._at_key(data, found, needle, key)
            if pos < 0:  # undecided until the next chunk: keep from the key on
                self._tail = data[found:]
                return
            if pos == end and self._parts is not None:  # capture continues in next chunk
                self._tail = b""
                return
            for index, at in enumerate(nexts):
                if 0 <= at < pos:
                    nexts[index] = data.find(needles[index][0], pos)

    def _at_key(self, data: bytes, at: int, needle: bytes, key: bytes) -> int:
        """Handles a key found at ``at``; returns where to search on, or -1 to wait."""
        end = len(data)
        if at > 0 and data[at - 1] == _BACKSLASH:  # an escaped quote inside a string
            return at + 1
        pos = _WS.match(data, at + len(needle)).end()  # type: ignore[union-attr]
        if pos < end:
            if data[pos] != _COLON:  # a string value that happens to read "key"
                return at + 1
            pos = _WS.match(data, pos + 1).end()  # type: ignore[union-attr]
        if pos >= end:
            return -1 if end - at <= self._carry_limit else at + 1
        first = data[pos]
        if first == _LBRACE:
            return self._start_capture(data, pos, key)
        if first in _NUMBER_START:
            number = _NUMBER.match(data, pos)
            if number is None:
                return pos + 1
            if number.end() == end:  # more digits may follow in the next chunk
                return -1 if end - at <= self._carry_limit else at + 1
            self._on_value(key, number.group())
            return number.end()
        if first == _QUOTE:
            if key in self._string_keys:
                string = _SHORT_STRING.match(data, pos)
                if string is not None:
                    self._on_value(key, string.group())
                    return string.end()
                if end - pos <= _MAX_STRING + 1 and data.find(b'"', pos + 1) < 0:  # cut by the chunk end
                    return -1 if end - at <= self._carry_limit else at + 1
            self._on_value(key, b'"')
            return pos + 1  # searching inside the string is safe: see the docstring
        return pos  # null, true, false, an array: not a value we read

    def _start_capture(self, data: bytes, pos: int, key: bytes) -> int:
        whole = _OBJECT.match(data, pos, min(len(data), pos + self._cap))
        if whole is not None:  # the common case: the object is complete in this chunk
            self._on_value(key, whole.group())
            return whole.end()
        self._parts = []
        self._key = key
        self._size = 0
        self._depth = 0
        self._in_str = False
        self._skip = 0
        resume = self._capture(data, pos)
        return len(data) if resume < 0 else resume

    def _capture(self, data: bytes, start: int) -> int:
        """Tracks braces and strings from ``start``; returns where searching resumes, or -1
        when the object continues in the next chunk."""
        end = len(data)
        limit = min(end, start + self._cap - self._size)
        pos = start + self._skip
        self._skip = 0
        depth = self._depth
        in_str = self._in_str
        closed = -1
        while pos < limit:
            if in_str:
                match = _IN_STRING.search(data, pos, limit)
                if match is None:
                    pos = limit
                    break
                pos = match.end()
                if data[pos - 1] == _BACKSLASH:
                    pos += 1  # the escaped byte, possibly in the next chunk
                else:
                    in_str = False
            else:
                match = _STRUCTURAL.search(data, pos, limit)
                if match is None:
                    pos = limit
                    break
                pos = match.end()
                byte = data[pos - 1]
                if byte == _QUOTE:
                    in_str = True
                elif byte == _LBRACE:
                    depth += 1
                else:
                    depth -= 1
                    if depth == 0:
                        closed = pos
                        break
        parts = self._parts
        assert parts is not None
        if closed >= 0:
            parts.append(data[start:closed])
            key = self._key
            self._parts = None
            self._size = 0
            self._on_value(key, b"".join(parts))
            return closed
        if limit < end or self._size + (end - start) >= self._cap:
            self._parts = None  # too big to be usage: abandon, search on from here
            self._size = 0
            return limit
        parts.append(data[start:] if start else data)
        self._size += end - start
        self._depth = depth
        self._in_str = in_str
        self._skip = pos - end if pos > end else 0
        return -1


# --------------------------------------------------------------------------- parsers


class UsageParser(Protocol):
    """Incremental usage parser: feed every response chunk, then read the result."""

    def feed(self, chunk: bytes) -> None: ...

    def result(self) -> Usage: ...

    @property
    def buffered_bytes(self) -> int: ...


class _ScanningParser(_KeyScanner):
    __slots__ = ("_dead",)

    def __init__(self, keys: tuple[bytes, ...], string_keys: frozenset[bytes] = frozenset()) -> None:
        super().__init__(keys, string_keys=string_keys)
        self._dead = False

    def feed(self, chunk: bytes) -> None:
        """Scans one chunk. Never raises: accounting must not break the relay."""
        if self._dead or not chunk:
            return
        try:
            self._scan(chunk if type(chunk) is bytes else bytes(chunk))
        except Exception:  # a bug here must cost the usage, not the response
            self._dead = True
            self._reset()

    def result(self) -> Usage:
        raise NotImplementedError


class GeminiUsageParser(_ScanningParser):
    """generateContent / streamGenerateContent: the last ``usageMetadata`` with counts wins
    (stream chunks carry cumulative usage; some carry only ``trafficType``)."""

    __slots__ = ("_last", "_model_version", "_memo")

    def __init__(self) -> None:
        super().__init__((b"usageMetadata",), string_keys=frozenset((b"modelVersion",)))
        self._last = b""
        self._model_version = b""
        # result() is asked by the telemetry and the token limits: decoded once per value seen.
        self._memo: tuple[bytes, bytes, Usage] | None = None

    def _on_value(self, key: bytes, raw: bytes) -> None:
        # Decoded lazily in result(): streams repeat usageMetadata in every chunk.
        if key == b"modelVersion":
            if len(raw) > 2:
                self._model_version = raw
        elif raw[:1] == b"{" and b'TokenCount"' in raw:
            self._last = raw

    def result(self) -> Usage:
        memo = self._memo
        if memo is not None and memo[0] is self._last and memo[1] is self._model_version:
            return memo[2]
        meta = _loads_object(self._last) if self._last else None
        usage = _gemini_usage(meta) or Usage()
        if self._model_version:
            usage.response_model = _short_string(self._model_version)
        self._memo = (self._last, self._model_version, usage)
        return usage


class UsageObjectParser(_ScanningParser):
    """A ``usage`` object, OpenAI or Anthropic shape. With ``merge`` (Anthropic streams:
    ``message_start`` has the input, ``message_delta`` the cumulative output) later fields
    update earlier ones; otherwise the last complete object wins."""

    __slots__ = ("_merge", "_fields", "_last")

    def __init__(self, *, merge: bool = False) -> None:
        super().__init__((b"usage",))
        self._merge = merge
        self._fields: dict[str, Any] = {}
        self._last = b""

    def _on_value(self, key: bytes, raw: bytes) -> None:
        if raw[:1] != b"{" or b'_tokens"' not in raw:
            return
        if not self._merge:
            self._last = raw
            return
        obj = _loads_object(raw)
        if obj is not None:  # known keys only, so a hostile stream cannot grow the dict
            self._fields.update(
                (k, v) for k, v in obj.items() if k in _USAGE_KEYS and v is not None
            )

    def result(self) -> Usage:
        obj = self._fields if self._merge else (_loads_object(self._last) if self._last else None)
        return _usage_object_usage(obj) or Usage()


class CountTokensParser(_ScanningParser):
    """countTokens (``totalTokens``) or Anthropic count-tokens (``input_tokens``): reported
    as input tokens of a call that costs nothing."""

    __slots__ = ("_tokens",)

    def __init__(self, key: bytes = b"totalTokens") -> None:
        super().__init__((key,))
        self._tokens: int | None = None

    def _on_value(self, key: bytes, raw: bytes) -> None:
        value = _number(raw)
        if value is not None:
            self._tokens = value

    def result(self) -> Usage:
        if self._tokens is None:
            return Usage(billable=False)
        return Usage(
            input_tokens=self._tokens, total_tokens=self._tokens, found=True, billable=False
        )


class PredictUsageParser(_ScanningParser):
    """predict / embedContent: sums embedding ``token_count`` (and ``usageMetadata``
    prompt tokens), reads ``billableCharacterCount``, counts generated images."""

    __slots__ = ("_tokens", "_images", "_characters", "_found")

    def __init__(self) -> None:
        super().__init__(
            (
                b"token_count",
                b"bytesBase64Encoded",
                b"gcsUri",
                b"billableCharacterCount",
                b"usageMetadata",
            )
        )
        self._tokens = 0
        self._images = 0
        self._characters = 0
        self._found = False

    def _on_value(self, key: bytes, raw: bytes) -> None:
        if key == b"bytesBase64Encoded" or key == b"gcsUri":
            if raw == b'"':
                self._images += 1
                self._found = True
        elif key == b"usageMetadata":
            usage = _gemini_usage(_loads_object(raw)) if raw[:1] == b"{" else None
            if usage is not None:
                self._tokens += usage.input_tokens
                self._found = True
        else:
            value = _number(raw)
            if value is not None:
                if key == b"token_count":
                    self._tokens += value
                else:
                    self._characters = value
                self._found = True

    def result(self) -> Usage:
        return Usage(
            input_tokens=self._tokens,
            total_tokens=self._tokens,
            images=self._images,
            billable_characters=self._characters,
            found=self._found,
        )


class NullUsageParser:
    """For responses that carry no usage (or an encoding we cannot read)."""

    __slots__ = ()

    buffered_bytes: Final = 0

    def feed(self, chunk: bytes) -> None:
        pass

    def result(self) -> Usage:
        return Usage()


def _number(raw: bytes) -> int | None:
    if raw[:1] == b'"':
        return None
    try:
        value = int(raw)
    except ValueError:
        try:
            value = int(float(raw))
        except (ValueError, OverflowError):
            return None
    return value if 0 <= value < _MAX_COUNT else None


class GzipUsageParser:
    """Inflates a gzip (or zlib) response incrementally and feeds ``inner``.

    Output is produced at most ``step`` bytes at a time, so memory stays bounded however
    well the body compresses; after ``max_output`` inflated bytes parsing stops (a bomb
    must not cost unbounded CPU). The proxy still forwards the compressed bytes untouched.
    """

    __slots__ = ("_inner", "_inflater", "_step", "_max_output", "_output", "_dead")

    def __init__(
        self, inner: UsageParser, *, step: int = 64 * 1024, max_output: int = 1 << 30
    ) -> None:
        self._inner = inner
        self._inflater = zlib.decompressobj(wbits=32 + zlib.MAX_WBITS)  # gzip or zlib header
        self._step = step
        self._max_output = max_output
        self._output = 0
        self._dead = False

    @property
    def buffered_bytes(self) -> int:
        return self._inner.buffered_bytes + len(self._inflater.unconsumed_tail)

    def feed(self, chunk: bytes) -> None:
        if self._dead or not chunk:
            return
        try:
            self._inflate(chunk)
        except Exception:  # corrupt stream: stop counting, never fail the relay
            self._dead = True
            self._inflater = zlib.decompressobj(wbits=32 + zlib.MAX_WBITS)

    def _inflate(self, data: bytes) -> None:
        while True:
            out = self._inflater.decompress(data, self._step)
            if out:
                self._output += len(out)
                if self._output > self._max_output:
                    self._dead = True
                    return
                self._inner.feed(out)
            data = self._inflater.unconsumed_tail
            if self._inflater.eof:
                rest = self._inflater.unused_data
                if not rest:
                    return
                self._inflater = zlib.decompressobj(wbits=32 + zlib.MAX_WBITS)  # next member
                data = rest
            elif not data and len(out) < self._step:
                return

    def result(self) -> Usage:
        return self._inner.result()


# --------------------------------------------------------------------------- factory

_OPENAI_METHODS: Final = frozenset({"chat/completions", "completions", "embeddings"})


def new_usage_parser(
    publisher: str,
    method: str,
    is_openai_compat: bool = False,
    *,
    model: str = "",
    content_encoding: str = "",
) -> UsageParser:
    """The parser for a response, chosen from the request (table in the module docstring).

    ``model`` is only needed to recognise Anthropic's ``count-tokens`` pseudo-model.
    """
    encoding = content_encoding.strip().lower()
    if encoding not in ("", "identity", "gzip", "x-gzip", "deflate"):
        return NullUsageParser()
    parser = _parser_for(publisher, _method_name(method), is_openai_compat, model)
    if encoding in ("gzip", "x-gzip", "deflate") and not isinstance(parser, NullUsageParser):
        return GzipUsageParser(parser)
    return parser


def _parser_for(publisher: str, method: str, is_openai_compat: bool, model: str) -> UsageParser:
    if is_openai_compat or method in _OPENAI_METHODS:
        return UsageObjectParser()
    if method in ("generateContent", "streamGenerateContent"):
        return GeminiUsageParser()
    if method == "countTokens":
        return CountTokensParser(b"totalTokens")
    if method in ("rawPredict", "streamRawPredict"):
        if _model_id(model) == "count-tokens":
            return CountTokensParser(b"input_tokens")
        return UsageObjectParser(merge=method == "streamRawPredict")
    if method in ("predict", "embedContent", "batchEmbedContents"):
        return PredictUsageParser()
    return NullUsageParser()
