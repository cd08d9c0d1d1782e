"""A Vertex-like upstream that misbehaves on purpose, at the byte level.

A raw asyncio server (no framework: a framework would refuse to send a bad chunk size or
to reset a connection mid-body). Requests are parsed with httptools; each answer is
written by hand. The behaviour is chosen per request:

- the `x-fault` header, if present (it passes through the sidecar untouched), else
- the model name in the path: `.../models/fault-<name>:method` → `<name>`, else `ok`.

Faults (`FAULTS`):
  ok                   200 JSON (Content-Length); an SSE stream for `:streamGenerateContent`
  stream               200 SSE, chunked, `x-fault-chunks` events `x-fault-interval` s apart
  reset-mid-stream     SSE headers and two events, then a TCP RST
  reset-before-headers the request is read, then a TCP RST
  close-before-headers the request is read, then a clean close (FIN) without a byte
  slow-first-byte      nothing for `x-fault-delay` s (default 5), then `ok`
  slow-drip            SSE, one small event every `x-fault-interval` s (default 0.2), 50 events
  huge-headers         a status line and `x-fault-size` bytes (default 300 KB) of headers
  garbage              bytes that are not HTTP, connection left open
  bad-chunk            chunked: one good chunk, then a chunk size that is not hex, left open
  bad-chunk-first      chunked headers immediately followed by a bad chunk size, left open
  short-body           Content-Length: 1000, nine bytes, then a clean close
  close-delimited      HTTP/1.1 200, `Connection: close`, no length: the body ends at EOF (valid)
  drop-on-reuse        `ok` on a connection's first request; later ones: closed without answer
                       (a keep-alive connection the server dropped just as the request came)
  error-json           a relayed Google error: 429 RESOURCE_EXHAUSTED
  trailers             200 JSON, chunked, then trailer fields (`x-trailer-*`), all in one write

`x-fault-hold: S` delays any behaviour by S seconds (keeps many requests in flight at once).

Every `ok`-like answer echoes what arrived (path, body length and sha256, the request's
index on its connection) under the top-level key `echo`, so tests can check relaying.

`FaultyServer.stats` counts, from the server's side: connections, requests by fault,
complete and aborted uploads (a connection lost mid-body — what a caller cutting its
upload short must look like upstream), requests abandoned while the server was still
"thinking", and the currently open connections. `idle_close_s` makes the server close
keep-alive connections idle that long, as Google's front ends do.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import hashlib
import json
import re
import socket
import struct
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import httptools

__all__ = ["FAULTS", "FaultStats", "FaultyServer", "running_faulty_server"]

FAULTS = (
    "ok", "stream", "reset-mid-stream", "reset-before-headers", "close-before-headers", "slow-first-byte",
    "slow-drip", "huge-headers", "garbage", "bad-chunk", "bad-chunk-first", "short-body", "close-delimited",
    "drop-on-reuse", "error-json", "trailers",
)
_MODEL_RE = re.compile(r"/models/fault-([a-z-]+?)(?::|$|/|\?)")


@dataclass
class FaultStats:
    """Written by the server thread, read by tests (plain ints and a Counter: GIL-safe)."""

    connections: int = 0
    open_connections: int = 0
    max_open_connections: int = 0
    requests: collections.Counter[str] = field(default_factory=collections.Counter)
    started_requests: int = 0  # request headers received
    completed_uploads: int = 0  # requests received whole (headers and the declared body)
    aborted_uploads: int = 0  # connection lost after the headers, before the declared body ended
    abandoned: int = 0  # connection lost while a slow answer was still pending
    paths: list[str] = field(default_factory=list)

    def total_requests(self) -> int:
        return sum(self.requests.values())


@dataclass
class _Request:
    method: str
    path: str
    headers: dict[str, str]
    body_length: int
    body_sha256: str
    index_on_connection: int

    def knob(self, name: str, default: float) -> float:
        value = self.headers.get(f"x-fault-{name}")
        return float(value) if value is not None else default

    @property
    def model(self) -> str:
        match = re.search(r"/models/([^/:?]+)", self.path)
        return match.group(1) if match else "unknown"


def choose_fault(path: str, headers: dict[str, str]) -> str:
    wanted = headers.get("x-fault")
    if wanted is None:
        match = _MODEL_RE.search(path)
        wanted = match.group(1) if match else "ok"
    return wanted if wanted in FAULTS else "ok"


class _ServerConnection(asyncio.Protocol):
    """One accepted connection: parses requests and answers them one at a time."""

    def __init__(self, server: "FaultyServer") -> None:
        self.server = server
        self.stats = server.stats
        self.parser = httptools.HttpRequestParser(self)
        self.transport: asyncio.Transport | None = None
        self.queue: asyncio.Queue[_Request | None] = asyncio.Queue()
        self.worker: asyncio.Task[None] | None = None
        self.lost = asyncio.get_running_loop().create_future()
        self.served = 0
        self.idle_timer: asyncio.TimerHandle | None = None
        self._begin_message()

    def _begin_message(self) -> None:
        self.url = b""
        self.headers: dict[str, str] = {}
        self.in_message = False
        self.body_length = 0
        self.digest = hashlib.sha256()

    # -- asyncio.Protocol
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self.stats.connections += 1
        self.stats.open_connections += 1
        self.stats.max_open_connections = max(self.stats.max_open_connections, self.stats.open_connections)
        self.worker = asyncio.ensure_future(self._work())

    def data_received(self, data: bytes) -> None:
        self._cancel_idle_timer()
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError:
            self._write(b"HTTP/1.1 400 Bad Request\r\ncontent-length: 0\r\nconnection: close\r\n\r\n")
            self.close()

    def connection_lost(self, exc: Exception | None) -> None:
        self.stats.open_connections -= 1
        self._cancel_idle_timer()
        if self.in_message:
            self.stats.aborted_uploads += 1
        if not self.lost.done():
            self.lost.set_result(None)
        self.queue.put_nowait(None)  # ends the worker

    # -- httptools callbacks
    def on_message_begin(self) -> None:
        self.in_message = True

    def on_url(self, url: bytes) -> None:
        self.url += url

    def on_header(self, name: bytes, value: bytes) -> None:
        self.headers[name.decode("latin-1").lower()] = value.decode("latin-1")

    def on_headers_complete(self) -> None:
        self.stats.started_requests += 1

    def on_body(self, body: bytes) -> None:
        self.body_length += len(body)
        self.digest.update(body)

    def on_message_complete(self) -> None:
        self.stats.completed_uploads += 1
        self.served += 1
        self.queue.put_nowait(_Request(
            method=self.parser.get_method().decode("latin-1"), path=self.url.decode("latin-1"),
            headers=self.headers, body_length=self.body_length, body_sha256=self.digest.hexdigest(),
            index_on_connection=self.served,
        ))
        self._begin_message()

    # -- answering
    async def _work(self) -> None:
        while True:
            request = await self.queue.get()
            if request is None:
                return
            fault = choose_fault(request.path, request.headers)
            if request.index_on_connection > 1 and fault == "drop-on-reuse":
                self.stats.requests["drop-on-reuse(dropped)"] += 1
                self.close()
                return
            self.stats.requests[fault] += 1
            self.stats.paths.append(request.path)
            hold = request.knob("hold", 0.0)
            if hold and not await self._pause(hold):
                return
            keep_open = await getattr(self, "_fault_" + fault.replace("-", "_"))(request)
            if not keep_open or self.lost.done():
                return
            if self.queue.empty():
                self._arm_idle_timer()

    def _arm_idle_timer(self) -> None:
        if self.server.idle_close_s is not None and self.transport is not None:
            self.idle_timer = asyncio.get_running_loop().call_later(self.server.idle_close_s, self.close)

    def _cancel_idle_timer(self) -> None:
        if self.idle_timer is not None:
            self.idle_timer.cancel()
            self.idle_timer = None

    def _write(self, data: bytes) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.write(data)

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()

    def reset(self) -> None:
        """Abort with a TCP RST (SO_LINGER 0), not a FIN: what a crashed peer or middlebox does."""
        if self.transport is None:
            return
        sock = self.transport.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self.transport.abort()

    async def _pause(self, seconds: float) -> bool:
        """Sleep unless the peer leaves first; False when it left."""
        try:
            await asyncio.wait_for(asyncio.shield(self.lost), seconds)
        except asyncio.TimeoutError:
            return True
        return False

    @staticmethod
    def _head(status: str, headers: list[tuple[str, str]]) -> bytes:
        lines = [f"HTTP/1.1 {status}"] + [f"{name}: {value}" for name, value in headers]
        return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")

    @staticmethod
    def _chunk(data: bytes) -> bytes:
        return b"%x\r\n%s\r\n" % (len(data), data)

    @staticmethod
    def _echo(request: _Request) -> dict[str, Any]:
        return {"method": request.method, "path": request.path, "body_length": request.body_length,
                "body_sha256": request.body_sha256, "index_on_connection": request.index_on_connection,
                "request_id": request.headers.get("x-request-id"),
                "header_names": sorted(request.headers),
                "header_bytes": sum(len(k) + len(v) for k, v in request.headers.items())}

    @staticmethod
    def _candidate(text: str, model: str, final: bool) -> dict[str, Any]:
        chunk: dict[str, Any] = {"candidates": [{"content": {"role": "model", "parts": [{"text": text}]}}],
                                 "modelVersion": model}
        if final:
            chunk["candidates"][0]["finishReason"] = "STOP"
            chunk["usageMetadata"] = {"promptTokenCount": 3, "candidatesTokenCount": 2, "totalTokenCount": 5}
        return chunk

    def _sse_event(self, payload: dict[str, Any]) -> bytes:
        return self._chunk(b"data: " + json.dumps(payload, separators=(",", ":")).encode() + b"\r\n\r\n")

    _SSE_HEAD = [("content-type", "text/event-stream"), ("transfer-encoding", "chunked")]

    async def _stream(self, request: _Request, events: int, interval: float) -> bool:
        self._write(self._head("200 OK", self._SSE_HEAD))
        for i in range(events):
            if i and not await self._pause(interval):
                return False
            final = i == events - 1
            payload = self._candidate(f"part {i} ", request.model, final)
            if final:
                payload["echo"] = self._echo(request)
            self._write(self._sse_event(payload))
        self._write(b"0\r\n\r\n")
        return True

    async def _fault_ok(self, request: _Request) -> bool:
        if ":streamGenerateContent" in request.path:
            return await self._stream(request, 3, 0.0)
        body = self._candidate("ok", request.model, True)
        body["echo"] = self._echo(request)
        data = json.dumps(body).encode()
        self._write(self._head("200 OK", [("content-type", "application/json; charset=UTF-8"),
                                          ("content-length", str(len(data)))]) + data)
        return True

    async def _fault_stream(self, request: _Request) -> bool:
        return await self._stream(request, int(request.knob("chunks", 3)), request.knob("interval", 0.0))

    async def _fault_reset_mid_stream(self, request: _Request) -> bool:
        self._write(self._head("200 OK", self._SSE_HEAD))
        for i in range(2):
            self._write(self._sse_event(self._candidate(f"part {i} ", request.model, False)))
        await asyncio.sleep(0.02)  # let the events leave before the RST discards the send buffer
        self.reset()
        return False

    async def _fault_reset_before_headers(self, request: _Request) -> bool:
        self.reset()
        return False

    async def _fault_close_before_headers(self, request: _Request) -> bool:
        self.close()
        return False

    async def _fault_slow_first_byte(self, request: _Request) -> bool:
        if not await self._pause(request.knob("delay", 5.0)):
            self.stats.abandoned += 1
            return False
        return await self._fault_ok(request)

    async def _fault_slow_drip(self, request: _Request) -> bool:
        if not await self._stream(request, int(request.knob("chunks", 50)), request.knob("interval", 0.2)):
            self.stats.abandoned += 1
            return False
        return True

    async def _fault_huge_headers(self, request: _Request) -> bool:
        size = int(request.knob("size", 300 * 1024))
        filler = [(f"x-filler-{i}", "f" * 1000) for i in range(size // 1000 + 1)]
        self._write(self._head("200 OK", filler + [("content-length", "2")]) + b"{}")
        return True

    async def _fault_garbage(self, request: _Request) -> bool:
        self._write(b"\x16\x03\x01\x00\xa5garbage that is not HTTP\x00\xff\r\n\r\n")
        await self._pause(30)  # hold the connection: the sidecar must notice on its own
        return False

    async def _fault_bad_chunk(self, request: _Request) -> bool:
        self._write(self._head("200 OK", self._SSE_HEAD))
        self._write(self._sse_event(self._candidate("part 0 ", request.model, False)))
        await asyncio.sleep(0.02)  # a separate segment: the good chunk is relayed first
        self._write(b"zz\r\nnot a chunk\r\n")
        await self._pause(30)
        return False

    async def _fault_bad_chunk_first(self, request: _Request) -> bool:
        self._write(self._head("200 OK", self._SSE_HEAD) + b"-1\r\nnope\r\n")
        await self._pause(30)
        return False

    async def _fault_short_body(self, request: _Request) -> bool:
        self._write(self._head("200 OK", [("content-type", "application/json"), ("content-length", "1000")])
                    + b'{"candida')
        await asyncio.sleep(0.02)
        self.close()
        return False

    async def _fault_close_delimited(self, request: _Request) -> bool:
        body = json.dumps({**self._candidate("ok", request.model, True), "echo": self._echo(request)}).encode()
        self._write(self._head("200 OK", [("content-type", "application/json"), ("connection", "close")]))
        await asyncio.sleep(0.02)
        self._write(body)
        self.close()
        return False

    async def _fault_drop_on_reuse(self, request: _Request) -> bool:
        return await self._fault_ok(request)  # first request on the connection: answered

    async def _fault_error_json(self, request: _Request) -> bool:
        data = json.dumps({"error": {"code": 429, "message": "Resource exhausted (emulated).",
                                     "status": "RESOURCE_EXHAUSTED"}}).encode()
        self._write(self._head("429 Too Many Requests", [("content-type", "application/json; charset=UTF-8"),
                                                         ("content-length", str(len(data)))]) + data)
        return True

    async def _fault_trailers(self, request: _Request) -> bool:
        data = json.dumps({**self._candidate("ok", request.model, True), "echo": self._echo(request)}).encode()
        self._write(self._head("200 OK", [("content-type", "application/json"), ("transfer-encoding", "chunked"),
                                          ("trailer", "x-trailer-status, x-trailer-location")])
                    + self._chunk(data) + b"0\r\nx-trailer-status: done\r\nx-trailer-location: /elsewhere\r\n\r\n")
        return True


class FaultyServer:
    """The server, run on its own event loop in a background thread."""

    def __init__(self, *, idle_close_s: float | None = None) -> None:
        self.idle_close_s = idle_close_s
        self.stats = FaultStats()
        self.port = 0
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._run, name="faulty-upstream", daemon=True)
        self._error: BaseException | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> None:
        self._thread.start()
        if not self._ready.wait(10) or self._error is not None:
            raise RuntimeError("faulty upstream failed to start") from self._error

    def stop(self) -> None:
        if self._loop is not None and self._stop is not None:
            self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(10)

    def wait_for(self, predicate: Callable[[FaultStats], bool], timeout: float = 5.0) -> bool:
        """Poll `predicate(stats)` until true or the deadline: no fixed sleeps in tests."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if predicate(self.stats):
                return True
            time.sleep(0.01)
        return bool(predicate(self.stats))

    def _run(self) -> None:
        try:
            asyncio.run(self._serve())
        except BaseException as exc:  # surfaced by start()
            self._error = exc
            self._ready.set()

    async def _serve(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._stop = asyncio.Event()
        connections: list[_ServerConnection] = []

        def factory() -> _ServerConnection:
            conn = _ServerConnection(self)
            connections.append(conn)
            return conn

        # Port 0 on loopback only: fixed ports collide on these machines.
        server = await self._loop.create_server(factory, "127.0.0.1", 0, backlog=1024)
        self.port = server.sockets[0].getsockname()[1]
        self._ready.set()
        await self._stop.wait()
        server.close()
        for conn in connections:
            conn.close()
            if conn.worker is not None:
                conn.worker.cancel()
        await server.wait_closed()


@contextlib.contextmanager
def running_faulty_server(*, idle_close_s: float | None = None) -> Iterator[FaultyServer]:
    server = FaultyServer(idle_close_s=idle_close_s)
    server.start()
    try:
        yield server
    finally:
        server.stop()
