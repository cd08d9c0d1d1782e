"""Claude on Vertex: `publishers/anthropic/models/{model}:rawPredict` and `:streamRawPredict`.

The body is an Anthropic Messages request with `anthropic_version` (e.g.
"vertex-2023-10-16") instead of a `model` field. Answers are deterministic like Gemini's:
"Echo: " + the last message's text; a token is a word. Prompt caching is emulated: the
prefix up to the last block with `cache_control` is written to an in-memory cache on first
sight (`cache_creation_input_tokens`) and read on later requests
(`cache_read_input_tokens`); `input_tokens` counts only the uncached rest, as Anthropic does.
Model-level errors use Anthropic's shape `{"type": "error", "error": {...}}`.
"""

from __future__ import annotations

import hashlib
import secrets
import string
from dataclasses import dataclass
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse

from . import google_errors, streams
from .model_call import BadBody, ModelCall, error_response, parse_json_body, preflight

__all__ = ["handle_anthropic_model"]

_ALPHABET = string.ascii_letters + string.digits


@dataclass(frozen=True)
class _Usage:
    input_tokens: int
    cache_creation_input_tokens: int
    cache_read_input_tokens: int
    output_tokens: int

    def to_json(self, output_tokens: int | None = None) -> dict[str, int]:
        return {
            "input_tokens": self.input_tokens,
            "cache_creation_input_tokens": self.cache_creation_input_tokens,
            "cache_read_input_tokens": self.cache_read_input_tokens,
            "output_tokens": self.output_tokens if output_tokens is None else output_tokens,
        }


def _invalid(message: str) -> JSONResponse:
    return JSONResponse(
        {"type": "error", "error": {"type": "invalid_request_error", "message": message}}, status_code=400
    )


def _validate(body: dict[str, Any]) -> str | None:
    for field in ("anthropic_version", "messages", "max_tokens"):
        if field not in body:
            return f"{field}: Field required"
    messages = body["messages"]
    if not isinstance(messages, list) or not messages or not all(isinstance(m, dict) for m in messages):
        return "messages: Input should be a non-empty list of message objects"
    if not isinstance(body["max_tokens"], int) or body["max_tokens"] < 1:
        return "max_tokens: Input should be a valid integer greater than 0"
    return None


def _blocks(content: Any) -> list[dict[str, Any]]:
    if isinstance(content, str):
        return [{"type": "text", "text": content}]
    return [b for b in content or [] if isinstance(b, dict)]


def _prompt_blocks(body: dict[str, Any]) -> list[dict[str, Any]]:
    blocks = _blocks(body.get("system"))
    for message in body["messages"]:
        blocks += _blocks(message.get("content"))
    return blocks


def _words(block: dict[str, Any]) -> int:
    text = block.get("text")
    return len(text.split()) if isinstance(text, str) else 0


def _usage(request: Request, body: dict[str, Any], output_tokens: int) -> _Usage:
    blocks = _prompt_blocks(body)
    total = sum(_words(b) for b in blocks)
    marks = [i for i, b in enumerate(blocks) if b.get("cache_control")]
    if not marks:
        return _Usage(total, 0, 0, output_tokens)
    prefix = blocks[: marks[-1] + 1]
    prefix_tokens = sum(_words(b) for b in prefix)
    key = hashlib.sha256(repr([b.get("text") for b in prefix]).encode()).hexdigest()
    cache: set[str] = request.app.state.anthropic_prompt_cache
    hit = key in cache
    cache.add(key)
    return _Usage(
        total - prefix_tokens,
        0 if hit else prefix_tokens,
        prefix_tokens if hit else 0,
        output_tokens,
    )


def _answer(body: dict[str, Any]) -> tuple[list[str], str]:
    last = body["messages"][-1]
    text = " ".join(b.get("text", "") for b in _blocks(last.get("content")) if isinstance(b.get("text"), str))
    words = ["Echo:", *text.split()]
    if len(words) > body["max_tokens"]:
        return words[: body["max_tokens"]], "max_tokens"
    return words, "end_turn"


def _message_id() -> str:
    return "msg_vrtx_" + "".join(secrets.choice(_ALPHABET) for _ in range(24))


def _model_name(call: ModelCall) -> str:
    # Vertex model ids use "@" before the date; responses carry Anthropic's "-" form.
    return call.model.replace("@", "-")


def _message(call: ModelCall, words: list[str], stop_reason: str, usage: _Usage) -> dict[str, Any]:
    return {
        "model": _model_name(call),
        "id": _message_id(),
        "type": "message",
        "role": "assistant",
        "content": [{"type": "text", "text": " ".join(words)}],
        "stop_reason": stop_reason,
        "stop_sequence": None,
        "usage": usage.to_json(),
    }


def _stream_frames(
    call: ModelCall, words: list[str], stop_reason: str, usage: _Usage, pieces: int
) -> list[bytes]:
    ev = streams.anthropic_event
    start = {
        "type": "message_start",
        "message": {
            "id": _message_id(),
            "type": "message",
            "role": "assistant",
            "model": _model_name(call),
            "content": [],
            "stop_reason": None,
            "stop_sequence": None,
            "usage": usage.to_json(output_tokens=1),
        },
    }
    texts = streams.split_words(words, pieces)
    deltas = [
        ev(
            "content_block_delta",
            {"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": t}},
        )
        for t in texts
    ]
    head = (
        ev("message_start", start)
        + ev("ping", {"type": "ping"})
        + ev(
            "content_block_start",
            {"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}},
        )
    )
    tail = (
        ev("content_block_stop", {"type": "content_block_stop", "index": 0})
        + ev(
            "message_delta",
            {
                "type": "message_delta",
                "delta": {"stop_reason": stop_reason, "stop_sequence": None},
                "usage": {"output_tokens": usage.output_tokens},
            },
        )
        + ev("message_stop", {"type": "message_stop"})
    )
    return [head + deltas[0], *deltas[1:], tail]


async def handle_anthropic_model(request: Request, call: ModelCall) -> Response:
    if call.action not in ("rawPredict", "streamRawPredict"):
        return error_response(
            request, google_errors.not_found(f"Method {call.action} is not supported on {call.resource}.")
        )
    try:
        body = await parse_json_body(request)
    except BadBody as exc:
        return error_response(request, exc.body)
    problem = await preflight(request, call)
    if problem is not None:
        return error_response(request, problem)
    message = _validate(body)
    if message is not None:
        return _invalid(message)
    words, stop_reason = _answer(body)
    usage = _usage(request, body, len(words))
    if call.action == "rawPredict":
        return JSONResponse(_message(call, words, stop_reason, usage))
    frames = _stream_frames(call, words, stop_reason, usage, streams.chunk_count(request))
    body_iter = streams.paced(frames, streams.chunk_delay(request), streams.fail_after(request))
    return StreamingResponse(body_iter, headers={"content-type": "text/event-stream; charset=utf-8"})
