"""Vertex's OpenAI-compatible endpoint: `projects/P/locations/L/endpoints/openapi/chat/completions`.

`model` is "publisher/model" (e.g. "google/gemini-2.0-flash-001"). Deterministic answers
("Echo: " + last message text; a token is a word). Streams are `data: {chunk}\\n\\n` ...
`data: [DONE]\\n\\n`; usage is sent only with `stream_options.include_usage`, and — as
Gemini's compatibility layer does, unlike OpenAI's separate empty-choices chunk — it rides
on the final chunk together with `finish_reason`.
"""

from __future__ import annotations

import secrets
import time
from typing import Any

from starlette.requests import Request
from starlette.responses import Response, StreamingResponse

from . import google_errors, streams
from .google_json import json_response
from .model_call import BadBody, ModelCall, error_response, parse_json_body, preflight

__all__ = ["handle_chat_completions"]


def _text(content: Any) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return " ".join(
            p.get("text", "") for p in content if isinstance(p, dict) and isinstance(p.get("text"), str)
        )
    return ""


def _validate(body: dict[str, Any]) -> str | None:
    if not isinstance(body.get("model"), str) or not body["model"]:
        return "model is required."
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages or not all(isinstance(m, dict) for m in messages):
        return "messages must be a non-empty list."
    return None


async def handle_chat_completions(request: Request, version: str, project: str, location: str) -> Response:
    try:
        body = await parse_json_body(request)
    except BadBody as exc:
        return error_response(request, exc.body)
    problem = _validate(body)
    if problem is not None:
        return error_response(request, google_errors.error_body(400, problem))
    publisher, _, model = body["model"].rpartition("/")
    call = ModelCall(
        version, project, location, publisher or "google", model, "chatCompletions", request.url.path
    )
    failure = await preflight(request, call)
    if failure is not None:
        return error_response(request, failure)

    messages = body["messages"]
    prompt_tokens = sum(len(_text(m.get("content")).split()) for m in messages)
    words = ["Echo:", *_text(messages[-1].get("content")).split()]
    finish_reason = "stop"
    limit = body.get("max_completion_tokens", body.get("max_tokens"))
    if isinstance(limit, int) and 0 < limit < len(words):
        words, finish_reason = words[:limit], "length"
    usage = {
        "completion_tokens": len(words),
        "prompt_tokens": prompt_tokens,
        "total_tokens": prompt_tokens + len(words),
    }
    common = {
        "created": int(time.time()),
        "id": secrets.token_urlsafe(18),
        "model": body["model"],
        "system_fingerprint": "",
    }

    if not body.get("stream"):
        answer = {
            "finish_reason": finish_reason,
            "index": 0,
            "logprobs": None,
            "message": {"content": " ".join(words), "role": "assistant"},
        }
        return json_response(
            request, {"choices": [answer], **common, "object": "chat.completion", "usage": usage}
        )

    include_usage = bool((body.get("stream_options") or {}).get("include_usage"))
    texts = streams.split_words(words, streams.chunk_count(request))
    frames = []
    for i, text in enumerate(texts):
        choice: dict[str, Any] = {"delta": {"content": text, "role": "assistant"}, "index": 0}
        chunk: dict[str, Any] = {"choices": [choice], **common, "object": "chat.completion.chunk"}
        if i == len(texts) - 1:
            choice["finish_reason"] = finish_reason
            if include_usage:
                chunk["usage"] = usage
        frames.append(streams.openai_event(chunk))
    frames[-1] += streams.openai_event(None)
    body_iter = streams.paced(frames, streams.chunk_delay(request), streams.fail_after(request))
    return StreamingResponse(body_iter, headers={"content-type": "text/event-stream"})
