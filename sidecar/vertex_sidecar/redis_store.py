"""The store of fleet-wide limits and budgets: Redis (≥ 6, Valkey, Memorystore). I/O only.

One Lua script (loaded once, then called by EVALSHA; redis-py reloads it after a
`SCRIPT FLUSH`/`FLUSHALL`) does a route's whole sync atomically: put back this sidecar's
counts if the store lost them, apply the token debt and the spend, grant leases from what
is left of the window, and remember the call's sequence number so a retried call is
answered again without being applied twice. All keys of a route share a hash tag, so the
script also runs on a Redis Cluster.

`redis` is imported only when a store is configured (it is in the `sidecar` extra).
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

from .config import RedisStore
from .fleet_limits import SyncCall, SyncReply, WINDOW_S

# KEYS: 1 seq hash, 2 window requests, 3 window tokens, 4 day spend, 5 month spend
# ARGV: 1 sidecar id, 2 seq, 3 known, 4 want req, 5 req limit, 6 want tok, 7 tok limit,
#       8 tok debt, 9 spend, 10 budgeted, 11-14 restore req/tok/day/month, 15 window ttl, 16 day ttl, 17 month ttl
SYNC_SCRIPT = """
local me, seq = ARGV[1], ARGV[2]
local function num(key) return tonumber(redis.call('GET', key) or '0') end
local function totals(g_req, g_tok, restored)
  local day, month = 0, 0
  if ARGV[10] == '1' then day, month = num(KEYS[4]), num(KEYS[5]) end
  return {g_req, g_tok, num(KEYS[2]), num(KEYS[3]), day, month, restored}
end
local last = redis.call('HGET', KEYS[1], me)
if last then
  local last_seq, g_req, g_tok = string.match(last, '^(%d+):(%d+):(%d+)$')
  if last_seq == seq then
    return totals(tonumber(g_req), tonumber(g_tok), 0)
  end
end
local function add(key, amount, ttl)
  amount = tonumber(amount)
  if amount > 0 then
    redis.call('INCRBY', key, amount)
    redis.call('EXPIRE', key, ttl)
  end
end
local restored = 0
if not last and ARGV[3] == '1' then
  restored = 1
  add(KEYS[2], ARGV[11], ARGV[15])
  add(KEYS[3], ARGV[12], ARGV[15])
  add(KEYS[4], ARGV[13], ARGV[16])
  add(KEYS[5], ARGV[14], ARGV[17])
end
add(KEYS[3], ARGV[8], ARGV[15])
add(KEYS[4], ARGV[9], ARGV[16])
add(KEYS[5], ARGV[9], ARGV[17])
local function grant(key, want, limit)
  want, limit = tonumber(want), tonumber(limit)
  if want <= 0 or limit <= 0 then return 0 end
  local g = math.min(want, limit - num(key))
  if g <= 0 then return 0 end
  add(key, g, ARGV[15])
  return g
end
local g_req = grant(KEYS[2], ARGV[4], ARGV[5])
local g_tok = grant(KEYS[3], ARGV[6], ARGV[7])
redis.call('HSET', KEYS[1], me, seq .. ':' .. g_req .. ':' .. g_tok)
redis.call('EXPIRE', KEYS[1], ARGV[17])
return totals(g_req, g_tok, restored)
"""

DAY_TTL_S = 2 * 86400
MONTH_TTL_S = 32 * 86400


class StoreError(Exception):
    """The store did not answer in time or failed; `kind` is a metric label."""

    def __init__(self, kind: str, detail: str) -> None:
        super().__init__(detail)
        self.kind = kind  # timeout | connection | error


class RedisLimitStore:
    def __init__(self, settings: RedisStore, sidecar_id: str) -> None:
        import redis.asyncio as aioredis  # only with a store configured
        from redis.backoff import NoBackoff
        from redis.asyncio.retry import Retry

        self.settings = settings
        self.sidecar_id = sidecar_id
        self.timeout_s = settings.timeout_ms / 1000
        options: dict[str, Any] = {
            "socket_timeout": self.timeout_s, "socket_connect_timeout": self.timeout_s,
            "retry": Retry(NoBackoff(), 0),  # the sync loop retries, with the same sequence number
            "health_check_interval": 0, "decode_responses": False, "max_connections": 4,
        }
        if settings.password_file is not None:
            options["password"] = Path(settings.password_file).read_text(encoding="utf-8").strip()
        if settings.url.startswith("rediss://"):
            # The server's certificate is verified, and its name against the URL's host.
            options.update(ssl_cert_reqs="required", ssl_check_hostname=True, ssl_ca_certs=settings.tls_ca_file)
        self._client = aioredis.Redis.from_url(settings.url, **options)
        self._script = self._client.register_script(SYNC_SCRIPT)
        self._redis_errors = (aioredis.ConnectionError, aioredis.TimeoutError)
        self._response_error = aioredis.ResponseError

    def keys(self, route: str, call: SyncCall) -> list[str]:
        base = f"{self.settings.key_prefix}:{{{route}}}"
        return [f"{base}:seq", f"{base}:req:{call.window}", f"{base}:tok:{call.window}",
                f"{base}:usd:d:{call.day}", f"{base}:usd:m:{call.month}"]

    async def sync(self, route: str, call: SyncCall) -> SyncReply:
        args = [self.sidecar_id, call.seq, int(call.known), call.want_requests, call.request_limit,
                call.want_tokens, call.token_limit, call.token_debt, call.spend, int(call.budgeted),
                call.restore_requests, call.restore_tokens, call.restore_day, call.restore_month,
                2 * WINDOW_S, DAY_TTL_S, MONTH_TTL_S]
        try:
            async with asyncio.timeout(self.timeout_s * 2):  # connect + call, each bounded too
                raw = await self._script(keys=self.keys(route, call), args=args)
        except TimeoutError:
            await self._reset()
            raise StoreError("timeout", f"no answer within {self.settings.timeout_ms} ms") from None
        except self._redis_errors as exc:
            await self._reset()
            kind = "timeout" if "imeout" in type(exc).__name__ else "connection"
            raise StoreError(kind, _safe(exc)) from None
        except self._response_error as exc:
            raise StoreError("error", _safe(exc)) from None
        except OSError as exc:
            await self._reset()
            raise StoreError("connection", _safe(exc)) from None
        values = [int(v) for v in raw]
        return SyncReply(values[0], values[1], values[2], values[3], values[4], values[5], bool(values[6]))

    async def warm_up(self) -> None:
        """Open the first connection (TLS handshake included) before any request needs it."""
        try:
            async with asyncio.timeout(max(self.timeout_s * 4, 1.0)):
                await self._client.ping()
        except Exception:
            pass  # the sync loop reports the store's state

    async def _reset(self) -> None:
        """A timed-out connection may still get its late answer: never reuse it."""
        try:
            await self._client.connection_pool.disconnect()
        except Exception:  # pragma: no cover - best effort
            pass

    async def aclose(self) -> None:
        await self._client.aclose()


def _safe(exc: BaseException) -> str:
    """Redis errors never carry the password, but keep messages short and one line."""
    return (str(exc) or type(exc).__name__).splitlines()[0][:200]
