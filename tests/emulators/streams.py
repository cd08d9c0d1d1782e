"""Stream framings used by Vertex, and per-request pacing knobs.

- Gemini SSE (`?alt=sse`): `data: {json}\\r\\n\\r\\n` per chunk.
- Gemini without `alt`: one JSON array written incrementally — `[{...}` then
  `\\n,\\r\\n{...}` for each further chunk, then `\\n]` (chunks pretty-printed, like
  Google's default `prettyPrint=true`).
- Anthropic SSE: `event: <type>\\ndata: {json}\\n\\n`.
- OpenAI SSE: `data: {json}\\n\\n` ... `data: [DONE]\\n\\n`.

Pacing: app.state values, overridable per request by headers (which pass through the
sidecar untouched):
- `stream_chunk_delay_s` / `x-emulator-chunk-delay`: seconds between chunks;
- `stream_chunks` / `x-emulator-chunks`: how many pieces to cut the answer into;
- `first_byte_delay_s` / `x-emulator-first-byte-delay`: seconds before the response starts;
- `x-emulator-fail-after-chunks: N`: drop the connection after N chunks (a broken upstream).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Iterable

from starlette.requests import Request

from .google_json import encode_json, encode_json_line

__all__ = [
    "EmulatedStreamFailure",
    "anthropic_event",
    "chunk_count",
    "chunk_delay",
    "fail_after",
    "first_byte_delay",
    "json_array_frames",
    "openai_event",
    "paced",
    "quiet_emulated_failures",
    "split_words",
    "sse_frame",
]


class EmulatedStreamFailure(RuntimeError):
    """Raised inside a response body to cut the connection mid-stream on purpose."""


class _DropEmulatedFailures(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        error = record.exc_info[1] if record.exc_info else None
        return not isinstance(error, EmulatedStreamFailure)


_QUIET = _DropEmulatedFailures()


def quiet_emulated_failures() -> None:
    """Keep uvicorn from logging a traceback for a failure the test asked for."""
    logging.getLogger("uvicorn.error").addFilter(_QUIET)  # adding the same filter twice is a no-op


def _float(request: Request, header: str, state_attr: str, default: float) -> float:
    raw = request.headers.get(header)
    if raw is not None:
        try:
            return max(0.0, float(raw))
        except ValueError:
            pass
    return float(getattr(request.app.state, state_attr, default))


def chunk_delay(request: Request) -> float:
    return _float(request, "x-emulator-chunk-delay", "stream_chunk_delay_s", 0.0)


def first_byte_delay(request: Request) -> float:
    return _float(request, "x-emulator-first-byte-delay", "first_byte_delay_s", 0.0)


def chunk_count(request: Request) -> int:
    return max(1, int(_float(request, "x-emulator-chunks", "stream_chunks", 4)))


def fail_after(request: Request) -> int | None:
    raw = request.headers.get("x-emulator-fail-after-chunks")
    return int(raw) if raw is not None and raw.isdigit() else None


def split_words(words: list[str] | tuple[str, ...], pieces: int) -> list[str]:
    """Cut an answer into at most `pieces` texts that concatenate back to it."""
    pieces = max(1, min(pieces, len(words)))
    size, extra = divmod(len(words), pieces)
    out, start = [], 0
    for i in range(pieces):
        end = start + size + (1 if i < extra else 0)
        out.append(("" if i == 0 else " ") + " ".join(words[start:end]))
        start = end
    return out


def sse_frame(payload: object) -> bytes:
    return b"data: " + encode_json_line(payload) + b"\r\n\r\n"


def json_array_frames(payloads: Iterable[object], *, pretty: bool = True) -> list[bytes]:
    frames = []
    for i, payload in enumerate(payloads):
        frames.append((b"[" if i == 0 else b"\n,\r\n") + encode_json(payload, pretty=pretty))
    if not frames:
        return [b"[]"]
    frames[-1] += b"\n]"
    return frames


def anthropic_event(event: str, payload: object) -> bytes:
    return b"event: " + event.encode() + b"\ndata: " + encode_json(payload, pretty=False) + b"\n\n"


def openai_event(payload: object | None) -> bytes:
    data = b"[DONE]" if payload is None else encode_json(payload, pretty=False)
    return b"data: " + data + b"\n\n"


async def paced(
    frames: Iterable[bytes], delay: float, fail_after_chunks: int | None = None
) -> AsyncIterator[bytes]:
    """Yield frames with `delay` seconds between them; optionally break after N frames."""
    for i, frame in enumerate(frames):
        if fail_after_chunks is not None and i >= fail_after_chunks:
            raise EmulatedStreamFailure(f"emulated upstream failure after {i} chunks")
        if i and delay:
            await asyncio.sleep(delay)
        yield frame
