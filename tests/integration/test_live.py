"""The Live API relay end to end: real clients → the real sidecar process → the Live emulator.

Two real clients: google-genai's `client.aio.live.connect` on the sidecar's TLS listener
(trusting it through SSL_CERT_FILE only), and a plain `websockets` client.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import time
from pathlib import Path
from typing import Any, Callable, Iterator

import httpx
import pytest
import websockets
from google import genai
from google.genai import types
from google.oauth2.credentials import Credentials
from websockets.asyncio.client import ClientConnection
from websockets.exceptions import ConnectionClosed

from tests.emulators.faulty import running_faulty_server
from tests.emulators.live import LiveKnobs, LiveSessionRecord, create_live_app
from tests.emulators.serve import ServerHandle, create_combined_app, running_server
from tests.harness.sidecar_process import SidecarProcess
from vertex_sidecar.callerkeys import hash_key

from .conftest import StartSidecar

PLACEHOLDER = "placeholder-app-token"
MODEL = "gemini-live-2.5-flash"
DEFAULTS = {"project": "emu-project", "location": "us-central1"}
TEXT_SETUP = {"setup": {"model": MODEL, "generationConfig": {"responseModalities": ["TEXT"]}}}


@pytest.fixture
def emulator() -> Iterator[ServerHandle]:
    """The combined emulator (metadata, OAuth, Vertex REST) with the Live endpoint in front, one port."""
    combined = create_combined_app(project_id="emu-project")
    app = create_live_app(fallback=combined)
    with running_server(app) as handle:
        yield handle


def knobs(emulator: ServerHandle) -> LiveKnobs:
    return emulator.app.state.live


def sessions(emulator: ServerHandle) -> list[LiveSessionRecord]:
    return list(knobs(emulator).sessions)


def ws_url(sidecar: SidecarProcess, query: str = "") -> str:
    return sidecar.url.replace("http://", "ws://", 1) + "/vertex_ai/live" + (f"?{query}" if query else "")


def tls_address(sidecar: SidecarProcess) -> str:
    for line in sidecar.stderr_lines:
        match = re.search(r"TLS listener on (\S+);", line)
        if match:
            return match.group(1)
    raise AssertionError("the sidecar did not log its TLS listener")


def wait_until(predicate: Callable[[], Any], timeout: float = 5.0, what: str = "condition") -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.02)
    raise AssertionError(f"timed out waiting for {what}")


async def async_wait_until(predicate: Callable[[], Any], timeout: float = 5.0, what: str = "condition") -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        await asyncio.sleep(0.02)
    raise AssertionError(f"timed out waiting for {what}")


def live_log_lines(sidecar: SidecarProcess) -> list[dict[str, Any]]:
    return [e for e in sidecar.access_log() if e.get("operation") == "BidiGenerateContent"]


def open_fds(sidecar: SidecarProcess) -> int:
    return len(os.listdir(f"/proc/{sidecar.proc.pid}/fd"))


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


async def one_turn(ws: ClientConnection, text: str) -> list[str | bytes]:
    await ws.send(json.dumps({"clientContent": {"turns": [{"role": "user", "parts": [{"text": text}]}],
                                                "turnComplete": True}}))
    frames: list[str | bytes] = []
    while True:
        frame = await asyncio.wait_for(ws.recv(), 5)
        frames.append(frame)
        if b'"turnComplete"' in (frame.encode() if isinstance(frame, str) else frame):
            return frames


async def closed_with(ws: ClientConnection) -> tuple[int | None, str]:
    with pytest.raises(ConnectionClosed):
        while True:
            await asyncio.wait_for(ws.recv(), 10)
    assert ws.close_code is not None
    return ws.close_code, ws.close_reason or ""


# --------------------------------------------------------------------------- google-genai


async def test_genai_sdk_live_and_rest_over_tls_with_only_ssl_cert_file(
        start: StartSidecar, emulator: ServerHandle, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    bundle = tmp_path / "shared" / "ca-bundle.pem"  # what the operator shares through a volume
    sidecar = start({"defaults": DEFAULTS, "tls_listen": "127.0.0.1:0",
                     "tls": {"state_dir": str(tmp_path / "tls-state"), "ca_bundle_path": str(bundle)}})
    assert bundle.exists() and (tmp_path / "tls-state" / "tls.key").stat().st_mode & 0o777 == 0o600
    monkeypatch.setenv("SSL_CERT_FILE", str(bundle))  # the only app-side change
    client = genai.Client(vertexai=True, project="emu-project", location="us-central1",
                          credentials=Credentials(token=PLACEHOLDER),
                          http_options=types.HttpOptions(base_url=f"https://{tls_address(sidecar)}/vertex_ai"))

    config = types.LiveConnectConfig(response_modalities=[types.Modality.TEXT])
    async with client.aio.live.connect(model=MODEL, config=config) as session:
        await session.send_client_content(
            turns=types.Content(role="user", parts=[types.Part(text="hello over tls")]), turn_complete=True)
        text, usage = "", None
        async for message in session.receive():
            text += message.text or ""
            usage = message.usage_metadata or usage
        assert "hello over tls" in text
        assert usage is not None and usage.prompt_token_count == 3 and usage.response_token_count

        await session.send_realtime_input(text="second turn")
        text = ""
        async for message in session.receive():
            text += message.text or ""
        assert "second turn" in text

    record = wait_until(lambda: next((s for s in sessions(emulator) if s.ended), None), what="upstream session end")
    assert record.version == "v1beta1" and record.setup is not None  # the SDK's default API version travels
    assert record.upstream_host == "us-central1-aiplatform.googleapis.com"
    assert record.setup["setup"]["model"] == (
        f"projects/emu-project/locations/us-central1/publishers/google/models/{MODEL}")
    assert record.headers["authorization"].startswith("Bearer ya29.")
    assert PLACEHOLDER not in json.dumps(record.headers)
    assert record.turns == 2 and record.client_close is not None and record.client_close[0] == 1000

    # Usage is accounted per turn, and the session gets one access-log line with the totals.
    entry = wait_until(lambda: live_log_lines(sidecar), what="the session's log line")[-1]
    assert entry["status"] == 101 and entry["route"] == "default" and entry["model"] == MODEL
    assert entry["live"]["turns"] == 2 and entry["live"]["ended_by"] == "client"
    assert entry["tokens"]["input_tokens"] > 0 and entry["tokens"]["output_tokens"] > 0
    # The Live model is not in the pricing table: cost 0 is marked unpriced, as on REST lines.
    assert entry["cost_usd"] == 0 and entry["pricing"] == "unknown"
    metrics = httpx.get(f"{sidecar.admin_url}/metrics").text
    assert re.search(r'vertex_sidecar_live_turns(_total)?\{model="[^"]+",route="default"\} 2\.0', metrics)
    assert 'vertex_sidecar_live_sessions{route="default"} 0.0' in metrics

    # REST works on the TLS listener too, with the same client.
    response = await client.aio.models.generate_content(model="gemini-2.5-flash", contents="rest over tls")
    assert "rest over tls" in (response.text or "")


# ------------------------------------------------------------------------ plain websockets


async def test_plain_client_setup_completion_and_byte_for_byte_relay(
        start: StartSidecar, emulator: ServerHandle) -> None:
    sidecar = start({
        "defaults": DEFAULTS,
        "routes": [{"name": "live", "match": {"projects": ["emu-project"], "models": ["gemini-live-*"]},
                    "quota_project": "billing-proj", "defaults": {"location": "europe-west4"}}],
    })
    fds_before = open_fds(sidecar)
    headers = {"Authorization": "Bearer app-secret", "x-goog-api-client": "test-client/1.0"}
    async with websockets.connect(ws_url(sidecar, "vertex_location=europe-west1"), additional_headers=headers) as ws:
        await ws.send(json.dumps({"setup": {"model": MODEL, "generationConfig": {"responseModalities": ["TEXT"]}}}))
        assert await ws.recv() == b'{"setupComplete":{}}'  # binary upstream → binary to the caller
        frames = await one_turn(ws, "relay me")
        last = frames[-1]
        assert all(isinstance(f, bytes) for f in frames) and isinstance(last, bytes)
        assert last.startswith(b'{"serverContent":{"turnComplete":true},"usageMetadata":')
        # Caller → Google: text and binary frames arrive exactly as sent.
        odd = '{ "realtimeInput" :{"text":"spaced   out"} }'
        await ws.send(odd)
        await ws.recv()
        assert sessions(emulator)[-1].last_message == odd
        raw = b'{"clientContent": {"turns": [], "turnComplete": false}}'
        await ws.send(raw)
        await async_wait_until(lambda: sessions(emulator)[-1].last_message == raw, what="binary frame upstream")

    record = sessions(emulator)[-1]
    assert record.upstream_host == "europe-west1-aiplatform.googleapis.com"  # the query's location
    assert record.version == "v1" and record.setup is not None
    assert record.setup["setup"]["model"] == f"projects/emu-project/locations/europe-west1/publishers/google/models/{MODEL}"
    assert record.headers["authorization"].startswith("Bearer ya29.")  # the caller's token never travels
    assert record.headers["x-goog-user-project"] == "billing-proj"
    assert record.headers["x-goog-api-client"] == "test-client/1.0"

    knobs(emulator).text_frames = True  # text upstream → text to the caller
    async with websockets.connect(ws_url(sidecar)) as ws:
        await ws.send(json.dumps(TEXT_SETUP))
        assert await ws.recv() == '{"setupComplete":{}}'
        assert all(isinstance(f, str) for f in await one_turn(ws, "as text"))
    assert sessions(emulator)[-1].upstream_host == "europe-west4-aiplatform.googleapis.com"  # route default

    # Nothing leaks: every socket the sessions opened is closed again.
    wait_until(lambda: open_fds(sidecar) <= fds_before, what=f"fds back to {fds_before}")
    wait_until(lambda: knobs(emulator).open_sessions == 0, what="upstream sessions closed")


async def test_refusals_close_with_a_code_and_reason(start: StartSidecar, emulator: ServerHandle) -> None:
    sidecar = start({
        "defaults": DEFAULTS,
        "routes": [{"name": "live", "match": {"models": ["gemini-live-*"]}}],
    })
    cases: list[tuple[Any, int, str]] = [
        ({"setup": {"model": "gemini-1.5-pro"}}, 1008, "gemini-1.5-pro in emu-project/us-central1 is not allowed"),
        ({"clientContent": {}}, 1007, "setup"),
        ({"setup": {"model": "projects/x/locations/evil.example.com/publishers/google/models/m"}}, 1007,
         "not a valid location"),
    ]
    for first, code, words in cases:
        async with websockets.connect(ws_url(sidecar)) as ws:
            await ws.send(json.dumps(first))
            close_code, reason = await closed_with(ws)
            assert (close_code, words in reason) == (code, True), reason
    assert not sessions(emulator), "refused sessions never reach Google"

    # Google refuses the handshake: the caller is told what happened.
    for status, code, words in [(403, 1008, "HTTP 403 PERMISSION_DENIED"), (404, 1008, "HTTP 404 NOT_FOUND"),
                                (429, 1013, "HTTP 429")]:
        knobs(emulator).refuse_next.append(status)
        async with websockets.connect(ws_url(sidecar)) as ws:
            await ws.send(json.dumps(TEXT_SETUP))
            close_code, reason = await closed_with(ws)
            assert close_code == code and words in reason, reason

    # A 401 is retried once with a fresh token; twice is the sidecar's credential problem.
    knobs(emulator).refuse_next.append(401)
    async with websockets.connect(ws_url(sidecar)) as ws:
        await ws.send(json.dumps(TEXT_SETUP))
        assert await ws.recv() == b'{"setupComplete":{}}'
    knobs(emulator).refuse_next.extend([401, 401])
    async with websockets.connect(ws_url(sidecar)) as ws:
        await ws.send(json.dumps(TEXT_SETUP))
        close_code, reason = await closed_with(ws)
        assert close_code == 1011 and "credentials" in reason

    # Not a Live path: the handshake itself is refused, in Google's error shape.
    with pytest.raises(websockets.exceptions.InvalidStatus) as info:
        async with websockets.connect(sidecar.url.replace("http", "ws") + "/vertex_ai/nope"):
            pass
    assert info.value.response.status_code == 404 and b"/vertex_ai/live" in (info.value.response.body or b"")


async def test_a_redirected_handshake_is_never_followed(start: StartSidecar, emulator: ServerHandle) -> None:
    """Following a redirect would send the sidecar's Bearer token (same origin) or the call
    (anywhere) where Google did not serve it: the caller is told, nothing is sent."""
    sidecar = start({"defaults": DEFAULTS, "routes": [{"name": "live", "match": {"models": ["gemini-live-*"]}}]})
    same_origin = emulator.url.replace("http", "ws", 1) + "/ws/google.cloud.aiplatform.v1.LlmBidiService/BidiGenerateContent"
    with running_faulty_server() as elsewhere:
        for location in (f"ws://127.0.0.1:{elsewhere.port}/collect", same_origin):
            knobs(emulator).redirect_next.append(location)
            async with websockets.connect(ws_url(sidecar)) as ws:
                await ws.send(json.dumps(TEXT_SETUP))
                close_code, reason = await closed_with(ws)
            assert close_code == 1014 and "HTTP 302" in reason and "redirect" in reason, (close_code, reason)
        assert elsewhere.stats.connections == 0, "the redirect was followed to another server"
    # The emulator saw the two redirected handshakes and no third one: nothing came back.
    assert len(sessions(emulator)) == 2, "the redirect was followed back to the emulator"


async def test_caller_key_checked_at_the_handshake_and_never_forwarded(
        start: StartSidecar, emulator: ServerHandle, tmp_path: Path) -> None:
    keys = tmp_path / "caller-keys"
    keys.write_text(f"team-a: {hash_key('s3cret-key')}\n")
    sidecar = start({"defaults": DEFAULTS, "caller_keys": {"file": str(keys)}})
    with pytest.raises(websockets.exceptions.InvalidStatus) as info:
        async with websockets.connect(ws_url(sidecar)):
            pass
    assert info.value.response.status_code == 401
    assert b"x-vertex-sidecar-key" in (info.value.response.body or b"")
    async with websockets.connect(ws_url(sidecar), additional_headers={"x-vertex-sidecar-key": "s3cret-key"}) as ws:
        await ws.send(json.dumps(TEXT_SETUP))
        assert await ws.recv() == b'{"setupComplete":{}}'
    assert "x-vertex-sidecar-key" not in sessions(emulator)[-1].headers
    entries = wait_until(lambda: live_log_lines(sidecar) if len(live_log_lines(sidecar)) == 2 else None,
                         what="two log lines")
    assert entries[0]["status"] == 401 and entries[1]["caller"] == "team-a"


async def test_client_credential_mode_forwards_the_callers_token(start: StartSidecar, emulator: ServerHandle) -> None:
    token, _ = emulator.app.state.registry.issue("app@emu-project.iam.gserviceaccount.com", 3600,
                                                 ["https://www.googleapis.com/auth/cloud-platform"])
    sidecar = start({"defaults": DEFAULTS, "credentials": {"mine": {"type": "client"}},
                     "routes": [{"name": "own-token", "credential": "mine"}]})
    async with websockets.connect(ws_url(sidecar), additional_headers={"Authorization": f"Bearer {token}"}) as ws:
        await ws.send(json.dumps(TEXT_SETUP))
        assert await ws.recv() == b'{"setupComplete":{}}'
    assert sessions(emulator)[-1].headers["authorization"] == f"Bearer {token}"


async def test_credentials_unavailable_close_1011(start: StartSidecar, emulator: ServerHandle,
                                                  tmp_path: Path) -> None:
    sidecar = start({"defaults": DEFAULTS, "credentials": {
        "team": {"type": "service_account_file", "path": str(tmp_path / "missing-key.json")}},
        "routes": [{"name": "team", "credential": "team"}]}, wait_ready=False)
    async with websockets.connect(ws_url(sidecar)) as ws:
        await ws.send(json.dumps(TEXT_SETUP))
        close_code, reason = await closed_with(ws)
    assert close_code == 1011 and "no Google credentials" in reason
    assert not sessions(emulator)


async def test_close_codes_and_go_away_relayed_both_ways(start: StartSidecar, emulator: ServerHandle) -> None:
    sidecar = start({"defaults": DEFAULTS})
    async with websockets.connect(ws_url(sidecar)) as ws:  # caller → Google
        await ws.send(json.dumps(TEXT_SETUP))
        await ws.recv()
        await ws.close(4001, "bye from the caller")
    record = wait_until(lambda: sessions(emulator)[-1].client_close and sessions(emulator)[-1],
                        what="the caller's close upstream")
    assert record.client_close == (4001, "bye from the caller")

    knobs(emulator).close_after_turns = (1, 4002, "bye from google")  # Google → caller
    async with websockets.connect(ws_url(sidecar)) as ws:
        await ws.send(json.dumps(TEXT_SETUP))
        await ws.recv()
        await one_turn(ws, "one turn")
        assert await closed_with(ws) == (4002, "bye from google")

    knobs(emulator).close_after_turns = None
    knobs(emulator).go_away_after_s, knobs(emulator).go_away_time_left_s = 0.1, 0.2
    async with websockets.connect(ws_url(sidecar)) as ws:
        await ws.send(json.dumps(TEXT_SETUP))
        await ws.recv()
        assert json.loads(await asyncio.wait_for(ws.recv(), 5)) == {"goAway": {"timeLeft": "0.2s"}}
        assert await closed_with(ws) == (1000, "Session duration limit reached.")
    entry = wait_until(lambda: live_log_lines(sidecar)[-1:] if len(live_log_lines(sidecar)) == 3 else None,
                       what="three log lines")[0]
    assert entry["live"]["ended_by"] == "upstream" and entry["live"]["close_code"] == 1000

    # The sidecar shutting down (SIGTERM) ends open sessions on both sides with 1012.
    knobs(emulator).go_away_after_s = None
    async with websockets.connect(ws_url(sidecar)) as ws:
        await ws.send(json.dumps(TEXT_SETUP))
        await ws.recv()
        stopping = asyncio.ensure_future(asyncio.to_thread(sidecar.terminate))
        assert (await closed_with(ws))[0] == 1012
        assert await stopping == 0
    wait_until(lambda: sessions(emulator)[-1].client_close == (1012, ""), what="1012 relayed upstream")


async def test_route_limits_sessions_idle_and_duration(start: StartSidecar, emulator: ServerHandle) -> None:
    sidecar = start({"defaults": DEFAULTS, "routes": [
        {"name": "live", "live": {"max_sessions": 1, "idle_timeout": 0.6, "max_duration": 1.5}}]})
    async with websockets.connect(ws_url(sidecar)) as first:
        await first.send(json.dumps(TEXT_SETUP))
        await first.recv()
        async with websockets.connect(ws_url(sidecar)) as second:
            await second.send(json.dumps(TEXT_SETUP))
            code, reason = await closed_with(second)
            assert code == 1013 and "live.max_sessions=1" in reason
        started = time.monotonic()
        code, reason = await closed_with(first)  # silent both ways
        assert code == 1001 and "idle" in reason and 0.5 < time.monotonic() - started < 3

    async with websockets.connect(ws_url(sidecar)) as busy:
        await busy.send(json.dumps(TEXT_SETUP))
        await busy.recv()
        started = time.monotonic()
        with pytest.raises(ConnectionClosed):
            while True:  # never idle, but too long
                await one_turn(busy, "still here")
                await asyncio.sleep(0.1)
        assert busy.close_code == 1008 and "maximum duration" in (busy.close_reason or "")
        assert 1.0 < time.monotonic() - started < 4
    wait_until(lambda: knobs(emulator).open_sessions == 0, what="upstream sessions closed")


async def test_slow_caller_back_pressure_keeps_memory_bounded(start: StartSidecar, emulator: ServerHandle) -> None:
    sidecar = start({"defaults": DEFAULTS})
    live = knobs(emulator)
    live.chunks, live.audio_reply_bytes = 300, 96_000  # 300 audio chunks of 128 kB (base64): 38 MB
    async with websockets.connect(ws_url(sidecar), max_queue=2, max_size=None) as ws:
        await ws.send(json.dumps({"setup": {"model": MODEL}}))  # AUDIO is the default modality
        await ws.recv()
        baseline = rss_mb(sidecar.proc.pid)
        await ws.send(json.dumps({"realtimeInput": {"text": "talk a lot"}}))
        # The caller reads nothing. Whatever Google manages to send sits in socket buffers
        # (the kernel's, bounded by its limits), never in the sidecar's memory.
        record = sessions(emulator)[-1]
        last, stable_since = -1, time.monotonic()
        while time.monotonic() - stable_since < 0.5:
            if record.messages_out != last:
                last, stable_since = record.messages_out, time.monotonic()
            await asyncio.sleep(0.05)
        grown = rss_mb(sidecar.proc.pid) - baseline
        assert grown < 16, f"the sidecar's memory must stay flat while {last} messages are in flight (+{grown:.1f} MB)"
        received = 0
        while True:
            frame = await asyncio.wait_for(ws.recv(), 10)
            received += 1
            if b'"turnComplete"' in frame:
                break
        assert received == 302  # every chunk, generationComplete, turnComplete: nothing dropped
