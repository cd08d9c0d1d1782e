"""Startup, readiness, token refresh, credentials, and graceful shutdown of the real process."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx

from tests.emulators.oauth import make_service_account_key
from tests.emulators.serve import ServerHandle
from tests.harness.sidecar_process import start_sidecar

from .conftest import StartSidecar, adc_env, upstreams_for

GEN_PATH = "v1/projects/emu-project/locations/us-central1/publishers/google/models/gemini-2.5-flash"
PROMPT = {"contents": [{"role": "user", "parts": [{"text": "ping"}]}]}


def vertex_calls(emulator: ServerHandle) -> list[dict]:
    return [r for r in emulator.app.state.requests if "/projects/" in r["path"]]


def test_bad_config_exits_2_naming_the_field(tmp_path: Path) -> None:
    config = tmp_path / "bad.yaml"
    config.write_text("routes:\n  - name: a\n    limits: {requests_per_minute: lots}\n")
    result = subprocess.run([sys.executable, "-m", "vertex_sidecar", "--config", str(config)],
                            capture_output=True, text=True, timeout=30)
    assert result.returncode == 2
    assert "routes[0].limits.requests_per_minute: expected a positive integer, got 'lots'" in result.stderr
    check = subprocess.run([sys.executable, "-m", "vertex_sidecar", "--config", str(config), "--check-config"],
                           capture_output=True, text=True, timeout=30)
    assert check.returncode == 2


def test_not_ready_until_the_first_token_then_ready(start: StartSidecar, emulator: ServerHandle) -> None:
    metadata = emulator.app.state.metadata_app.state
    metadata.fail_tokens = True
    sidecar = start({"defaults": {"project": "emu-project", "location": "us-central1"}}, wait_ready=False)
    time.sleep(1.0)
    readyz = httpx.get(f"{sidecar.admin_url}/readyz")
    assert readyz.status_code == 503
    assert "default" in readyz.json()["waiting_for_credentials"]
    assert httpx.get(f"{sidecar.admin_url}/healthz").status_code == 200
    response = httpx.post(f"{sidecar.base_url}/{GEN_PATH}:generateContent", json=PROMPT, timeout=30)
    assert response.status_code == 503
    error = response.json()["error"]
    assert error["status"] == "UNAVAILABLE" and "access token" in error["message"]
    assert "ya29" not in response.text
    assert not vertex_calls(emulator), "nothing may be sent without a token"
    metadata.fail_tokens = False  # the metadata server comes up, as on a fresh GKE pod
    sidecar.wait_ready(timeout=30)
    assert httpx.post(f"{sidecar.base_url}/{GEN_PATH}:generateContent", json=PROMPT).status_code == 200


def test_short_lived_tokens_are_refreshed_ahead_of_expiry(start: StartSidecar, emulator: ServerHandle) -> None:
    # Tokens far shorter than the fixed margins (300 s ahead, 30 s minimum): the margins scale
    # to the lifetime, so the sidecar is ready and every request succeeds across refreshes.
    metadata = emulator.app.state.metadata_app.state
    metadata.token_lifetime_s = 2
    metadata.token_reuse_min_remaining_s = 3600  # always mint: every refresh yields a new token
    sidecar = start()
    tokens, statuses = set(), []
    deadline = time.monotonic() + 5
    with httpx.Client() as client:
        while time.monotonic() < deadline:
            statuses.append(client.post(f"{sidecar.base_url}/{GEN_PATH}:generateContent", json=PROMPT).status_code)
            tokens.add(vertex_calls(emulator)[-1]["headers"]["authorization"])
    assert set(statuses) == {200}, "a request failed while the short-lived token was refreshed"
    assert len(tokens) >= 3, "the sidecar kept using a token that was about to expire"
    assert metadata.token_requests < len(statuses) / 2, "refreshes must be single-flight, not one per request"


def test_token_refused_by_google_is_refreshed_and_retried_once(start: StartSidecar, emulator: ServerHandle) -> None:
    sidecar = start()
    assert httpx.post(f"{sidecar.base_url}/{GEN_PATH}:generateContent", json=PROMPT).status_code == 200
    emulator.app.state.registry.revoke_all()  # e.g. the token was revoked
    response = httpx.post(f"{sidecar.base_url}/{GEN_PATH}:generateContent", json=PROMPT)
    assert response.status_code == 200, response.text
    statuses = [r.get("status") for r in vertex_calls(emulator)[-2:]]
    assert statuses == [401, 200]
    metrics = httpx.get(f"{sidecar.admin_url}/metrics").text
    assert 'reason="token_refused"' in metrics


def test_service_account_key_file(tmp_path: Path, start: StartSidecar, emulator: ServerHandle) -> None:
    key = tmp_path / "key.json"
    make_service_account_key(f"{emulator.url}/token", key, keys=emulator.app.state.keys,
                             client_email="vertex-caller@emu-project.iam.gserviceaccount.com")
    sidecar = start({"credentials": {"default": {"type": "service_account_file", "path": str(key)}}},
                    env={"GCE_METADATA_HOST": "127.0.0.1:9", "GCE_METADATA_IP": "127.0.0.1:9"})
    assert httpx.post(f"{sidecar.base_url}/{GEN_PATH}:generateContent", json=PROMPT).status_code == 200
    assert vertex_calls(emulator)[-1]["auth_subject"] == "vertex-caller@emu-project.iam.gserviceaccount.com"
    assert emulator.app.state.oauth_app.state.token_requests == 1


def test_sigterm_drains_in_flight_streams(tmp_path: Path, emulator: ServerHandle) -> None:
    sidecar = start_sidecar({"upstreams": upstreams_for(emulator), "drain_seconds": 10}, tmp_path,
                            env=adc_env(emulator))
    received: list[bytes] = []
    done = threading.Event()

    def stream() -> None:
        long_prompt = {"contents": [{"role": "user", "parts": [{"text": "one two three four five six"}]}]}
        with httpx.stream("POST", f"{sidecar.base_url}/{GEN_PATH}:streamGenerateContent?alt=sse", json=long_prompt,
                          headers={"x-emulator-chunk-delay": "0.4", "x-emulator-chunks": "5"}, timeout=30) as r:
            for chunk in r.iter_raw():
                received.append(chunk)
        done.set()

    thread = threading.Thread(target=stream)
    thread.start()
    deadline = time.monotonic() + 10
    while not received and time.monotonic() < deadline:
        time.sleep(0.01)
    assert received, "the stream did not start"
    sidecar.proc.send_signal(signal.SIGTERM)
    time.sleep(0.3)
    readyz = httpx.get(f"{sidecar.admin_url}/readyz")
    assert readyz.status_code == 503 and readyz.json()["draining"] is True
    try:
        httpx.post(f"{sidecar.base_url}/{GEN_PATH}:generateContent", json=PROMPT, timeout=2)
        accepted_new = True
    except httpx.HTTPError:
        accepted_new = False
    assert not accepted_new, "a draining sidecar must stop accepting connections"
    thread.join(20)
    assert done.is_set()
    body = b"".join(received)
    assert body.count(b"data: ") == 5 and b'"finishReason"' in body, "the in-flight stream must finish completely"
    assert sidecar.proc.wait(20) == 0
    logged = [json.loads(line) for line in sidecar.stdout_lines if '"request_id"' in line]
    assert logged and logged[-1]["status"] == 200
