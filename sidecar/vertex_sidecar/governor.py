"""Fleet-scoped rate limits and budgets at request time: admission, background sync, metrics.

The proxy and the Live relay ask `Governor.admit` before a request (a lease taken from
memory in the common case); the governor is also an `Observer`, so when a request ends it
debits the tokens and the cost the telemetry put in the record. A background task syncs
each route with the store (`redis_store`) every `sync_interval_ms`, and at once when a
lease runs low. The accounting itself is in `fleet_limits` (pure).

Store faults: each call is bounded (`timeout_ms`), a breaker stops calling a failing store,
and while the store is out a route with `on_store_error: allow` falls back to its per-pod
limits, `deny` refuses with 503. Leases already held keep being used. When the store is
back the next sync puts everything right (see `fleet_limits`).
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
import uuid
from pathlib import Path
from typing import Any, Callable

from prometheus_client import CollectorRegistry, Counter, Gauge

from .config import Config, Route
from .errors import SidecarError
from .fleet_limits import Breaker, BudgetState, RouteAccount, WallClock, seconds_to_next_window
from .limits import RouteLimiter
from .observe import ChunkParser, RequestRecord

log = logging.getLogger("vertex_sidecar.fleet")

MAX_SYNCS_PER_REQUEST = 6  # a request whose grant others took waits for at most this many syncs
TEST_CLOCK_ENV = "VERTEX_SIDECAR_TEST_CLOCK_FILE"  # tests only: a file holding a clock offset in seconds


class Governor:
    def __init__(self, config: Config, *, registry: CollectorRegistry | None = None,
                 wall: WallClock | None = None, showback: dict[str, str] | None = None) -> None:
        self.store_settings = config.store
        self.store: Any = None
        self.wall = wall or time.time
        self.breaker = Breaker()
        self.sidecar_id = uuid.uuid4().hex[:12]
        self._accounts: dict[str, RouteAccount] = {}
        self._inflight: dict[str, asyncio.Future[bool]] = {}
        self._kicked: set[str] = set()  # routes with a refill scheduled and not started yet
        self._task: asyncio.Task[None] | None = None
        self._warned: set[tuple[str, str, str]] = set()
        self._metrics = _Metrics(registry or CollectorRegistry())
        self.showback = showback or {}
        self._routes_by_name: dict[str, Route] = {}
        self.apply_config(config, initial=True)

    # ---------------------------------------------------------------- lifecycle
    @property
    def has_store(self) -> bool:
        return self.store_settings is not None

    def start(self) -> None:
        if self.store_settings is not None:
            from .redis_store import RedisLimitStore

            self.store = RedisLimitStore(self.store_settings, self.sidecar_id)
            self._task = asyncio.ensure_future(self._sync_periodically())

    async def aclose(self) -> None:
        if self._task is not None:
            self._task.cancel()
        if self.store is not None:
            try:
                await asyncio.wait_for(self._sync_all(), self.store.timeout_s * 2)  # last spend and debts
            except Exception:
                pass
            await self.store.aclose()

    def describe(self, config: Config) -> None:
        """Say plainly where each route's limits are counted (at start and after a reload)."""
        fleet = [r.name for r in config.routes if r.limits.scope == "fleet"]
        budgets = [r.name for r in config.routes if r.budget is not None]
        if config.store is None:
            if fleet or budgets:
                log.warning("no store configured: limits and budgets of route(s) %s are counted per pod "
                            "(each sidecar on its own)", ", ".join(sorted(set(fleet + budgets))))
            else:
                log.info("rate limits are counted per pod (no store configured)")
        else:
            log.info("fleet-wide limits for route(s) %s and budgets for %s through %s",
                     ", ".join(fleet) or "none", ", ".join(budgets) or "none", _redacted(config.store.url))
        for route in config.routes:
            self._metrics.describe_budget(route, self.showback)

    # ------------------------------------------------------------------ routes
    def governs(self, route: Route) -> bool:
        return route.budget is not None or (route.limits.scope == "fleet" and self.has_store)

    def _account(self, route: Route) -> RouteAccount:
        account = self._accounts.get(route.name)
        if account is None or not account.matches(route.limits, route.budget):
            fleet = route.limits.scope == "fleet" and self.has_store
            account = self._accounts[route.name] = RouteAccount.create(route.name, route.limits, route.budget,
                                                                      fleet=fleet)
        return account

    # --------------------------------------------------------------- admission
    async def admit(self, route: Route, limiter: RouteLimiter) -> None:
        """Let one request of `route` through, or raise the SidecarError to answer."""
        account = self._account(route)
        now = self.wall()
        self.check_budget(route, account, now)
        if account.requests is None and account.tokens is None:
            if limiter.active:  # pod-scoped limits of a budgeted route
                _per_pod(limiter)
            return
        requests, tokens = account.requests, account.tokens
        for _ in range(MAX_SYNCS_PER_REQUEST + 1):
            short = None
            if requests is not None and not requests.take(now):  # rolls to the current window first
                if requests.exhausted:
                    raise _rate_limited(route, "requests", route.limits.requests_per_minute, now)
                short = "requests"
            if short is None and tokens is not None and not tokens.holds(now):
                if tokens.exhausted:
                    if requests is not None:
                        requests.give_back()
                    raise _rate_limited(route, "tokens", route.limits.tokens_per_minute, now)
                if requests is not None:
                    requests.give_back()
                short = "tokens"
            if short is None:
                break
            lease = requests if short == "requests" else tokens
            assert lease is not None
            lease.waiting += 1
            try:
                synced = await self.sync(account)
            finally:
                lease.waiting -= 1
            if not synced:
                self._store_unavailable(route, limiter)  # raises, or admits by per-pod limits
                return
            now = self.wall()  # synced; others waiting on the same sync may have taken the grant
        else:
            raise _rate_limited(route, short, route.limits.requests_per_minute if short == "requests"
                                else route.limits.tokens_per_minute, now)
        if (requests is not None and requests.want(now)) or (tokens is not None and tokens.want(now)):
            self._kick(account)  # refill ahead of need, off the request's path

    def _store_unavailable(self, route: Route, limiter: RouteLimiter) -> None:
        """The store is out (or slow) and this sidecar holds no allowance: the route's policy decides."""
        if route.limits.on_store_error == "deny":
            self._metrics.fallback(route.name, "deny")
            raise SidecarError(503, f"route {route.name!r} counts its limits fleet-wide and the limit store "
                                    "is unavailable (on_store_error: deny); retry shortly",
                               reason="LIMIT_STORE_UNAVAILABLE", headers=[(b"retry-after", b"1")])
        self._metrics.fallback(route.name, "allow_pod_limits")
        _per_pod(limiter)

    def check_budget(self, route: Route, account: RouteAccount | None = None, now: float | None = None) -> None:
        account = account or self._account(route)
        meter = account.meter
        if meter is None:
            return
        now = self.wall() if now is None else now
        state = meter.exhausted(now)
        if state is None:
            return
        assert route.budget is not None
        action = route.budget.action
        self._metrics.budget_exceeded(route.name, state.period, action)
        if action == "warn":
            key = (route.name, state.period, meter.day if state.period == "day" else meter.month)
            if key not in self._warned:
                self._warned.add(key)
                log.warning("budget reached (action: warn, requests continue): %s", state.message(route.name))
            return
        raise budget_refusal(route.name, state)

    def budget_state(self, route: Route) -> BudgetState | None:
        account = self._account(route)
        if account.meter is None or route.budget is None or route.budget.action == "warn":
            return None
        return account.meter.exhausted(self.wall())

    # ------------------------------------------------------------- accounting
    def spent(self, route: Route, tokens: int, usd: float) -> None:
        """After a response (or a Live turn): debit tokens and cost."""
        account = self._account(route)
        now = self.wall()
        if account.tokens is not None and tokens > 0:
            account.tokens.consume(tokens, now)
        if account.meter is not None and usd > 0:
            account.meter.add(usd, now)
            self._metrics.spend(route.name, account)

    def counts_fleet_tokens(self, route: Route) -> bool:
        return self._account(route).tokens is not None

    async def tokens_spent(self, route: Route) -> str | None:
        """After a Live turn's tokens were debited: a reason to stop when the fleet's tokens per
        minute are used up (one sync when the lease ran dry, to learn whether the fleet's are)."""
        account = self._account(route)
        tokens = account.tokens
        if tokens is None or tokens.holds(self.wall()):
            return None
        if not tokens.exhausted:
            if self.store is None or not await self.sync(account):
                return None  # not known to be spent (store out: the next setup decides)
            if tokens.holds(self.wall()) or not tokens.exhausted:
                return None
        return _rate_limited(route, "tokens", route.limits.tokens_per_minute, self.wall()).message

    # Observer (after telemetry, which put tokens and cost into the record)
    def request_started(self, record: RequestRecord) -> None:
        pass

    def response_started(self, record: RequestRecord) -> ChunkParser | None:
        return None

    def request_finished(self, record: RequestRecord) -> None:
        route = self._routes_by_name.get(record.route or "")
        if route is None or not self.governs(route):
            return
        usage = record.extra.get("tokens")
        tokens = int(usage.get("total_tokens", 0) or (usage.get("input_tokens", 0) + usage.get("output_tokens", 0))) \
            if isinstance(usage, dict) else 0
        cost = record.extra.get("cost_usd")
        self.spent(route, tokens, float(cost) if isinstance(cost, (int, float)) else 0.0)

    def apply_config(self, config: Config, *, initial: bool = False) -> None:
        self._routes_by_name = {route.name: route for route in config.routes}
        for route in config.routes:
            if self.governs(route):
                self._account(route)  # synced from the start: fleet spend is known before the first request
        if not initial and config.store != self.store_settings:
            log.warning("config reloaded, but store only changes on restart")
        self.describe(config)

    # -------------------------------------------------------------------- sync
    def _kick(self, account: RouteAccount) -> None:
        # One scheduled refill per route: requests arriving before it starts do not add more.
        if self.store is None or account.route in self._inflight or account.route in self._kicked:
            return
        self._kicked.add(account.route)
        asyncio.ensure_future(self._refill(account))

    async def _refill(self, account: RouteAccount) -> None:
        self._kicked.discard(account.route)
        await self.sync(account)

    async def sync(self, account: RouteAccount) -> bool:
        """One sync of the route with the store (shared with a sync already running); True on success."""
        running = self._inflight.get(account.route)
        if running is not None:
            return await asyncio.shield(running)
        future: asyncio.Future[bool] = asyncio.get_running_loop().create_future()
        self._inflight[account.route] = future
        try:
            ok = await self._sync_once(account)
        finally:
            self._inflight.pop(account.route, None)
        future.set_result(ok)
        return ok

    async def _sync_once(self, account: RouteAccount) -> bool:
        store = self.store
        if store is None:
            return False
        now = self.wall()
        if not self.breaker.allows(time.monotonic()):
            return False
        call = account.next_call(now)
        if call is None:
            return True
        try:
            reply = await store.sync(account.route, call)
        except Exception as exc:
            kind = getattr(exc, "kind", "error")
            self.breaker.failed(time.monotonic())
            self._metrics.store_error(kind, self.breaker.healthy)
            if self.breaker.failures == self.breaker.threshold:
                log.warning("limit store unavailable (%s: %s); using held leases, then on_store_error", kind, exc)
            return False
        if not self.breaker.healthy:
            log.info("limit store reachable again")
        self.breaker.succeeded()
        self._metrics.store_up.set(1)
        account.answered(call, reply)
        if reply.restored:
            log.warning("the limit store had lost this sidecar's counts for route %s (flushed or failed over); "
                        "they were put back", account.route)
        self._metrics.spend(account.route, account)
        return True

    async def _sync_all(self) -> None:
        for account in list(self._accounts.values()):
            await self.sync(account)

    async def _sync_periodically(self) -> None:
        assert self.store_settings is not None
        interval = self.store_settings.sync_interval_ms / 1000
        await self.store.warm_up()
        while True:
            await asyncio.sleep(interval)
            try:
                await self._sync_all()
            except Exception:  # never let the loop die
                log.exception("limit store sync failed")


def budget_refusal(route: str, state: BudgetState) -> SidecarError:
    return SidecarError(429, state.message(route), reason="ROUTE_BUDGET_EXHAUSTED",
                        headers=[(b"retry-after", str(max(1, int(state.resets_at - time.time()))).encode())])


def _per_pod(limiter: RouteLimiter) -> None:
    refusal = limiter.admit()
    if refusal is not None:
        raise SidecarError(429, refusal.message, reason="ROUTE_RATE_LIMITED",
                           headers=[(b"retry-after", str(refusal.retry_after_s).encode())])


def _rate_limited(route: Route, kind: str, limit: int | None, now: float) -> SidecarError:
    wait = seconds_to_next_window(now)
    return SidecarError(429, f"route {route.name!r} allows {limit} {kind} per minute across the fleet "
                             f"(limits.scope: fleet); retry in {wait} s", reason="ROUTE_RATE_LIMITED",
                        headers=[(b"retry-after", str(wait).encode())])


def _redacted(url: str) -> str:
    scheme, _, rest = url.partition("://")
    return f"{scheme}://{rest.rpartition('@')[2]}"


def wall_clock_from_env(environ: dict[str, str] | None = None) -> WallClock | None:
    """Tests only: a clock offset read from the file named by VERTEX_SIDECAR_TEST_CLOCK_FILE."""
    path = (environ if environ is not None else os.environ).get(TEST_CLOCK_ENV)
    if not path:
        return None
    file = Path(path)
    cache: dict[str, float] = {"at": -1.0, "offset": 0.0}

    def now() -> float:
        real = time.time()
        if real - cache["at"] > 0.02:
            cache["at"] = real
            try:
                cache["offset"] = float(file.read_text().strip() or 0)
            except (OSError, ValueError):
                pass
        return real + cache["offset"]

    log.warning("%s is set: the clock of budgets and windows is shifted (tests only)", TEST_CLOCK_ENV)
    return now


class _Metrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.store_errors = Counter(
            "vertex_sidecar_limit_store_errors", "Failed calls to the limit store, by kind (timeout|connection|error).",
            ["kind"], registry=registry)
        self.fallbacks = Counter(
            "vertex_sidecar_limit_store_fallbacks",
            "Requests decided without the store (it was unavailable and no lease was held), by decision "
            "(allow_pod_limits|deny).", ["route", "decision"], registry=registry)
        self.store_up = Gauge("vertex_sidecar_limit_store_up",
                              "1 while the last call to the limit store succeeded.", registry=registry)
        self.budget = Gauge(
            "vertex_sidecar_budget_usd", "A route's budget in USD per period (day|month).",
            ["route", "period", "namespace", "workload", "team"], registry=registry)
        self.spent = Gauge(
            "vertex_sidecar_budget_spent_usd",
            "Spend in USD of the current period (day|month) as this sidecar knows it: fleet-wide with a store, "
            "else this pod's own.", ["route", "period", "namespace", "workload", "team"], registry=registry)
        self.exceeded = Counter(
            "vertex_sidecar_budget_exceeded", "Requests that arrived with the route's budget spent, by action "
            "(deny: refused, warn: let through).", ["route", "period", "action"], registry=registry)
        self._show: tuple[str, str, str] = ("", "", "")

    def describe_budget(self, route: Route, showback: dict[str, str]) -> None:
        self._show = (showback.get("namespace", ""), showback.get("workload", ""), showback.get("team", ""))
        if route.budget is None:
            return
        for period, limit in (("day", route.budget.usd_per_day), ("month", route.budget.usd_per_month)):
            if limit is not None:
                self.budget.labels(route.name, period, *self._show).set(limit)
                self.spent.labels(route.name, period, *self._show).set(0)

    def spend(self, route: str, account: RouteAccount) -> None:
        meter, budget = account.meter, account.budget
        if meter is None or budget is None:
            return
        if budget.usd_per_day is not None:
            self.spent.labels(route, "day", *self._show).set(meter.fleet_day / 1e6)
        if budget.usd_per_month is not None:
            self.spent.labels(route, "month", *self._show).set(meter.fleet_month / 1e6)

    def store_error(self, kind: str, healthy: bool) -> None:
        self.store_errors.labels(kind).inc()
        self.store_up.set(0)

    def fallback(self, route: str, decision: str) -> None:
        self.fallbacks.labels(route, decision).inc()

    def budget_exceeded(self, route: str, period: str, action: str) -> None:
        self.exceeded.labels(route, period, action).inc()
