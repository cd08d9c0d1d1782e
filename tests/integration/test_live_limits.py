"""A route's requests/tokens per minute apply to Live sessions: per pod and across the fleet.

A session's setup counts as one request; each turn's tokens are debited when the turn
completes, and a session whose turn used up the route's tokens is closed cleanly (1013)
after that turn. Real WebSocket clients → real sidecars → the Live emulator; the fleet
test shares the limits of two sidecars through a real redis-server.
"""

from __future__ import annotations

import asyncio
import json
import math
import time
from pathlib import Path
from typing import Any, Iterator

import httpx
import pytest
import websockets
from websockets.exceptions import ConnectionClosed

from tests.emulators.live import create_live_app
from tests.emulators.serve import ServerHandle, create_combined_app, running_server
from tests.harness.redis_server import RedisServer, require_redis_server
from tests.harness.sidecar_process import SidecarProcess

from .conftest import StartSidecar
from .test_fleet_limits import metric

MODEL = "gemini-live-2.5-flash"
DEFAULTS = {"project": "emu-project", "location": "us-central1"}
SETUP = json.dumps({"setup": {"model": MODEL, "generationConfig": {"responseModalities": ["TEXT"]}}})
PROMPT = {"contents": [{"role": "user", "parts": [{"text": "one two three"}]}]}
REST = "v1/projects/emu-project/locations/us-central1/publishers/google/models/gemini-2.5-flash:generateContent"


@pytest.fixture
def emulator() -> Iterator[ServerHandle]:
    with running_server(create_live_app(fallback=create_combined_app(project_id="emu-project"))) as handle:
        yield handle


def live_url(sidecar: SidecarProcess) -> str:
    return sidecar.url.replace("http://", "ws://", 1) + "/vertex_ai/live"


def upstream_sessions(emulator: ServerHandle) -> int:
    return len(emulator.app.state.live.sessions)


async def open_session(sidecar: SidecarProcess) -> Any:
    ws = await websockets.connect(live_url(sidecar))
    await ws.send(SETUP)
    return ws


async def setup_answer(ws: Any) -> tuple[str, int | None, str]:
    """("ok", None, "") after setupComplete, else ("closed", code, reason)."""
    try:
        frame = await asyncio.wait_for(ws.recv(), 10)
    except ConnectionClosed:
        return "closed", ws.close_code, ws.close_reason or ""
    assert json.loads(frame) == {"setupComplete": {}}
    return "ok", None, ""


async def turn(ws: Any, text: str) -> list[dict[str, Any]]:
    await ws.send(json.dumps({"clientContent": {"turns": [{"role": "user", "parts": [{"text": text}]}],
                                                "turnComplete": True}}))
    messages = []
    while True:
        message = json.loads(await asyncio.wait_for(ws.recv(), 10))
        messages.append(message)
        if message.get("serverContent", {}).get("turnComplete"):
            return messages


def live_entries(sidecar: SidecarProcess, count: int) -> list[dict[str, Any]]:
    """The sessions' access-log lines, once `count` are written (a line follows the session's end)."""
    deadline = time.monotonic() + 5
    while True:
        entries = [e for e in sidecar.access_log() if e.get("operation") == "BidiGenerateContent"]
        if len(entries) >= count or time.monotonic() > deadline:
            return entries
        time.sleep(0.02)


async def closed_with(ws: Any) -> tuple[int | None, str]:
    with pytest.raises(ConnectionClosed):
        while True:
            await asyncio.wait_for(ws.recv(), 10)
    return ws.close_code, ws.close_reason or ""


async def test_requests_per_minute_count_live_setups_per_pod(start: StartSidecar, emulator: ServerHandle) -> None:
    sidecar = start({"defaults": DEFAULTS, "routes": [{"name": "live", "limits": {"requests_per_minute": 3}}]})
    assert httpx.post(f"{sidecar.base_url}/{REST}", json=PROMPT).status_code == 200  # REST shares the count
    for _ in range(2):
        ws = await open_session(sidecar)
        assert (await setup_answer(ws))[0] == "ok"
        await ws.close()
    ws = await open_session(sidecar)
    state, code, reason = await setup_answer(ws)
    assert (state, code) == ("closed", 1013) and "3 requests per minute" in reason, reason
    assert upstream_sessions(emulator) == 2, "the refused setup never reached Google"
    assert httpx.post(f"{sidecar.base_url}/{REST}", json=PROMPT).status_code == 429
    entries = live_entries(sidecar, 3)
    assert sorted((e["status"], e.get("error")) for e in entries) == [(101, None), (101, None),
                                                                       (429, "ROUTE_RATE_LIMITED")], entries


async def test_tokens_per_minute_close_the_session_after_the_turn_that_used_them(
        start: StartSidecar, emulator: ServerHandle) -> None:
    sidecar = start({"defaults": DEFAULTS, "routes": [{"name": "live", "limits": {"tokens_per_minute": 12}}]})
    ws = await open_session(sidecar)
    assert (await setup_answer(ws))[0] == "ok"
    first = await turn(ws, "a few words")  # under the limit: the session goes on
    assert first[-1]["usageMetadata"]["totalTokenCount"] < 12
    second = await turn(ws, "and now a few more words to pass the limit")
    assert second[-1]["serverContent"]["turnComplete"] is True  # the whole turn was relayed first
    code, reason = await closed_with(ws)
    assert code == 1013 and "12 tokens per minute" in reason, reason
    entry = live_entries(sidecar, 1)[-1]
    assert entry["live"]["ended_by"] == "rate_limit" and entry["live"]["turns"] == 2
    # The next setup is refused before Google is called; so is REST on the route.
    before = upstream_sessions(emulator)
    ws = await open_session(sidecar)
    state, code, reason = await setup_answer(ws)
    assert (state, code) == ("closed", 1013) and "tokens per minute" in reason
    assert upstream_sessions(emulator) == before
    assert httpx.post(f"{sidecar.base_url}/{REST}", json=PROMPT).status_code == 429


# ---------------------------------------------------------------------------- fleet scope


@pytest.fixture
def clock_file(tmp_path: Path) -> Path:
    path = tmp_path / "clock-offset"
    path.write_text("0")
    return path


def start_of_window(clock_file: Path) -> None:
    """Shift the sidecars' clock to 1 s into a fresh UTC minute (the fleet's windows)."""
    now = time.time()
    clock_file.write_text(repr(math.ceil(now / 60) * 60 + 1 - now))
    time.sleep(0.05)


async def test_fleet_limits_apply_to_live_sessions_across_sidecars(
        start: StartSidecar, emulator: ServerHandle, tmp_path: Path, clock_file: Path) -> None:
    require_redis_server()
    redis = RedisServer(tmp_path).start()
    try:
        route = {"name": "live", "limits": {"scope": "fleet", "requests_per_minute": 3, "tokens_per_minute": 40}}
        config = {"defaults": DEFAULTS, "store": redis.store_config(timeout_ms=500), "routes": [route]}
        env = {"VERTEX_SIDECAR_TEST_CLOCK_FILE": str(clock_file)}
        one, two = start(config, env=env), start(config, env=env)
        start_of_window(clock_file)
        ws = await open_session(one)
        assert (await setup_answer(ws))[0] == "ok"
        # Tokens: the turn that passes the fleet's 40 closes the session at its end.
        await turn(ws, "one two three four five six seven eight nine ten eleven twelve")
        await turn(ws, "thirteen fourteen fifteen sixteen seventeen eighteen nineteen twenty")
        code, reason = await closed_with(ws)
        assert code == 1013 and "tokens per minute across the fleet" in reason, reason
        # The other sidecar knows: the fleet's tokens of this minute are spent. It may still hold a
        # lease taken before (at most 1 % of the limit, fleet_limits.py): then its session ends
        # after one turn, and the next setup is refused before Google is called.
        ws = await open_session(two)
        state, code, reason = await setup_answer(ws)
        if state == "ok":
            await turn(ws, "one more")
            code, reason = await closed_with(ws)
            assert code == 1013 and "across the fleet" in reason, reason
            ws = await open_session(two)
            state, code, reason = await setup_answer(ws)
        assert (state, code) == ("closed", 1013) and "across the fleet" in reason, reason
        assert upstream_sessions(emulator) <= 2
    finally:
        redis.kill()


async def test_fleet_requests_per_minute_count_live_setups(
        start: StartSidecar, emulator: ServerHandle, tmp_path: Path, clock_file: Path) -> None:
    require_redis_server()
    redis = RedisServer(tmp_path).start()
    try:
        route = {"name": "live", "limits": {"scope": "fleet", "requests_per_minute": 3}}
        config = {"defaults": DEFAULTS, "store": redis.store_config(timeout_ms=500), "routes": [route]}
        env = {"VERTEX_SIDECAR_TEST_CLOCK_FILE": str(clock_file)}
        sidecars = [start(config, env=env), start(config, env=env)]
        start_of_window(clock_file)
        answers = []
        for index in range(5):
            ws = await open_session(sidecars[index % 2])
            answers.append(await setup_answer(ws))
            await ws.close()
        assert [a[0] for a in answers] == ["ok"] * 3 + ["closed"] * 2, answers
        assert all(a[1] == 1013 and "3 requests per minute across the fleet" in a[2] for a in answers[3:])
        assert upstream_sessions(emulator) == 3
    finally:
        redis.kill()


# ---------------------------------------------------------------------------- budgets

# The Live model is not in the packaged pricing table: priced here at $0.10 a token, so the
# emulator's turns cost dollars ("a few words": 3 + 5 tokens = $0.80; the next turn of three
# words: 8 + 3 context and prompt + 5 answer = $1.60).
PRICED = {"models": {MODEL: {"input": 100_000.0, "output": 100_000.0}}}
BUDGET = {"usd_per_day": 1.5}


async def test_a_spent_budget_closes_the_session_after_its_turn_and_refuses_new_setups(
        start: StartSidecar, emulator: ServerHandle) -> None:
    sidecar = start({"defaults": DEFAULTS, "pricing": PRICED, "routes": [{"name": "live", "budget": BUDGET}]})
    ws = await open_session(sidecar)
    assert (await setup_answer(ws))[0] == "ok"
    first = await turn(ws, "a few words")  # $0.80 of $1.50: the session goes on
    assert first[-1]["usageMetadata"]["totalTokenCount"] == 8
    second = await turn(ws, "two more words")  # $2.40: crosses the budget
    assert second[-1]["serverContent"]["turnComplete"] is True  # the whole turn was relayed first
    code, reason = await closed_with(ws)
    assert code == 1013 and "route 'live' has spent $2.4 of its daily budget of $1.5" in reason, reason
    assert "resets at" in reason and "T00:00:00Z" in reason
    entry = live_entries(sidecar, 1)[-1]
    assert entry["live"]["ended_by"] == "budget" and entry["live"]["turns"] == 2
    assert entry["cost_usd"] == pytest.approx(2.4)
    # Spent: the next setup is refused before Google is dialled; REST on the route too.
    before = upstream_sessions(emulator)
    ws = await open_session(sidecar)
    state, code, reason = await setup_answer(ws)
    assert (state, code) == ("closed", 1013) and "daily budget" in reason, reason
    assert upstream_sessions(emulator) == before
    refused = httpx.post(f"{sidecar.base_url}/{REST}", json=PROMPT)
    assert refused.status_code == 429 and refused.json()["error"]["details"][0]["reason"] == "ROUTE_BUDGET_EXHAUSTED"
    entries = live_entries(sidecar, 2)
    assert (entries[-1]["status"], entries[-1].get("error")) == (429, "ROUTE_BUDGET_EXHAUSTED"), entries[-1]


async def test_a_budget_spent_in_one_sidecar_ends_live_sessions_in_the_others(
        start: StartSidecar, emulator: ServerHandle, tmp_path: Path, clock_file: Path) -> None:
    require_redis_server()
    redis = RedisServer(tmp_path).start()
    try:
        config = {"defaults": DEFAULTS, "pricing": PRICED, "store": redis.store_config(timeout_ms=500, sync_interval_ms=100),
                  "routes": [{"name": "live", "budget": BUDGET}]}
        env = {"VERTEX_SIDECAR_TEST_CLOCK_FILE": str(clock_file)}
        one, two = start(config, env=env), start(config, env=env)
        start_of_window(clock_file)
        running = await open_session(two)  # opened while the budget is not spent
        assert (await setup_answer(running))[0] == "ok"
        ws = await open_session(one)
        assert (await setup_answer(ws))[0] == "ok"
        await turn(ws, "a few words")
        await turn(ws, "two more words")  # the fleet's $2.40 > $1.50
        code, reason = await closed_with(ws)
        assert code == 1013 and "daily budget" in reason, reason
        deadline = time.monotonic() + 10  # the other sidecar learns the fleet's spend at its next sync
        while metric(two, "vertex_sidecar_budget_spent_usd", route="live", period="day") < 1.5:
            assert time.monotonic() < deadline, "sidecar two never learnt the fleet's spend"
            await asyncio.sleep(0.05)
        # Its running session ends cleanly after its next turn (relayed whole) ...
        answered = await turn(running, "hello")
        assert answered[-1]["serverContent"]["turnComplete"] is True
        code, reason = await closed_with(running)
        assert code == 1013 and "route 'live' has spent" in reason, reason
        # ... and a new setup there is refused before Google is dialled.
        before = upstream_sessions(emulator)
        ws = await open_session(two)
        state, code, reason = await setup_answer(ws)
        assert (state, code) == ("closed", 1013) and "daily budget" in reason, reason
        assert upstream_sessions(emulator) == before
    finally:
        redis.kill()
