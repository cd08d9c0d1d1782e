"""No token or key material ever leaves the sidecar in a log line, a metric or an error body.

One sidecar exercises every credential path against the emulators — ADC through the
metadata server, a service-account key (JWT grant), a broken key, the caller's own token
(`client`), a revoked token (401 → refresh → retry), caller keys, policy refusals, Live API
sessions (relayed, and refused by Google with 401) — and everything it printed or answered
is searched for the tokens the emulators issued, the key files' material, the JWT grants and
the caller's secrets. Zero hits.
"""

from __future__ import annotations

import asyncio
import json
import secrets
import time
from pathlib import Path
from typing import Any

import httpx
import pytest
import websockets
from websockets.exceptions import ConnectionClosed

from tests.emulators.live import create_live_app
from tests.emulators.oauth import make_service_account_key
from tests.emulators.serve import create_combined_app, running_server
from tests.emulators.tokens import TOKEN_PREFIX
from tests.harness.sidecar_process import start_sidecar
from vertex_sidecar.callerkeys import hash_key

from .conftest import adc_env, upstreams_for

PROJECT, LOCATION = "emu-project", "us-central1"
GEMINI = "publishers/google/models/gemini-2.5-flash"
CLAUDE = "publishers/anthropic/models/claude-sonnet-4-5@20250929"
PROMPT = {"contents": [{"role": "user", "parts": [{"text": "tell me a secret"}]}]}
CLAUDE_BODY = {"anthropic_version": "vertex-2023-10-16", "max_tokens": 16,
               "messages": [{"role": "user", "content": "tell me a secret"}]}


def key_fragments(info: dict[str, str]) -> list[str]:
    """Pieces of a service-account key that must never be printed: its id and every PEM line."""
    lines = [line for line in info["private_key"].splitlines() if line and not line.startswith("-----")]
    return [info["private_key_id"], *lines]


def find_leaks(texts: dict[str, str], needles: list[str]) -> list[str]:
    return [f"{needle[:16]}... in {where}" for where, text in texts.items() for needle in needles if needle in text]


async def live_sessions(base_url: str, headers: dict[str, str], knobs: Any) -> list[int]:
    """A relayed Live turn, then a session Google refuses twice with 401 (the sidecar refreshes once)."""
    url = base_url.replace("http://", "ws://", 1) + "/vertex_ai/live"
    setup = json.dumps({"setup": {"model": "gemini-live-2.5-flash", "generationConfig": {"responseModalities": ["TEXT"]}}})
    closes = []
    async with websockets.connect(url, additional_headers=headers) as ws:
        await ws.send(setup)
        await ws.recv()
        await ws.send(json.dumps({"realtimeInput": {"text": "tell me a secret"}}))
        while b"turnComplete" not in await asyncio.wait_for(ws.recv(), 10):  # type: ignore[operator]
            pass
    closes.append(ws.close_code or 0)
    knobs.refuse_next.extend([401, 401])
    async with websockets.connect(url, additional_headers=headers) as ws:
        await ws.send(setup)
        with pytest.raises(ConnectionClosed):
            await asyncio.wait_for(ws.recv(), 10)
    closes.append(ws.close_code or 0)
    return closes


def test_no_secrets_in_logs_metrics_or_error_bodies(tmp_path: Path) -> None:
    with running_server(create_live_app(fallback=create_combined_app(project_id=PROJECT))) as emulator:
        state = emulator.app.state
        token_uri = f"{emulator.url}/token"
        good_key = make_service_account_key(token_uri, tmp_path / "sa.json", keys=state.keys)
        broken_key = make_service_account_key(token_uri, tmp_path / "broken.json", keys=state.keys)
        state.keys.remove(broken_key["private_key_id"])  # deleted in IAM: every grant it signs is refused
        caller_token, _ = state.registry.issue("caller@example.com", 3600)
        caller_key = "vsk-" + secrets.token_urlsafe(24)
        wrong_key = "vsk-" + secrets.token_urlsafe(24)
        api_key = "AIza" + secrets.token_urlsafe(30)
        stray_bearer = "stray-" + secrets.token_urlsafe(24)
        (tmp_path / "caller-keys.txt").write_text(f"app: {hash_key(caller_key)}\n")

        sidecar = start_sidecar({
            "upstreams": upstreams_for(emulator),
            "defaults": {"project": PROJECT, "location": LOCATION},
            "credentials": {
                "default": {"type": "adc"},
                "sa": {"type": "service_account_file", "path": str(tmp_path / "sa.json")},
                "broken": {"type": "service_account_file", "path": str(tmp_path / "broken.json")},
                "byo": {"type": "client"},
            },
            "routes": [
                {"name": "byo", "match": {"projects": ["byo-project"]}, "credential": "byo"},
                {"name": "broken", "match": {"projects": ["broken-project"]}, "credential": "broken"},
                {"name": "gemini", "match": {"models": ["gemini-*"]}, "credential": "default"},
                {"name": "claude", "match": {"models": ["claude-*"]}, "credential": "sa"},
            ],
            "caller_keys": {"file": str(tmp_path / "caller-keys.txt")},
            "metrics": {"header_labels": {"x-team": "team"}},
        }, tmp_path, env=adc_env(emulator), wait_ready=False)
        try:
            # Ready except for the broken credential, which keeps failing (and says why in /readyz).
            deadline = time.monotonic() + 30
            while True:
                readyz = httpx.get(f"{sidecar.admin_url}/readyz")
                waiting = readyz.json().get("waiting_for_credentials", {}) if readyz.status_code == 503 else {}
                if set(waiting) == {"broken"} and "no token yet" not in waiting["broken"]:
                    break
                assert time.monotonic() < deadline, readyz.text
                time.sleep(0.05)

            base = f"{sidecar.base_url}/v1/projects/{PROJECT}/locations/{LOCATION}"
            key = {"x-vertex-sidecar-key": caller_key}
            answers: list[httpx.Response] = []
            with httpx.Client(timeout=30) as client:
                def call(url: str, body: dict[str, Any], expect: int, headers: dict[str, str] | None = None) -> None:
                    response = client.post(url, json=body, headers={**key, **(headers or {})})
                    assert response.status_code == expect, response.text
                    answers.append(response)

                call(f"{base}/{GEMINI}:generateContent", PROMPT, 200,
                     {"authorization": f"Bearer {stray_bearer}", "x-goog-api-key": api_key, "x-team": "a",
                      "tags": "leak-test"})
                call(f"{base}/{GEMINI}:streamGenerateContent?alt=sse", PROMPT, 200)
                call(f"{base}/{CLAUDE}:rawPredict", CLAUDE_BODY, 200)
                byo = f"{sidecar.base_url}/v1/projects/byo-project/locations/{LOCATION}/{GEMINI}:generateContent"
                call(byo, PROMPT, 200, {"authorization": f"Bearer {caller_token}"})
                call(byo, PROMPT, 401, {"authorization": f"Bearer {TOKEN_PREFIX}not-a-real-token"})
                broken = f"{sidecar.base_url}/v1/projects/broken-project/locations/{LOCATION}/{GEMINI}:generateContent"
                call(broken, PROMPT, 503)
                state.registry.revoke_all()  # Google refuses the cached token: refreshed, retried once
                call(f"{base}/{GEMINI}:generateContent", PROMPT, 200)
                call(f"{base}/publishers/google/models/text-bison:predict", {"instances": []}, 403)
                call(f"{base}/{GEMINI}:generateContent", PROMPT, 401, {"x-vertex-sidecar-key": wrong_key})
                call(f"{base}/{GEMINI}:generateContent", PROMPT, 401, {"x-vertex-sidecar-key": ""})
                live_closes = asyncio.run(live_sessions(sidecar.url, {
                    **key, "authorization": f"Bearer {stray_bearer}", "x-goog-api-key": api_key}, state.live))
                assert live_closes == [1000, 1011]
                metrics = client.get(f"{sidecar.admin_url}/metrics").text
                readyz_body = client.get(f"{sidecar.admin_url}/readyz").text
        finally:
            sidecar.terminate()
        time.sleep(0.2)  # the pump threads drain what the process wrote before it exited

        issued = {value.removeprefix("Bearer ") for entry in state.requests
                  for name, value in entry["header_list"] if name == "authorization"}
        assert any(token.startswith(TOKEN_PREFIX) for token in issued), "the emulator saw no sidecar token"
        texts = {
            "stdout": "\n".join(sidecar.stdout_lines),
            "stderr": "\n".join(sidecar.stderr_lines),
            "metrics": metrics,
            "readyz": readyz_body,
            **{f"answer {i} ({r.status_code})": r.text + json.dumps(dict(r.headers)) for i, r in enumerate(answers)},
        }
        needles = [
            TOKEN_PREFIX, "ya29.", *sorted(issued), caller_token,  # access tokens
            *key_fragments(good_key), *key_fragments(broken_key), "PRIVATE KEY",  # key files
            "eyJhbGci",  # the start of every JWT grant's header
            caller_key, wrong_key, api_key, stray_bearer,  # the caller's secrets
        ]
        assert not find_leaks(texts, needles)

        # The checks looked at real output: every request was logged, metrics and errors were there.
        assert len(sidecar.access_log()) == len(answers) + len(live_closes)
        assert state.live.sessions[0].headers["authorization"].startswith("Bearer " + TOKEN_PREFIX)
        forwarded = json.dumps([session.headers for session in state.live.sessions])  # what Google saw
        assert not find_leaks({"Live handshake": forwarded}, [caller_key, api_key, stray_bearer])
        assert "vertex_sidecar_requests_total" in metrics and 'credential="broken",result="failure"' in metrics
        assert "Invalid JWT Signature" in readyz_body  # the reason is shown, the grant is not
        assert all(r.json()["error"]["message"] for r in answers if r.status_code >= 400)
