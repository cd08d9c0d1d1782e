"""Deterministic `:predict` (text embeddings, Imagen) and `:embedContent` answers.

Embeddings: values are a unit vector derived from the text's SHA-256 (same text → same
vector); `statistics.token_count` = words in the text; dimension = `outputDimensionality`
or the model's default (768, gemini-embedding-* 3072); `metadata.billableCharacterCount` =
non-whitespace characters. Imagen: `sampleCount` (default 4) small valid PNGs coloured by
the prompt.
"""

from __future__ import annotations

import base64
import hashlib
import math
import random
import struct
import zlib
from typing import Any

__all__ = [
    "batch_embed_contents_response",
    "embed_content_response",
    "embedding_values",
    "imagen_response",
    "text_embedding_response",
]


def _dimension(model: str, requested: Any) -> int:
    if isinstance(requested, int) and requested > 0:
        return requested
    return 3072 if model.startswith("gemini-embedding") else 768


def embedding_values(text: str, dimension: int) -> list[float]:
    rng = random.Random(hashlib.sha256(text.encode()).digest())
    raw = [rng.uniform(-1.0, 1.0) for _ in range(dimension)]
    norm = math.sqrt(sum(v * v for v in raw)) or 1.0
    return [round(v / norm, 7) for v in raw]


def _billable(text: str) -> int:
    return len("".join(text.split()))


def text_embedding_response(model: str, body: dict[str, Any]) -> dict[str, Any] | str:
    """Response for `text-embedding-*:predict`, or an INVALID_ARGUMENT message."""
    instances = body.get("instances")
    if not isinstance(instances, list) or not instances:
        return "Invalid request: instances must not be empty."
    parameters = body.get("parameters") or {}
    dimension = _dimension(model, parameters.get("outputDimensionality"))
    predictions, billable = [], 0
    for instance in instances:
        text = instance.get("content") if isinstance(instance, dict) else None
        if not isinstance(text, str):
            return "Invalid request: each instance needs a string `content`."
        billable += _billable(text)
        predictions.append(
            {
                "embeddings": {
                    "statistics": {"truncated": False, "token_count": len(text.split())},
                    "values": embedding_values(text, dimension),
                }
            }
        )
    return {"predictions": predictions, "metadata": {"billableCharacterCount": billable}}


def _content_text(content: Any) -> str:
    parts = content.get("parts") if isinstance(content, dict) else None
    return " ".join(p["text"] for p in parts or [] if isinstance(p, dict) and isinstance(p.get("text"), str))


def _embed_one(model: str, request: dict[str, Any]) -> tuple[list[float], int]:
    config = request.get("embedContentConfig") or {}
    text = _content_text(request.get("content"))
    return embedding_values(text, _dimension(model, config.get("outputDimensionality"))), len(text.split())


def _usage(tokens: int) -> dict[str, Any]:
    return {
        "promptTokenCount": tokens,
        "totalTokenCount": tokens,
        "promptTokensDetails": [{"modality": "TEXT", "tokenCount": tokens}],
    }


def embed_content_response(model: str, body: dict[str, Any]) -> dict[str, Any] | str:
    """Response for `gemini-embedding-*:embedContent` (one content)."""
    if not isinstance(body.get("content"), dict):
        return "Invalid request: content is required."
    values, tokens = _embed_one(model, body)
    return {"embedding": {"values": values}, "usageMetadata": _usage(tokens), "truncated": False}


def batch_embed_contents_response(model: str, body: dict[str, Any]) -> dict[str, Any] | str:
    requests = body.get("requests")
    if not isinstance(requests, list) or not requests:
        return "Invalid request: requests must not be empty."
    embeddings, total = [], 0
    for request in requests:
        values, tokens = _embed_one(model, request if isinstance(request, dict) else {})
        embeddings.append({"values": values})
        total += tokens
    return {"embeddings": embeddings, "usageMetadata": _usage(total)}


def _png(rgb: tuple[int, int, int], size: int = 8) -> bytes:
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    row = b"\x00" + bytes(rgb) * size
    header = struct.pack(">IIBBBBB", size, size, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(row * size))
        + chunk(b"IEND", b"")
    )


def imagen_response(body: dict[str, Any]) -> dict[str, Any] | str:
    instances = body.get("instances")
    if not isinstance(instances, list) or not instances or not isinstance(instances[0], dict):
        return "Invalid request: instances must not be empty."
    prompt = instances[0].get("prompt")
    if not isinstance(prompt, str) or not prompt:
        return "Invalid request: prompt is required."
    count = (body.get("parameters") or {}).get("sampleCount", 4)
    count = count if isinstance(count, int) and 0 < count <= 8 else 4
    predictions = []
    for i in range(count):
        digest = hashlib.sha256(f"{prompt}#{i}".encode()).digest()
        image = _png((digest[0], digest[1], digest[2]))
        predictions.append({"bytesBase64Encoded": base64.b64encode(image).decode(), "mimeType": "image/png"})
    return {"predictions": predictions}
