"""Host routing for tests, and the request log.

The sidecar lets tests override upstream URL templates, e.g.
`http://127.0.0.1:PORT/_upstream/{location}-aiplatform.googleapis.com`. This ASGI
middleware strips a leading `/_upstream/<hostname>` from the path, remembers `<hostname>`
as the request's upstream host, and records every request (method, path, query, headers,
upstream host, final status) in a bounded log.
"""

from __future__ import annotations

import time
from typing import Any

from starlette.types import ASGIApp, Message, Receive, Scope, Send

__all__ = ["LOG_ENTRY_KEY", "PREFIX", "UPSTREAM_HOST_KEY", "RequestLog", "UpstreamPrefix", "scope_headers"]

PREFIX = "/_upstream/"
UPSTREAM_HOST_KEY = "emulator.upstream_host"
LOG_ENTRY_KEY = "emulator.log_entry"


class RequestLog(list[dict[str, Any]]):
    """A list that drops its oldest entries beyond `max_entries`."""

    def __init__(self, max_entries: int = 1000) -> None:
        super().__init__()
        self.max_entries = max_entries

    def append(self, entry: dict[str, Any]) -> None:
        super().append(entry)
        overflow = len(self) - self.max_entries
        if overflow > 0:
            del self[:overflow]


def _split_prefix(path: str) -> tuple[str | None, str]:
    if not path.startswith(PREFIX):
        return None, path
    host, slash, rest = path[len(PREFIX) :].partition("/")
    return host or None, slash + rest if slash else "/"


def scope_headers(scope: Scope) -> dict[str, str]:
    """Request headers, names lower-cased, repeated headers joined with ", "."""
    out: dict[str, str] = {}
    for raw_name, raw_value in scope.get("headers", []):
        name, value = raw_name.decode("latin-1").lower(), raw_value.decode("latin-1")
        out[name] = f"{out[name]}, {value}" if name in out else value
    return out


class UpstreamPrefix:
    """Pure ASGI middleware; a nested copy (the combined app) records each request once."""

    def __init__(self, app: ASGIApp, log: RequestLog) -> None:
        self.app = app
        self.log = log

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] not in ("http", "websocket") or LOG_ENTRY_KEY in scope:
            await self.app(scope, receive, send)
            return
        host, path = _split_prefix(scope["path"])
        if host is not None:
            scope = dict(scope)
            scope["path"] = path
            raw_path: bytes | None = scope.get("raw_path")
            if raw_path is not None:
                # Keep the client's percent-encoding: cut the prefix from the raw bytes too.
                _, raw_rest = _split_prefix(raw_path.decode("latin-1"))
                scope["raw_path"] = raw_rest.encode("latin-1")
        entry: dict[str, Any] = {
            "time": time.time(),
            "method": scope.get("method", "GET"),
            "path": path,
            "query": scope.get("query_string", b"").decode("latin-1"),
            "headers": scope_headers(scope),
            "header_list": [
                (k.decode("latin-1").lower(), v.decode("latin-1")) for k, v in scope.get("headers", [])
            ],
            "upstream_host": host,
            "status": None,
        }
        scope[UPSTREAM_HOST_KEY] = host
        scope[LOG_ENTRY_KEY] = entry
        self.log.append(entry)

        async def send_and_record(message: Message) -> None:
            if message["type"] == "http.response.start":
                entry["status"] = message["status"]
            await send(message)

        await self.app(scope, receive, send_and_record)
