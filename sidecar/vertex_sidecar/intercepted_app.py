"""The ASGI app behind the forward proxy's TLS termination (forward_proxy.py).

A request arrives as the app sent it to Google (``POST /v1/projects/P/locations/L/...`` on
``L-aiplatform.googleapis.com``) and goes through the sidecar's own pipeline, exactly as
``/vertex_ai/v1/projects/P/locations/L/...`` would: `Proxy.handle` for REST (route, policy,
limits, credential injection, usage, metrics, logs), the Live relay for the WebSocket.
The location the host name stands for must be the one the request names: an app cannot
aim a request at one region's name and have it served by another's route.
"""

from __future__ import annotations

import json
from typing import Any
from urllib.parse import parse_qsl, urlencode

from .forward_proxy import STATE_KEY, Receive, Scope, Send
from .live import POLICY, close_reason
from .proxy_hosts import InterceptedHost, path_location_mismatch


class InterceptedApp:
    def __init__(self, sidecar: Any) -> None:  # app.Sidecar (not imported: app imports nothing of ours here)
        self.sidecar = sidecar

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            return
        host: InterceptedHost = scope["state"][STATE_KEY]
        raw_path: bytes = scope.get("raw_path") or scope["path"].encode("utf-8")
        path = raw_path.decode("latin-1")
        if scope["type"] == "websocket":
            await self._live(scope, receive, send, host, path)
            return
        await self.sidecar.proxy.handle(scope, receive, send, host.service, path.lstrip("/"), intercepted=host)

    async def _live(self, scope: Scope, receive: Receive, send: Send, host: InterceptedHost, path: str) -> None:
        handler = self.sidecar.websocket_handler
        if handler is None or host.service != "aiplatform":
            await receive()
            await send({"type": "websocket.close", "code": POLICY,
                        "reason": "no Live API relay for this host in this sidecar"})
            return
        # The host's location completes a setup model that names none, as the query would.
        query = dict(parse_qsl(scope.get("query_string", b"").decode("latin-1")))
        query.setdefault("vertex_location", host.location)
        scope = {**scope, "query_string": urlencode(query).encode("latin-1")}
        await handler(scope, _LiveLocationCheck(receive, send, host), send, "/vertex_ai" + path)


class _LiveLocationCheck:
    """`receive` for the Live relay that refuses a setup naming another location than the host's."""

    def __init__(self, receive: Receive, send: Send, host: InterceptedHost) -> None:
        self._receive = receive
        self._send = send
        self._host = host
        self._checked = False

    async def __call__(self) -> dict[str, Any]:
        message = await self._receive()
        if self._checked or message["type"] != "websocket.receive":
            return message
        self._checked = True
        mismatch = path_location_mismatch(self._host, _setup_location(message) or self._host.location)
        if mismatch is None:
            return message
        await self._send({"type": "websocket.close", "code": POLICY, "reason": close_reason(mismatch)})
        return {"type": "websocket.disconnect", "code": POLICY, "reason": "location mismatch"}


def _setup_location(message: dict[str, Any]) -> str | None:
    """The location in a setup message's ``projects/P/locations/L/...`` model, if it names one."""
    frame = message.get("text") or message.get("bytes") or ""
    try:
        model = json.loads(frame)["setup"]["model"]
    except (ValueError, KeyError, TypeError):
        return None  # the relay itself refuses a malformed setup
    if not isinstance(model, str):
        return None
    parts = model.split("/")
    if len(parts) >= 4 and parts[0] == "projects" and parts[2] == "locations":
        return parts[3]
    return None

