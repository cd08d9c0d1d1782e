"""The HTTP relay: one caller request → one Google request, streamed both ways.

Raw ASGI on purpose: this is the hot path, and Starlette's Request/StreamingResponse
add allocations per request that the benchmark shows. Bodies are never held: a small
body that arrives in one ASGI message is sent inline (and can be replayed), anything
larger is streamed to Google as it is received; the response is relayed chunk by chunk
as it arrives, with the upstream socket paused when the caller reads slowly.
"""

from __future__ import annotations

import asyncio
import json
import logging
from typing import Any, AsyncIterator, Awaitable, Callable

from .callerkeys import KeyCheck
from .config import Config, Route
from .credentials import CredentialError, TokenSource
from .errors import SidecarError, error_headers
from .headers import client_response_headers, content_length, header_value, upstream_request_headers
from .observe import ChunkParser, Observer, RequestRecord
from .policy import needs_body_model, resolve_target
from .proxy_hosts import InterceptedHost, path_location_mismatch
from .routing import Service, Target, with_location
from .state import SidecarState
from .strict_json import DuplicateKey, loads_unique
from .upstream_client import UpstreamConnectError, UpstreamError, UpstreamPool, UpstreamResponse, UpstreamTimeout

log = logging.getLogger("vertex_sidecar.proxy")

Scope = dict[str, Any]
Receive = Callable[[], Awaitable[dict[str, Any]]]
Send = Callable[[dict[str, Any]], Awaitable[None]]


REPLAY_BUFFER_BYTES = 256 * 1024  # bodies up to this size are kept, so retries and fallbacks can replay them


class ClientDisconnected(Exception):
    """The caller went away while its request body was being read."""


class StreamAborted(Exception):
    """The upstream broke a response that had already started; the caller's connection is cut
    so it sees a truncated response rather than a clean end."""


class BodyTooLarge(Exception):
    def __init__(self, limit: int) -> None:
        super().__init__(limit)
        self.limit = limit


class Proxy:
    def __init__(self, state: SidecarState, pool: UpstreamPool, observer: Observer) -> None:
        self.state = state
        self.pool = pool
        self.observer = observer

    async def handle(self, scope: Scope, receive: Receive, send: Send, service: Service, subpath: str, *,
                     intercepted: InterceptedHost | None = None) -> None:
        """`intercepted`: through the forward proxy, the Google host the app dialled; the request
        must name the location its name stands for (intercepted_app.py)."""
        record = RequestRecord.for_request(scope["headers"], method=scope["method"], service=service)
        if intercepted is not None:
            record.extra["via_proxy"] = intercepted.name  # the log line says which mode the app used
        self.observer.request_started(record)
        try:
            await self._handle(scope, receive, send, service, subpath, record, intercepted)
        except SidecarError as exc:
            await self._send_error(send, record, exc)
        except ClientDisconnected:
            record.status = 499  # nginx's "client closed request": nothing is sent
            record.error_reason = "CLIENT_DISCONNECTED"
        finally:
            record.finish()
            self.observer.request_finished(record)

    async def _handle(self, scope: Scope, receive: Receive, send: Send, service: Service, subpath: str,
                      record: RequestRecord, intercepted: InterceptedHost | None = None) -> None:
        snapshot = self.state.snapshot  # the whole exchange runs under one config
        config = snapshot.config
        headers: list[tuple[bytes, bytes]] = scope["headers"]
        if snapshot.keys is not None:
            self._check_caller_key(snapshot.keys, headers, record)

        declared_length = content_length(headers)
        max_body = config.limits.max_body_bytes
        body_model: str | None = None
        body: bytes | None = None
        streamed: _CallerUpload | None = None
        # ("%": an escaped spelling of the path is judged by its canonical form, routing.py)
        if ("endpoints/openapi/" in subpath or "%" in subpath) and needs_body_model(
                resolve_target(subpath, service, config)):
            # The OpenAI-compatible endpoint names its model in the body: read it (bounded).
            body, streamed = await self._read_body_start(receive, max_body, record, keep_up_to=max_body)
            body_model = _openai_body_model(body, strict=not config.allow_all)
        decision = snapshot.decide(subpath, service, body_model)
        route, target = decision.route, decision.target
        if intercepted is not None:
            mismatch = path_location_mismatch(intercepted, target.location)
            if mismatch is not None:
                raise SidecarError(400, mismatch, reason="LOCATION_MISMATCH")
        if decision.body_model is not None and body is not None:
            body = _rewrite_openai_model(body, decision.body_model)
        record.route, record.project, record.location = route.name, target.project, target.location
        record.model, record.publisher, record.operation = target.model, target.publisher, target.method
        record.answered_location = target.location

        max_body = route.limits.max_body_bytes
        if max_body is not None and declared_length is not None and declared_length > max_body:
            raise SidecarError(413, f"the request body is {declared_length} bytes; this route "
                                    f"({route.name}) accepts at most {max_body} bytes", reason="BODY_TOO_LARGE")
        limiter = self.state.limiters.for_route(route.name, route.limits)
        governor = self.state.governor
        if governor is not None and governor.governs(route):
            await governor.admit(route, limiter)  # fleet-wide limits and budgets (governor.py)
        elif limiter.active:
            refusal = limiter.admit()
            if refusal is not None:
                raise SidecarError(429, refusal.message, reason="ROUTE_RATE_LIMITED",
                                   headers=[(b"retry-after", str(refusal.retry_after_s).encode())])
        if body is None:
            body, streamed = await self._read_body_start(receive, max_body, record)
        elif max_body is not None and record.bytes_in > max_body:
            raise SidecarError(413, f"the request body exceeds this route's limit of {max_body} bytes",
                               reason="BODY_TOO_LARGE")

        spec = snapshot.credentials.specs[route.credential]
        exchange = _Exchange(
            source=snapshot.credentials.get(route.credential),
            forward_caller=spec.type == "client",
            extra_drop=frozenset({snapshot.keys.header}) if snapshot.keys is not None else frozenset(),
            headers=headers, method=scope["method"], query=scope.get("query_string", b""),
            body=body, streamed=streamed, streamed_length=declared_length if streamed is not None else None,
        )
        # A streamed upload notices a caller that leaves itself; once it is whole, a watcher does.
        upload_finished = streamed.finished if streamed is not None else None
        response = await _unless_caller_leaves(receive, self._send_with_retries(exchange, route, target,
                                                                                config, record), upload_finished)
        parser = await self._relay_response(response, receive, send, record, upload_finished=upload_finished)
        if limiter.counts_tokens and parser is not None:
            limiter.record_tokens(_total_tokens(parser))

    async def _send_with_retries(self, exchange: "_Exchange", route: Route, target: Target, config: Config,
                                 record: RequestRecord) -> UpstreamResponse:
        """Send; on a refused token refresh and replay once; on 429/503 try the fallback locations.

        Retries happen only while nothing has reached the caller and the body was kept.
        """
        locations = [target.location] + [loc for loc in route.fallback_locations if loc != target.location]
        response: UpstreamResponse | None = None
        for attempt, location in enumerate(locations):
            if attempt:
                assert response is not None and location is not None
                await response.aclose()
                record.extra["fallbacks"] = attempt
                target = with_location(target, location, config.upstreams)
                record.answered_location = location
            response = await self._send_once(exchange, route, target)
            if response.status == 401 and exchange.source is not None and exchange.replayable:
                # Google refused our token (revoked, or clock skew): refresh once and replay.
                await response.aclose()
                assert exchange.token is not None
                exchange.source.invalidate(exchange.token)
                record.extra["token_retry"] = True
                response = await self._send_once(exchange, route, target)
            if response.status not in (429, 503) or not exchange.replayable or target.location is None:
                break
        assert response is not None
        return response

    async def _send_once(self, exchange: "_Exchange", route: Route, target: Target) -> UpstreamResponse:
        if exchange.source is not None:
            exchange.token = exchange.source.cached() or await self._token(exchange.source)
        upstream_headers = upstream_request_headers(
            exchange.headers, bearer_token=exchange.token, quota_project=route.quota_project,
            forward_caller_credentials=exchange.forward_caller, extra_drop=exchange.extra_drop,
        )
        query = exchange.query
        request_target = target.origin.prefix + target.path
        if query:
            request_target += "?" + query.decode("latin-1")
        return await self._send_upstream(target, route, exchange.method, request_target, upstream_headers,
                                         exchange.body, exchange.streamed_length, exchange.streamed)

    def _check_caller_key(self, keys: KeyCheck, headers: list[tuple[bytes, bytes]], record: RequestRecord) -> None:
        name = keys.identify_request(headers)
        if name is None:
            raise SidecarError(401, keys.refusal, reason="CALLER_KEY_REQUIRED")
        record.extra["caller"] = name

    async def _token(self, source: TokenSource) -> str:
        try:
            return await source.token()
        except CredentialError as exc:
            raise SidecarError(503, f"{exc} — check the pod's Workload Identity binding or the "
                                    "credential in the sidecar config; the request was not sent",
                               reason="CREDENTIALS_UNAVAILABLE") from None

    async def _read_body_start(self, receive: Receive, max_body: int | None, record: RequestRecord,
                               keep_up_to: int | None = REPLAY_BUFFER_BYTES
                               ) -> tuple[bytes, "_CallerUpload | None"]:
        """Bodies up to `keep_up_to` bytes come back whole (they can be replayed on a retry);
        larger ones as a stream that starts with what was read so far."""
        parts: list[bytes] = []
        more = True
        while more:
            message = await receive()
            if message["type"] == "http.disconnect":
                raise ClientDisconnected()
            chunk = message.get("body", b"")
            parts.append(chunk)
            record.bytes_in += len(chunk)
            more = message.get("more_body", False)
            if max_body is not None and record.bytes_in > max_body:
                raise SidecarError(413, f"the request body exceeds this route's limit of {max_body} bytes",
                                   reason="BODY_TOO_LARGE")
            if keep_up_to is not None and record.bytes_in > keep_up_to:
                break
        first = parts[0] if len(parts) == 1 else b"".join(parts)
        if not more:
            return first, None

        finished = asyncio.Event()

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
                if not message.get("more_body", False):
                    finished.set()
                    if chunk:
                        yield chunk
                    return
                if chunk:
                    yield chunk

        return b"", _CallerUpload(stream(), finished)

    async def _send_upstream(self, target: Target, route: Route, method: str, request_target: str,
                             headers: list[tuple[bytes, bytes]], body: bytes,
                             streamed_length: int | None, streamed: "_CallerUpload | None") -> UpstreamResponse:
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
                              record: RequestRecord, *, upload_finished: asyncio.Event | None
                              ) -> ChunkParser | None:
        record.upstream_status = record.status = response.status
        response_headers = client_response_headers(response.headers)
        content_type = header_value(response_headers, b"content-type")
        record.response_content_type = content_type.decode("latin-1") if content_type else None
        encoding = header_value(response_headers, b"content-encoding")
        record.response_content_encoding = encoding.decode("latin-1") if encoding else None
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
                if more_pending and watcher is None:
                    # A long response: watch for the caller leaving, so Google's stream is cancelled.
                    watcher = asyncio.ensure_future(_watch_disconnect(receive, response, upload_finished))
            if more_pending:
                await send({"type": "http.response.body", "body": b"", "more_body": False})
        except UpstreamError as exc:
            record.error_reason = "UPSTREAM_STREAM_BROKEN" if not response.client_gone else "CLIENT_DISCONNECTED"
            if response.client_gone:
                return parser
            log.warning("upstream stream broke after %d bytes (request %s): %s", record.bytes_out,
                        record.request_id, exc)
            raise StreamAborted(str(exc)) from None
        finally:
            if watcher is not None:
                watcher.cancel()
            await response.aclose()
        return parser

    async def _send_error(self, send: Send, record: RequestRecord, error: SidecarError) -> None:
        record.status = error.code
        record.error_reason = error.reason
        if record.response_started:
            return  # the response already started; nothing more can be said
        body = error.body()
        headers = error_headers(body, [(b"x-request-id", record.request_id.encode("latin-1"))] + error.headers)
        await send({"type": "http.response.start", "status": error.code, "headers": headers})
        await send({"type": "http.response.body", "body": body})


_TIMEOUT_KEYS = {"connection": "connect", "response headers": "first_byte", "complete response": "total"}


WATCH_CALLER_AFTER_S = 0.5  # quick answers never pay for a watcher task


async def _unless_caller_leaves(receive: Receive, work: Awaitable[UpstreamResponse],
                                upload_finished: asyncio.Event | None = None) -> UpstreamResponse:
    """Await `work` (waiting for Google's answer); if the caller hangs up meanwhile, cancel it,
    which closes the upstream connection so Google stops working (and billing) on it.

    The watcher starts only after WATCH_CALLER_AFTER_S, so the common fast exchange costs a
    timer, not a task. With a streamed upload it waits for `upload_finished`: until then the
    upload reads the caller's messages (and notices a disconnect) itself.
    """
    task = asyncio.current_task()
    assert task is not None
    gone = False
    watcher: asyncio.Task[None] | None = None

    async def watch() -> None:
        nonlocal gone
        if upload_finished is not None:
            await upload_finished.wait()
        while (await receive())["type"] != "http.disconnect":
            pass
        gone = True
        task.cancel()

    def start_watching() -> None:
        nonlocal watcher
        watcher = asyncio.ensure_future(watch())

    timer = asyncio.get_running_loop().call_later(WATCH_CALLER_AFTER_S, start_watching)
    try:
        return await work
    except asyncio.CancelledError:
        if gone:
            task.uncancel()
            raise ClientDisconnected() from None
        raise
    finally:
        timer.cancel()
        if watcher is not None:
            watcher.cancel()


async def _watch_disconnect(receive: Receive, response: UpstreamResponse,
                            upload_finished: asyncio.Event | None) -> None:
    if upload_finished is not None:
        await upload_finished.wait()  # until then the upload itself reads the caller's messages
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            response.abort_for_client()
            return


class _CallerUpload:
    """A caller's body streamed upstream as it arrives; `finished` is set once its last
    message was read."""

    def __init__(self, chunks: AsyncIterator[bytes], finished: asyncio.Event) -> None:
        self._chunks = chunks
        self.finished = finished

    def __aiter__(self) -> AsyncIterator[bytes]:
        return self._chunks


class _Exchange:
    """What is sent upstream, kept together so a retry can send it again."""

    def __init__(self, *, source: TokenSource | None, forward_caller: bool, extra_drop: frozenset[bytes],
                 headers: list[tuple[bytes, bytes]], method: str, query: bytes, body: bytes,
                 streamed: _CallerUpload | None, streamed_length: int | None) -> None:
        self.source = source
        self.forward_caller = forward_caller
        self.extra_drop = extra_drop
        self.headers = headers
        self.method = method
        self.query = query
        self.body = body
        self.streamed = streamed
        self.streamed_length = streamed_length
        self.token: str | None = None

    @property
    def replayable(self) -> bool:
        return self.streamed is None


def _openai_body_model(body: bytes, *, strict: bool) -> str | None:
    """The `model` of an OpenAI-compatible request body; with routes configured it is required."""
    try:
        data = loads_unique(body)
        model = data.get("model") if isinstance(data, dict) else None
    except DuplicateKey as exc:  # judged by one "model", served by another: refused (strict_json.py)
        raise SidecarError(400, f"the request body is ambiguous: {exc}; send each key once",
                           reason="INVALID_BODY") from None
    except ValueError:
        if strict:
            raise SidecarError(400, "the request body is not valid JSON; the sidecar must read its \"model\" "
                                    "to apply the route policy", reason="INVALID_BODY") from None
        return None
    if not isinstance(model, str) or not model:
        if strict:
            raise SidecarError(400, "the OpenAI-compatible request names no \"model\" (e.g. \"google/gemini-2.5-flash\")",
                               reason="INVALID_BODY")
        return None
    return model


def _rewrite_openai_model(body: bytes, model: str) -> bytes:
    data = json.loads(body)
    data["model"] = model
    return json.dumps(data, separators=(",", ":")).encode("utf-8")


def _total_tokens(parser: ChunkParser) -> int:
    result = getattr(parser, "result", None)
    if result is None:
        return 0
    usage = result()
    return int(getattr(usage, "total_tokens", 0) or (getattr(usage, "input_tokens", 0) + getattr(usage, "output_tokens", 0)))
