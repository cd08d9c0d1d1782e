"""Run emulators on loopback: in a background thread, or as a task in the running loop.

Always port 0 (some fixed loopback ports are taken on these machines): the socket is bound
first, so the URL is known before uvicorn starts, and the handle is returned only once
uvicorn accepts connections.

`create_combined_app` serves metadata server, OAuth token endpoint and Vertex from one
port, sharing one TokenRegistry: `/` and `/computeMetadata/...` → metadata, `/token` →
OAuth, everything else → Vertex. Behind a `/_upstream/<host>` prefix, the host decides:
`metadata.google.internal` (or any host containing "metadata") → metadata,
`oauth2.googleapis.com` → OAuth.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import threading
import time
from collections.abc import AsyncIterator, Generator, Iterator
from dataclasses import dataclass
from typing import Any

import uvicorn
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.routing import Mount
from starlette.types import ASGIApp, Receive, Scope, Send

from .identity import mount_identity_endpoints
from .keys import KeyStore
from .metadata import create_metadata_app
from .oauth import create_oauth_app
from .tokens import TokenRegistry
from .upstream import UPSTREAM_HOST_KEY, UpstreamPrefix
from .vertex import create_vertex_app

__all__ = ["EmulatorServer", "ServerHandle", "async_running_server", "create_combined_app", "running_server"]

_STARTUP_TIMEOUT_S = 10.0


@dataclass(frozen=True)
class ServerHandle:
    url: str
    port: int
    app: Any
    server: uvicorn.Server

    @property
    def host(self) -> str:
        return "127.0.0.1"


class EmulatorServer(uvicorn.Server):
    """uvicorn without its signal handlers: the owner decides when to stop (tests, __main__)."""

    @contextlib.contextmanager
    def capture_signals(self) -> Generator[None, None, None]:
        yield


def bind_loopback(port: int = 0) -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", port))
    sock.set_inheritable(True)
    return sock


def make_server(app: ASGIApp, **config: Any) -> EmulatorServer:
    options: dict[str, Any] = {
        "log_level": "warning",
        "access_log": False,
        "server_header": False,
        "lifespan": "off",
        # Open streams must not hold a test's teardown for long.
        "timeout_graceful_shutdown": 1,
    }
    options.update(config)
    return EmulatorServer(uvicorn.Config(app, **options))


def _handle(app: Any, sock: socket.socket, server: uvicorn.Server) -> ServerHandle:
    port = sock.getsockname()[1]
    return ServerHandle(f"http://127.0.0.1:{port}", port, app, server)


@contextlib.contextmanager
def running_server(app: ASGIApp, **config: Any) -> Iterator[ServerHandle]:
    """Serve `app` from a background thread with its own event loop."""
    sock = bind_loopback()
    server = make_server(app, **config)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, name="emulator", daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + _STARTUP_TIMEOUT_S
        while not server.started:
            if not thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("emulator server failed to start")
            time.sleep(0.005)
        yield _handle(app, sock, server)
    finally:
        server.should_exit = True
        thread.join(timeout=10)
        sock.close()


@contextlib.asynccontextmanager
async def async_running_server(app: ASGIApp, **config: Any) -> AsyncIterator[ServerHandle]:
    """Serve `app` as a task in the current event loop."""
    sock = bind_loopback()
    server = make_server(app, **config)
    task = asyncio.create_task(server.serve(sockets=[sock]))
    try:
        deadline = time.monotonic() + _STARTUP_TIMEOUT_S
        while not server.started:
            if task.done() or time.monotonic() > deadline:
                if task.done() and task.exception() is not None:
                    raise RuntimeError("emulator server failed to start") from task.exception()
                raise RuntimeError("emulator server failed to start")
            await asyncio.sleep(0.005)
        yield _handle(app, sock, server)
    finally:
        server.should_exit = True
        await task
        sock.close()


class _Dispatcher:
    """Sends each request to the metadata, OAuth or Vertex app (see module docstring)."""

    def __init__(self, metadata: ASGIApp, oauth: ASGIApp, vertex: ASGIApp) -> None:
        self.metadata, self.oauth, self.vertex = metadata, oauth, vertex

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await self._pick(scope)(scope, receive, send)

    def _pick(self, scope: Scope) -> ASGIApp:
        host = scope.get(UPSTREAM_HOST_KEY) or ""
        path = scope.get("path", "/")
        if "metadata" in host or (not host and (path == "/" or path.startswith("/computeMetadata/"))):
            return self.metadata
        if host == "oauth2.googleapis.com" or (not host and path == "/token"):
            return self.oauth
        return self.vertex


def create_combined_app(
    registry: TokenRegistry | None = None,
    *,
    require_auth: bool = True,
    project_id: str = "emu-project",
    numeric_project_id: str = "123456789012",
    email: str = "sidecar@emu-project.iam.gserviceaccount.com",
    token_lifetime_s: float = 3600,
    unavailable_for_first_s: float = 0.0,
) -> Starlette:
    """One app for metadata + OAuth + Vertex. state: registry, keys, metadata_app,
    oauth_app, vertex_app, requests (the shared request log)."""
    registry = registry if registry is not None else TokenRegistry()
    keys = KeyStore()
    metadata = create_metadata_app(
        registry,
        project_id=project_id,
        numeric_project_id=numeric_project_id,
        email=email,
        token_lifetime_s=token_lifetime_s,
        unavailable_for_first_s=unavailable_for_first_s,
    )
    oauth = create_oauth_app(registry, token_lifetime_s=token_lifetime_s, keys=keys)
    vertex = create_vertex_app(registry if require_auth else None)
    app = Starlette(
        routes=[Mount("", app=_Dispatcher(metadata, oauth, vertex))],
        middleware=[Middleware(UpstreamPrefix, log=vertex.state.requests)],
    )
    app.state.registry = registry
    app.state.keys = keys
    app.state.metadata_app = metadata
    app.state.oauth_app = oauth
    app.state.vertex_app = vertex
    app.state.requests = vertex.state.requests
    mount_identity_endpoints(app)  # STS + IAM Credentials on the same port and token registry
    return app
