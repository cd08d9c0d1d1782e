"""A burst of concurrent requests on a fleet-limited route, far below its limit, against a real
redis-server: every one is admitted. (A cold sidecar knows no request rate yet; it used to
ask the store for one unit per sync, so 64 requests arriving together exhausted their
retries and were refused with a rate-limit error the limit never called for.)"""

from __future__ import annotations

import asyncio
from pathlib import Path


from tests.harness.redis_server import RedisServer, require_redis_server
from vertex_sidecar.config import parse_config
from vertex_sidecar.errors import SidecarError
from vertex_sidecar.governor import Governor
from vertex_sidecar.limits import RouteLimiter


async def test_a_cold_burst_far_below_the_limit_is_admitted(tmp_path: Path) -> None:
    require_redis_server()
    redis = RedisServer(tmp_path).start()
    try:
        config = parse_config({"routes": [{"name": "burst", "match": {"models": ["*"]}, "limits": {
            "requests_per_minute": 1_000_000, "scope": "fleet"}}], "store": redis.store_config()})
        governor = Governor(config)
        governor.start()
        route = config.routes[0]
        limiter = RouteLimiter(route.name, route.limits)
        refused: list[str] = []

        async def client() -> None:
            for _ in range(5):
                try:
                    await governor.admit(route, limiter)
                except SidecarError as exc:
                    refused.append(str(exc))
                await asyncio.sleep(0.01)  # the upstream's time

        try:
            await asyncio.gather(*(client() for _ in range(64)))
        finally:
            await governor.aclose()
        assert refused == []
        # Every admitted request was leased from the store (one window key holds the grants).
        windows = [key for key in redis.client().keys("vxp:{burst}:req:*")]
        assert len(windows) == 1 and int(redis.client().get(windows[0])) >= 64 * 5
    finally:
        redis.kill()
