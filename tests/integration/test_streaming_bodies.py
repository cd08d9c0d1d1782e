"""Large bodies stream through in bounded memory; a caller hanging up cancels Google's side."""

from __future__ import annotations

import hashlib
import time

import httpx

from tests.emulators.emulator_paths import expected_download_sha256
from tests.emulators.serve import ServerHandle
from tests.harness.processes import PeakRss, rss_mb

from .conftest import StartSidecar

SIZE = 100 * 1024 * 1024
GEN_PATH = "v1/projects/emu-project/locations/us-central1/publishers/google/models/gemini-2.5-flash:generateContent"


def test_100_mb_upload_streams_through_byte_exact(start: StartSidecar, emulator: ServerHandle) -> None:
    sidecar = start({"upstreams": {"aiplatform": f"{emulator.url}/_emulator/echo"},
                     "limits": {"max_body_bytes": 200 * 1024 * 1024}})
    block = bytes(range(256)) * 4096  # 1 MiB
    digest = hashlib.sha256()

    def body():
        for _ in range(SIZE // len(block)):
            digest.update(block)
            yield block

    baseline = rss_mb(sidecar.proc.pid)
    with PeakRss(sidecar.proc.pid) as rss:
        response = httpx.post(f"{sidecar.base_url}/{GEN_PATH}", content=body(), timeout=120)
    assert response.status_code == 200, response.text
    assert response.json()["body_length"] == SIZE
    assert response.json()["body_sha256"] == digest.hexdigest()
    assert rss.peak - baseline < 30, f"sidecar RSS grew {rss.peak - baseline:.1f} MB for a 100 MB upload"


def test_100_mb_download_streams_through_byte_exact(start: StartSidecar, emulator: ServerHandle) -> None:
    sidecar = start({"upstreams": {"aiplatform": f"{emulator.url}/_emulator/download"}})
    digest = hashlib.sha256()
    received = 0
    baseline = rss_mb(sidecar.proc.pid)
    with PeakRss(sidecar.proc.pid) as rss:
        with httpx.stream("GET", f"{sidecar.base_url}/{GEN_PATH}?bytes={SIZE}", timeout=120) as response:
            assert response.status_code == 200
            assert int(response.headers["content-length"]) == SIZE
            for chunk in response.iter_raw():
                digest.update(chunk)
                received += len(chunk)
    assert received == SIZE and digest.hexdigest() == expected_download_sha256(SIZE)
    assert rss.peak - baseline < 30, f"sidecar RSS grew {rss.peak - baseline:.1f} MB for a 100 MB download"


def test_caller_disconnect_cancels_the_upstream_request(start: StartSidecar, emulator: ServerHandle) -> None:
    sidecar = start({"upstreams": {"aiplatform": f"{emulator.url}/_emulator/download"}})
    vertex_state = emulator.app.state.vertex_app.state
    url = f"{sidecar.base_url}/{GEN_PATH}?bytes={50 * 1024 * 1024}&chunk_delay_s=0.05"
    with httpx.stream("GET", url, timeout=30) as response:
        chunks = response.iter_raw()  # kept: a dropped iterator makes httpcore close the connection
        next(chunks)
        assert getattr(vertex_state, "downloads_open", 0) == 1
    # The caller is gone: the sidecar must hang up on the upstream, not drain 50 MB.
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and vertex_state.downloads_open:
        time.sleep(0.02)
    assert vertex_state.downloads_open == 0
    assert getattr(vertex_state, "downloads_abandoned", 0) == 1
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and not sidecar.access_log():
        time.sleep(0.02)
    assert sidecar.access_log()[-1]["error"] == "CLIENT_DISCONNECTED"
    # ...and keeps serving.
    with httpx.stream("GET", f"{sidecar.base_url}/{GEN_PATH}?bytes=1000") as again:
        assert again.status_code == 200 and len(again.read()) == 1000


def test_upstream_breaking_mid_stream_truncates_the_callers_stream(start: StartSidecar) -> None:
    sidecar = start()
    url = (f"{sidecar.base_url}/v1/projects/emu-project/locations/us-central1/publishers/google/models/"
           "gemini-2.5-flash:streamGenerateContent?alt=sse")
    received = b""
    try:
        with httpx.stream("POST", url, json={"contents": [{"role": "user", "parts": [{"text": "a b c d e f"}]}]},
                          headers={"x-emulator-fail-after-chunks": "1", "x-emulator-chunks": "4"}) as response:
            for chunk in response.iter_raw():
                received += chunk
        truncated = False
    except httpx.RemoteProtocolError:
        truncated = True
    assert received.startswith(b"data: ")
    assert truncated, "a broken upstream stream must not look like a complete response"
    assert httpx.post(f"{sidecar.base_url}/{GEN_PATH}",
                      json={"contents": [{"role": "user", "parts": [{"text": "still alive"}]}]}).status_code == 200
