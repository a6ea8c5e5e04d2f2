"""The heartbeat's first beat refuses a prefix used by live nodes of another key layout.

(That the heartbeat keeps its own timer whatever housekeeping costs is
``tests/test_integrity.py::test_mass_expiry_does_not_starve_the_heartbeat``.)"""

from __future__ import annotations

import asyncio
import time

import pytest
from django.core.exceptions import ImproperlyConfigured

from channels_distrib.keys import Keys
from tests.helpers_layers import raw_redis


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


async def test_reconciliation_removes_a_ghost_and_restores_a_lost_membership(make_layer, redis_url):
    """Redis and the owner disagree behind its back (a write nobody told it of, a membership
    deleted under it): within a few heartbeats the node's reconciliation repairs both."""
    fast = {"heartbeat_interval": 0.1, "node_timeout": 0.6}
    node = make_layer(**fast)
    other = make_layer()
    channel = await node.new_channel()
    await node.group_add("kept", channel)
    # A membership written straight to Redis, no control entry: the node does not hold it.
    await other.registry.add(
        other._transport(), "ghost", channel, node.node_id, None, False, notify=False
    )
    assert await other.group_size("ghost") == 1
    # And one the node holds, deleted under it.
    keys = Keys(node.prefix)
    async with raw_redis(redis_url) as raw:
        await raw.hdel(keys.group("kept"), channel)
        await raw.hset(keys.node_channels(node._node.token), channel, "ghost")
    async with asyncio.timeout(5):
        while await other.group_size("ghost") or not await other.group_size("kept"):
            await asyncio.sleep(0.05)
    assert await other.channel_groups(channel) == {"kept"}
    await other.group_send("kept", {"type": "test.message"})
    assert (await asyncio.wait_for(node.receive(channel), 2))["type"] == "test.message"
