"""The forward-proxy listener (`proxy_listen`): apps reach Vertex AI with no code change.

An app started with ``HTTPS_PROXY=http://127.0.0.1:4080`` and the pod's CA bundle sends
every HTTPS call as ``CONNECT host:443``. Then:

- For Google's Vertex AI and Discovery Engine endpoints (`proxy_hosts.intercepted_names`)
  the sidecar answers ``200``, terminates TLS itself with a leaf certificate for exactly
  that name (issued by the pod-local CA, `tls`), and serves the decrypted HTTP/1.1 stream
  with uvicorn's own protocol on the sidecar's pipeline (`InterceptedApp`): the same
  route match, policy, limits, credentials, usage, metrics and logs as ``/vertex_ai/...``.
  The location the host name stands for must be the location the request names. ALPN
  offers only ``http/1.1`` (gRPC's HTTP/2 is not intercepted: clients must use REST).
- Any other host: a blind TCP tunnel (nothing added, nothing read), or ``403`` with
  ``proxy.other_hosts: deny``. The name is resolved once, every address is checked (no
  loopback, link-local, unspecified, multicast or the pod's own address: the proxy must
  not become a way into the pod's ports or the metadata server) and the tunnel dials a
  checked address, so a DNS answer that changes in between cannot slip past.
- Plain-HTTP proxy requests (absolute-form ``GET http://...``) get ``405``: apps set only
  HTTPS_PROXY.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import socket
import ssl
import time
from typing import Any, Awaitable, Callable, Protocol, cast

import uvicorn
from uvicorn.server import ServerState

from .config import ProxySettings
from .errors import error_body
from .proxy_hosts import (INTERCEPT_PORT, Authority, AuthorityError, InterceptedHost, classify, forbidden_address,
                          looks_like_google_endpoint, parse_authority)

log = logging.getLogger("vertex_sidecar.forward_proxy")

STATE_KEY = "vertex_sidecar.intercepted_host"  # in the ASGI scope's "state": which host the tunnel was for
MAX_HEAD_BYTES = 16 * 1024
HEAD_TIMEOUT_S = 10.0  # a client that never finishes its CONNECT line is dropped
HANDSHAKE_TIMEOUT_S = 10.0
SHUTDOWN_TIMEOUT_S = 2.0  # an idle client never answers our close_notify: don't hold the drain for it
CONNECT_TIMEOUT_S = 10.0

Scope = dict[str, Any]
Receive = Callable[[], Awaitable[dict[str, Any]]]
Send = Callable[[dict[str, Any]], Awaitable[None]]


class ProxyObserver(Protocol):
    def proxy_connect(self, outcome: str, reason: str) -> None: ...

    def proxy_tunnel_closed(self, bytes_up: int, bytes_down: int) -> None: ...


class _NoObserver:
    def proxy_connect(self, outcome: str, reason: str) -> None:
        pass

    def proxy_tunnel_closed(self, bytes_up: int, bytes_down: int) -> None:
        pass


class ProxyRefusal(Exception):
    def __init__(self, code: int, message: str, reason: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.reason = reason


class ForwardProxy:
    """The CONNECT listener. `http_config`: the uvicorn config (app, protocol classes) that
    serves decrypted streams; `settings` returns the current `ProxySettings` (re-read per
    CONNECT, so a config reload applies)."""

    def __init__(self, *, names: tuple[str, ...], cert_dir: str, http_config: uvicorn.Config,
                 settings: Callable[[], ProxySettings], observer: ProxyObserver | None = None) -> None:
        self.names = frozenset(names)
        self.cert_dir = cert_dir
        if not http_config.loaded:
            http_config.load()
        self.http_config = http_config
        self.server_state = ServerState()  # uvicorn's view of the intercepted connections
        self.settings = settings
        self.observer: ProxyObserver = observer or _NoObserver()
        self._contexts: dict[str, ssl.SSLContext] = {}
        self._server: asyncio.AbstractServer | None = None
        self.connections: set[asyncio.BaseTransport] = set()  # everything open, for the drain

    async def start(self, sock: socket.socket) -> None:
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(lambda: _ProxyRequest(self), sock=sock, backlog=2048)

    async def shutdown(self, timeout_s: float) -> None:
        """Stop accepting; give open tunnels and intercepted connections `timeout_s`, then cut them."""
        if self._server is not None:
            self._server.close()
        for connection in list(self.server_state.connections):
            cycle = getattr(connection, "cycle", False)  # HTTP connections have one; WebSockets not
            if cycle is None or (cycle and cycle.response_complete):
                # Idle keep-alive: nothing to lose, and a TLS close would wait for the client's answer.
                connection.transport.abort()
            else:
                connection.shutdown()  # a busy one closes after its response; a Live session gets 1012
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            # A WebSocket upgrade gives the transport to uvicorn's WebSocket protocol, which we no
            # longer hear from: a closing transport counts as gone.
            self.connections = {t for t in self.connections if not t.is_closing()}
            if not self.connections:
                break
            await asyncio.sleep(0.1)
        for transport in list(self.connections):
            transport.abort()

    def context_for(self, host: str) -> ssl.SSLContext:
        """The TLS server context for an intercepted name (loaded once, on first use)."""
        context = self._contexts.get(host)
        if context is None:
            context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            context.minimum_version = ssl.TLSVersion.TLSv1_2
            context.load_cert_chain(os.path.join(self.cert_dir, f"{host}.pem"))
            context.set_alpn_protocols(["http/1.1"])
            self._contexts[host] = context
        return context

    # ------------------------------------------------------------------ one CONNECT
    async def serve(self, transport: asyncio.Transport, head: bytes, early: bytes) -> None:
        loop = asyncio.get_running_loop()
        try:
            method, authority = _request_line(head)
            if method != "CONNECT":
                raise ProxyRefusal(405, "the sidecar's proxy serves only CONNECT (set HTTPS_PROXY, not HTTP_PROXY: "
                                        "plain-HTTP requests are not proxied)", "PROXY_METHOD_NOT_ALLOWED")
            try:
                target = parse_authority(authority)
            except AuthorityError as exc:
                raise ProxyRefusal(400, f"CONNECT target refused: {exc}", "PROXY_BAD_TARGET") from None
            intercepted = classify(target.host, self.names) if not target.is_ip else None
            if intercepted is not None and target.port == INTERCEPT_PORT:
                if early:
                    raise ProxyRefusal(400, "the client sent data before the CONNECT was answered",
                                       "PROXY_BAD_REQUEST")
                self.observer.proxy_connect("intercepted", "intercepted")
                await self._intercept(loop, transport, intercepted)
                return
            await self._tunnel(loop, transport, target, early, intercepted is not None)
            self.observer.proxy_connect("tunnelled", "tunnelled")
        except ProxyRefusal as refusal:
            log.info("proxy refused %s: %s", _printable(head.split(b"\r\n", 1)[0]), refusal.message)
            self.observer.proxy_connect("refused", refusal.reason)
            _answer_error(transport, refusal)
        except (ConnectionError, ssl.SSLError, TimeoutError, asyncio.TimeoutError) as exc:
            log.info("proxy connection ended early: %s", exc)
            transport.abort()
        except Exception:  # a bug must not leave the app hanging on an unanswered CONNECT
            log.exception("proxy request failed")
            transport.abort()

    async def _intercept(self, loop: asyncio.AbstractEventLoop, transport: asyncio.Transport,
                         host: InterceptedHost) -> None:
        context = self.context_for(host.name)
        transport.write(b"HTTP/1.1 200 Connection established\r\n\r\n")
        handoff = _Handoff()
        try:
            tls_transport = await loop.start_tls(transport, handoff, context, server_side=True,
                                                 ssl_handshake_timeout=HANDSHAKE_TIMEOUT_S,
                                                 ssl_shutdown_timeout=SHUTDOWN_TIMEOUT_S)
        except (ssl.SSLError, ConnectionError, TimeoutError, asyncio.TimeoutError, OSError) as exc:
            # Typically an app that does not trust the pod's CA bundle: say so once per failure.
            log.warning("TLS handshake with the app for %s failed (does it trust the sidecar's CA bundle, "
                        "e.g. SSL_CERT_FILE?): %s", host.name, exc)
            self.connections.discard(transport)
            transport.abort()
            return
        self.connections.discard(transport)
        tls_transport = cast(asyncio.Transport, tls_transport)
        self.connections.add(tls_transport)
        protocol = self.http_config.http_protocol_class(  # type: ignore[call-arg]
            config=self.http_config, server_state=self.server_state, app_state={STATE_KEY: host})
        handoff.hand_to(protocol, tls_transport, on_lost=lambda: self.connections.discard(tls_transport))

    async def _tunnel(self, loop: asyncio.AbstractEventLoop, transport: asyncio.Transport, target: Authority,
                      early: bytes, intercepted_name: bool) -> None:
        settings = self.settings()
        if intercepted_name:
            raise ProxyRefusal(403, f"{target.host} is answered by the sidecar on port 443 only",
                               "PROXY_TARGET_FORBIDDEN")
        if not target.is_ip and looks_like_google_endpoint(target.host):
            raise ProxyRefusal(403, f"{target.host} looks like a Vertex AI / Discovery Engine endpoint the sidecar "
                                    "does not intercept (a region newer than its list?): add the location to "
                                    "proxy.extra_locations; it is not tunnelled past the sidecar",
                               "PROXY_UNKNOWN_GOOGLE_ENDPOINT")
        if settings.other_hosts == "deny":
            raise ProxyRefusal(403, f"this sidecar proxies only Vertex AI (proxy.other_hosts: deny); {target} is not "
                                    "reachable through it. Add the host to NO_PROXY to reach it directly",
                               "PROXY_HOST_DENIED")
        if target.port not in settings.tunnel_ports:
            raise ProxyRefusal(403, f"port {target.port} is not tunnelled (proxy.tunnel_ports: "
                                    f"{list(settings.tunnel_ports)})", "PROXY_PORT_DENIED")
        addresses = await self._destinations(loop, target, settings.resolve)
        upstream: asyncio.Transport | None = None
        client_side = _Pipe(self, transport, from_client=True)
        upstream_side = _Pipe(self, None, from_client=False)
        last_error: Exception | None = None
        for address in addresses:
            try:
                upstream, _ = await asyncio.wait_for(
                    loop.create_connection(lambda: upstream_side, host=address[0], port=address[1]),
                    CONNECT_TIMEOUT_S)
                break
            except (OSError, asyncio.TimeoutError) as exc:
                last_error = exc
        if upstream is None:
            raise ProxyRefusal(502, f"cannot connect to {target}: {last_error}", "PROXY_UPSTREAM_UNREACHABLE")
        self.connections.add(upstream)
        client_side.peer, upstream_side.peer = upstream_side, client_side
        client_side.tunnel = upstream_side.tunnel = _TunnelStats(str(target), self.observer)
        transport.set_protocol(client_side)
        transport.write(b"HTTP/1.1 200 Connection established\r\n\r\n")
        if early:
            client_side.data_received(early)
        transport.resume_reading()
        upstream.resume_reading()

    async def _destinations(self, loop: asyncio.AbstractEventLoop, target: Authority,
                            pinned: dict[str, str]) -> list[tuple[str, int]]:
        """Where a tunnel may go: the operator's pin, else every resolved address, all checked."""
        pin = pinned.get(str(target))
        if pin is not None:
            host, _, port = pin.rpartition(":")
            return [(host.strip("[]"), int(port))]
        if target.is_ip:
            candidates = [target.host]
        else:
            try:
                infos = await loop.getaddrinfo(target.host, target.port, type=socket.SOCK_STREAM)
            except (socket.gaierror, UnicodeError) as exc:
                raise ProxyRefusal(502, f"cannot resolve {target.host}: {exc}", "PROXY_UPSTREAM_UNREACHABLE") from None
            candidates = list(dict.fromkeys(str(info[4][0]) for info in infos))
        for address in candidates:
            reason = forbidden_address(address) or (_own_address(address) and "one of the pod's own addresses")
            if reason:
                raise ProxyRefusal(403, f"{target} resolves to {address}, {reason}: the proxy never tunnels there",
                                   "PROXY_TARGET_FORBIDDEN")
        if not candidates:
            raise ProxyRefusal(502, f"{target.host} has no address", "PROXY_UPSTREAM_UNREACHABLE")
        return [(address, target.port) for address in candidates]


def _own_address(address: str) -> bool:
    """Whether `address` is one of this pod's (network namespace's) addresses: only those can
    be bound. (With net.ipv4.ip_nonlocal_bind=1 every address binds, and every tunnel is refused.)"""
    family = socket.AF_INET6 if ":" in address else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        try:
            probe.bind((address, 0))
        except OSError:
            return False
    return True


def _request_line(head: bytes) -> tuple[str, str]:
    line = head.split(b"\r\n", 1)[0]
    parts = line.split(b" ")
    if len(parts) != 3 or not parts[2].startswith(b"HTTP/1."):
        raise ProxyRefusal(400, "not an HTTP/1.x proxy request", "PROXY_BAD_REQUEST")
    return parts[0].decode("latin-1"), parts[1].decode("latin-1")


_REASONS = {400: b"Bad Request", 403: b"Forbidden", 405: b"Method Not Allowed", 431: b"Request Header Fields Too Large",
            502: b"Bad Gateway"}


def _answer_error(transport: asyncio.Transport, refusal: ProxyRefusal) -> None:
    body = error_body(refusal.code, refusal.message, reason=refusal.reason)
    head = [b"HTTP/1.1 %d %s" % (refusal.code, _REASONS.get(refusal.code, b"Error")),
            b"content-type: application/json; charset=UTF-8", b"content-length: %d" % len(body),
            b"x-vertex-sidecar-error: 1", b"connection: close"]
    if refusal.code == 405:
        head.append(b"allow: CONNECT")
    transport.write(b"\r\n".join(head) + b"\r\n\r\n" + body)
    transport.close()


def _printable(line: bytes) -> str:
    return line[:200].decode("latin-1").encode("unicode_escape").decode("ascii")


class _ProxyRequest(asyncio.Protocol):
    """Reads one proxy request head, then hands the connection to `ForwardProxy.serve`."""

    def __init__(self, proxy: ForwardProxy) -> None:
        self.proxy = proxy
        self.buffer = bytearray()
        self.transport: asyncio.Transport | None = None
        self.task: asyncio.Future[None] | None = None
        self.timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        transport = cast(asyncio.Transport, transport)  # uvloop transports are not asyncio classes
        self.transport = transport
        self.proxy.connections.add(transport)
        self.timer = asyncio.get_running_loop().call_later(HEAD_TIMEOUT_S, transport.abort)

    def data_received(self, data: bytes) -> None:
        assert self.transport is not None
        if self.task is not None:
            return  # paused; nothing should arrive
        self.buffer += data
        end = self.buffer.find(b"\r\n\r\n")
        if end < 0:
            if len(self.buffer) > MAX_HEAD_BYTES:
                _answer_error(self.transport, ProxyRefusal(431, "the proxy request head is too large",
                                                           "PROXY_BAD_REQUEST"))
            return
        if self.timer is not None:
            self.timer.cancel()
        self.transport.pause_reading()
        head, early = bytes(self.buffer[:end]), bytes(self.buffer[end + 4:])
        self.buffer.clear()
        self.task = asyncio.ensure_future(self.proxy.serve(self.transport, head, early))

    def connection_lost(self, exc: Exception | None) -> None:
        if self.timer is not None:
            self.timer.cancel()
        if self.transport is not None:
            self.proxy.connections.discard(self.transport)
        if self.task is not None and not self.task.done():
            self.task.cancel()


class _Handoff(asyncio.Protocol):
    """What the TLS layer delivers before uvicorn's protocol takes the connection (a client's
    first request can arrive with its handshake's last flight) is kept and passed on."""

    def __init__(self) -> None:
        self.target: asyncio.Protocol | None = None
        self.pending: list[bytes] = []
        self.eof = False
        self.lost: tuple[Exception | None] | None = None
        self.on_lost: Callable[[], None] | None = None

    def data_received(self, data: bytes) -> None:
        if self.target is not None:
            self.target.data_received(data)
        else:
            self.pending.append(data)

    def eof_received(self) -> bool | None:
        if self.target is not None:
            return self.target.eof_received()
        self.eof = True
        return None

    def connection_lost(self, exc: Exception | None) -> None:
        if self.on_lost is not None:
            self.on_lost()
        if self.target is not None:
            self.target.connection_lost(exc)
        else:
            self.lost = (exc,)

    def hand_to(self, protocol: asyncio.Protocol, transport: asyncio.Transport, *,
                on_lost: Callable[[], None]) -> None:
        self.on_lost = on_lost
        protocol.connection_made(transport)
        self.target = protocol
        # The transport keeps calling us: uvicorn replaces the protocol itself on a WebSocket
        # upgrade, so we forward rather than set_protocol(protocol) and lose track.
        transport.set_protocol(_Forwarder(protocol, self))
        for data in self.pending:
            protocol.data_received(data)
        self.pending.clear()
        if self.eof:
            protocol.eof_received()
        if self.lost is not None:
            on_lost()
            protocol.connection_lost(self.lost[0])


class _Forwarder(asyncio.Protocol):
    """Passes transport events to uvicorn's protocol and notes when the connection ends."""

    def __init__(self, protocol: asyncio.Protocol, handoff: _Handoff) -> None:
        self.protocol = protocol
        self.handoff = handoff

    def data_received(self, data: bytes) -> None:
        self.protocol.data_received(data)

    def eof_received(self) -> bool | None:
        return self.protocol.eof_received()

    def pause_writing(self) -> None:
        self.protocol.pause_writing()

    def resume_writing(self) -> None:
        self.protocol.resume_writing()

    def connection_lost(self, exc: Exception | None) -> None:
        self.handoff.connection_lost(exc)


class _TunnelStats:
    def __init__(self, target: str, observer: ProxyObserver) -> None:
        self.target = target
        self.observer = observer
        self.started = time.monotonic()
        self.bytes_up = 0
        self.bytes_down = 0
        self.closed = False

    def log(self) -> None:
        if not self.closed:
            self.closed = True
            self.observer.proxy_tunnel_closed(self.bytes_up, self.bytes_down)
            print(json.dumps({"event": "tunnel", "target": self.target, "bytes_up": self.bytes_up,
                              "bytes_down": self.bytes_down,
                              "duration_ms": round((time.monotonic() - self.started) * 1000, 1)},
                             separators=(",", ":")), flush=True)


class _Pipe(asyncio.Protocol):
    """One side of a blind tunnel: what arrives is written to the other side, with back-pressure
    (a side that cannot keep up pauses reading on the other)."""

    def __init__(self, proxy: ForwardProxy, transport: asyncio.Transport | None, *, from_client: bool) -> None:
        self.proxy = proxy
        self.transport = transport
        self.from_client = from_client
        self.peer: _Pipe | None = None
        self.tunnel: _TunnelStats | None = None
        self.eof = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        transport = cast(asyncio.Transport, transport)  # uvloop transports are not asyncio classes
        self.transport = transport
        transport.pause_reading()  # until the client has its 200 and the pipes are joined

    def data_received(self, data: bytes) -> None:
        assert self.peer is not None and self.peer.transport is not None and self.tunnel is not None
        if self.from_client:
            self.tunnel.bytes_up += len(data)
        else:
            self.tunnel.bytes_down += len(data)
        self.peer.transport.write(data)

    def eof_received(self) -> bool | None:
        self.eof = True
        peer = self.peer
        if peer is None or peer.transport is None or peer.eof:
            return None  # both directions done: close
        if peer.transport.can_write_eof():
            peer.transport.write_eof()
        return True  # half-closed: the other direction may still carry data

    def pause_writing(self) -> None:
        if self.peer is not None and self.peer.transport is not None:
            self.peer.transport.pause_reading()

    def resume_writing(self) -> None:
        if self.peer is not None and self.peer.transport is not None:
            self.peer.transport.resume_reading()

    def connection_lost(self, exc: Exception | None) -> None:
        if self.transport is not None:
            self.proxy.connections.discard(self.transport)
        if self.peer is not None and self.peer.transport is not None:
            self.peer.transport.close()
        if self.tunnel is not None:
            self.tunnel.log()

