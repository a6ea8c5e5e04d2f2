"""The demo's index of room names, so the dashboard can list rooms.

The channel layer answers "who is in room X" but deliberately keeps no list of all
groups. The demo keeps its own: a sorted set ``<prefix>:demo:rooms`` (room name -> the
last time someone joined it or a dashboard saw members in it) in the same Redis, under
the layer's prefix so ``flush()`` clears it. Member counts always come from the layer
(``group_members``), never from this index, and the dashboard lists only rooms that have
members now.

Nothing in the index lives forever: an entry not refreshed for ``ROOM_TTL`` seconds is
dropped (by the next join or dashboard tick), and the whole key expires ``KEY_TTL`` after
the last join, so a cluster that is gone leaves nothing behind.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterable
from typing import Any

import redis.asyncio as aioredis
from django.conf import settings

ROOM_TTL = 300.0  # seconds an empty room stays in the index after it was last seen in use
KEY_TTL = 86400  # seconds the index key outlives the last join

_clients: dict[asyncio.AbstractEventLoop, aioredis.Redis] = {}


def index_key() -> str:
    """The Redis key of the room index (documented above)."""
    prefix = settings.CHANNEL_LAYERS["default"]["CONFIG"].get("prefix", "asgi")
    return f"{prefix}:demo:rooms"


def _client() -> aioredis.Redis:
    loop = asyncio.get_running_loop()
    client = _clients.get(loop)
    if client is None:
        client = aioredis.Redis.from_url(settings.REDIS_URL)
        _clients[loop] = client
    return client


async def close() -> None:
    """Close this event loop's Redis client (tests; a node keeps it for its lifetime)."""
    client = _clients.pop(asyncio.get_running_loop(), None)
    if client is not None:
        await client.aclose()


async def remember(room: str, now: float | None = None) -> None:
    """Record that someone joined ``room``; drop entries unused for ``ROOM_TTL``."""
    now = time.time() if now is None else now
    key = index_key()
    async with _client().pipeline(transaction=True) as pipe:
        pipe.zadd(key, {room: now})
        pipe.zremrangebyscore(key, "-inf", now - ROOM_TTL)
        pipe.expire(key, KEY_TTL)
        await pipe.execute()


async def seen_in_use(names: Iterable[str], now: float | None = None) -> None:
    """Refresh rooms that have members now, so a long-lived room never expires."""
    mapping = {name: time.time() if now is None else now for name in names}
    if mapping:
        await _client().zadd(index_key(), mapping, xx=True)  # xx: never re-add a dropped one


async def known_rooms() -> list[tuple[str, float]]:
    """All indexed rooms with their last-used time, oldest first."""
    rows: list[Any] = await _client().zrange(index_key(), 0, -1, withscores=True)
    return [(name.decode() if isinstance(name, bytes) else name, score) for name, score in rows]


async def forget(room: str) -> None:
    await _client().zrem(index_key(), room)
