"""Fleet-wide limits and budgets: the lease accounting, without any I/O. Pure.

Every sidecar serving a route shares its requests/tokens per minute and its budget
through a store (Redis, see `redis_store`). No request waits for the store in the common
case: a sidecar *leases* a slice of the current minute's allowance and admits requests
from that slice locally; a background sync refills the slice before it runs out, sends the
tokens used and the money spent, and brings back the fleet's totals.

Windows are fixed UTC minutes (every pod agrees on them without talking). The store only
ever grants what is left of the window, so with the store reachable:

- requests: the fleet admits at most `requests_per_minute` per window. What sidecars leased
  but did not use is lost to the window: at most one lease per sidecar, and a lease is at
  most `MAX_LEASE_SHARE` (1 %) of the limit, so with 5 sidecars at most 5 % of the limit
  goes unused.
- tokens: usage is known only after the response, so a request is admitted while its
  sidecar holds token allowance and the tokens are debited afterwards; the overshoot is at
  most the tokens of the requests in flight when the window's allowance ran out (as per pod).
- budgets: spend is added locally at once and sent on the next sync; other sidecars see it
  within one sync interval, so the fleet overshoots by at most the spend of that interval.

A sync that fails is retried with the same sequence number; the store applies each
(sidecar, sequence) once, so a retry never debits twice. When the store lost this
sidecar's record (flushed, failed over to an empty replica), the sync also sends what this
sidecar counted in the current periods, and the totals recover.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Callable

from .config import Budget, Limits

WINDOW_S = 60
MAX_LEASE_SHARE = 0.01  # one lease is at most this share of the limit (the under-admission bound)
LEAD_S = 0.5  # a lease covers about this long of the sidecar's recent rate
MICRO = 1_000_000  # spend is counted in micro-USD integers (exact sums in the store)

WallClock = Callable[[], float]  # seconds since the epoch (UTC periods are derived from it)


def window_of(now: float) -> int:
    return int(now // WINDOW_S)


def seconds_to_next_window(now: float) -> int:
    return max(1, math.ceil(WINDOW_S - now % WINDOW_S))


class Lease:
    """This sidecar's allowance of one counter (requests or tokens) in the current window."""

    def __init__(self, limit: int, *, min_chunk: int = 1) -> None:
        self.limit = limit
        self.max_chunk = max(1, int(limit * MAX_LEASE_SHARE))
        self.min_chunk = min(max(1, min_chunk), self.max_chunk)
        self.window = -1
        self.remaining = 0  # leased and not used yet
        self.contributed = 0  # what this sidecar added to the store's count in this window
        self.debt = 0  # tokens used beyond the lease, not sent yet
        self.exhausted = False  # the store said the fleet used the whole window
        self.fleet_used = 0  # the window's total as last seen in the store
        self.waiting = 0  # requests waiting for this lease to be refilled (they size the next ask)
        self._rate = 0.0  # units per second, smoothed
        self._used_since = 0
        self._rate_at = 0.0

    def roll(self, now: float) -> None:
        window = window_of(now)
        if window != self.window:
            self.window = window
            self.remaining = self.contributed = 0
            self.exhausted = False
            self.fleet_used = 0

    def take(self, now: float) -> bool:
        """Admit one request from the lease."""
        self.roll(now)
        if self.remaining >= 1:
            self.remaining -= 1
            self._used_since += 1
            return True
        return False

    def give_back(self) -> None:
        """Undo a `take` (the request was refused for another reason)."""
        self.remaining += 1
        self._used_since -= 1

    def holds(self, now: float) -> bool:
        """Token allowance left (a request may start; its usage is debited afterwards)."""
        self.roll(now)
        return self.remaining > 0

    def consume(self, amount: int, now: float) -> None:
        """Tokens a response used: from the lease, the rest becomes debt for the store."""
        self.roll(now)
        self._used_since += amount
        self.remaining -= amount
        if self.remaining < 0:
            self.debt += -self.remaining
            self.remaining = 0

    def want(self, now: float) -> int:
        """How much to ask for now (0: the lease is full enough, or the window is spent)."""
        self.roll(now)
        if self._rate_at == 0.0:
            self._rate_at = now  # the rate is measured from the first ask, not from the epoch
        elapsed = now - self._rate_at
        if elapsed > 0.05:
            current = self._used_since / elapsed
            self._rate = current if self._rate == 0 else 0.5 * self._rate + 0.5 * current
            self._used_since, self._rate_at = 0, now
        if self.exhausted:
            return 0
        # At least one unit per waiting request: a burst (or a cold start, with no rate known
        # yet) is served by one sync instead of one unit per sync.
        chunk = min(self.max_chunk, max(self.min_chunk, math.ceil(self._rate * LEAD_S), self.waiting + 1))
        return chunk if self.remaining <= chunk // 2 else 0

    def granted(self, window: int, wanted: int, grant: int, debt_sent: int, fleet_used: int) -> None:
        self.debt -= debt_sent
        if window != self.window:
            return  # an answer about a window that is over
        self.remaining += grant
        self.contributed += grant + debt_sent
        self.fleet_used = fleet_used
        if wanted > 0 and grant < wanted and fleet_used >= self.limit:
            self.exhausted = True


@dataclass(frozen=True)
class BudgetState:
    """A budget period that is spent."""

    period: str  # "day" | "month"
    limit_usd: float
    spent_usd: float
    resets_at: float  # epoch seconds (UTC midnight / first of the month)

    def message(self, route: str) -> str:
        reset = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(self.resets_at))
        adjective = "daily" if self.period == "day" else "monthly"
        return (f"route {route!r} has spent ${_usd(self.spent_usd)} of its {adjective} budget of "
                f"${_usd(self.limit_usd)} (budget.usd_per_{self.period}); it resets at {reset}")


def _usd(amount: float) -> str:
    return f"{amount:.2f}" if amount >= 10 else f"{amount:.6f}".rstrip("0").rstrip(".")


def day_key(now: float) -> str:
    return time.strftime("%Y%m%d", time.gmtime(now))


def month_key(now: float) -> str:
    return time.strftime("%Y%m", time.gmtime(now))


def next_day(now: float) -> float:
    return (int(now) // 86400 + 1) * 86400.0


def next_month(now: float) -> float:
    t = time.gmtime(now)
    year, month = (t.tm_year + 1, 1) if t.tm_mon == 12 else (t.tm_year, t.tm_mon + 1)
    import calendar

    return float(calendar.timegm((year, month, 1, 0, 0, 0, 0, 0, 0)))


class BudgetMeter:
    """Spend of one route in the current UTC day and month, in micro-USD.

    `fleet_*` is the store's total as last seen plus what this sidecar spent since (without a
    store it is this sidecar's own spend); `mine_*` is this sidecar's own part, put back into
    the store if the store lost it.
    """

    def __init__(self, budget: Budget) -> None:
        self.budget = budget
        self.day = self.month = ""
        self.fleet_day = self.fleet_month = 0
        self.mine_day = self.mine_month = 0
        self.pending = 0  # spent, not sent to the store yet

    def roll(self, now: float) -> None:
        day, month = day_key(now), month_key(now)
        if day != self.day:
            self.day, self.fleet_day, self.mine_day = day, 0, 0
        if month != self.month:
            self.month, self.fleet_month, self.mine_month = month, 0, 0

    def add(self, usd: float, now: float) -> None:
        self.roll(now)
        micro = int(round(usd * MICRO))
        if micro <= 0:
            return
        self.pending += micro
        self.fleet_day += micro
        self.fleet_month += micro
        self.mine_day += micro
        self.mine_month += micro

    def synced(self, day: str, month: str, sent: int, fleet_day: int, fleet_month: int) -> None:
        """The store's totals after it added `sent`; spend since the call was sent stays on top."""
        self.pending -= sent
        if day == self.day:
            self.fleet_day = fleet_day + self.pending
        if month == self.month:
            self.fleet_month = fleet_month + self.pending

    def exhausted(self, now: float) -> BudgetState | None:
        self.roll(now)
        budget = self.budget
        if budget.usd_per_day is not None and self.fleet_day >= budget.usd_per_day * MICRO:
            return BudgetState("day", budget.usd_per_day, self.fleet_day / MICRO, next_day(now))
        if budget.usd_per_month is not None and self.fleet_month >= budget.usd_per_month * MICRO:
            return BudgetState("month", budget.usd_per_month, self.fleet_month / MICRO, next_month(now))
        return None


@dataclass(frozen=True)
class SyncCall:
    """One request to the store for one route; resent unchanged (same `seq`) after a failure."""

    seq: int
    window: int
    day: str
    month: str
    want_requests: int = 0
    request_limit: int = 0
    want_tokens: int = 0
    token_limit: int = 0
    token_debt: int = 0
    spend: int = 0  # micro-USD
    budgeted: bool = False
    known: bool = False  # this sidecar synced before: a missing record means the store lost it
    restore_requests: int = 0
    restore_tokens: int = 0
    restore_day: int = 0
    restore_month: int = 0


@dataclass(frozen=True)
class SyncReply:
    granted_requests: int
    granted_tokens: int
    window_requests: int
    window_tokens: int
    day_usd_micro: int
    month_usd_micro: int
    restored: bool


@dataclass
class RouteAccount:
    """Everything one sidecar counts for one fleet-scoped (or budgeted) route."""

    route: str
    limits: Limits
    budget: Budget | None
    requests: Lease | None = None
    tokens: Lease | None = None
    meter: BudgetMeter | None = None
    pending: SyncCall | None = None  # sent (or failed) and not answered yet
    synced_once: bool = False
    _seq: int = 0
    _extra: dict[str, int] = field(default_factory=dict)

    @classmethod
    def create(cls, route: str, limits: Limits, budget: Budget | None, *, fleet: bool) -> "RouteAccount":
        account = cls(route, limits, budget)
        if fleet and limits.requests_per_minute is not None:
            account.requests = Lease(limits.requests_per_minute)
        if fleet and limits.tokens_per_minute is not None:
            limit = limits.tokens_per_minute
            account.tokens = Lease(limit, min_chunk=int(limit * MAX_LEASE_SHARE))
        if budget is not None:
            account.meter = BudgetMeter(budget)
        return account

    def matches(self, limits: Limits, budget: Budget | None) -> bool:
        return self.limits == limits and self.budget == budget

    def next_call(self, now: float) -> SyncCall | None:
        """The call to send now: the failed one again, else a new one (None: nothing is shared)."""
        if self.pending is not None:
            return self.pending
        requests, tokens, meter = self.requests, self.tokens, self.meter
        want_requests = requests.want(now) if requests is not None else 0
        want_tokens = tokens.want(now) if tokens is not None else 0
        token_debt = tokens.debt if tokens is not None else 0
        if meter is not None:
            meter.roll(now)
        spend = meter.pending if meter is not None else 0
        if requests is None and tokens is None and meter is None:
            return None
        # Sent even with nothing to ask: it brings the fleet's totals and repairs a flushed store.
        self._seq += 1
        call = SyncCall(
            seq=self._seq, window=window_of(now), day=day_key(now), month=month_key(now),
            want_requests=want_requests, request_limit=requests.limit if requests else 0,
            want_tokens=want_tokens, token_limit=tokens.limit if tokens else 0, token_debt=token_debt,
            spend=spend, budgeted=meter is not None, known=self.synced_once,
            restore_requests=requests.contributed if requests else 0,
            restore_tokens=tokens.contributed if tokens else 0,
            restore_day=(meter.mine_day - spend) if meter else 0,
            restore_month=(meter.mine_month - spend) if meter else 0,
        )
        self.pending = call
        return call

    def answered(self, call: SyncCall, reply: SyncReply) -> None:
        self.pending = None
        self.synced_once = True
        if self.requests is not None:
            self.requests.granted(call.window, call.want_requests, reply.granted_requests, 0, reply.window_requests)
        if self.tokens is not None:
            self.tokens.granted(call.window, call.want_tokens, reply.granted_tokens, call.token_debt,
                                reply.window_tokens)
        if self.meter is not None:
            self.meter.synced(call.day, call.month, call.spend, reply.day_usd_micro, reply.month_usd_micro)


class Breaker:
    """Stops calling a failing store for a while, so a dead Redis costs nothing per request.

    Opens after `threshold` failures in a row; stays open `open_s` (doubling up to `max_open_s`
    while the store keeps failing), then lets one call through to probe it.
    """

    def __init__(self, threshold: int = 3, open_s: float = 0.5, max_open_s: float = 5.0) -> None:
        self.threshold = threshold
        self.base_open_s = open_s
        self.max_open_s = max_open_s
        self.failures = 0
        self.open_until = 0.0
        self._open_s = open_s

    def allows(self, now: float) -> bool:
        return self.failures < self.threshold or now >= self.open_until

    @property
    def healthy(self) -> bool:
        return self.failures == 0

    def succeeded(self) -> None:
        self.failures = 0
        self._open_s = self.base_open_s

    def failed(self, now: float) -> None:
        self.failures += 1
        if self.failures >= self.threshold:
            if self.failures > self.threshold:  # a failed probe: wait longer
                self._open_s = min(self._open_s * 2, self.max_open_s)
            self.open_until = now + self._open_s
