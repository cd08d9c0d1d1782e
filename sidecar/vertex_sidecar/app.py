"""Assembly: the sidecar's ASGI apps and the services they share.

`Sidecar` owns the state (config snapshot, credentials), the upstream pool and the
observers; `main_app` serves callers on localhost, `admin_app` (Starlette) serves
/healthz, /readyz and /metrics on the admin port.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any, Awaitable, Callable

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response
from starlette.routing import Route as StarletteRoute

from .config import Config
from .credentials import RefreshObserver
from .errors import error_body, error_headers
from .live import LiveRelay
from .observe import AccessLog, Observers
from .proxy import Proxy, Receive, Scope, Send
from .routing import Service
from .state import SidecarState, Snapshot
from .upstream_client import UpstreamPool

log = logging.getLogger("vertex_sidecar")

# Path prefixes callers use; the discovery ones first (they are longer).
_PREFIXES: tuple[tuple[str, Service], ...] = (
    ("/vertex_ai/discovery/", "discovery"),
    ("/vertex-ai/discovery/", "discovery"),
    ("/vertex_ai/", "aiplatform"),
    ("/vertex-ai/", "aiplatform"),
)

WebSocketHandler = Callable[[Scope, Receive, Send, str], Awaitable[None]]


class Sidecar:
    def __init__(self, config: Config, *, observers: Observers | None = None,
                 refresh_observer: RefreshObserver | None = None) -> None:
        self.refresh_observer = refresh_observer
        self.reload_observer: Callable[[str], None] | None = None  # ("success" | "failure"), for metrics
        self.state = SidecarState(Snapshot.build(config, refresh_observer))
        self.pool = UpstreamPool()
        self.observers = observers or Observers(AccessLog())
        self.proxy = Proxy(self.state, self.pool, self.observers)
        self.live = LiveRelay(self.state)  # the Live API (WebSocket) relay; telemetry sets live.observer
        self.websocket_handler: WebSocketHandler | None = self.live.handle
        self.metrics_renderer: Callable[[], tuple[bytes, str]] | None = None
        self.proxy_observer: Any = None  # forward_proxy.ProxyObserver (telemetry), for proxy_listen
        self.on_close: list[Callable[[], Awaitable[None]]] = []  # e.g. the trace exporter's last flush

    @property
    def config(self) -> Config:
        return self.state.snapshot.config

    def start(self) -> None:
        """Begin fetching the first tokens (readiness waits for them)."""
        snapshot = self.state.snapshot
        snapshot.credentials.start(snapshot.needed_credentials())
        if self.state.governor is not None:
            self.state.governor.start()

    def apply_config(self, config: Config) -> None:
        """Swap in a new config atomically: requests already running finish on the old one.

        Unchanged credentials keep their cached tokens. Raises ConfigError (e.g. an
        unreadable caller-keys file) without changing anything.
        """
        previous = self.state.snapshot
        snapshot = Snapshot.build(config, self.refresh_observer)
        snapshot.credentials.adopt(previous.credentials)
        snapshot.credentials.start(snapshot.needed_credentials())
        self.state.swap(snapshot)
        if self.state.governor is not None:
            self.state.governor.apply_config(config)
        retired = [source for name, source in previous.credentials.sources.items()
                   if snapshot.credentials.sources.get(name) is not source]
        for source in retired:
            asyncio.ensure_future(source.aclose())

    async def aclose(self) -> None:
        if self.state.governor is not None:
            await self.state.governor.aclose()
        self.observers.flush()
        for close in self.on_close:
            await close()
        await self.state.snapshot.credentials.aclose()
        await self.pool.aclose()

    # ----------------------------------------------------------------- main app
    async def main_app(self, scope: Scope, receive: Receive, send: Send) -> None:
        kind = scope["type"]
        if kind == "lifespan":
            await _lifespan_noop(receive, send)
            return
        raw_path: bytes = scope.get("raw_path") or scope["path"].encode("utf-8")
        path = raw_path.decode("latin-1")
        if kind == "websocket":
            if self.websocket_handler is not None:
                await self.websocket_handler(scope, receive, send, path)
            else:
                await send({"type": "websocket.close", "code": 1008,
                            "reason": "the Live API relay is not enabled in this sidecar"})
            return
        for prefix, service in _PREFIXES:
            if path.startswith(prefix):
                await self.proxy.handle(scope, receive, send, service, path[len(prefix):])
                return
        await _send_json(send, 404, error_body(
            404, f"the sidecar serves Vertex AI under /vertex_ai/ (e.g. /vertex_ai/v1/projects/PROJECT/locations/"
                 f"LOCATION/publishers/google/models/MODEL:generateContent); {path[:100]!r} is not such a path",
            reason="UNKNOWN_PATH"))

    # ---------------------------------------------------------------- admin app
    def admin_app(self) -> Starlette:
        async def healthz(request: Request) -> Response:
            return PlainTextResponse("ok\n")

        async def readyz(request: Request) -> Response:
            state = self.state
            if state.ready:
                return PlainTextResponse("ready\n")
            snapshot = state.snapshot
            waiting = {
                name: (source.last_error or "no token yet")
                for name in sorted(snapshot.needed_credentials())
                if (source := snapshot.credentials.get(name)) is not None and not source.ready
            }
            return JSONResponse({"ready": False, "draining": state.draining, "waiting_for_credentials": waiting},
                                status_code=503)

        async def metrics(request: Request) -> Response:
            if self.metrics_renderer is None:
                return PlainTextResponse("", media_type="text/plain; version=0.0.4")
            body, content_type = self.metrics_renderer()
            return Response(body, media_type=content_type)

        return Starlette(routes=[
            StarletteRoute("/healthz", healthz),
            StarletteRoute("/readyz", readyz),
            StarletteRoute("/metrics", metrics),
        ])


async def _send_json(send: Send, status: int, body: bytes) -> None:
    await send({"type": "http.response.start", "status": status, "headers": error_headers(body)})
    await send({"type": "http.response.body", "body": body})


async def _lifespan_noop(receive: Receive, send: Send) -> None:
    # Startup and shutdown are driven by the CLI, which runs several listeners on one app.
    while True:
        message: dict[str, Any] = await receive()
        if message["type"] == "lifespan.startup":
            await send({"type": "lifespan.startup.complete"})
        elif message["type"] == "lifespan.shutdown":
            await send({"type": "lifespan.shutdown.complete"})
            return

