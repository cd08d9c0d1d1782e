"""Emulator-only test endpoints under `/_emulator/` (never on real API paths).

- `/_emulator/echo` (any method): what arrived — method, path, raw query, headers
  (lower-cased; `headers` joins repeats with ", ", `header_list` keeps order and
  repeats), upstream host, authenticated subject, and the body's SHA-256 and length
  (hashed while streaming, never held in memory).
- `/_emulator/download?bytes=N[&chunk_delay_s=S]`: N deterministic bytes in 64 KiB chunks
  with a content-length.
- `/_emulator/upload`: consumes the body as a stream; answers its SHA-256 and length.
- `/_emulator/slow?first_byte_delay_s=S[&chunks=N&chunk_delay_s=D]`: waits before the
  response starts, then optionally streams N small chunks D seconds apart.
"""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import AsyncIterator

from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import BaseRoute, Route

from .upstream import UPSTREAM_HOST_KEY, scope_headers
from .vertex_auth import AUTH_SUBJECT_KEY

__all__ = ["DOWNLOAD_BLOCK", "emulator_routes", "expected_download_sha256"]

_CHUNK = 64 * 1024
# One 64 KiB block of 0..255 repeated; downloads are this block repeated and cut to size.
DOWNLOAD_BLOCK = bytes(range(256)) * (_CHUNK // 256)
_ALL_METHODS = ["GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"]


def expected_download_sha256(size: int) -> str:
    digest = hashlib.sha256()
    full, rest = divmod(size, _CHUNK)
    for _ in range(full):
        digest.update(DOWNLOAD_BLOCK)
    digest.update(DOWNLOAD_BLOCK[:rest])
    return digest.hexdigest()


async def _hash_body(request: Request) -> tuple[str, int]:
    digest, length = hashlib.sha256(), 0
    async for chunk in request.stream():
        digest.update(chunk)
        length += len(chunk)
    return digest.hexdigest(), length


def _float_param(request: Request, name: str) -> float:
    try:
        return max(0.0, float(request.query_params.get(name, "0")))
    except ValueError:
        return 0.0


async def _echo(request: Request) -> Response:
    sha256, length = await _hash_body(request)
    header_list = [(k.decode("latin-1").lower(), v.decode("latin-1")) for k, v in request.scope["headers"]]
    return JSONResponse(
        {
            "method": request.method,
            "path": request.url.path,
            "query_string": request.scope.get("query_string", b"").decode("latin-1"),
            "headers": scope_headers(request.scope),
            "header_list": header_list,
            "upstream_host": request.scope.get(UPSTREAM_HOST_KEY),
            "auth_subject": request.scope.get(AUTH_SUBJECT_KEY),
            "http_version": request.scope.get("http_version"),
            "body_sha256": sha256,
            "body_length": length,
        }
    )


async def _download(request: Request) -> Response:
    try:
        size = max(0, int(request.query_params.get("bytes", "0")))
    except ValueError:
        return JSONResponse({"error": "bytes must be an integer"}, status_code=400)
    delay = _float_param(request, "chunk_delay_s")

    state = request.app.state

    async def body() -> AsyncIterator[bytes]:
        remaining = size
        state.downloads_open = getattr(state, "downloads_open", 0) + 1
        try:
            while remaining > 0:
                piece = DOWNLOAD_BLOCK if remaining >= _CHUNK else DOWNLOAD_BLOCK[:remaining]
                remaining -= len(piece)
                yield piece
                if delay and remaining:
                    await asyncio.sleep(delay)
        finally:
            # Tests read this to prove a proxy hung up on us when its caller left.
            state.downloads_open -= 1
            if remaining:
                state.downloads_abandoned = getattr(state, "downloads_abandoned", 0) + 1

    headers = {"content-length": str(size)}
    return StreamingResponse(body(), headers=headers, media_type="application/octet-stream")


async def _upload(request: Request) -> Response:
    sha256, length = await _hash_body(request)
    return JSONResponse({"sha256": sha256, "length": length})


async def _slow(request: Request) -> Response:
    first = _float_param(request, "first_byte_delay_s")
    chunk_delay = _float_param(request, "chunk_delay_s")
    try:
        chunks = max(0, int(request.query_params.get("chunks", "0")))
    except ValueError:
        chunks = 0
    await asyncio.sleep(first)
    if not chunks:
        return JSONResponse({"first_byte_delay_s": first})

    async def body() -> AsyncIterator[bytes]:
        for i in range(chunks):
            if i and chunk_delay:
                await asyncio.sleep(chunk_delay)
            yield f"chunk {i}\n".encode()

    return StreamingResponse(body(), media_type="text/plain")


def emulator_routes() -> list[BaseRoute]:
    return [
        Route("/_emulator/echo", _echo, methods=_ALL_METHODS),
        Route("/_emulator/echo/{rest:path}", _echo, methods=_ALL_METHODS),
        Route("/_emulator/download", _download, methods=["GET"]),
        Route("/_emulator/download/{rest:path}", _download, methods=["GET"]),
        Route("/_emulator/upload", _upload, methods=["POST", "PUT"]),
        Route("/_emulator/slow", _slow, methods=["GET", "POST"]),
    ]
