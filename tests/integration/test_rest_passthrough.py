"""The REST pass-through end to end with httpx: headers, bodies, streaming, hosts, errors."""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import time

import httpx
import pytest

from tests.emulators.serve import ServerHandle
from tests.harness.sidecar_process import SidecarProcess

from .conftest import StartSidecar

GEN = "publishers/google/models/gemini-2.5-flash"
PROMPT = {"contents": [{"role": "user", "parts": [{"text": "the quick brown fox"}]}]}


def gen_url(sidecar: SidecarProcess, location: str = "us-central1", method: str = "generateContent",
            version: str = "v1") -> str:
    return f"{sidecar.base_url}/{version}/projects/emu-project/locations/{location}/{GEN}:{method}"


def echo_sidecar(start: StartSidecar, emulator: ServerHandle) -> SidecarProcess:
    """A sidecar whose upstream is the emulator's echo endpoint: it answers with what arrived."""
    echo = f"{emulator.url}/_emulator/echo"
    return start({"upstreams": {"aiplatform": echo, "aiplatform_global": echo, "aiplatform_multiregion": echo}})


def assert_google_error(response: httpx.Response, code: int, status: str) -> dict:
    assert response.status_code == code, response.text
    error = response.json()["error"]
    assert error["code"] == code and error["status"] == status and error["message"]
    return error


def test_header_hygiene_and_exact_query(start: StartSidecar, emulator: ServerHandle) -> None:
    sidecar = echo_sidecar(start, emulator)
    body = os.urandom(4096)  # not even JSON: forwarded untouched, Google would answer it
    response = httpx.post(
        gen_url(sidecar) + "?alt=sse&key=1&key=2&x=%2F%20",
        content=body,
        headers={
            "authorization": "Bearer caller-own-token",
            "x-goog-api-key": "AIza-caller-key",
            "x-goog-request-params": "model=gemini",
            "anthropic-beta": "prompt-caching-2024-07-31",
            "connection": "keep-alive, x-hop-header",
            "x-hop-header": "must-not-pass",
            "keep-alive": "timeout=5",
            "te": "trailers",
            "content-type": "application/octet-stream",
        },
    )
    assert response.status_code == 200, response.text
    seen = response.json()
    headers = seen["headers"]
    assert headers["authorization"].startswith("Bearer ya29.")
    assert "caller-own-token" not in json.dumps(seen)
    assert "x-goog-api-key" not in headers
    for hop in ("x-hop-header", "keep-alive", "te", "transfer-encoding"):
        assert hop not in headers
    assert headers["x-goog-request-params"] == "model=gemini"
    assert headers["anthropic-beta"] == "prompt-caching-2024-07-31"
    assert seen["query_string"] == "alt=sse&key=1&key=2&x=%2F%20"
    assert seen["body_sha256"] == hashlib.sha256(body).hexdigest() and seen["body_length"] == len(body)
    assert seen["path"].endswith(f"/v1/projects/emu-project/locations/us-central1/{GEN}:generateContent")
    assert response.headers["x-request-id"]


def test_request_id_is_honoured(sidecar: SidecarProcess) -> None:
    response = httpx.post(gen_url(sidecar), json=PROMPT, headers={"x-request-id": "req-123"})
    assert response.headers["x-request-id"] == "req-123"
    assert any(entry["request_id"] == "req-123" for entry in wait_for_log(sidecar, 1))


@pytest.mark.parametrize(("location", "host"), [
    ("us-central1", "us-central1-aiplatform.googleapis.com"),
    ("europe-west4", "europe-west4-aiplatform.googleapis.com"),
    ("global", "aiplatform.googleapis.com"),
    ("us", "aiplatform.us.rep.googleapis.com"),
    ("eu", "aiplatform.eu.rep.googleapis.com"),
])
def test_host_table(sidecar: SidecarProcess, emulator: ServerHandle, location: str, host: str) -> None:
    response = httpx.post(gen_url(sidecar, location), json=PROMPT)
    assert response.status_code == 200, response.text
    assert emulator.app.state.requests[-1]["upstream_host"] == host


def test_discovery_engine_search(sidecar: SidecarProcess, emulator: ServerHandle) -> None:
    path = ("v1/projects/emu-project/locations/global/collections/default_collection/engines/my-engine/"
            "servingConfigs/default_search:search")
    response = httpx.post(f"{sidecar.base_url}/discovery/{path}", json={"query": "sidecars", "pageSize": 3})
    assert response.status_code == 200, response.text
    assert "results" in response.json()
    assert emulator.app.state.requests[-1]["upstream_host"] == "discoveryengine.googleapis.com"
    response = httpx.post(f"{sidecar.base_url}/discovery/{path.replace('global', 'eu')}", json={"query": "x"})
    assert emulator.app.state.requests[-1]["upstream_host"] == "eu-discoveryengine.googleapis.com"


@pytest.mark.parametrize("location", [
    "evil.com", "us-central1.evil.com", "us-central1:443", "user@us-central1", "US-CENTRAL1",
    "us-central1%2F..%2F", "%2575s-central1", "localhost", "127.0.0.1", "metadata.google.internal",
])
def test_ssrf_attempts_never_leave_the_sidecar(sidecar: SidecarProcess, emulator: ServerHandle,
                                               location: str) -> None:
    before = len(emulator.app.state.requests)
    response = httpx.post(gen_url(sidecar, location), json=PROMPT)
    error = assert_google_error(response, 400, "INVALID_ARGUMENT")
    assert "location" in error["message"] or "path" in error["message"]
    assert len(emulator.app.state.requests) == before


def test_unknown_path_and_missing_defaults(start: StartSidecar) -> None:
    sidecar = start()  # no defaults configured
    assert_google_error(httpx.get(f"{sidecar.url}/not-vertex"), 404, "NOT_FOUND")
    response = httpx.post(f"{sidecar.base_url}/v1/{GEN}:generateContent", json=PROMPT)
    error = assert_google_error(response, 400, "INVALID_ARGUMENT")
    assert "defaults.project" in error["message"] and "defaults.location" in error["message"]


def test_alias_prefix_and_versions(sidecar: SidecarProcess, emulator: ServerHandle) -> None:
    url = gen_url(sidecar, version="v1beta1").replace("/vertex_ai/", "/vertex-ai/")
    assert httpx.post(url, json=PROMPT).status_code == 200
    assert emulator.app.state.requests[-1]["path"].startswith("/v1beta1/projects/emu-project/")


def test_sse_chunks_are_forwarded_as_they_arrive(sidecar: SidecarProcess) -> None:
    arrivals: list[float] = []
    started = time.perf_counter()
    with httpx.stream("POST", gen_url(sidecar, method="streamGenerateContent") + "?alt=sse", json=PROMPT,
                      headers={"x-emulator-chunk-delay": "0.3", "x-emulator-chunks": "4"}) as response:
        assert response.headers["content-type"].startswith("text/event-stream")
        assert response.headers["x-accel-buffering"] == "no"
        for chunk in response.iter_raw():
            if chunk:
                arrivals.append(time.perf_counter() - started)
    assert len(arrivals) >= 4
    # Four chunks 0.3 s apart: a buffering proxy would deliver everything at the end.
    assert arrivals[-1] - arrivals[0] > 0.6


def test_json_array_stream_is_byte_identical_to_direct(sidecar: SidecarProcess, emulator: ServerHandle) -> None:
    direct = httpx.post(f"{emulator.url}/v1/projects/emu-project/locations/us-central1/{GEN}:streamGenerateContent",
                        json=PROMPT, headers={"authorization": f"Bearer {mint_token(emulator)}"})
    via = httpx.post(gen_url(sidecar, method="streamGenerateContent"), json=PROMPT)
    assert via.status_code == direct.status_code == 200
    assert via.content.startswith(b"[{") and via.content.endswith(b"\n]")
    assert strip_ids(via.content) == strip_ids(direct.content)


def test_gzip_passes_through_untouched(sidecar: SidecarProcess) -> None:
    with httpx.stream("POST", gen_url(sidecar), json=PROMPT,
                      headers={"accept-encoding": "gzip", "x-emulator-gzip": "1"}) as response:
        raw = b"".join(response.iter_raw())  # the bytes on the wire, not decoded by httpx
    assert response.headers["content-encoding"] == "gzip"
    # Still Google's compressed body, byte for byte: gzip framing and its own length.
    assert raw[:2] == b"\x1f\x8b" and int(response.headers["content-length"]) == len(raw)
    assert json.loads(gzip.decompress(raw))["candidates"]


def test_upstream_errors_are_relayed_unchanged(sidecar: SidecarProcess, emulator: ServerHandle) -> None:
    for code in (400, 403, 429, 503):
        path = f"v1/projects/emu-project/locations/us-central1/publishers/google/models/error-{code}:generateContent"
        direct = httpx.post(f"{emulator.url}/{path}", json=PROMPT,
                            headers={"authorization": f"Bearer {mint_token(emulator)}"})
        via = httpx.post(f"{sidecar.base_url}/{path}", json=PROMPT)
        assert via.status_code == direct.status_code == code
        assert via.json() == direct.json()
        assert "x-vertex-sidecar-error" not in via.headers


def test_upstream_unreachable_is_503(start: StartSidecar) -> None:
    closed = f"http://127.0.0.1:{free_port()}"
    sidecar = start({"upstreams": {"aiplatform": closed}})
    error = assert_google_error(httpx.post(gen_url(sidecar), json=PROMPT), 503, "UNAVAILABLE")
    assert "unreachable" in error["message"]


def test_upstream_timeout_is_504(start: StartSidecar) -> None:
    sidecar = start({"timeouts": {"first_byte": 0.5}})
    response = httpx.post(gen_url(sidecar), json=PROMPT, headers={"x-emulator-first-byte-delay": "3"}, timeout=10)
    error = assert_google_error(response, 504, "DEADLINE_EXCEEDED")
    assert "timeouts.first_byte" in error["message"]


def test_body_limit_is_413_before_forwarding(start: StartSidecar, emulator: ServerHandle) -> None:
    sidecar = start({"limits": {"max_body_bytes": 1000}})
    before = len(emulator.app.state.requests)
    assert_google_error(httpx.post(gen_url(sidecar), content=b"x" * 5000), 413, "INVALID_ARGUMENT")

    def chunks():  # no content-length: the limit is enforced while streaming
        for _ in range(10):
            yield b"y" * 500

    assert_google_error(httpx.post(gen_url(sidecar), content=chunks()), 413, "INVALID_ARGUMENT")
    assert len(emulator.app.state.requests) == before


def test_bad_json_is_forwarded_for_google_to_answer(sidecar: SidecarProcess) -> None:
    response = httpx.post(gen_url(sidecar), content=b'{"contents": [', headers={"content-type": "application/json"})
    error = assert_google_error(response, 400, "INVALID_ARGUMENT")
    assert "x-vertex-sidecar-error" not in response.headers
    assert error["message"]


def test_methods_other_than_post(sidecar: SidecarProcess) -> None:
    response = httpx.get(f"{sidecar.base_url}/v1/projects/emu-project/locations/us-central1/operations/op-1")
    assert response.status_code == 200 and response.json()["name"].endswith("operations/op-1")


# ------------------------------------------------------------------ helpers


def wait_for_log(sidecar: SidecarProcess, count: int, timeout: float = 5.0) -> list[dict]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        entries = sidecar.access_log()
        if len(entries) >= count:
            return entries
        time.sleep(0.02)
    raise AssertionError(f"expected {count} access log lines, got {sidecar.access_log()}")


def mint_token(emulator: ServerHandle) -> str:
    token, _ = emulator.app.state.registry.issue("direct-test", 600)
    return token


def strip_ids(body: bytes) -> bytes:
    """Response ids and timestamps differ per call; everything else must match byte for byte."""
    import re

    return re.sub(rb'"(responseId|createTime)": ?"[^"]*"', b"", body)


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]
