"""Deterministic Gemini answers in the real `GenerateContentResponse` shape (pure functions).

The rules, so tests can assert exact numbers:
- a token is a whitespace-separated word;
- promptTokenCount = words in `systemInstruction` and all `contents` text parts
  (+ CACHED_CONTENT_TOKENS when the request names a `cachedContent`, reported again as
  cachedContentTokenCount);
- the answer is "Echo: " + the text of the last content, so candidatesTokenCount is
  1 + its words; `generationConfig.maxOutputTokens` cuts it (finishReason MAX_TOKENS);
- thinking models (gemini-2.5*, gemini-3*) report thoughtsTokenCount = twice the candidates
  unless `thinkingConfig.thinkingBudget` is 0; totalTokenCount = prompt + candidates +
  thoughts, as on Vertex (candidates never include thoughts);
- streams split the answer into N nearly equal chunks whose texts concatenate to it; the
  first chunk has `usageMetadata: {"trafficType": "ON_DEMAND"}` only, middle chunks none,
  the last carries finishReason and the full usage (as Vertex does).
"""

from __future__ import annotations

import base64
import datetime as dt
import secrets
from dataclasses import dataclass
from typing import Any

from .streams import split_words

__all__ = [
    "CACHED_CONTENT_TOKENS",
    "GeminiAnswer",
    "GeminiUsage",
    "count_tokens_response",
    "full_response",
    "plan_answer",
    "stream_responses",
    "validate_generate_request",
]

CACHED_CONTENT_TOKENS = 32
_THINKING_PREFIXES = ("gemini-2.5", "gemini-3")
_LEARN_MORE = "Learn more: https://cloud.google.com/vertex-ai/generative-ai/docs/model-reference/gemini"
_TOP_LEVEL_FIELDS = {
    "model",
    "contents",
    "systemInstruction",
    "cachedContent",
    "tools",
    "toolConfig",
    "labels",
    "safetySettings",
    "generationConfig",
    "modelArmorConfig",
    "continuationToken",
    "outputConfig",
    "serviceTier",
}
# Proto JSON parsing accepts both lowerCamelCase and the proto's snake_case names.
_ACCEPTED_FIELDS = _TOP_LEVEL_FIELDS | {
    "".join("_" + c.lower() if c.isupper() else c for c in name) for name in _TOP_LEVEL_FIELDS
}
_VALID_ROLES = {"", "user", "model", "function"}


def _get(body: dict[str, Any], camel: str) -> Any:
    snake = "".join("_" + c.lower() if c.isupper() else c for c in camel)
    return body.get(camel, body.get(snake))


def _texts(content: Any) -> list[str]:
    if not isinstance(content, dict):
        return []
    parts = content.get("parts") or []
    return [p["text"] for p in parts if isinstance(p, dict) and isinstance(p.get("text"), str)]


def _words(texts: list[str]) -> int:
    return sum(len(t.split()) for t in texts)


@dataclass(frozen=True)
class GeminiUsage:
    prompt: int
    candidates: int
    thoughts: int = 0
    cached: int = 0

    @property
    def total(self) -> int:
        return self.prompt + self.candidates + self.thoughts

    def to_json(self) -> dict[str, Any]:
        usage: dict[str, Any] = {
            "promptTokenCount": self.prompt,
            "candidatesTokenCount": self.candidates,
            "totalTokenCount": self.total,
            "trafficType": "ON_DEMAND",
            "promptTokensDetails": [{"modality": "TEXT", "tokenCount": self.prompt}],
            "candidatesTokensDetails": [{"modality": "TEXT", "tokenCount": self.candidates}],
        }
        if self.cached:
            usage["cachedContentTokenCount"] = self.cached
            usage["cacheTokensDetails"] = [{"modality": "TEXT", "tokenCount": self.cached}]
        if self.thoughts:
            usage["thoughtsTokenCount"] = self.thoughts
        return usage


@dataclass(frozen=True)
class GeminiAnswer:
    model: str
    words: tuple[str, ...]
    finish_reason: str
    usage: GeminiUsage
    response_id: str
    create_time: str

    @property
    def text(self) -> str:
        return " ".join(self.words)


def validate_generate_request(body: dict[str, Any]) -> tuple[str, str | None] | None:
    """(error kind, detail) for an invalid request: ("unknown_field", name) or
    ("invalid", message); None when valid."""
    for name in body:
        if name not in _ACCEPTED_FIELDS:
            return "unknown_field", name
    contents = body.get("contents")
    if not isinstance(contents, list) or not contents:
        return (
            "invalid",
            f"Unable to submit request because at least one contents field is required. {_LEARN_MORE}",
        )
    for content in contents:
        if not isinstance(content, dict) or not content.get("parts"):
            return (
                "invalid",
                "Unable to submit request because it must include at least one parts field, "
                f"which describes the prompt input. {_LEARN_MORE}",
            )
        if str(content.get("role", "")) not in _VALID_ROLES:
            return "invalid", "Please use a valid role: user, model."
    return None


def _prompt_tokens(body: dict[str, Any]) -> int:
    texts = _texts(_get(body, "systemInstruction"))
    for content in body.get("contents") or []:
        texts += _texts(content)
    return _words(texts)


def _is_thinking(model: str, body: dict[str, Any]) -> bool:
    if not model.startswith(_THINKING_PREFIXES):
        return False
    config = _get(body, "generationConfig") or {}
    thinking = _get(config, "thinkingConfig") or {}
    return bool(_get(thinking, "thinkingBudget") != 0)


def _new_response_id() -> str:
    return base64.urlsafe_b64encode(secrets.token_bytes(17)).decode().rstrip("=")


def _now_rfc3339() -> str:
    return dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def plan_answer(model: str, body: dict[str, Any]) -> GeminiAnswer:
    contents = body.get("contents") or [{}]
    words = ["Echo:", *" ".join(_texts(contents[-1])).split()]
    finish_reason = "STOP"
    max_tokens = _get(_get(body, "generationConfig") or {}, "maxOutputTokens")
    if isinstance(max_tokens, int) and 0 < max_tokens < len(words):
        words, finish_reason = words[:max_tokens], "MAX_TOKENS"
    cached = CACHED_CONTENT_TOKENS if _get(body, "cachedContent") else 0
    candidates = len(words)
    usage = GeminiUsage(
        prompt=_prompt_tokens(body) + cached,
        candidates=candidates,
        thoughts=2 * candidates if _is_thinking(model, body) else 0,
        cached=cached,
    )
    return GeminiAnswer(model, tuple(words), finish_reason, usage, _new_response_id(), _now_rfc3339())


def _envelope(
    answer: GeminiAnswer, candidate: dict[str, Any], usage: dict[str, Any] | None
) -> dict[str, Any]:
    response: dict[str, Any] = {"candidates": [candidate]}
    if usage is not None:
        response["usageMetadata"] = usage
    response["modelVersion"] = answer.model
    response["createTime"] = answer.create_time
    response["responseId"] = answer.response_id
    return response


def full_response(answer: GeminiAnswer) -> dict[str, Any]:
    candidate = {
        "content": {"role": "model", "parts": [{"text": answer.text}]},
        "finishReason": answer.finish_reason,
        # Deterministic stand-in for a mean log-probability.
        "avgLogprobs": round(-1.0 / (answer.usage.candidates + 1), 6),
    }
    return _envelope(answer, candidate, answer.usage.to_json())


def stream_responses(answer: GeminiAnswer, chunks: int) -> list[dict[str, Any]]:
    texts = split_words(answer.words, chunks)
    out = []
    for i, text in enumerate(texts):
        candidate: dict[str, Any] = {"content": {"role": "model", "parts": [{"text": text}]}}
        last = i == len(texts) - 1
        usage: dict[str, Any] | None = None
        if last:
            candidate["finishReason"] = answer.finish_reason
            usage = answer.usage.to_json()
        elif i == 0:
            usage = {"trafficType": "ON_DEMAND"}
        out.append(_envelope(answer, candidate, usage))
    return out


def count_tokens_response(body: dict[str, Any]) -> dict[str, Any]:
    tokens = _prompt_tokens(body)
    texts = _texts(_get(body, "systemInstruction"))
    for content in body.get("contents") or []:
        texts += _texts(content)
    billable = sum(len("".join(t.split())) for t in texts)
    return {
        "totalTokens": tokens,
        "totalBillableCharacters": billable,
        "promptTokensDetails": [{"modality": "TEXT", "tokenCount": tokens}],
    }
