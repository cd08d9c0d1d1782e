"""`vertex-sidecar --wait-ready` / `--linger`: the lifecycle hooks of a regular (non-native)
sidecar container, run as the kubelet runs them (a process; exit code)."""

from __future__ import annotations

import http.server
import subprocess
import sys
import threading
import time
from typing import Iterator

import pytest


class Readiness(http.server.BaseHTTPRequestHandler):
    ready_after = 3  # answers 503 this many times first
    calls = 0

    def do_GET(self) -> None:  # noqa: N802 - http.server's naming
        type(self).calls += 1
        self.send_response(200 if type(self).calls > type(self).ready_after else 503)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, *_: object) -> None:
        pass


@pytest.fixture()
def readiness() -> Iterator[str]:
    Readiness.calls = 0
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Readiness)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}/readyz"
    server.shutdown()
    server.server_close()


def hook(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "vertex_sidecar", *args], capture_output=True, text=True, timeout=60)


def test_wait_ready_returns_once_the_sidecar_answers(readiness: str) -> None:
    result = hook("--wait-ready", readiness, "--wait-timeout", "30")
    assert result.returncode == 0, result.stdout + result.stderr
    assert Readiness.calls == Readiness.ready_after + 1


def test_wait_ready_fails_after_its_timeout() -> None:
    result = hook("--wait-ready", "http://127.0.0.1:9/readyz", "--wait-timeout", "0.5")
    assert result.returncode == 1 and "not ready after" in result.stdout


def test_linger_keeps_the_container_alive_for_a_while() -> None:
    started = time.monotonic()
    assert hook("--linger", "0.3").returncode == 0
    assert time.monotonic() - started >= 0.3
