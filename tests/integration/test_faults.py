"""Bad input and faults: a misbehaving upstream and malformed callers.

Every request ends, within a deadline, in one of three ways the caller can tell apart:
a success, a Google-shaped error (`{"error": {"code", "message", "status"}}` with the HTTP
status), or — when the upstream broke a response that had already started — a visibly
truncated stream (the caller's HTTP client raises; it never looks like a clean end). And the
sidecar keeps serving, without leaking upstream sockets.

The upstream is `tests/emulators/faulty.py` (a raw asyncio server), chosen per request by the
model name (`fault-<name>`) or the `x-fault` header. The sidecar runs with the `client`
credential type, so no Google token is involved.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import socket
import time
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO, Literal

import httpx
import pytest

from tests.emulators.faulty import FaultyServer, running_faulty_server
from tests.harness.sidecar_process import SidecarProcess, start_sidecar
from vertex_sidecar.routing import Origin
from vertex_sidecar.upstream_client import UpstreamError, UpstreamPool

pytestmark = pytest.mark.timeout(60)

SLOW_FIRST_BYTE_S = 0.5  # the `slow` route's timeouts, kept short so slow faults are quick
SLOW_TOTAL_S = 1.5
DEFAULT_FIRST_BYTE_S = 3.0


# --------------------------------------------------------------------------- the rig


@dataclass
class Rig:
    faulty: FaultyServer
    sidecar: SidecarProcess

    @property
    def port(self) -> int:
        return int(self.sidecar.url.rsplit(":", 1)[1])

    def path(self, model: str, method: str = "generateContent", location: str = "us-central1") -> str:
        return f"/vertex_ai/v1/projects/emu-project/locations/{location}/publishers/google/models/{model}:{method}"

    def url(self, model: str, method: str = "generateContent", location: str = "us-central1") -> str:
        return self.sidecar.url + self.path(model, method, location)


def rig_config(faulty: FaultyServer, dead_port: int) -> dict[str, Any]:
    return {
        # `us`/`eu` go to a port nothing listens on: connection refused.
        "upstreams": {"aiplatform": faulty.url, "aiplatform_multiregion": f"http://127.0.0.1:{dead_port}"},
        "credentials": {"default": {"type": "client"}},
        "timeouts": {"connect": 1, "first_byte": DEFAULT_FIRST_BYTE_S, "total": 10},
        "limits": {"max_body_bytes": 1_000_000},
        "routes": [
            {"name": "slow", "match": {"models": ["fault-slow-*"]},
             "timeouts": {"first_byte": SLOW_FIRST_BYTE_S, "total": SLOW_TOTAL_S}},
            {"name": "everything"},
        ],
    }


@pytest.fixture(scope="module")
def dead_port() -> Iterator[int]:
    """A loopback port that refuses connections: bound (so nobody else takes it), never listening."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    yield sock.getsockname()[1]
    sock.close()


@pytest.fixture(scope="module")
def rig(tmp_path_factory: pytest.TempPathFactory, dead_port: int) -> Iterator[Rig]:
    """One faulty upstream and one sidecar for the module: each test checks deltas, not totals."""
    with running_faulty_server() as faulty:
        sidecar = start_sidecar(rig_config(faulty, dead_port), tmp_path_factory.mktemp("faults"))
        try:
            yield Rig(faulty, sidecar)
        finally:
            sidecar.terminate()


@pytest.fixture
def closing_rig(tmp_path: Path, dead_port: int) -> Iterator[Rig]:
    """An upstream that closes keep-alive connections after 0.3 s idle, as Google's front ends do."""
    with running_faulty_server(idle_close_s=0.3) as faulty:
        sidecar = start_sidecar(rig_config(faulty, dead_port), tmp_path)
        try:
            yield Rig(faulty, sidecar)
        finally:
            sidecar.terminate()


# --------------------------------------------------------------------------- outcomes


Kind = Literal["success", "error", "truncated"]


@dataclass
class Outcome:
    kind: Kind
    status: int
    body: bytes
    seconds: float

    def json(self) -> Any:
        return json.loads(self.body)


def classify(status: int, body: bytes, broken: bool, started: float) -> Outcome:
    seconds = time.monotonic() - started
    if broken:
        return Outcome("truncated", status, body, seconds)
    return Outcome("error" if status >= 400 else "success", status, body, seconds)


def call(url: str, *, headers: dict[str, str] | None = None, content: Any = b"{}", timeout: float = 10) -> Outcome:
    """POST and read the whole answer; a transport error after the headers means truncation."""
    started = time.monotonic()
    body = b""
    with httpx.stream("POST", url, content=content, headers=headers, timeout=timeout) as response:
        try:
            for chunk in response.iter_raw():
                body += chunk
        except (httpx.RemoteProtocolError, httpx.ReadError):
            return classify(response.status_code, body, True, started)
    return classify(response.status_code, body, False, started)


def assert_google_error(outcome: Outcome, code: int, status: str) -> str:
    assert outcome.kind == "error" and outcome.status == code, (outcome.kind, outcome.status, outcome.body[:300])
    error = outcome.json()["error"]
    assert error["code"] == code and error["status"] == status, error
    assert isinstance(error["message"], str) and error["message"]
    return error["message"]


def assert_serves(rig: Rig) -> None:
    """The sidecar is alive and answers a normal request normally."""
    assert rig.sidecar.proc.poll() is None, "the sidecar exited"
    outcome = call(rig.url("gemini-2.5-flash"), content=b'{"contents": []}')
    assert outcome.kind == "success" and outcome.status == 200, outcome
    assert outcome.json()["echo"]["body_length"] == len(b'{"contents": []}')


def log_entry(sidecar: SidecarProcess, request_id: str, timeout: float = 3.0) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for entry in sidecar.access_log():
            if entry["request_id"] == request_id:
                return entry
        time.sleep(0.02)
    raise AssertionError(f"no access log line for {request_id}")


def socket_count(pid: int) -> int:
    count = 0
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            if os.readlink(f"/proc/{pid}/fd/{fd}").startswith("socket:"):
                count += 1
        except OSError:
            pass  # closed while listing
    return count


def settled_socket_count(pid: int, quiet_s: float = 0.15, timeout: float = 2.0) -> int:
    """The socket count once it stops changing (a just-closed probe connection may still be
    on its way out)."""
    deadline = time.monotonic() + timeout
    count = socket_count(pid)
    while time.monotonic() < deadline:
        time.sleep(quiet_s)
        latest = socket_count(pid)
        if latest == count:
            break
        count = latest
    return count


def wait_until(predicate: Callable[[], bool], timeout: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.02)
    return predicate()


async def async_wait_until(predicate: Callable[[], bool], timeout: float = 3.0) -> bool:
    """`wait_until` for in-process tests: the event loop keeps running while it polls."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        await asyncio.sleep(0.01)
    return predicate()


# --------------------------------------------------------------------------- upstream faults


def test_connection_refused_is_503_unavailable(rig: Rig) -> None:
    outcome = call(rig.url("gemini-2.5-flash", location="us"))
    message = assert_google_error(outcome, 503, "UNAVAILABLE")
    assert "Connection refused" in message
    assert outcome.seconds < 1
    assert_serves(rig)


@pytest.mark.parametrize(("fault", "in_message"), [
    ("reset-before-headers", "closed the connection"),
    ("close-before-headers", "closed the connection"),
    ("huge-headers", "larger than 256 KiB"),
    ("garbage", "malformed HTTP response"),
])
def test_upstream_failing_before_headers_is_502(rig: Rig, fault: str, in_message: str) -> None:
    request_id = f"before-{fault}"
    outcome = call(rig.url(f"fault-{fault}"), headers={"x-request-id": request_id})
    assert in_message in assert_google_error(outcome, 502, "UNAVAILABLE")
    assert log_entry(rig.sidecar, request_id)["error"] == "UPSTREAM_FAILED"
    assert_serves(rig)


@pytest.mark.parametrize(("fault", "relayed"), [
    ("reset-mid-stream", b'data: {"candidates"'),  # two SSE events, then a TCP RST
    ("bad-chunk", b'data: {"candidates"'),  # one good chunk, then a chunk size that is not hex
    ("bad-chunk-first", b""),  # the bad chunk size came with the headers
    ("short-body", b'{"candida'),  # Content-Length: 1000, nine bytes, close
])
def test_upstream_breaking_after_headers_truncates_visibly(rig: Rig, fault: str, relayed: bytes) -> None:
    request_id = f"after-{fault}"
    outcome = call(rig.url(f"fault-{fault}"), headers={"x-request-id": request_id})
    assert outcome.kind == "truncated" and outcome.status == 200, outcome
    assert outcome.body.startswith(relayed)
    assert log_entry(rig.sidecar, request_id)["error"] == "UPSTREAM_STREAM_BROKEN"
    assert_serves(rig)


def test_slow_first_byte_is_504_after_the_routes_first_byte_timeout(rig: Rig) -> None:
    abandoned = rig.faulty.stats.abandoned
    outcome = call(rig.url("fault-slow-first-byte"), headers={"x-fault-delay": "5"})
    assert "timeouts.first_byte" in assert_google_error(outcome, 504, "DEADLINE_EXCEEDED")
    assert SLOW_FIRST_BYTE_S <= outcome.seconds < SLOW_FIRST_BYTE_S + 1
    # The sidecar hung up: Google stops working on a request nobody waits for.
    assert rig.faulty.wait_for(lambda stats: stats.abandoned > abandoned, 2)
    assert_serves(rig)


def test_slow_drip_is_relayed_as_it_comes_then_cut_at_the_total_timeout(rig: Rig) -> None:
    abandoned = rig.faulty.stats.abandoned
    started = time.monotonic()
    first_event_at = None
    body = b""
    broken = False
    with httpx.stream("POST", rig.url("fault-slow-drip", "streamGenerateContent?alt=sse"), content=b"{}",
                      timeout=10) as response:
        assert response.status_code == 200
        try:
            for chunk in response.iter_raw():
                if first_event_at is None:
                    first_event_at = time.monotonic() - started
                body += chunk
        except httpx.RemoteProtocolError:
            broken = True
    elapsed = time.monotonic() - started
    assert first_event_at is not None and first_event_at < 0.3, "events must be forwarded as they arrive"
    assert 3 <= body.count(b"data: ") < 50
    assert broken, "a stream cut by the total timeout must not look complete"
    assert SLOW_TOTAL_S <= elapsed < SLOW_TOTAL_S + 1
    assert rig.faulty.wait_for(lambda stats: stats.abandoned > abandoned, 2)
    assert_serves(rig)


def test_close_delimited_response_is_relayed_complete(rig: Rig) -> None:
    # HTTP/1.1 allows a body that ends when the server closes (no length, no chunking).
    outcome = call(rig.url("fault-close-delimited"))
    assert outcome.kind == "success" and outcome.status == 200, outcome
    assert outcome.json()["candidates"][0]["finishReason"] == "STOP"


def test_google_errors_are_relayed_untouched(rig: Rig) -> None:
    outcome = call(rig.url("fault-error-json"))
    assert_google_error(outcome, 429, "RESOURCE_EXHAUSTED")
    assert outcome.json()["error"]["message"] == "Resource exhausted (emulated)."


def test_upstream_trailers_never_become_response_headers(rig: Rig) -> None:
    """The `trailers` fault sends its body and trailer fields in one segment, so they are all
    parsed before the sidecar starts its answer; they must not join the header list."""
    for _ in range(2):  # a fresh, then a pooled connection
        response = httpx.post(rig.url("fault-trailers"), content=b"{}")
        assert response.status_code == 200 and response.json()["echo"]["body_length"] == 2
        assert not [name for name in response.headers if name.startswith("x-trailer-")], response.headers
    assert_serves(rig)


async def test_a_post_is_resent_when_nothing_of_it_was_written() -> None:
    """In process: a pooled connection whose transport is already closing when the request
    comes (the close was seen, its callback not yet run) gets nothing written, so the POST
    goes out once on a fresh connection."""
    with running_faulty_server() as faulty:
        pool = UpstreamPool()
        origin = Origin("http", "127.0.0.1", faulty.port)
        target = "/v1/projects/p/locations/us-central1/publishers/google/models/gemini:generateContent"
        try:
            await (await pool.request(origin, "POST", target, [], b"{}")).read()  # leaves one idle connection
            [idle] = pool._idle[origin]
            assert idle.transport is not None
            idle.transport.close()
            response = await pool.request(origin, "POST", target, [], b"{}")
            assert response.status == 200 and json.loads(await response.read())["echo"]["index_on_connection"] == 1
            assert faulty.stats.requests["ok"] == 2 and faulty.stats.connections == 2
        finally:
            await pool.aclose()


async def test_a_large_bytes_body_is_sent_whole_after_its_head() -> None:
    """In process, at the client's interface: a bytes body above the inline size (a trace
    export batch) is written after the head without being copied into it; on a kept-alive
    connection, byte for byte, followed by a small inline one."""
    with running_faulty_server() as faulty:
        pool = UpstreamPool()
        origin = Origin("http", "127.0.0.1", faulty.port)
        target = "/v1/projects/p/locations/us-central1/publishers/google/models/gemini:generateContent"
        large = bytes(range(256)) * 4096 + b"tail"  # 1 MiB and a bit: over any socket buffer's first send
        try:
            for body in (large, b"{}"):
                response = await pool.request(origin, "POST", target, [], body)
                echo = json.loads(await response.read())["echo"]
                assert response.status == 200 and echo["body_length"] == len(body)
                assert echo["body_sha256"] == hashlib.sha256(body).hexdigest()
            assert faulty.stats.connections == 1
        finally:
            await pool.aclose()


async def test_a_streamed_upload_must_match_its_declared_content_length() -> None:
    """In process, at the client's interface: fewer bytes than declared abort the upstream
    request (it must never look complete, nor wait for bytes that never come); more are
    refused before the excess is written (it would be read as the next request)."""
    with running_faulty_server() as faulty:
        pool = UpstreamPool()
        origin = Origin("http", "127.0.0.1", faulty.port)
        target = "/v1/projects/p/locations/us-central1/publishers/google/models/gemini:generateContent"

        async def body(sizes: list[int]) -> AsyncIterator[bytes]:
            for size in sizes:
                yield b"b" * size

        try:
            for sizes, declared, words in (([40, 30], 100, "fewer"), ([60, 60], 100, "more")):
                aborted, completed = faulty.stats.aborted_uploads, faulty.stats.completed_uploads
                with pytest.raises(UpstreamError, match=f"{words} bytes than"):
                    await pool.request(origin, "POST", target, [], body(sizes), content_length=declared,
                                       first_byte_timeout=5)
                assert await async_wait_until(lambda: faulty.stats.aborted_uploads == aborted + 1), words
                assert faulty.stats.completed_uploads == completed, words
            response = await pool.request(origin, "POST", target, [], body([60, 40]), content_length=100)
            assert response.status == 200 and json.loads(await response.read())["echo"]["body_length"] == 100
        finally:
            await pool.aclose()


def test_a_sent_post_is_never_replayed_when_a_pooled_connection_drops(rig: Rig) -> None:
    """`drop-on-reuse` reads the whole request, then closes without answering: Google may be
    running (and billing) the call, so a POST is not sent again (as Go's net/http: only a
    request nothing of which was written is retried). The caller gets a 502 to retry itself."""
    stats = rig.faulty.stats
    for content in (b"{}", None):  # small (kept for replay) and large (streamed)
        with httpx.Client() as client:
            assert client.post(rig.url("gemini-2.5-flash"), content=b"{}").status_code == 200  # a pooled connection
            dropped, answered = stats.requests["drop-on-reuse(dropped)"], stats.requests["drop-on-reuse"]
            body = content if content is not None else (b"x" * 65536 for _ in range(14))  # ~900 KB
            outcome = call(rig.url("fault-drop-on-reuse"), content=body)
        message = assert_google_error(outcome, 502, "UNAVAILABLE")
        assert "closed the connection" in message
        assert stats.requests["drop-on-reuse(dropped)"] == dropped + 1, "the pooled connection was not the one tried"
        assert stats.requests["drop-on-reuse"] == answered, "the POST reached the upstream a second time"
    assert_serves(rig)


def test_an_idempotent_get_dropped_on_a_pooled_connection_is_retried_on_a_fresh_one(rig: Rig) -> None:
    stats = rig.faulty.stats
    with httpx.Client() as client:
        assert client.post(rig.url("gemini-2.5-flash"), content=b"{}").status_code == 200  # leaves a pooled connection
        dropped = stats.requests["drop-on-reuse(dropped)"]
        response = client.get(rig.url("fault-drop-on-reuse"))
    assert response.status_code == 200, response.text
    assert stats.requests["drop-on-reuse(dropped)"] == dropped + 1, "the pooled connection was not the one tried"
    assert response.json()["echo"]["index_on_connection"] == 1  # answered on a fresh connection


def test_idle_connection_closed_by_the_upstream_is_dropped_and_replaced(closing_rig: Rig) -> None:
    rig, pid = closing_rig, closing_rig.sidecar.proc.pid
    baseline = settled_socket_count(pid)
    with httpx.Client() as client:
        first = client.post(rig.url("gemini-2.5-flash"), content=b"{}")
        assert first.status_code == 200 and first.json()["echo"]["index_on_connection"] == 1
        # The upstream hangs up on the idle pooled connection; the sidecar closes its end too,
        # leaving only the caller's keep-alive connection.
        assert rig.faulty.wait_for(lambda stats: stats.open_connections == 0)
        assert wait_until(lambda: socket_count(pid) == baseline + 1), (socket_count(pid), baseline)
        second = client.post(rig.url("gemini-2.5-flash"), content=b"{}")
    assert second.status_code == 200 and second.json()["echo"]["index_on_connection"] == 1
    assert rig.faulty.stats.connections == 2


async def test_pool_closes_connections_a_burst_left_behind() -> None:
    """In process: reuse is LIFO, so after a burst steady traffic never touches the older idle
    connections; the pool must still close them once they exceed its idle timeout."""
    with running_faulty_server() as faulty:  # never closes idle connections itself
        pool = UpstreamPool(idle_timeout_s=0.2)
        origin = Origin("http", "127.0.0.1", faulty.port)
        target = "/v1/projects/p/locations/us-central1/publishers/google/models/gemini:generateContent"

        async def one() -> None:
            response = await pool.request(origin, "POST", target, [(b"x-fault-hold", b"0.1")], b"{}")
            assert response.status == 200
            await response.read()

        try:
            await asyncio.gather(*(one() for _ in range(20)))
            assert pool.open_connections == 20
            deadline = time.monotonic() + 0.6
            while time.monotonic() < deadline:  # steady, one at a time
                await one()
            assert pool.open_connections <= 2
            assert faulty.wait_for(lambda stats: stats.open_connections <= 2, 2)
        finally:
            await pool.aclose()


# --------------------------------------------------------------------------- malformed callers


@dataclass
class RawResponse:
    version: bytes
    status: int
    headers: dict[str, str]
    body: bytes


def read_response(stream: BinaryIO) -> RawResponse:
    """One HTTP/1.x response from a socket file: Content-Length, chunked or close-delimited."""
    status_line = stream.readline()
    if not status_line:
        raise EOFError("the connection closed before a response")
    version, status = status_line.split(b" ", 2)[:2]
    headers: dict[str, str] = {}
    while (line := stream.readline()) not in (b"\r\n", b""):
        name, _, value = line.decode("latin-1").partition(":")
        headers[name.strip().lower()] = value.strip()
    code = int(status)
    if 100 <= code < 200 or code in (204, 304):
        body = b""
    elif "content-length" in headers:
        body = stream.read(int(headers["content-length"]))
    elif headers.get("transfer-encoding") == "chunked":
        body = b""
        while (size := int(stream.readline().split(b";")[0], 16)) > 0:
            body += stream.read(size)
            stream.readline()
        stream.readline()
    else:
        body = stream.read()
    return RawResponse(version, code, headers, body)


def raw_error(response: RawResponse) -> dict[str, Any]:
    """The Google error in a raw response, checked for shape."""
    error = json.loads(response.body)["error"]
    assert error["code"] == response.status and error["status"] and error["message"], error
    return error


def raw_connection(rig: Rig) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", rig.port))
    sock.settimeout(5)  # nothing in these tests may hang
    return sock


def raw_exchange(rig: Rig, request: bytes) -> RawResponse:
    with raw_connection(rig) as sock, sock.makefile("rb") as stream:
        sock.sendall(request)
        return read_response(stream)


def request_bytes(method: str, path: str, body: bytes = b"", *, version: str = "HTTP/1.1",
                  headers: list[tuple[str, str]] | None = None, content_length: int | None = None) -> bytes:
    """A request's bytes; `content_length` may announce more than `body` (the rest sent later)."""
    lines = [f"{method} {path} {version}", "host: 127.0.0.1"]
    lines += [f"{name}: {value}" for name, value in headers or []]
    if method == "POST":
        lines.append(f"content-length: {len(body) if content_length is None else content_length}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body


def test_invalid_percent_encoding_is_refused_and_never_forwarded(rig: Rig) -> None:
    """A `%` that starts no valid escape, or an escape left in a model name, is refused with
    400 INVALID_PATH (see the README's "Request paths and policy"), in the model as in the
    location; nothing reaches an upstream."""
    seen = rig.faulty.stats.total_requests()
    for path in (rig.path("gem%ZZini"), rig.path("gem%"), rig.path("gem%FF%FEini"),
                 rig.path("m", location="us-central1%ZZ")):
        response = raw_exchange(rig, request_bytes("POST", path, b"{}"))
        assert response.status == 400 and response.headers["content-type"].startswith("application/json"), path
        assert raw_error(response)["status"] == "INVALID_ARGUMENT"
    assert rig.faulty.stats.total_requests() == seen, "a bad path must never reach an upstream"
    # An escaped unreserved character is the same name: forwarded decoded.
    response = raw_exchange(rig, request_bytes("POST", rig.path("gem%69ni"), b"{}"))
    assert response.status == 200
    assert rig.faulty.stats.paths[-1] == rig.path("gemini").removeprefix("/vertex_ai")
    assert_serves(rig)


def test_a_10000_character_path_is_relayed(rig: Rig) -> None:
    model = "m" * 10_000
    response = raw_exchange(rig, request_bytes("POST", rig.path(model), b"{}"))
    assert response.status == 200
    assert rig.faulty.stats.paths[-1].endswith(f"/models/{model}:generateContent")
    assert_serves(rig)


def test_header_and_target_sizes_are_bounded_with_431_and_414(rig: Rig) -> None:
    seen = rig.faulty.stats.total_requests()
    # Up to the bounds (64 KiB of header fields, a 32 KiB target), relayed; Google judges.
    response = raw_exchange(rig, request_bytes("POST", rig.path("gemini-2.5-flash"), b"{}",
                                               headers=[("x-big", "a" * 60_000)]))
    assert response.status == 200 and json.loads(response.body)["echo"]["header_bytes"] > 60_000
    for headers in ([("x-big", "a" * 100 * 1024)], [(f"x-many-{i}", "m" * 1000) for i in range(70)]):
        response = raw_exchange(rig, request_bytes("POST", rig.path("gemini-2.5-flash"), b"{}", headers=headers))
        assert response.status == 431 and response.headers["connection"] == "close"
        assert raw_error(response)["status"] == "INVALID_ARGUMENT"
        assert "64 KiB" in raw_error(response)["message"]
    response = raw_exchange(rig, request_bytes("POST", rig.path("m" * 33_000), b"{}"))
    assert response.status == 414 and "32 KiB" in raw_error(response)["message"]
    assert rig.faulty.stats.total_requests() == seen + 1, "a refused request must never reach an upstream"
    # The admin listener has the same bounds.
    admin = httpx.get(rig.sidecar.admin_url + "/healthz", headers={"x-big": "a" * 100 * 1024})
    assert admin.status_code == 431 and admin.json()["error"]["code"] == 431
    assert httpx.get(rig.sidecar.admin_url + "/healthz?" + "q" * 33_000).status_code == 414
    assert_serves(rig)


def test_a_64_mib_header_is_refused_without_being_buffered(rig: Rig) -> None:
    """The refusal comes once the bound is passed, not after the sidecar took it all: the
    caller's send fails long before 64 MiB are out (what is out sits in socket buffers)."""
    total, piece, sent = 64 * 1024 * 1024, b"h" * 65536, 0
    with raw_connection(rig) as sock, sock.makefile("rb") as stream:
        sock.sendall(f"POST {rig.path('gemini-2.5-flash')} HTTP/1.1\r\nhost: x\r\nx-huge: ".encode())
        try:
            while sent < total:
                sock.sendall(piece)
                sent += len(piece)
        except (BrokenPipeError, ConnectionResetError):
            pass
        response = read_response(stream)
    assert response.status == 431, response
    assert raw_error(response)["details"][0]["reason"] == "HEADERS_TOO_LARGE"
    assert sent < total // 4, sent
    assert_serves(rig)


def test_caller_trailers_are_not_forwarded_as_headers(rig: Rig) -> None:
    head = (f"POST {rig.path('gemini-2.5-flash')} HTTP/1.1\r\nhost: x\r\ntransfer-encoding: chunked\r\n"
            "trailer: x-sneaky\r\n\r\n")
    response = raw_exchange(rig, head.encode() + b"2\r\n{}\r\n0\r\nx-sneaky: yes\r\n\r\n")  # one segment
    assert response.status == 200
    echo = json.loads(response.body)["echo"]
    assert echo["body_length"] == 2 and "x-sneaky" not in echo["header_names"], echo["header_names"]


def test_garbage_from_the_caller_gets_400_and_the_sidecar_carries_on(rig: Rig) -> None:
    response = raw_exchange(rig, b"\x16\x03\x01\x02\x00garbage\r\n\r\n")
    assert response.status == 400
    assert_serves(rig)


def test_http_1_0_requests(rig: Rig) -> None:
    response = raw_exchange(rig, request_bytes("POST", rig.path("gemini-2.5-flash"), b"{}", version="HTTP/1.0"))
    assert response.status == 200 and response.headers["connection"] == "close"
    assert response.headers["content-length"] == str(len(response.body))
    assert json.loads(response.body)["echo"]["body_length"] == 2

    # A stream to an HTTP/1.0 caller: complete, then the connection closes. (uvicorn's httptools
    # protocol frames it chunked even for HTTP/1.0 — read_response copes either way.)
    response = raw_exchange(rig, request_bytes("POST", rig.path("gemini-2.5-flash", "streamGenerateContent?alt=sse"),
                                               b"{}", version="HTTP/1.0"))
    assert response.status == 200 and response.body.count(b"data: ") == 3
    assert b'"finishReason":"STOP"' in response.body

    # No Host header at all (legal in HTTP/1.0): the sidecar sets its own upstream Host.
    response = raw_exchange(rig, f"GET {rig.path('gemini-2.5-flash')} HTTP/1.0\r\n\r\n".encode())
    assert response.status == 200

    # The sidecar's own errors reach an HTTP/1.0 caller too.
    response = raw_exchange(rig, request_bytes("POST", rig.path("m", location="nowhere"), b"{}", version="HTTP/1.0"))
    assert response.status == 400 and raw_error(response)["status"] == "INVALID_ARGUMENT"


def test_expect_100_continue(rig: Rig) -> None:
    body = os.urandom(200_000)
    with raw_connection(rig) as sock, sock.makefile("rb") as stream:
        sock.sendall(request_bytes("POST", rig.path("gemini-2.5-flash"), headers=[("expect", "100-continue")],
                                   content_length=len(body)))
        # httpx/curl wait for this before sending the body.
        assert read_response(stream).status == 100
        sock.sendall(body)
        response = read_response(stream)
    echo = json.loads(response.body)["echo"]
    assert response.status == 200 and echo["body_length"] == len(body)
    assert echo["body_sha256"] == hashlib.sha256(body).hexdigest()
    assert "expect" not in echo["header_names"], "the sidecar answers 100-continue itself; Google must not wait"

    # Refused up front: the final status comes without a 100, and the body is never needed.
    with raw_connection(rig) as sock, sock.makefile("rb") as stream:
        sock.sendall(request_bytes("POST", rig.path("gemini-2.5-flash"), headers=[("expect", "100-continue")],
                                   content_length=5_000_000))
        response = read_response(stream)
    assert response.status == 413
    assert raw_error(response)["status"] == "INVALID_ARGUMENT"


@pytest.mark.parametrize("framing", ["content-length", "chunked", "content-length-tiny"])
def test_upload_cut_short_by_the_caller_is_aborted_upstream(rig: Rig, framing: str) -> None:
    """The two large cases (300+ KB, beyond what the sidecar buffers for replay) are streamed
    upstream as they arrive; the tiny one is buffered and never sent. Either way the upstream
    never sees a shortened request that looks complete."""
    stats = rig.faulty.stats
    aborted, completed = stats.aborted_uploads, stats.completed_uploads
    request_id = f"cut-{framing}"
    head = f"POST {rig.path('gemini-2.5-flash')} HTTP/1.1\r\nhost: x\r\nx-request-id: {request_id}\r\n"
    if framing == "content-length":
        data = (head + "content-length: 900000\r\n\r\n").encode() + b"y" * 300_000
    elif framing == "chunked":  # six 64 KiB chunks and no terminating zero-size chunk
        data = (head + "transfer-encoding: chunked\r\n\r\n").encode()
        data += b"".join(b"10000\r\n" + b"z" * 65536 + b"\r\n" for _ in range(6))
    else:
        data = (head + "content-length: 900\r\n\r\n").encode() + b"y" * 300
    started = stats.started_requests
    with raw_connection(rig) as sock:
        sock.sendall(data)
        if framing != "content-length-tiny":
            # The upload is under way upstream before the caller vanishes.
            assert rig.faulty.wait_for(lambda s: s.started_requests > started, 2)
    assert log_entry(rig.sidecar, request_id)["error"] == "CLIENT_DISCONNECTED"
    if framing != "content-length-tiny":
        assert rig.faulty.wait_for(lambda s: s.aborted_uploads == aborted + 1, 3), "the upstream must see an abort"
    # Never a shortened request that looks complete.
    assert stats.completed_uploads == completed
    assert_serves(rig)


def test_pipelined_requests_are_answered_in_order(rig: Rig) -> None:
    requests = b"".join(
        request_bytes("POST", rig.path("gemini-2.5-flash"), b'{"n": %d}' % i,
                      headers=[("x-request-id", f"pipe-{i}")] + ([("connection", "close")] if i == 3 else []))
        for i in range(4)
    )
    with raw_connection(rig) as sock, sock.makefile("rb") as stream:
        sock.sendall(requests)  # all four in one write
        responses = [read_response(stream) for _ in range(4)]
        assert stream.read() == b""  # and nothing more: the last asked to close
    for i, response in enumerate(responses):
        assert response.status == 200 and response.headers["x-request-id"] == f"pipe-{i}"
        assert json.loads(response.body)["echo"]["request_id"] == f"pipe-{i}"


def test_caller_leaving_before_the_upstream_answers_cancels_the_upstream_request(rig: Rig) -> None:
    abandoned = rig.faulty.stats.abandoned
    with pytest.raises(httpx.TimeoutException):
        httpx.post(rig.url("gemini-2.5-flash"), content=b"{}",
                   headers={"x-fault": "slow-first-byte", "x-fault-delay": "5"}, timeout=0.2)
    # Well before the sidecar's own first-byte timeout (3 s), Google's work must be cancelled.
    assert rig.faulty.wait_for(lambda stats: stats.abandoned > abandoned, 1.0)


def large_upload() -> Iterator[bytes]:
    """~900 KB: beyond the replay buffer, so the proxy streams it upstream as it arrives."""
    for _ in range(14):
        yield b"u" * 65536


def test_caller_leaving_after_a_large_upload_cancels_the_upstream_request(rig: Rig) -> None:
    stats = rig.faulty.stats
    abandoned, completed = stats.abandoned, stats.completed_uploads
    with pytest.raises(httpx.TimeoutException):
        httpx.post(rig.url("gemini-2.5-flash"), content=large_upload(),
                   headers={"x-fault": "slow-first-byte", "x-fault-delay": "5"}, timeout=0.5)
    assert stats.completed_uploads == completed + 1  # the upload was whole; Google is "generating"
    # Well before the sidecar's own first-byte timeout (3 s), Google's work must be cancelled.
    assert rig.faulty.wait_for(lambda stats: stats.abandoned > abandoned, 1.5)

    # And while a stream is being relayed: the caller reads one event and hangs up.
    abandoned = stats.abandoned
    with httpx.stream("POST", rig.url("gemini-2.5-flash", "streamGenerateContent?alt=sse"), content=large_upload(),
                      headers={"x-fault": "slow-drip", "x-fault-interval": "0.2"}, timeout=5) as response:
        assert response.status_code == 200
        assert next(response.iter_raw())
    assert rig.faulty.wait_for(lambda stats: stats.abandoned > abandoned, 1.5), "the stream ran on without a reader"
    assert_serves(rig)


# --------------------------------------------------------------------------- the storm


@dataclass(frozen=True)
class StormCase:
    name: str
    model: str
    expect: Kind
    status: int
    method: str = "generateContent"
    location: str = "us-central1"
    headers: tuple[tuple[str, str], ...] = ()


STORM_CASES = [
    StormCase("ok", "gemini-2.5-flash", "success", 200),
    StormCase("ok-sse", "gemini-2.5-flash", "success", 200, "streamGenerateContent?alt=sse"),
    StormCase("paced-stream", "gemini-2.5-flash", "success", 200, "streamGenerateContent?alt=sse",
              headers=(("x-fault", "stream"), ("x-fault-chunks", "6"), ("x-fault-interval", "0.05"))),
    StormCase("ok-again", "gemini-2.5-pro", "success", 200),
    StormCase("drop-on-reuse", "fault-drop-on-reuse", "success", 200),
    StormCase("close-delimited", "fault-close-delimited", "success", 200),
    StormCase("refused", "gemini-2.5-flash", "error", 503, location="us"),
    StormCase("reset-before-headers", "fault-reset-before-headers", "error", 502),
    StormCase("close-before-headers", "fault-close-before-headers", "error", 502),
    StormCase("huge-headers", "fault-huge-headers", "error", 502),
    StormCase("garbage", "fault-garbage", "error", 502),
    StormCase("slow-first-byte", "fault-slow-first-byte", "error", 504),
    StormCase("error-json", "fault-error-json", "error", 429),
    StormCase("reset-mid-stream", "fault-reset-mid-stream", "truncated", 200),
    StormCase("slow-drip", "fault-slow-drip", "truncated", 200, "streamGenerateContent?alt=sse",
              headers=(("x-fault-hold", "0"),)),  # its headers must beat the 0.5 s first-byte timeout
    StormCase("bad-chunk", "fault-bad-chunk", "truncated", 200),
    StormCase("bad-chunk-first", "fault-bad-chunk-first", "truncated", 200),
    StormCase("short-body", "fault-short-body", "truncated", 200),
]
STORM_SIZE = 200
STORM_DEADLINE_S = 8.0  # per request; the slowest expected case (slow-drip) ends at SLOW_TOTAL_S


async def storm_call(client: httpx.AsyncClient, rig: Rig, case: StormCase, index: int) -> Outcome | str:
    """One request of the storm; a string describes a lost or hung request."""
    # Every request first waits 0.4 s upstream, so all of them are in flight together.
    headers = {"x-request-id": f"storm-{index}", "x-fault-hold": "0.4", **dict(case.headers)}
    started = time.monotonic()

    async def run() -> Outcome:
        body = b""
        async with client.stream("POST", rig.url(case.model, case.method, case.location), content=b"{}",
                                 headers=headers) as response:
            try:
                async for chunk in response.aiter_raw():
                    body += chunk
            except (httpx.RemoteProtocolError, httpx.ReadError):
                return classify(response.status_code, body, True, started)
        return classify(response.status_code, body, False, started)

    try:
        return await asyncio.wait_for(run(), STORM_DEADLINE_S)
    except asyncio.TimeoutError:
        return f"storm-{index} ({case.name}) hung for {STORM_DEADLINE_S} s"
    except httpx.HTTPError as exc:
        return f"storm-{index} ({case.name}) lost: {type(exc).__name__}: {exc}"


def check_storm_outcome(case: StormCase, outcome: Outcome) -> str | None:
    if outcome.kind != case.expect or outcome.status != case.status:
        return f"{case.name}: expected {case.expect} {case.status}, got {outcome.kind} {outcome.status} {outcome.body[:120]!r}"
    if outcome.kind == "error":
        try:
            error = outcome.json()["error"]
        except (ValueError, KeyError):
            return f"{case.name}: not a Google error: {outcome.body[:120]!r}"
        if error.get("code") != outcome.status or not error.get("status") or not error.get("message"):
            return f"{case.name}: malformed Google error {error}"
    if outcome.kind == "success" and b"STOP" not in outcome.body:
        return f"{case.name}: incomplete success body {outcome.body[-120:]!r}"
    return None


def test_storm_of_200_concurrent_requests_with_faults(closing_rig: Rig) -> None:
    rig, pid = closing_rig, closing_rig.sidecar.proc.pid
    baseline = settled_socket_count(pid)
    cases = [STORM_CASES[i % len(STORM_CASES)] for i in range(STORM_SIZE)]

    async def storm() -> list[Outcome | str]:
        limits = httpx.Limits(max_connections=STORM_SIZE + 10, max_keepalive_connections=STORM_SIZE + 10)
        async with httpx.AsyncClient(limits=limits, timeout=STORM_DEADLINE_S + 2) as client:
            return await asyncio.gather(*(storm_call(client, rig, case, i) for i, case in enumerate(cases)))

    started = time.monotonic()
    outcomes = asyncio.run(storm())
    elapsed = time.monotonic() - started

    checked = [outcome if isinstance(outcome, str) else check_storm_outcome(case, outcome)
               for case, outcome in zip(cases, outcomes)]
    problems = [problem for problem in checked if problem]
    assert not problems, f"{len(problems)} of {STORM_SIZE} requests went wrong:\n" + "\n".join(problems[:20])
    assert elapsed < STORM_DEADLINE_S
    # The requests really were held at once (everything but the refused ones reached the upstream).
    assert rig.faulty.stats.max_open_connections >= 150, rig.faulty.stats.max_open_connections

    # The sidecar accounted for every one of them...
    storm_ids = {f"storm-{i}" for i in range(STORM_SIZE)}
    assert wait_until(lambda: storm_ids <= {e["request_id"] for e in rig.sidecar.access_log()}, 3), \
        "a storm request is missing from the access log"
    # ...still serves normally...
    for _ in range(10):
        assert_serves(rig)
    # ...and every socket of the storm is gone once things are idle: the broken upstream
    # connections (some still held open by the server), the callers', and the pooled ones.
    assert rig.faulty.wait_for(lambda stats: stats.open_connections == 0, 5), rig.faulty.stats.open_connections
    assert wait_until(lambda: socket_count(pid) <= baseline, 5), (socket_count(pid), baseline)
