"""The HTTP relay: one caller request → one Google request, streamed both ways.

Raw ASGI on purpose: this is the hot path, and Starlette's Request/StreamingResponse
add allocations per request that the benchmark shows. Bodies are never held: a small
body that arrives in one ASGI message is sent inline (and can be replayed), anything
larger is streamed to Google as it is received; the response is relayed chunk by chunk
as it arrives, with the upstream socket paused when the caller reads slowly.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from typing import Any, AsyncIterator, Awaitable, Callable

from .config import Route
from .credentials import CredentialError, TokenSource
from .errors import SidecarError
from .headers import client_response_headers, content_length, header_value, upstream_request_headers
from .observe import Observer, RequestRecord
from .policy import decide
from .routing import Service, Target
from .state import SidecarState
from .upstream_client import UpstreamConnectError, UpstreamError, UpstreamPool, UpstreamResponse, UpstreamTimeout

log = logging.getLogger("vertex_sidecar.proxy")

Scope = dict[str, Any]
Receive = Callable[[], Awaitable[dict[str, Any]]]
Send = Callable[[dict[str, Any]], Awaitable[None]]


class ClientDisconnected(Exception):
    """The caller went away while its request body was being read."""


class StreamAborted(Exception):
    """The upstream broke a response that had already started; the caller's connection is cut
    so it sees a truncated response rather than a clean end."""


class BodyTooLarge(Exception):
    def __init__(self, limit: int) -> None:
        super().__init__(limit)
        self.limit = limit


def new_request_id() -> str:
    return os.urandom(8).hex()


class Proxy:
    def __init__(self, state: SidecarState, pool: UpstreamPool, observer: Observer) -> None:
        self.state = state
        self.pool = pool
        self.observer = observer

    async def handle(self, scope: Scope, receive: Receive, send: Send, service: Service, subpath: str) -> None:
        headers: list[tuple[bytes, bytes]] = scope["headers"]
        request_id = header_value(headers, b"x-request-id")
        record = RequestRecord(
            request_id=request_id.decode("latin-1")[:128] if request_id else new_request_id(),
            method=scope["method"],
            started=time.perf_counter(),
            wall_time=time.time(),
            service=service,
        )
        tags = header_value(headers, b"tags")
        if tags:
            record.tags = tags.decode("utf-8", "replace")[:512]
        self.observer.request_started(record)
        try:
            await self._handle(scope, receive, send, service, subpath, record)
        except SidecarError as exc:
            await self._send_error(send, record, exc)
        except ClientDisconnected:
            record.status = 499  # nginx's "client closed request": nothing is sent
            record.error_reason = "CLIENT_DISCONNECTED"
        finally:
            record.finish()
            self.observer.request_finished(record)

    async def _handle(self, scope: Scope, receive: Receive, send: Send, service: Service, subpath: str,
                      record: RequestRecord) -> None:
        snapshot = self.state.snapshot  # the whole exchange runs under one config
        config = snapshot.config
        decision = decide(subpath, service, config)
        route, target = decision.route, decision.target
        record.route, record.project, record.location = route.name, target.project, target.location
        record.model, record.publisher, record.operation = target.model, target.publisher, target.method
        record.answered_location = target.location

        declared_length = content_length(scope["headers"])
        max_body = route.limits.max_body_bytes
        if max_body is not None and declared_length is not None and declared_length > max_body:
            raise SidecarError(413, f"the request body is {declared_length} bytes; this route "
                                    f"({route.name}) accepts at most {max_body} bytes", reason="BODY_TOO_LARGE")

        source = snapshot.credentials.get(route.credential)
        forward_caller = snapshot.credentials.specs[route.credential].type == "client"
        body, streamed = await self._read_body_start(receive, max_body, record)
        upstream_target = _request_target(target, scope)
        token = await self._token(source) if source is not None else None
        upstream_headers = upstream_request_headers(
            scope["headers"], bearer_token=token, quota_project=route.quota_project,
            forward_caller_credentials=forward_caller,
        )
        response = await self._send_upstream(target, route, scope["method"], upstream_target, upstream_headers,
                                             body, declared_length if streamed is not None else None, streamed)
        if response.status == 401 and source is not None and token is not None and streamed is None:
            # Google refused our token (revoked, or clock skew): refresh once and replay.
            await response.aclose()
            source.invalidate(token)
            token = await self._token(source)
            upstream_headers = upstream_request_headers(
                scope["headers"], bearer_token=token, quota_project=route.quota_project,
                forward_caller_credentials=forward_caller,
            )
            response = await self._send_upstream(target, route, scope["method"], upstream_target,
                                                 upstream_headers, body, None, None)
        await self._relay_response(response, receive, send, record, request_body_done=streamed is None)

    async def _token(self, source: TokenSource) -> str:
        try:
            return await source.token()
        except CredentialError as exc:
            raise SidecarError(503, f"{exc} — check the pod's Workload Identity binding or the "
                                    "credential in the sidecar config; the request was not sent",
                               reason="CREDENTIALS_UNAVAILABLE") from None

    async def _read_body_start(self, receive: Receive, max_body: int | None,
                               record: RequestRecord) -> tuple[bytes, AsyncIterator[bytes] | None]:
        """Small bodies (one ASGI message) come back as bytes; larger ones as a stream."""
        message = await receive()
        if message["type"] == "http.disconnect":
            raise ClientDisconnected()
        first = message.get("body", b"")
        record.bytes_in = len(first)
        if max_body is not None and len(first) > max_body:
            raise SidecarError(413, f"the request body exceeds this route's limit of {max_body} bytes",
                               reason="BODY_TOO_LARGE")
        if not message.get("more_body", False):
            return first, None

        async def stream() -> AsyncIterator[bytes]:
            yield first
            while True:
                message = await receive()
                if message["type"] == "http.disconnect":
                    raise ClientDisconnected()
                chunk = message.get("body", b"")
                record.bytes_in += len(chunk)
                if max_body is not None and record.bytes_in > max_body:
                    raise BodyTooLarge(max_body)
                if chunk:
                    yield chunk
                if not message.get("more_body", False):
                    return

        return b"", stream()

    async def _send_upstream(self, target: Target, route: Route, method: str, request_target: str,
                             headers: list[tuple[bytes, bytes]], body: bytes,
                             streamed_length: int | None, streamed: AsyncIterator[bytes] | None) -> UpstreamResponse:
        timeouts = route.timeouts
        try:
            return await self.pool.request(
                target.origin, method, request_target, headers, streamed if streamed is not None else body,
                content_length=streamed_length, connect_timeout=timeouts.connect_s,
                first_byte_timeout=timeouts.first_byte_s, total_timeout=timeouts.total_s,
            )
        except UpstreamTimeout as exc:
            raise SidecarError(504, f"{exc} ({target.origin.host}); the sidecar gave up. Raise "
                                    f"timeouts.{_TIMEOUT_KEYS[exc.phase]} in the route if this call is "
                                    "legitimately slow", reason="UPSTREAM_TIMEOUT") from None
        except UpstreamConnectError as exc:
            raise SidecarError(503, f"the upstream is unreachable: {exc}. Check the pod's egress to Google "
                                    "(or the upstream override in the sidecar config)",
                               reason="UPSTREAM_UNREACHABLE") from None
        except UpstreamError as exc:
            cause = exc.__cause__
            if isinstance(cause, BodyTooLarge):
                raise SidecarError(413, f"the request body exceeds this route's limit of {cause.limit} bytes",
                                   reason="BODY_TOO_LARGE") from None
            if isinstance(cause, ClientDisconnected):
                raise cause from None
            raise SidecarError(502, f"the upstream failed before answering: {exc}",
                               reason="UPSTREAM_FAILED") from None

    async def _relay_response(self, response: UpstreamResponse, receive: Receive, send: Send,
                              record: RequestRecord, *, request_body_done: bool) -> None:
        record.upstream_status = record.status = response.status
        response_headers = client_response_headers(response.headers)
        content_type = header_value(response_headers, b"content-type")
        record.response_content_type = content_type.decode("latin-1") if content_type else None
        response_headers.append((b"x-request-id", record.request_id.encode("latin-1")))
        parser = self.observer.response_started(record)
        watcher: asyncio.Task[None] | None = None
        more_pending = True
        record.response_started = True
        try:
            await send({"type": "http.response.start", "status": response.status, "headers": response_headers})
            async for chunk in response.iter_body():
                record.mark_first_byte()
                record.bytes_out += len(chunk)
                if parser is not None:
                    parser.feed(chunk)
                more_pending = not response.complete or response.buffered
                await send({"type": "http.response.body", "body": chunk, "more_body": more_pending})
                if more_pending and watcher is None and request_body_done:
                    # A long response: watch for the caller leaving, so Google's stream is cancelled.
                    watcher = asyncio.ensure_future(_watch_disconnect(receive, response))
            if more_pending:
                await send({"type": "http.response.body", "body": b"", "more_body": False})
        except UpstreamError as exc:
            record.error_reason = "UPSTREAM_STREAM_BROKEN" if not response.client_gone else "CLIENT_DISCONNECTED"
            if response.client_gone:
                return
            log.warning("upstream stream broke after %d bytes (request %s): %s", record.bytes_out,
                        record.request_id, exc)
            raise StreamAborted(str(exc)) from None
        finally:
            if watcher is not None:
                watcher.cancel()
            await response.aclose()

    async def _send_error(self, send: Send, record: RequestRecord, error: SidecarError) -> None:
        record.status = error.code
        record.error_reason = error.reason
        if record.response_started:
            return  # the response already started; nothing more can be said
        body = error.body()
        headers = [(b"content-type", b"application/json; charset=UTF-8"),
                   (b"x-request-id", record.request_id.encode("latin-1"))] + error.headers
        await send({"type": "http.response.start", "status": error.code, "headers": headers})
        await send({"type": "http.response.body", "body": body})


_TIMEOUT_KEYS = {"connection": "connect", "response headers": "first_byte", "complete response": "total"}


async def _watch_disconnect(receive: Receive, response: UpstreamResponse) -> None:
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            response.abort_for_client()
            return


def _request_target(target: Target, scope: Scope) -> str:
    """Upstream request-target: the origin's prefix, the resolved path, the query string verbatim."""
    query: bytes = scope.get("query_string", b"")
    path = target.origin.prefix + target.path
    return f"{path}?{query.decode('latin-1')}" if query else path
