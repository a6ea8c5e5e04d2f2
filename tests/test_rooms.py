"""The demo's room index (testproject/rooms.py) and what the dashboard lists from it."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest
import redis.asyncio as aioredis
from django.test import override_settings

from testproject import rooms
from testproject.consumers import snapshot


@pytest.fixture
async def index(redis_url: str, prefix: str) -> AsyncIterator[aioredis.Redis]:
    layers = {"default": {"BACKEND": "channels_distrib.layers.DistributedChannelLayer",
                          "CONFIG": {"hosts": [redis_url], "prefix": prefix}}}
    client = aioredis.Redis.from_url(redis_url)
    with override_settings(REDIS_URL=redis_url, CHANNEL_LAYERS=layers):
        try:
            yield client
        finally:
            await client.delete(rooms.index_key())
            await rooms.close()
            await client.aclose()


async def test_entries_unused_for_room_ttl_are_dropped_and_the_key_expires(
    index: aioredis.Redis,
) -> None:
    now = time.time()
    await rooms.remember("ancient", now=now - rooms.ROOM_TTL - 5)
    await rooms.remember("recent", now=now - 10)
    await rooms.remember("fresh", now=now)
    assert [name for name, _ in await rooms.known_rooms()] == ["recent", "fresh"]
    ttl = await index.ttl(rooms.index_key())
    assert 0 < ttl <= rooms.KEY_TTL


async def test_seen_in_use_refreshes_but_never_resurrects(index: aioredis.Redis) -> None:
    now = time.time()
    await rooms.remember("busy", now=now - rooms.ROOM_TTL + 1)
    await rooms.seen_in_use(["busy", "gone"], now=now)
    assert await rooms.known_rooms() == [("busy", now)]


async def test_dashboard_lists_only_rooms_with_members_and_forgets_old_empty_ones(
    index: aioredis.Redis, make_layer: Callable[..., Any],
) -> None:
    layer = make_layer()
    channel = await layer.new_channel()
    await layer.group_add("full", channel, meta={"name": "ann"}, presence=True)
    now = time.time()
    await rooms.remember("full", now=now - rooms.ROOM_TTL - 60)  # joined long ago, still used
    await rooms.remember("just-emptied", now=now - 5)
    await rooms.remember("emptied-long-ago", now=now - rooms.ROOM_TTL - 30)
    # remember() already pruned the entries older than ROOM_TTL; put one back as a node
    # that crashed mid-way would have left it.
    await index.zadd(rooms.index_key(), {"emptied-long-ago": now - rooms.ROOM_TTL - 30,
                                         "full": now - rooms.ROOM_TTL - 60})
    snap = await snapshot(layer)
    assert [row["room"] for row in snap["rooms"]] == ["full"]
    assert snap["rooms"][0]["members"] == 1
    left = dict(await rooms.known_rooms())
    assert set(left) == {"full", "just-emptied"}
    assert left["full"] >= now  # refreshed: a room in use never expires
