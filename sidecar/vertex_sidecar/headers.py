"""Header rules between the caller, the sidecar and Google (design §3). Pure."""

from __future__ import annotations

from functools import lru_cache
from typing import Iterable

HeaderList = list[tuple[bytes, bytes]]

# RFC 9110 §7.6.1 hop-by-hop headers, plus the ones this proxy sets itself.
HOP_BY_HOP = frozenset({
    b"connection", b"keep-alive", b"proxy-authenticate", b"proxy-authorization", b"proxy-connection",
    b"te", b"trailer", b"transfer-encoding", b"upgrade",
})
# Never forwarded to Google: the sidecar sets Host and the body length itself; `expect`
# would make Google wait for a 100-continue the sidecar does not relay.
REQUEST_DROP = HOP_BY_HOP | {b"host", b"content-length", b"expect"}
# The caller's credentials: dropped unless the route's credential is `client`.
CALLER_CREDENTIALS = frozenset({b"authorization", b"x-goog-api-key"})
RESPONSE_DROP = HOP_BY_HOP


def upstream_request_headers(client_headers: Iterable[tuple[bytes, bytes]], *, bearer_token: str | None,
                             quota_project: str | None = None, forward_caller_credentials: bool = False,
                             extra_drop: frozenset[bytes] = frozenset()) -> HeaderList:
    """The headers sent to Google: the caller's, minus hop-by-hop and credentials, plus ours."""
    drop = _drop_set(extra_drop, forward_caller_credentials, bool(quota_project))
    connection_tokens = _connection_tokens(client_headers)
    result = [(name, value) for name, value in client_headers
              if name not in drop and name not in connection_tokens]
    if bearer_token is not None:
        result.append((b"authorization", b"Bearer " + bearer_token.encode("ascii")))
    if quota_project:
        result.append((b"x-goog-user-project", quota_project.encode("ascii")))
    return result


@lru_cache(maxsize=64)
def _drop_set(extra_drop: frozenset[bytes], forward_caller_credentials: bool, quota_project: bool) -> frozenset[bytes]:
    drop = REQUEST_DROP | extra_drop
    if not forward_caller_credentials:
        drop |= CALLER_CREDENTIALS
    if quota_project:
        drop |= {b"x-goog-user-project"}
    return drop


def client_response_headers(upstream_headers: Iterable[tuple[bytes, bytes]]) -> HeaderList:
    """Google's response headers for the caller: everything but hop-by-hop headers.

    Bodies are relayed byte for byte and never decompressed, so Content-Length and
    Content-Encoding stay true; a chunked upstream body is re-framed by the ASGI server.
    """
    lowered = [(name.lower(), value) for name, value in upstream_headers]
    connection_tokens = _connection_tokens(lowered)
    result = [(name, value) for name, value in lowered
              if name not in RESPONSE_DROP and name not in connection_tokens]
    if any(name == b"content-type" and value.lower().startswith(b"text/event-stream") for name, value in lowered):
        result.append((b"x-accel-buffering", b"no"))
    return result


def content_length(headers: Iterable[tuple[bytes, bytes]]) -> int | None:
    for name, value in headers:
        if name.lower() == b"content-length":
            try:
                return int(value)
            except ValueError:
                return None
    return None


def header_value(headers: Iterable[tuple[bytes, bytes]], wanted: bytes) -> bytes | None:
    for name, value in headers:
        if name.lower() == wanted:
            return value
    return None


def _connection_tokens(headers: Iterable[tuple[bytes, bytes]]) -> frozenset[bytes]:
    """Header names listed in `Connection` are hop-by-hop too (RFC 9110 §7.6.1)."""
    tokens: set[bytes] = set()
    for name, value in headers:
        if name.lower() == b"connection":
            tokens.update(t.strip().lower() for t in value.split(b",") if t.strip())
    return frozenset(tokens)
