"""The heartbeat: its own timer whatever housekeeping costs, and the versioned key layout."""

from __future__ import annotations

import asyncio
import time

import pytest
from django.core.exceptions import ImproperlyConfigured

from channels_distrib.keys import Keys
from tests.helpers_layers import raw_redis
from tests.test_integrity import FAST, close_quietly, holds_for, poll, proxy_to

GROUPS = 2000


async def test_slow_bulk_expiry_never_starves_the_heartbeat(make_layer, redis_url):
    """2,000 memberships expire at once over a slow link (50 ms a round trip): their removal
    takes seconds of housekeeping, yet the node beats on time and is never pruned. (With one
    round trip per removal inside the heartbeat, it took 100 s and the node was pruned.)"""
    observer = make_layer(**FAST)
    async with proxy_to(redis_url) as proxy:
        node = make_layer(hosts=[proxy.url], group_expiry=1, **FAST)
        try:
            channel = await node.new_channel()
            for i in range(GROUPS):
                await node.group_add(f"bulk{i}", channel)
            assert await observer.group_size(f"bulk{GROUPS - 1}") == 1
            proxy.delay = 0.05
            started = time.monotonic()
            # The removals run (SYNC batches of 200) while the node stays listed throughout.
            await holds_for(
                lambda: observer.nodes(),
                lambda ns: node.node_id in [n.node_id for n in ns],
                3.0,
                "the busy node stayed listed",
            )
            _, took = await poll(
                lambda: observer.channel_groups(channel),
                lambda groups: groups == set(),
                15,
                "every expired membership removed",
            )
            assert await observer.prune() == []
            assert node.node_id in [n.node_id for n in await observer.nodes()]
            print(f"\n{GROUPS} expirations over a 50 ms link: gone {time.monotonic() - started:.1f} s")
        finally:
            proxy.delay = 0.0
            await close_quietly(node)


async def test_a_live_node_of_the_previous_key_layout_refuses_the_start(make_layer, redis_url, prefix):
    """Layout 1 kept node deadlines in ``<prefix>:nodes``; a live entry there means a node of
    the old code still runs on this prefix: the new node refuses, saying what to do."""
    layer = make_layer()
    old_nodes = f"{prefix}:nodes"
    async with raw_redis(redis_url) as raw:
        deadline = int((time.time() + 60) * 1000)
        await raw.zadd(old_nodes, {"oldtoken": deadline})
        try:
            with pytest.raises(ImproperlyConfigured, match="another key layout") as caught:
                await layer.new_channel()
            assert "stop all nodes" in str(caught.value) and prefix in str(caught.value)
            assert not await raw.exists(Keys(prefix).nodes), "the refused node registered"
            # Once the old node is gone (its deadline passed), the start goes through.
            await raw.zadd(old_nodes, {"oldtoken": int((time.time() - 60) * 1000)})
            channel = await asyncio.wait_for(layer.new_channel(), 5)
            assert channel.startswith("specific.")
        finally:
            await raw.delete(old_nodes)
