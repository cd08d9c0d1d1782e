"""Access tokens issued by the emulated token endpoints and checked by the emulated APIs.

One registry is shared by the metadata server and OAuth emulators (which issue tokens) and
the Vertex emulator (which validates them), the way Google's front ends all trust tokens
minted by Google's token services.
"""

from __future__ import annotations

import secrets
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

__all__ = ["TOKEN_PREFIX", "IssuedToken", "TokenRegistry"]

# Real access tokens start with "ya29."; keeping the prefix makes log redaction tests honest.
TOKEN_PREFIX = "ya29.emu-"

# Expired records are kept (so an API can answer ACCESS_TOKEN_EXPIRED rather than "unknown")
# but pruned once there are many of them, so a long benchmark does not grow without bound.
_PRUNE_ABOVE = 10_000


@dataclass(frozen=True)
class IssuedToken:
    """One issued access token."""

    token: str
    subject: str
    scopes: tuple[str, ...]
    issued_at: float
    expires_at: float


class TokenRegistry:
    """Thread-safe store of issued access tokens and their expiry.

    `clock` returns seconds on a monotonic scale; tests may pass a fake clock to expire
    tokens without sleeping.
    """

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._lock = threading.Lock()
        self._tokens: dict[str, IssuedToken] = {}
        self._issued_count = 0

    def now(self) -> float:
        return self._clock()

    def issue(
        self, subject: str, lifetime_s: float, scopes: tuple[str, ...] | list[str] = ()
    ) -> tuple[str, int]:
        """Mint an opaque token for `subject`; returns (token, expires_in seconds).

        expires_in is rounded down so a client never believes a token lives longer than it does.
        """
        token = TOKEN_PREFIX + secrets.token_urlsafe(32)
        now = self._clock()
        record = IssuedToken(token, subject, tuple(scopes), now, now + lifetime_s)
        with self._lock:
            if len(self._tokens) >= _PRUNE_ABOVE:
                self._prune_expired(now)
            self._tokens[token] = record
            self._issued_count += 1
        return token, max(0, int(lifetime_s))

    def lookup(self, token: str) -> IssuedToken | None:
        """The record of a known, unrevoked token, expired or not."""
        with self._lock:
            return self._tokens.get(token)

    def validate(self, token: str) -> str | None:
        """The token's subject when it is known, unrevoked and unexpired; else None."""
        record = self.lookup(token)
        if record is None or record.expires_at <= self._clock():
            return None
        return record.subject

    def remaining_s(self, token: str) -> float:
        """Seconds left before the token expires (0 when unknown or expired)."""
        record = self.lookup(token)
        if record is None:
            return 0.0
        return max(0.0, record.expires_at - self._clock())

    def revoke(self, token: str) -> None:
        with self._lock:
            self._tokens.pop(token, None)

    def revoke_all(self) -> None:
        with self._lock:
            self._tokens.clear()

    @property
    def issued_count(self) -> int:
        """How many tokens were issued since creation (revocation does not decrease it)."""
        with self._lock:
            return self._issued_count

    def __len__(self) -> int:
        with self._lock:
            return len(self._tokens)

    def _prune_expired(self, now: float) -> None:
        for token in [t for t, r in self._tokens.items() if r.expires_at <= now]:
            del self._tokens[token]
