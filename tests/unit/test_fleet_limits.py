"""The pure lease and budget accounting of fleet-scoped routes (fleet_limits), on an injected clock."""

from __future__ import annotations

import calendar

import pytest

from vertex_sidecar.config import Budget, ConfigError, Limits, parse_config
from vertex_sidecar.fleet_limits import (
    MICRO, Breaker, BudgetMeter, Lease, RouteAccount, SyncReply, next_month, seconds_to_next_window,
)

T0 = calendar.timegm((2026, 1, 31, 23, 59, 0, 0, 0, 0))  # one minute before a new day and month


def reply(granted_requests: int = 0, granted_tokens: int = 0, window_requests: int = 0, window_tokens: int = 0,
          day: int = 0, month: int = 0, restored: bool = False) -> SyncReply:
    return SyncReply(granted_requests, granted_tokens, window_requests, window_tokens, day, month, restored)


def test_a_lease_admits_what_it_holds_and_the_window_resets_it() -> None:
    lease = Lease(1000)
    assert lease.max_chunk == 10  # 1 % of the limit: the most one sidecar can leave unused
    assert not lease.take(T0)
    wanted = lease.want(T0)
    assert 1 <= wanted <= 10
    lease.granted(lease.window, wanted, wanted, 0, wanted)
    assert all(lease.take(T0 + 1) for _ in range(wanted))
    assert not lease.take(T0 + 1)
    lease.granted(lease.window, 5, 0, 0, 1000)  # the store: the fleet used the window
    assert lease.exhausted and lease.want(T0 + 2) == 0
    assert not lease.take(T0 + 60) and not lease.exhausted  # a new window


def test_a_late_answer_about_a_finished_window_grants_nothing() -> None:
    lease = Lease(100)
    lease.roll(T0)
    old = lease.window
    lease.roll(T0 + 60)
    lease.granted(old, 1, 1, 0, 1)
    assert lease.remaining == 0


def test_tokens_used_beyond_the_lease_become_debt_sent_once() -> None:
    account = RouteAccount.create("r", Limits(tokens_per_minute=10_000), None, fleet=True)
    tokens = account.tokens
    assert tokens is not None
    call = account.next_call(T0)
    assert call is not None and call.want_tokens == 100
    account.answered(call, reply(granted_tokens=100, window_tokens=100))
    tokens.consume(130, T0)
    assert tokens.remaining == 0 and tokens.debt == 30
    call = account.next_call(T0)
    assert call is not None and call.token_debt == 30
    # The store did not answer: the same call (same sequence number) goes again, nothing added twice.
    assert account.next_call(T0) is call
    account.answered(call, reply(granted_tokens=100, window_tokens=230))
    assert tokens.debt == 0 and tokens.contributed == 230
    second = account.next_call(T0)
    assert second is not None and second.seq == call.seq + 1 and second.token_debt == 0


def test_a_call_carries_this_sidecars_counts_to_restore_a_flushed_store() -> None:
    account = RouteAccount.create("r", Limits(requests_per_minute=1000), Budget(usd_per_day=5), fleet=True)
    first = account.next_call(T0)
    assert first is not None and not first.known
    account.answered(first, reply(granted_requests=first.want_requests, window_requests=first.want_requests))
    assert account.meter is not None
    account.meter.add(0.25, T0)
    call = account.next_call(T0)
    assert call is not None and call.known
    assert call.restore_requests == first.want_requests
    assert call.spend == 250_000 and call.restore_day == 0  # the spend is sent, not restored as well


def test_budget_periods_roll_over_at_utc_midnight_and_month_start() -> None:
    meter = BudgetMeter(Budget(usd_per_day=1.0, usd_per_month=1.5))
    meter.add(1.0, T0)
    state = meter.exhausted(T0)
    assert state is not None and state.period == "day" and state.spent_usd == 1.0
    assert state.resets_at == T0 + 60
    assert "daily budget of $1" in state.message("team-a") and "2026-02-01T00:00:00Z" in state.message("team-a")
    assert meter.exhausted(T0 + 61) is None  # a new day, and a new month
    meter.add(0.9, T0 + 61)
    meter.add(0.7, T0 + 86400 + 61)  # the next day: 0.7 today, 1.6 this month
    state = meter.exhausted(T0 + 86400 + 61)
    assert state is not None and state.period == "month"
    assert next_month(T0 + 86400) == calendar.timegm((2026, 3, 1, 0, 0, 0, 0, 0, 0))


def test_the_fleet_total_comes_from_the_store_plus_what_was_spent_since() -> None:
    meter = BudgetMeter(Budget(usd_per_day=10))
    meter.add(1.0, T0)
    sent = meter.pending
    meter.add(0.5, T0)  # while the sync was on its way
    meter.synced(meter.day, meter.month, sent, fleet_day=7 * MICRO, fleet_month=7 * MICRO)
    assert meter.fleet_day == 7.5 * MICRO and meter.pending == 0.5 * MICRO


def test_breaker_opens_after_failures_and_probes_later() -> None:
    breaker = Breaker(threshold=3, open_s=0.5, max_open_s=2)
    for _ in range(3):
        assert breaker.allows(0)
        breaker.failed(0)
    assert not breaker.allows(0.1) and breaker.allows(0.5)
    breaker.failed(0.5)  # the probe failed: longer
    assert not breaker.allows(1.4) and breaker.allows(1.5)
    breaker.succeeded()
    assert breaker.healthy and breaker.allows(1.5)


def test_retry_after_is_the_rest_of_the_window() -> None:
    assert seconds_to_next_window(T0 + 1) == 59
    assert seconds_to_next_window(T0 + 59.5) == 1


def test_config_of_scopes_budgets_and_store() -> None:
    config = parse_config({
        "store": {"redis": {"url": "rediss://10.0.0.3:6378/0", "password_file": "/p", "tls_ca_file": "/ca"}},
        "routes": [{"name": "a", "limits": {"scope": "fleet", "requests_per_minute": 5, "on_store_error": "deny"},
                    "budget": {"usd_per_month": 100, "action": "warn"}}],
    })
    assert config.store is not None and config.store.timeout_ms == 50
    route = config.routes[0]
    assert route.limits.scope == "fleet" and route.limits.on_store_error == "deny"
    assert route.budget == Budget(usd_per_month=100.0, action="warn")
    for bad, message in [
        ({"routes": [{"name": "a", "limits": {"scope": "cluster"}}]}, "routes[0].limits.scope"),
        ({"routes": [{"name": "a", "budget": {"action": "deny"}}]}, "usd_per_day and/or usd_per_month"),
        ({"routes": [{"name": "a", "budget": {"usd_per_day": -1}}]}, "positive amount in USD"),
        ({"store": {"redis": {"url": "http://x"}}}, "redis:// or rediss://"),
        ({"store": {"redis": {"url": "redis://:pw@x:6379"}}}, "password_file"),
        ({"store": {"redis": {"url": "redis://x", "timeout_ms": 5000}}}, "at most 1000 ms"),
    ]:
        with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)").replace("[", r"\[").replace("]", r"\]")):
            parse_config(bad)
