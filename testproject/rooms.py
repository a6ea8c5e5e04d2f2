"""The demo's index of room names, so the dashboard can list rooms.

The channel layer answers "who is in room X" but deliberately keeps no list of all
groups. The demo keeps its own: a sorted set ``<prefix>:demo:rooms`` (room name ->
last join time) in the same Redis, under the layer's prefix so ``flush()`` clears it.
Member counts always come from the layer (``group_members``), never from this index.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import redis.asyncio as aioredis
from django.conf import settings

# A room nobody joined for this long, and that is empty now, leaves the index.
FORGET_EMPTY_AFTER = 300.0

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


async def remember(room: str) -> None:
    """Record that someone joined ``room`` just now."""
    await _client().zadd(index_key(), {room: time.time()})


async def known_rooms() -> list[tuple[str, float]]:
    """All indexed rooms with their last join time, oldest first."""
    rows: list[Any] = await _client().zrange(index_key(), 0, -1, withscores=True)
    return [(name.decode() if isinstance(name, bytes) else name, score) for name, score in rows]


async def forget(room: str) -> None:
    await _client().zrem(index_key(), room)
