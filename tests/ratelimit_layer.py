"""A tests-only layer with the ``ratelimit`` extension that ``user_rate_limit`` needs.

``DistributedChannelLayer`` has no shared token bucket yet; this subclass adds
``take_tokens`` on the same Redis with one Lua script (what the layer could adopt as is:
one round trip, Redis server time, the bucket expires once full again).
"""

from __future__ import annotations

import math
from typing import Any

from redis.asyncio import Redis

from channels_distrib.layers import DistributedChannelLayer

# KEYS[1] the bucket (hash: tokens, ts). ARGV[1] rate (tokens/s), ARGV[2] burst,
# ARGV[3] cost, ARGV[4] TTL ms. Returns 1 when the tokens were taken, else 0.
TOKEN_BUCKET = """
local now_parts = redis.call('TIME')
local now = tonumber(now_parts[1]) + tonumber(now_parts[2]) / 1000000
local rate, burst, cost = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
local state = redis.call('HMGET', KEYS[1], 'tokens', 'ts')
local tokens = tonumber(state[1]) or burst
local ts = tonumber(state[2]) or now
tokens = math.min(burst, tokens + math.max(0, now - ts) * rate)
local taken = 0
if tokens >= cost then
  tokens = tokens - cost
  taken = 1
end
redis.call('HSET', KEYS[1], 'tokens', tostring(tokens), 'ts', tostring(now))
redis.call('PEXPIRE', KEYS[1], ARGV[4])
return taken
"""


class RateLimitedLayer(DistributedChannelLayer):
    """DistributedChannelLayer + ``take_tokens(key, rate, burst, cost=1) -> bool``."""

    extensions = [*DistributedChannelLayer.extensions, "ratelimit"]

    def __init__(self, **config: Any) -> None:
        super().__init__(**config)
        self._bucket_url = str(config["hosts"][0])

    async def take_tokens(self, key: str, rate: float, burst: int, cost: int = 1) -> bool:
        ttl_ms = math.ceil(burst / rate * 1000) + 1000
        client = Redis.from_url(self._bucket_url)
        try:
            taken = await client.eval(
                TOKEN_BUCKET, 1, f"{self.prefix}:rl:{key}", rate, burst, cost, ttl_ms
            )
        finally:
            await client.aclose()
        return bool(taken)
