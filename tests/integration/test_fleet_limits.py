"""Fleet-wide limits and budgets: several real sidecars share one route through a real redis-server.

Each test starts its own redis-server on a free port and several `vertex-sidecar`
processes against the Vertex emulator. The windows are UTC minutes; the sidecars' clock is
shifted (VERTEX_SIDECAR_TEST_CLOCK_FILE, honoured only for tests) so a test starts at the
beginning of a window and can jump to the next day instead of waiting for it.
"""

from __future__ import annotations

import concurrent.futures
import math
import time
from pathlib import Path
from typing import Any, Callable

import httpx
import pytest

from tests.harness.redis_server import RedisServer, make_tls_files, require_redis_server
from tests.harness.sidecar_process import SidecarProcess

from .conftest import StartSidecar

PROMPT = {"contents": [{"role": "user", "parts": [{"text": "one two three"}]}]}
PATH = "v1/projects/emu-project/locations/us-central1/publishers/google/models/gemini-2.5-flash:generateContent"
TOKENS_PER_CALL = 15  # the emulator: 3 prompt + 4 answer + 8 thoughts
COST_PER_CALL = 3 * 0.30e-6 + 12 * 2.50e-6  # gemini-2.5-flash list prices (input, output incl. thinking)
SIDECARS = 5


@pytest.fixture(autouse=True)
def _needs_redis() -> None:
    require_redis_server()


@pytest.fixture
def clock_file(tmp_path: Path) -> Path:
    path = tmp_path / "clock-offset"
    path.write_text("0")
    return path


def start_of_window(clock_file: Path, *, days: int = 0) -> float:
    """Shift the sidecars' clock so that now is 1 s into a fresh minute (plus `days`); returns the offset."""
    now = time.time()
    offset = math.ceil(now / 60) * 60 + 1 - now + days * 86400
    clock_file.write_text(repr(offset))
    time.sleep(0.05)  # the sidecars re-read the file every 20 ms
    return offset


def fleet(start: StartSidecar, route: dict[str, Any], store: dict[str, Any], clock_file: Path,
          count: int = SIDECARS) -> list[SidecarProcess]:
    config = {"store": store, "routes": [route]}
    sidecars = [start(config, env={"VERTEX_SIDECAR_TEST_CLOCK_FILE": str(clock_file)}, wait_ready=False)
                for _ in range(count)]
    for sidecar in sidecars:
        sidecar.wait_ready()
    return sidecars


def call(sidecar: SidecarProcess, client: httpx.Client | None = None) -> httpx.Response:
    return (client or httpx).post(f"{sidecar.base_url}/{PATH}", json=PROMPT, timeout=10)  # type: ignore[attr-defined]


def load(sidecars: list[SidecarProcess], total: int, workers: int = 16,
         between: Callable[[int], None] | None = None) -> list[httpx.Response]:
    """`total` requests spread round-robin over the sidecars, `workers` at a time."""
    clients = [httpx.Client() for _ in sidecars]

    def one(i: int) -> httpx.Response:
        if between is not None:
            between(i)
        return call(sidecars[i % len(sidecars)], clients[i % len(sidecars)])

    try:
        with concurrent.futures.ThreadPoolExecutor(workers) as pool:
            return list(pool.map(one, range(total)))
    finally:
        for client in clients:
            client.close()


def reason(response: httpx.Response) -> str | None:
    details = response.json()["error"].get("details") or [{}]
    return details[0].get("reason")


def metric(sidecar: SidecarProcess, name: str, **labels: str) -> float:
    total = 0.0
    for line in httpx.get(f"{sidecar.admin_url}/metrics", timeout=5).text.splitlines():
        if not line.startswith(name + "{") and not line.startswith(name + " "):
            continue
        if all(f'{key}="{value}"' in line for key, value in labels.items()):
            total += float(line.rsplit(" ", 1)[1])
    return total


def wait_until(predicate: Callable[[], bool], timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.05)
    return predicate()


@pytest.mark.parametrize("mode", ["plain", "password", "tls"])
def test_requests_per_minute_hold_across_the_fleet(start: StartSidecar, tmp_path: Path, clock_file: Path,
                                                   mode: str) -> None:
    redis = RedisServer(tmp_path, password="s3cret-pass" if mode == "password" else None,
                        tls=make_tls_files(tmp_path) if mode == "tls" else None).start()
    try:
        limit = 200
        sidecars = fleet(start, {"name": "shared", "limits": {"scope": "fleet", "requests_per_minute": limit}},
                         redis.store_config(timeout_ms=200), clock_file)  # a loaded CI machine is slow
        start_of_window(clock_file)
        responses = load(sidecars, 300, workers=20)
        admitted = sum(r.status_code == 200 for r in responses)
        refused = [r for r in responses if r.status_code == 429]
        # The bound holds while the store answers (no per-pod fallback happened).
        assert sum(metric(s, "vertex_sidecar_limit_store_fallbacks_total") for s in sidecars) == 0
        assert admitted + len(refused) == 300
        # Never more than the limit; at most one unused lease per sidecar (1 % of the limit each).
        max_lease = max(1, int(limit * 0.01))
        assert limit - SIDECARS * max_lease <= admitted <= limit, admitted
        assert {reason(r) for r in refused} == {"ROUTE_RATE_LIMITED"}
        assert all("across the fleet" in r.json()["error"]["message"] for r in refused)
        assert all(1 <= int(r.headers["retry-after"]) <= 60 for r in refused)
        # Every sidecar served some of them: the limit is shared, not one pod's.
        assert all(any(e["status"] == 200 for e in s.access_log()) for s in sidecars)
    finally:
        redis.kill()
    if mode == "password":
        assert all("s3cret-pass" not in "\n".join(s.stderr_lines + s.stdout_lines) for s in sidecars)


def test_tokens_per_minute_hold_across_the_fleet(start: StartSidecar, tmp_path: Path, clock_file: Path) -> None:
    redis = RedisServer(tmp_path).start()
    try:
        limit, workers = 3000, 10
        sidecars = fleet(start, {"name": "tok", "limits": {"scope": "fleet", "tokens_per_minute": limit}},
                         redis.store_config(timeout_ms=200), clock_file)
        start_of_window(clock_file)
        responses = load(sidecars, 400, workers=workers)
        assert sum(metric(s, "vertex_sidecar_limit_store_fallbacks_total") for s in sidecars) == 0
        tokens = TOKENS_PER_CALL * sum(r.status_code == 200 for r in responses)
        # Usage is known after the response: the overshoot is at most the requests in flight.
        assert limit - SIDECARS * int(limit * 0.01) <= tokens <= limit + workers * TOKENS_PER_CALL, tokens
        assert any(r.status_code == 429 for r in responses)
    finally:
        redis.kill()


def test_budget_reached_refuses_in_every_sidecar_and_rolls_over(start: StartSidecar, tmp_path: Path,
                                                                 clock_file: Path) -> None:
    redis = RedisServer(tmp_path).start()
    try:
        budget = COST_PER_CALL * 6.5
        sidecars = fleet(start, {"name": "team-a", "budget": {"usd_per_day": budget}},
                         redis.store_config(sync_interval_ms=100), clock_file, count=3)
        start_of_window(clock_file)
        first = sidecars[0]
        statuses = [call(first).status_code for _ in range(8)]
        assert statuses == [200] * 7 + [429], statuses  # the 7th crosses it, the 8th is refused
        for sidecar in sidecars:  # every sidecar learns the fleet's spend within a sync interval
            assert wait_until(lambda: metric(sidecar, "vertex_sidecar_budget_spent_usd", period="day") >= budget)
            refused = call(sidecar)
            assert refused.status_code == 429
            error = refused.json()["error"]
            assert error["status"] == "RESOURCE_EXHAUSTED"
            assert error["details"][0]["@type"] == "type.googleapis.com/google.rpc.ErrorInfo"
            assert error["details"][0]["reason"] == "ROUTE_BUDGET_EXHAUSTED"
            assert "'team-a'" in error["message"] and "daily budget" in error["message"]
            assert "resets at" in error["message"] and "T00:00:00Z" in error["message"]
            assert metric(sidecar, "vertex_sidecar_budget_usd", route="team-a", period="day") == pytest.approx(budget)
        # The next UTC day: a fresh budget everywhere.
        start_of_window(clock_file, days=1)
        for sidecar in sidecars:
            assert call(sidecar).status_code == 200
    finally:
        redis.kill()


def test_budget_warn_only_logs_and_counts(start: StartSidecar, tmp_path: Path, clock_file: Path) -> None:
    sidecar = start({"routes": [{"name": "w", "budget": {"usd_per_month": COST_PER_CALL, "action": "warn"}}]})
    assert [call(sidecar).status_code for _ in range(3)] == [200, 200, 200]
    assert metric(sidecar, "vertex_sidecar_budget_exceeded_total", route="w", action="warn") == 2
    assert wait_until(lambda: any("budget reached (action: warn" in line for line in sidecar.stderr_lines))
    assert any("counted per pod" in line for line in sidecar.stderr_lines)


def test_store_killed_mid_load_then_restarted(start: StartSidecar, tmp_path: Path, clock_file: Path) -> None:
    redis = RedisServer(tmp_path).start()
    # Small enough that a lease (at most 1 % of the limit) runs out soon after the kill, so
    # the sidecars must fall back; large enough that the load never reaches it.
    route_allow = {"name": "allow", "limits": {"scope": "fleet", "requests_per_minute": 2000}}
    sidecars = fleet(start, route_allow, redis.store_config(timeout_ms=30), clock_file, count=3)
    start_of_window(clock_file)

    def kill_midway(i: int) -> None:
        if i == 100:
            redis.kill()

    responses = load(sidecars, 400, workers=8, between=kill_midway)
    assert all(r.status_code == 200 for r in responses)  # allow: per-pod limits (far away here)
    assert wait_until(lambda: all(metric(s, "vertex_sidecar_limit_store_up") == 0 for s in sidecars))
    assert all(metric(s, "vertex_sidecar_limit_store_errors_total") >= 1 for s in sidecars)
    assert wait_until(lambda: sum(metric(s, "vertex_sidecar_limit_store_fallbacks_total",
                                         decision="allow_pod_limits") for s in sidecars) >= 1)
    redis.start()  # same port, empty: the sidecars put their counts back
    assert all(call(s).status_code == 200 for s in sidecars)
    assert wait_until(lambda: all(metric(s, "vertex_sidecar_limit_store_up") == 1 for s in sidecars))
    assert wait_until(lambda: any("lost this sidecar's counts" in line for s in sidecars for line in s.stderr_lines))
    redis.kill()


def test_store_down_with_deny_refuses_with_503(start: StartSidecar, tmp_path: Path, clock_file: Path) -> None:
    redis = RedisServer(tmp_path).start()
    route = {"name": "strict", "limits": {"scope": "fleet", "requests_per_minute": 1000, "on_store_error": "deny"}}
    sidecar = fleet(start, route, redis.store_config(timeout_ms=30), clock_file, count=1)[0]
    start_of_window(clock_file)
    # (on a loaded machine the first sync may miss its 30 ms: deny answers 503 until one lands)
    assert wait_until(lambda: call(sidecar).status_code == 200)
    denied_before = metric(sidecar, "vertex_sidecar_limit_store_fallbacks_total", decision="deny")
    redis.kill()
    statuses = [call(sidecar) for _ in range(40)]  # the held lease first, then 503
    refused = [r for r in statuses if r.status_code == 503]
    assert refused and all(r.status_code in (200, 503) for r in statuses)
    assert reason(refused[0]) == "LIMIT_STORE_UNAVAILABLE" and refused[0].json()["error"]["status"] == "UNAVAILABLE"
    assert metric(sidecar, "vertex_sidecar_limit_store_fallbacks_total", decision="deny") - denied_before == len(refused)
    redis.start()
    assert wait_until(lambda: call(sidecar).status_code == 200)


def test_slow_and_flushed_store(start: StartSidecar, tmp_path: Path, clock_file: Path) -> None:
    redis = RedisServer(tmp_path).start()
    limit = 100000
    sidecars = fleet(start, {"name": "f", "limits": {"scope": "fleet", "requests_per_minute": limit}},
                     redis.store_config(timeout_ms=30, sync_interval_ms=50), clock_file, count=2)
    offset = start_of_window(clock_file)
    admin = redis.client()
    assert all(r.status_code == 200 for r in load(sidecars, 40, workers=4))
    window = int((time.time() + offset) // 60)
    key = f"vxp:{{f}}:req:{window}"
    leased = int(admin.get(key))
    assert leased >= 40
    # Slow: Redis blocked for 300 ms; requests keep flowing (leases held, then per-pod fallback).
    slow = concurrent.futures.ThreadPoolExecutor(1).submit(lambda: redis.client().execute_command("DEBUG", "SLEEP", "0.3"))
    assert all(r.status_code == 200 for r in load(sidecars, 40, workers=4))
    slow.result()
    # Flushed: each sidecar puts back what it leased in this window.
    admin.flushall()
    assert wait_until(lambda: int(admin.get(key) or 0) >= leased)
    admin.close()
    redis.kill()


async def test_the_store_applies_a_retried_call_once(tmp_path: Path) -> None:
    """The Lua script against a real Redis: same sequence number → same answer, nothing debited twice."""
    from vertex_sidecar.config import RedisStore
    from vertex_sidecar.fleet_limits import SyncCall
    from vertex_sidecar.redis_store import RedisLimitStore

    redis = RedisServer(tmp_path, password="pw").start()
    (tmp_path / "pw").write_text("pw\n")
    store = RedisLimitStore(RedisStore(url=redis.url, password_file=str(tmp_path / "pw"), timeout_ms=200), "side-1")
    try:
        call = SyncCall(seq=1, window=7, day="20260101", month="202601", want_requests=5, request_limit=8,
                        want_tokens=50, token_limit=100, token_debt=20, spend=1500, budgeted=True)
        first = await store.sync("r", call)
        again = await store.sync("r", call)
        assert first == again
        assert (first.granted_requests, first.granted_tokens, first.window_tokens, first.day_usd_micro) == (5, 50, 70, 1500)
        later = await store.sync("r", SyncCall(seq=2, window=7, day="20260101", month="202601", want_requests=5,
                                               request_limit=8, budgeted=True, known=True))
        assert later.granted_requests == 3 and later.window_requests == 8  # never beyond the limit
        redis.client().flushall()
        restored = await store.sync("r", SyncCall(seq=3, window=7, day="20260101", month="202601", budgeted=True,
                                                  known=True, restore_requests=8, restore_day=1500))
        assert restored.restored and restored.window_requests == 8 and restored.day_usd_micro == 1500
    finally:
        await store.aclose()
        redis.kill()


def test_fleet_scope_without_a_store_is_per_pod_and_says_so(start: StartSidecar) -> None:
    sidecar = start({"routes": [{"name": "solo", "limits": {"scope": "fleet", "requests_per_minute": 2}}]})
    assert wait_until(lambda: any("no store configured: limits and budgets of route(s) solo are counted per pod"
                                  in line for line in sidecar.stderr_lines))
    responses = [call(sidecar) for _ in range(3)]
    assert [r.status_code for r in responses] == [200, 200, 429]
    assert reason(responses[2]) == "ROUTE_RATE_LIMITED"
    assert "across the fleet" not in responses[2].json()["error"]["message"]
