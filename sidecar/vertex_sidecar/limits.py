"""Per-route request and token rate limits over a sliding one-minute window. Pure.

The window is 60 one-second buckets in a ring: O(1) per request, constant memory,
and a limit that frees up gradually rather than all at once on a minute boundary.
Tokens are counted from responses (usage is only known afterwards), so a burst can
overshoot the token limit by the requests already in flight; the next request after
that waits until enough of the window has passed.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Callable

from .config import Limits

WINDOW_S = 60
Clock = Callable[[], float]


class _Window:
    """Counts in the last WINDOW_S seconds, by one-second bucket."""

    def __init__(self) -> None:
        self._buckets = [0] * WINDOW_S
        self._stamps = [-1] * WINDOW_S  # the absolute second each bucket holds
        self.total = 0
        self._expired_at = -1  # buckets only age out when the second changes

    def _expire(self, second: int) -> None:
        if second == self._expired_at:
            return
        self._expired_at = second
        for index in range(WINDOW_S):
            if self._stamps[index] != -1 and second - self._stamps[index] >= WINDOW_S:
                self.total -= self._buckets[index]
                self._buckets[index] = 0
                self._stamps[index] = -1

    def count(self, now: float) -> int:
        self._expire(int(now))
        return self.total

    def add(self, amount: int, now: float) -> None:
        second = int(now)
        self._expire(second)
        index = second % WINDOW_S
        if self._stamps[index] != second:
            self._buckets[index] = 0
            self._stamps[index] = second
        self._buckets[index] += amount
        self.total += amount

    def seconds_until_below(self, limit: int, now: float) -> float:
        """How long until the count drops below `limit` (the oldest buckets expire first)."""
        second = int(now)
        self._expire(second)
        remaining = self.total
        for stamp, amount in sorted((s, self._buckets[i]) for i, s in enumerate(self._stamps) if s != -1):
            remaining -= amount
            if remaining < limit:
                return max(stamp + WINDOW_S - now, 0.0)
        return 0.0


@dataclass(frozen=True)
class Refusal:
    retry_after_s: int
    message: str


class RouteLimiter:
    def __init__(self, route: str, limits: Limits, clock: Clock = time.monotonic) -> None:
        self.route = route
        self.limits = limits
        self._clock = clock
        self._requests = _Window()
        self._tokens = _Window()

    def admit(self) -> Refusal | None:
        """Count one request, or say why not and when to retry."""
        now = self._clock()
        rpm, tpm = self.limits.requests_per_minute, self.limits.tokens_per_minute
        if rpm is not None and self._requests.count(now) >= rpm:
            wait = self._requests.seconds_until_below(rpm, now)
            return Refusal(_ceil(wait), f"route {self.route!r} allows {rpm} requests per minute; "
                                        f"retry in {_ceil(wait)} s")
        if tpm is not None and self._tokens.count(now) >= tpm:
            wait = self._tokens.seconds_until_below(tpm, now)
            return Refusal(_ceil(wait), f"route {self.route!r} allows {tpm} tokens per minute; "
                                        f"retry in {_ceil(wait)} s")
        if rpm is not None:
            self._requests.add(1, now)
        return None

    def token_refusal(self) -> Refusal | None:
        """Why no more tokens may be spent now (the window is used up), without counting a request."""
        now = self._clock()
        tpm = self.limits.tokens_per_minute
        if tpm is None or self._tokens.count(now) < tpm:
            return None
        wait = _ceil(self._tokens.seconds_until_below(tpm, now))
        return Refusal(wait, f"route {self.route!r} allows {tpm} tokens per minute; retry in {wait} s")

    def record_tokens(self, tokens: int) -> None:
        if self.limits.tokens_per_minute is not None and tokens > 0:
            self._tokens.add(tokens, self._clock())

    @property
    def counts_tokens(self) -> bool:
        return self.limits.tokens_per_minute is not None

    @property
    def active(self) -> bool:
        return self.limits.requests_per_minute is not None or self.limits.tokens_per_minute is not None


def _ceil(seconds: float) -> int:
    return max(1, math.ceil(seconds))


class Limiters:
    """One limiter per route name; kept across config reloads while a route's limits are unchanged."""

    def __init__(self, clock: Clock = time.monotonic) -> None:
        self._clock = clock
        self._by_route: dict[str, RouteLimiter] = {}

    def for_route(self, route: str, limits: Limits) -> RouteLimiter:
        limiter = self._by_route.get(route)
        if limiter is None or limiter.limits != limits:
            limiter = RouteLimiter(route, limits, self._clock)
            self._by_route[route] = limiter
        return limiter
