"""Whether the webhook's indexes are complete: no pod is judged on a half-loaded index.

kopf starts serving admission requests as soon as the resources are discovered, while
its indexes are still filling from the initial lists. A replica answering then would
find no route for a pod that one selects, and let it start without its sidecar. So the
webhook (and the readiness probe, which asks the webhook) refuse until every route and
credential that the API server lists is in the index; once complete, the watch keeps it so.
"""

from __future__ import annotations

import asyncio
import time
from typing import Awaitable, Callable, Iterable

Key = tuple[str, str, str]  # (kind, namespace, name)


class IndexSync:
    def __init__(self, list_keys: Callable[[], Awaitable[set[Key]]], *, min_interval: float = 0.5,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._list_keys = list_keys
        self._min_interval = min_interval
        self._clock = clock
        self._lock = asyncio.Lock()
        self._listed: set[Key] | None = None
        self._listed_at = float("-inf")
        self.synced = False
        self.missing: list[Key] = []

    async def check(self, indexed: Callable[[], Iterable[Key]]) -> bool:
        """True once `indexed()` holds everything listed (re-listing at most every min_interval)."""
        if self.synced:
            return True
        async with self._lock:
            if self.synced:
                return True
            if self._listed is None or self._clock() - self._listed_at >= self._min_interval:
                self._listed = await self._list_keys()  # deleted since: the next listing forgets them
                self._listed_at = self._clock()
            have = set(indexed())
            self.missing = sorted(self._listed - have)
            self.synced = not self.missing
            return self.synced
