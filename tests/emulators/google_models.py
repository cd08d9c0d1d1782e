"""Handlers for `publishers/google/models/{model}:{action}`.

generateContent, streamGenerateContent (SSE with `?alt=sse`, JSON array without),
countTokens, predict (text embeddings, Imagen), embedContent, batchEmbedContents.
Errors on a JSON-array stream come as a one-element array `[{"error": ...}]`, as Vertex
sends them; on SSE they are a plain JSON body with the error status.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

from starlette.requests import Request
from starlette.responses import Response, StreamingResponse

from . import gemini, google_errors, predict, streams
from .google_json import GOOGLE_JSON, json_response, wants_pretty
from .model_call import BadBody, ModelCall, error_response, parse_json_body, preflight

__all__ = ["handle_google_model"]

_EMBEDDING_PREFIXES = (
    "text-embedding",
    "text-multilingual-embedding",
    "multimodalembedding",
    "gemini-embedding",
)
_GEMINI_VIA_PREDICT = (
    "Gemini cannot be accessed through Vertex Predict/RawPredict API. Please follow "
    "https://cloud.google.com/vertex-ai/docs/generative-ai/start/quickstarts/quickstart-multimodal "
    "for Gemini usage."
)


def _is_json_array_stream(request: Request, call: ModelCall) -> bool:
    return call.action == "streamGenerateContent" and request.query_params.get("alt") != "sse"


def _render_error(request: Request, call: ModelCall, body: dict[str, Any]) -> Response:
    if _is_json_array_stream(request, call):
        raw = b"".join(streams.json_array_frames([body], pretty=wants_pretty(request)))
        return Response(raw, status_code=body["error"]["code"], media_type=GOOGLE_JSON)
    return error_response(request, body)


def _invalid_generate(problem: tuple[str, str | None]) -> dict[str, Any]:
    kind, detail = problem
    if kind == "unknown_field":
        return google_errors.unknown_field(str(detail))
    return google_errors.error_body(400, str(detail))


async def _generate(request: Request, call: ModelCall, body: dict[str, Any]) -> Response:
    problem = gemini.validate_generate_request(body)
    if problem is not None:
        return _render_error(request, call, _invalid_generate(problem))
    answer = gemini.plan_answer(call.model, body)
    if call.action == "generateContent":
        return json_response(request, gemini.full_response(answer))
    chunks = gemini.stream_responses(answer, streams.chunk_count(request))
    if request.query_params.get("alt") == "sse":
        frames = [streams.sse_frame(c) for c in chunks]
        headers = {"content-type": "text/event-stream", "content-disposition": "attachment"}
    else:
        frames = streams.json_array_frames(chunks, pretty=wants_pretty(request))
        headers = {"content-type": GOOGLE_JSON}
    body_iter = streams.paced(frames, streams.chunk_delay(request), streams.fail_after(request))
    return StreamingResponse(body_iter, headers=headers)


async def _count_tokens(request: Request, call: ModelCall, body: dict[str, Any]) -> Response:
    if not body.get("contents") and not body.get("instances"):
        return error_response(
            request,
            google_errors.error_body(
                400, "Unable to submit request because at least one contents field is required."
            ),
        )
    return json_response(request, gemini.count_tokens_response(body))


def _answer_or_400(request: Request, result: dict[str, Any] | str) -> Response:
    if isinstance(result, str):
        return error_response(request, google_errors.error_body(400, result))
    return json_response(request, result)


async def _predict(request: Request, call: ModelCall, body: dict[str, Any]) -> Response:
    if call.model.startswith("imagen-"):
        return _answer_or_400(request, predict.imagen_response(body))
    if call.model.startswith(_EMBEDDING_PREFIXES):
        return _answer_or_400(request, predict.text_embedding_response(call.model, body))
    return error_response(request, google_errors.error_body(400, _GEMINI_VIA_PREDICT))


async def _embed_content(request: Request, call: ModelCall, body: dict[str, Any]) -> Response:
    return _answer_or_400(request, predict.embed_content_response(call.model, body))


async def _batch_embed(request: Request, call: ModelCall, body: dict[str, Any]) -> Response:
    return _answer_or_400(request, predict.batch_embed_contents_response(call.model, body))


_Handler = Callable[[Request, ModelCall, dict[str, Any]], Awaitable[Response]]
_ACTIONS: dict[str, _Handler] = {
    "generateContent": _generate,
    "streamGenerateContent": _generate,
    "countTokens": _count_tokens,
    "predict": _predict,
    "embedContent": _embed_content,
    "batchEmbedContents": _batch_embed,
}


async def handle_google_model(request: Request, call: ModelCall) -> Response:
    handler = _ACTIONS.get(call.action)
    if handler is None:
        return error_response(
            request, google_errors.not_found(f"Method {call.action} is not supported on {call.resource}.")
        )
    try:
        body = await parse_json_body(request)
    except BadBody as exc:
        return _render_error(request, call, exc.body)
    problem = await preflight(request, call)
    if problem is not None:
        return _render_error(request, call, problem)
    return await handler(request, call, body)
