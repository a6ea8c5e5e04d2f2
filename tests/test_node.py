"""Nodes, heartbeats and pruning (DESIGN.md "Nodes, heartbeats, pruning"), with real processes.

Every node here is its own OS process (tests/node_proc.py, or daphne with tests/node_app.py);
the test process only sends and queries, so it is no node. Nothing calls ``prune()`` except
``test_prune_returns_each_dead_node_once``, which is about ``prune()`` itself: the surviving
nodes find the dead ones by themselves. Timing bounds get ``POLL_SLACK`` for the polling.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import time
import uuid
from urllib.parse import urlparse

import pytest
import redis.asyncio as aioredis

from tests.helpers_nodes import (
    FAST,
    RoundTripProxy,
    covered_at,
    eventually,
    joins_of,
    leaves_of,
    node_spawner,
    settle,
    start_nodes,
    view_of,
    wait_until,
)

# Every test here that makes layers runs with messages through Redis and through RabbitMQ.
BOTH_MESSAGE_PATHS = True

@pytest.fixture
async def spawn_node(redis_url, prefix, make_layer, path_options):
    """Node processes on the test's prefix (and message path); killed (by pid) before
    make_layer's flush."""
    async with node_spawner(redis_url, prefix, path_options.get("broker")) as spawn:
        yield spawn


GROUP = "room"
POLL_SLACK = 0.25
"""Tolerance on top of a contract bound for the 20 ms polling and process scheduling."""


def node_ids(infos: list) -> set[str]:
    return {n.node_id for n in infos}


async def flushdb(url: str) -> None:
    client = aioredis.from_url(url)
    try:
        await client.flushdb()
    finally:
        await client.aclose()


async def time_to_prune(layer, victim, survivors, members_left: int, timeout: float) -> dict:
    """SIGKILL ``victim``; poll until its memberships and node entry are gone and every
    surviving presence channel has received the leaves of all its channels.

    Returns seconds from the kill to "pruned" (group size right, as seen by polling) and to
    "leaves" (the receipt time the survivors printed for the last diff needed).
    """
    expected = set(victim.channels)
    victim.kill()
    killed_wall, killed = time.time(), time.monotonic()
    _, pruned = await wait_until(
        lambda: layer.group_size(GROUP),
        lambda n: n == members_left,
        timeout,
        what=f"group back to {members_left} members",
    )
    await wait_until(
        layer.nodes,
        lambda ns: victim.node_id not in node_ids(ns),
        1.0,
        what="victim gone from nodes()",
    )
    assert await layer.node_channels(victim.node_id) == set()
    arrivals = []
    for survivor in survivors:
        for channel in survivor.info["channels"]:
            await eventually(
                lambda s=survivor, ch=channel: covered_at(s, ch, "leaves", expected) is not None,
                max(1.0, timeout - (time.monotonic() - killed)),
                what=f"leaves at {channel}",
            )
            arrivals.append(covered_at(survivor, channel, "leaves", expected) - killed_wall)
    return {"pruned": pruned, "leaves": max(arrivals)}


async def test_sigkill_pruned_within_timeout_plus_interval_fast(layer, spawn_node):
    survivor = spawn_node(channels=1, group=GROUP, presence=True, **FAST)
    plain = spawn_node(channels=1, group=GROUP, **FAST)  # a member without presence
    victim = spawn_node(channels=5, group=GROUP, presence=True, **FAST)
    await asyncio.gather(survivor.ready(), plain.ready(), victim.ready())
    assert await layer.group_size(GROUP) == 7
    bound = FAST["node_timeout"] + FAST["heartbeat_interval"]
    took = await time_to_prune(layer, victim, [survivor], 2, timeout=bound + 5)
    print(
        f"\nSIGKILL, fast settings (0.5 s / 2 s): pruned after {took['pruned']:.2f} s, "
        f"leaves received after {took['leaves']:.2f} s (bound {bound} s)"
    )
    assert took["pruned"] <= bound + POLL_SLACK
    assert took["leaves"] <= bound + POLL_SLACK
    assert await layer.group_channels(GROUP) == {*survivor.channels, *plain.channels}
    assert plain.messages() == [], "non-presence members get no presence messages"


async def test_sigkill_pruned_within_timeout_plus_interval_with_defaults(layer, spawn_node):
    """The README's worst case with the defaults: node_timeout + heartbeat_interval = 8 s; and
    never before node_timeout - heartbeat_interval (its last beat was at most one interval
    before the kill), so a live node is never pruned early."""
    survivor = spawn_node(channels=1, group=GROUP, presence=True)
    victim = spawn_node(channels=5, group=GROUP, presence=True)
    await asyncio.gather(survivor.ready(), victim.ready())
    took = await time_to_prune(layer, victim, [survivor], 1, timeout=12)
    print(
        f"\nSIGKILL, default settings (2 s / 6 s): pruned after {took['pruned']:.2f} s, "
        f"leaves received after {took['leaves']:.2f} s (bound 8 s)"
    )
    assert 4.0 - POLL_SLACK <= took["pruned"] <= 8.0 + POLL_SLACK
    assert 4.0 - POLL_SLACK <= took["leaves"] <= 8.0 + POLL_SLACK


async def test_two_survivors_pruning_at_once_emit_each_leave_once(layer, spawn_node):
    survivors = await start_nodes(spawn_node, 2, channels=2, group=GROUP, presence=True, **FAST)
    victim = spawn_node(channels=20, group=GROUP, presence=True, **FAST)
    await victim.ready()
    bound = FAST["node_timeout"] + FAST["heartbeat_interval"]
    await time_to_prune(layer, victim, survivors, 4, timeout=bound + 5)
    # Let any late double-prune happen before counting.
    await asyncio.sleep(4 * FAST["heartbeat_interval"])
    for survivor in survivors:
        for channel in survivor.info["channels"]:
            leaves = leaves_of(survivor.messages(channel))
            assert sorted(leaves) == sorted(victim.channels), f"{channel} saw {leaves}"
    assert await layer.group_size(GROUP) == 4
    assert await layer.group_channels(GROUP) == {c for s in survivors for c in s.channels}
    assert len(await layer.group_members(GROUP)) == 4


async def test_prune_returns_each_dead_node_once(make_layer, spawn_node):
    """``prune()`` by hand from four sender-only layers at once (no live node prunes): the dead
    node is reported by exactly one call and its memberships are gone."""
    victim = spawn_node(channels=4, group=GROUP, presence=True, **FAST)
    await victim.ready()
    pruners = [make_layer(**FAST) for _ in range(4)]
    assert await pruners[0].prune() == [], "a live node is not dead"
    victim.kill()
    await asyncio.sleep(FAST["node_timeout"] + 0.5)
    # Silent past node_timeout is dead ("nodes() lists live nodes"), pruned or not yet.
    assert victim.node_id not in node_ids(await pruners[0].nodes())
    results = await asyncio.gather(*(p.prune() for p in pruners))
    assert sorted(sum(results, [])) == [victim.node_id], results
    assert await pruners[0].group_size(GROUP) == 0
    assert await pruners[0].node_channels(victim.node_id) == set()
    assert await pruners[1].prune() == []


async def test_pruning_removes_memberships_others_added_but_not_normal_channels(layer, spawn_node):
    """A node's channel added to a group by another process goes with the node; a normal
    channel the dead node added belongs to no node and stays."""
    survivor = spawn_node(channels=1, group=GROUP, **FAST)
    victim = spawn_node(channels=2, group=GROUP, **FAST)
    await asyncio.gather(survivor.ready(), victim.ready())
    await layer.group_add("added-by-sender", victim.channels[0], meta={"by": "sender"})
    await victim.command(cmd="group_add", group=GROUP, channel="workers.jobs")
    victim.kill()
    await wait_until(
        lambda: layer.group_channels(GROUP),
        lambda chans: chans == {*survivor.channels, "workers.jobs"},
        FAST["node_timeout"] + FAST["heartbeat_interval"] + 3,
        what="victim's channels pruned, the normal channel kept",
    )
    assert await layer.group_size("added-by-sender") == 0
    assert await layer.channel_groups(victim.channels[0]) == set()
    assert await layer.channel_groups("workers.jobs") == {GROUP}


async def test_node_memory_includes_memberships_others_made(own_redis, spawn_node, prefix):
    """After FLUSHDB the owner re-registers a membership another process added for its channel,
    and not one another process added and then discarded."""
    from channels_distrib.layers import DistributedChannelLayer

    node = spawn_node(url=own_redis.url, channels=2, **FAST)
    await node.ready()
    kept, dropped = node.channels
    sender = DistributedChannelLayer(hosts=[own_redis.url], prefix=prefix)
    try:
        await sender.group_add("by-sender", kept, meta={"k": 1}, presence=True)
        await sender.group_add("by-sender", dropped)
        await sender.group_discard("by-sender", dropped)
        await asyncio.sleep(2 * FAST["heartbeat_interval"])  # the owner hears of both
        await flushdb(own_redis.url)
        members, _ = await wait_until(
            lambda: sender.group_members("by-sender"),
            lambda ms: len(ms) >= 1,
            FAST["heartbeat_interval"] + 2,
            what="membership rebuilt by its owner",
        )
        await asyncio.sleep(FAST["heartbeat_interval"])
        members = await sender.group_members("by-sender")
        assert [(m.channel, m.meta) for m in members] == [(kept, {"k": 1})]
        assert members[0].node_id == node.node_id, members[0]
    finally:
        await sender.close()


async def test_partitioned_node_is_pruned_then_reregisters(layer, spawn_node, redis_url):
    """A node cut off from Redis (its connections closed, reconnects refused) past node_timeout
    is pruned by the others; when the network heals it re-registers and re-announces joins."""
    host_port = urlparse(redis_url).port or 6379  # the proxy listens and connects on loopback
    watcher = spawn_node(channels=1, group=GROUP, presence=True, **FAST)
    async with RoundTripProxy(host_port) as proxy:
        cut = spawn_node(url=proxy.url, channels=2, group=GROUP, presence=True, **FAST)
        await asyncio.gather(watcher.ready(), cut.ready())
        watch = watcher.info["channels"][0]
        await settle([watcher, cut])
        proxy.cut()
        await wait_until(
            lambda: layer.group_size(GROUP),
            lambda n: n == 1,
            FAST["node_timeout"] + FAST["heartbeat_interval"] + 3,
            what="partitioned node pruned",
        )
        joins_before = len(joins_of(watcher.messages(watch)))
        await asyncio.sleep(1.0)
        proxy.heal()
        _, took = await wait_until(
            lambda: layer.group_size(GROUP), lambda n: n == 3, 10, what="re-registered"
        )
        print(f"\npartition healed: re-registered after {took:.2f} s")
        await eventually(
            lambda: set(cut.channels) <= set(joins_of(watcher.messages(watch))[joins_before:]),
            3,
            what="joins re-announced after the partition",
        )
        await layer.group_send(GROUP, {"type": "room.message", "text": "healed"})
        await expect_everywhere([cut], "healed")
        assert took <= FAST["heartbeat_interval"] + 2.0, "reconnect plus one heartbeat"


async def test_pause_shorter_than_node_timeout_is_not_a_death(layer, spawn_node):
    watcher = spawn_node(channels=1, group=GROUP, presence=True, **FAST)
    paused = spawn_node(channels=2, group=GROUP, presence=True, **FAST)
    await asyncio.gather(watcher.ready(), paused.ready())
    await settle([watcher, paused])
    watch = watcher.info["channels"][0]
    seen_before = len(watcher.messages(watch))
    paused.pause()
    sizes = []
    start = time.monotonic()
    while time.monotonic() - start < FAST["node_timeout"] - 0.8:  # silent < 1.2 s + one beat
        sizes.append(await layer.group_size(GROUP))
        await asyncio.sleep(0.05)
    paused.resume()
    while time.monotonic() - start < FAST["node_timeout"] + 3 * FAST["heartbeat_interval"]:
        sizes.append(await layer.group_size(GROUP))
        await asyncio.sleep(0.05)
    assert set(sizes) == {3}, sizes
    assert watcher.messages(watch)[seen_before:] == [], "no leaves, no joins"


@pytest.mark.parametrize("configured_id", [False, True], ids=["generated-id", "configured-id"])
async def test_sigstop_past_timeout_then_sigcont_reregisters(layer, spawn_node, configured_id):
    """A paused node comes back by itself; with a configured node_id it must not refuse itself."""
    watcher = spawn_node(channels=1, group=GROUP, presence=True, **FAST)
    extra = {"node_id": f"paused-{uuid.uuid4().hex[:6]}"} if configured_id else {}
    paused = spawn_node(
        channels=3, group=GROUP, presence=True, meta={"who": "paused"}, **extra, **FAST
    )
    await asyncio.gather(watcher.ready(), paused.ready())
    watch = watcher.info["channels"][0]
    paused.pause()
    bound = FAST["node_timeout"] + FAST["heartbeat_interval"]
    await wait_until(
        lambda: layer.group_size(GROUP), lambda n: n == 1, bound + 3, what="paused node pruned"
    )
    assert paused.node_id not in node_ids(await layer.nodes())
    await eventually(
        lambda: set(paused.channels) <= set(leaves_of(watcher.messages(watch))),
        3,
        what="leaves of the paused node's channels",
    )
    joins_before = len(joins_of(watcher.messages(watch)))

    paused.resume()
    resumed = time.monotonic()
    _, took = await wait_until(
        lambda: layer.group_size(GROUP),
        lambda n: n == 4,
        FAST["heartbeat_interval"] + 3,
        what="re-registered",
    )
    print(f"\nSIGCONT: re-registered after {took:.2f} s")
    assert took <= FAST["heartbeat_interval"] + 0.5
    assert paused.node_id in node_ids(await layer.nodes())
    members = {m.channel: m for m in await layer.group_members(GROUP)}
    assert {members[c].node_id for c in paused.channels} == {paused.node_id}
    assert all(members[c].meta and members[c].meta["who"] == "paused" for c in paused.channels)
    # Their leaves were announced, so their joins are announced again.
    await eventually(
        lambda: set(paused.channels) <= set(joins_of(watcher.messages(watch))[joins_before:]),
        max(0.5, 3 - (time.monotonic() - resumed)),
        what="joins re-announced",
    )
    # And they receive group messages again.
    await layer.group_send(GROUP, {"type": "room.message", "text": "welcome back"})
    for channel in paused.channels:
        await paused.wait_event(
            lambda e, ch=channel: (
                e.get("event") == "message"
                and e["channel"] == ch
                and e["message"].get("text") == "welcome back"
            ),
            5,
        )
    assert paused.proc.poll() is None


async def test_flushdb_rebuilds_registry_within_a_heartbeat(own_redis, spawn_node, prefix):
    from channels_distrib.layers import DistributedChannelLayer

    nodes = await start_nodes(spawn_node, 2, url=own_redis.url, channels=3, group=GROUP, **FAST)
    query = DistributedChannelLayer(hosts=[own_redis.url], prefix=prefix)
    try:
        assert await query.group_size(GROUP) == 6
        await flushdb(own_redis.url)
        _, took = await wait_until(
            lambda: query.group_size(GROUP),
            lambda n: n == 6,
            FAST["heartbeat_interval"] + 3,
            what="registry rebuilt",
        )
        print(f"\nFLUSHDB: registry rebuilt after {took:.2f} s")
        assert took <= FAST["heartbeat_interval"] + 1.0  # a beat, plus slack for a loaded machine
        await wait_until(
            query.nodes,
            lambda ns: node_ids(ns) == {n.node_id for n in nodes},
            2,
            what="both nodes listed again",
        )
        assert await query.group_channels(GROUP) == {c for n in nodes for c in n.channels}
        await query.group_send(GROUP, {"type": "room.message", "text": "after flushdb"})
        await expect_everywhere(nodes, "after flushdb")
    finally:
        await query.close()


async def test_redis_restart_rebuilds_registry_and_delivery_works(own_redis, spawn_node, prefix):
    from channels_distrib.layers import DistributedChannelLayer

    nodes = await start_nodes(
        spawn_node, 2, url=own_redis.url, channels=3, group=GROUP, presence=True, **FAST
    )
    await settle(nodes)  # the joins' own presence traffic is over
    killed_at = time.time()
    own_redis.kill()
    await asyncio.sleep(1.0)
    own_redis.restart()
    restarted = time.monotonic()
    # A fresh sender: this test is about the nodes healing, not the sender's pool.
    query = DistributedChannelLayer(hosts=[own_redis.url], prefix=prefix)
    try:
        _, took = await wait_until(
            lambda: query.group_size(GROUP),
            lambda n: n == 6,
            FAST["heartbeat_interval"] + 5,
            what="registry rebuilt",
        )
        print(f"\nRedis restart: registry rebuilt {took:.2f} s after the server answered")
        assert took <= FAST["heartbeat_interval"] + 1.0
        await wait_until(
            query.nodes,
            lambda ns: node_ids(ns) == {n.node_id for n in nodes},
            2,
            what="both nodes listed again",
        )
        await query.group_send(GROUP, {"type": "room.message", "text": "after restart"})
        await query.send(
            nodes[0].info["channels"][0], {"type": "room.message", "text": "direct after restart"}
        )
        await expect_everywhere(nodes, "after restart")
        # Data loss is not a leave: re-registering announces no joins (and no leaves).
        await asyncio.sleep(2 * FAST["heartbeat_interval"])
        for node in nodes:
            late = [
                e["message"]
                for e in node.snapshot()
                if e.get("event") == "message" and e["t"] > killed_at
            ]
            assert joins_of(late) == [] and leaves_of(late) == [], late
        await nodes[0].wait_event(
            lambda e: (
                e.get("event") == "message" and e["message"].get("text") == "direct after restart"
            ),
            5,
        )
        assert time.monotonic() - restarted < 20
    finally:
        await query.close()


async def test_redis_stall_longer_than_node_timeout_prunes_nobody(own_redis, spawn_node, prefix):
    """Redis itself stops answering (SIGSTOP of our private server) for longer than node_timeout.

    Every node was alive and trying to beat; none was silent by its own doing. Pruning them all
    when Redis comes back would send a leave for every presence member of every group, then a
    join for each when they re-register: the flood DESIGN.md avoids after data loss. Expected:
    group sizes never drop and presence members see no diffs.
    """
    from channels_distrib.layers import DistributedChannelLayer

    nodes = await start_nodes(
        spawn_node, 2, url=own_redis.url, channels=2, group=GROUP, presence=True, **FAST
    )
    await settle(nodes)
    seen = [len(node.snapshot()) for node in nodes]
    os.kill(own_redis.proc.pid, signal.SIGSTOP)
    try:
        await asyncio.sleep(FAST["node_timeout"] + 1.0)
    finally:
        os.kill(own_redis.proc.pid, signal.SIGCONT)
    query = DistributedChannelLayer(hosts=[own_redis.url], prefix=prefix)
    try:
        sizes = []
        start = time.monotonic()
        while time.monotonic() - start < 4 * FAST["heartbeat_interval"]:
            async with asyncio.timeout(5):
                sizes.append(await query.group_size(GROUP))
            await asyncio.sleep(0.05)
        assert set(sizes) == {4}, sizes
        assert node_ids(await query.nodes()) == {n.node_id for n in nodes}
        for node, count in zip(nodes, seen, strict=True):
            late = [e["message"] for e in node.snapshot()[count:] if e.get("event") == "message"]
            assert leaves_of(late) == [] and joins_of(late) == [], late
    finally:
        await query.close()


async def expect_everywhere(nodes, text: str, timeout: float = 5.0) -> None:
    for node in nodes:
        for channel in node.info["channels"]:
            await node.wait_event(
                lambda e, ch=channel: (
                    e.get("event") == "message"
                    and e["channel"] == ch
                    and e["message"].get("text") == text
                ),
                timeout,
            )


async def test_same_node_id_as_a_live_node_is_refused(layer, spawn_node):
    node_id = f"fixed-{uuid.uuid4().hex[:8]}"
    first = spawn_node(channels=2, group=GROUP, node_id=node_id, **FAST)
    await first.ready()
    assert first.node_id == node_id
    second = spawn_node(channels=1, group=GROUP, node_id=node_id, **FAST)
    error = await second.wait_event(lambda e: e.get("event") in ("ready", "error"), 30)
    assert error["event"] == "error", f"second node with id {node_id} started: {error}"
    assert error["type"] == "ImproperlyConfigured", error
    assert node_id in error["message"], "the message names the id that is taken"
    assert await asyncio.to_thread(second.proc.wait, 10) == 3
    # The first one is untouched.
    await asyncio.sleep(2 * FAST["heartbeat_interval"])
    assert node_id in node_ids(await layer.nodes())
    assert await layer.group_channels(GROUP) == set(first.channels)
    # Once the holder is dead and pruned (by another live node), the id is free again.
    pruner = spawn_node(channels=1, **FAST)
    await pruner.ready()
    first.kill()
    await wait_until(
        layer.nodes,
        lambda ns: node_id not in node_ids(ns),
        FAST["node_timeout"] + FAST["heartbeat_interval"] + 3,
        what="dead holder of the id past its deadline",
    )
    # nodes() leaves a node out once its deadline passed; its memberships go with the
    # pruning that a live node's next beat does.
    await wait_until(
        lambda: layer.group_channels(GROUP),
        lambda chans: not chans & set(first.channels),
        FAST["heartbeat_interval"] + 3,
        what="dead holder of the id pruned",
    )
    third = spawn_node(channels=1, group=GROUP, node_id=node_id, **FAST)
    assert (await third.ready())["node_id"] == node_id
    assert await layer.group_channels(GROUP) == set(third.channels)


async def test_close_removes_node_and_memberships_at_once(layer, spawn_node):
    watcher = spawn_node(channels=1, group=GROUP, presence=True)  # default timings: no pruning
    closing = spawn_node(channels=3, group=[GROUP, "other"], presence=True)
    await asyncio.gather(watcher.ready(), closing.ready())
    assert closing.node_id in node_ids(await layer.nodes())
    done = await closing.command(cmd="close")
    assert done["event"] == "done", done
    # At once: no waiting for a heartbeat or a pruner.
    assert closing.node_id not in node_ids(await layer.nodes())
    assert await layer.group_channels(GROUP) == set(watcher.channels)
    assert await layer.group_size("other") == 0
    assert await layer.node_channels(closing.node_id) == set()
    for channel in closing.channels:
        assert await layer.channel_groups(channel) == set()
    watch = watcher.info["channels"][0]
    await eventually(
        lambda: set(closing.channels) <= set(leaves_of(watcher.messages(watch))),
        2,
        what="leaves of the closed node's channels",
    )


async def test_flush_makes_nodes_drop_local_state(layer, spawn_node):
    nodes = await start_nodes(spawn_node, 2, channels=3, group=[GROUP, "other"], **FAST)
    assert await layer.group_size(GROUP) == 6
    await layer.flush()
    # Several heartbeats: self-healing must not bring flushed memberships back.
    await asyncio.sleep(4 * FAST["heartbeat_interval"])
    assert await layer.group_size(GROUP) == 0
    assert await layer.group_channels("other") == set()
    for node in nodes:
        assert await layer.node_channels(node.node_id) == set()
        for channel in node.channels:
            assert await layer.channel_groups(channel) == set()
        assert node.proc.poll() is None, node.describe()
    # Flushed nodes keep working: a membership made after the flush is kept.
    channel = nodes[0].info["channels"][0]
    await nodes[0].command(cmd="group_add", group=GROUP, channel=channel)
    await asyncio.sleep(3 * FAST["heartbeat_interval"])
    assert await layer.group_channels(GROUP) == {channel}
    await layer.group_send(GROUP, {"type": "room.message", "text": "after flush"})
    await nodes[0].wait_event(
        lambda e: (
            e.get("event") == "message"
            and e["channel"] == channel
            and e["message"].get("text") == "after flush"
        ),
        5,
    )


async def test_group_add_again_restarts_group_expiry(layer, spawn_node):
    """Every node has group_expiry=2. The watcher re-joins every 0.5 s (how an application keeps
    a membership past group_expiry) and must stay; the other node's channels joined once and go."""
    options = {"group_expiry": 2, **FAST}
    watcher = spawn_node(channels=1, group=GROUP, presence=True, **options)
    expiring = spawn_node(channels=2, group=GROUP, presence=True, **options)
    await asyncio.gather(watcher.ready(), expiring.ready())
    joined = time.monotonic()
    watch = watcher.info["channels"][0]

    async def keep_joining() -> None:
        while True:
            await watcher.command(cmd="group_add", group=GROUP, channel=watch, presence=True)
            await asyncio.sleep(0.5)

    refresher = asyncio.ensure_future(keep_joining())
    bound = 2 + 2 * FAST["heartbeat_interval"] + 1.0
    watcher_missing: list[float] = []
    gone_after = None
    try:
        await asyncio.sleep(1.0)
        assert await layer.group_size(GROUP) == 3, "not before group_expiry"
        # Observe past the bound: the other node's channels go, the re-joining watcher stays.
        while (elapsed := time.monotonic() - joined) < bound + 1.0:
            present = await layer.group_channels(GROUP)
            if watch not in present:
                watcher_missing.append(round(elapsed, 2))
            if gone_after is None and not present & set(expiring.channels):
                gone_after = elapsed
            await asyncio.sleep(0.1)
    finally:
        refresher.cancel()
        await asyncio.gather(refresher, return_exceptions=True)
    print(f"\ngroup_expiry=2: memberships removed {gone_after or -1:.2f} s after joining")
    assert gone_after is not None and gone_after <= bound
    # A group_add restarts the membership's group_expiry, as in channels_redis (ZADD with a new
    # time) and InMemoryChannelLayer: re-joining is how a long-lived channel stays in a group.
    assert not watcher_missing, f"re-joined every 0.5 s, yet missing at {watcher_missing} s"
    assert expiring.node_id in node_ids(await layer.nodes()), "the node itself is alive"
    # The watcher learns they left: from a leaves diff, or from the presence.state its next
    # re-join brings (a diff its state already covers is not sent to it again).
    await eventually(
        lambda: (view := view_of(watcher.messages(watch))) >= {watch}
        and not view & set(expiring.channels),
        5,  # the memberships are gone already; their diffs cross processes (and the broker)
        what="the expired memberships gone from the watcher's view",
    )


async def test_group_expiry_enforced_per_node_for_own_channels(layer, spawn_node):
    """ "Each node enforces it for its own channels": a node configured with group_expiry=2 drops
    its own memberships (announcing the leaves) and leaves a default-configured node's alone."""
    keeper = spawn_node(channels=1, group=GROUP, presence=True, **FAST)  # default group_expiry
    await keeper.ready()
    expiring = spawn_node(channels=2, group=GROUP, presence=True, group_expiry=2, **FAST)
    await expiring.ready()
    joined = time.monotonic()
    await asyncio.sleep(1.0)
    assert await layer.group_size(GROUP) == 3, "not before group_expiry"
    await wait_until(
        lambda: layer.group_channels(GROUP),
        lambda chans: not chans & set(expiring.channels),
        2 + 2 * FAST["heartbeat_interval"] + 1.0,
        what="the short-expiry node's memberships gone",
    )
    print(f"\ngroup_expiry=2: removed {time.monotonic() - joined:.2f} s after joining")
    await asyncio.sleep(FAST["heartbeat_interval"])
    assert await layer.group_channels(GROUP) == set(keeper.channels)
    assert await layer.channel_groups(keeper.channels[0]) == {GROUP}
    assert expiring.node_id in node_ids(await layer.nodes()), "the node itself is alive"
    watch = keeper.info["channels"][0]
    await eventually(
        lambda: set(expiring.channels) <= set(leaves_of(keeper.messages(watch))),
        2,
        what="leaves of the expired memberships",
    )


async def test_idle_and_slow_consumers_keep_their_memberships(layer, spawn_node):
    """A channel's life is its consumer's life: a consumer that is alive but does not receive
    for longer than expiry (its messages expire) and a slow one both keep every membership."""
    node = spawn_node(channels=1, idle=2, slow=1, slow_delay=1.0, group=[], expiry=2, **FAST)
    await node.ready()
    (live,) = node.info["channels"]
    idle, untouched = node.info["idle"]
    (slow,) = node.info["slow"]
    for channel in (live, idle, slow):  # live and idle are presence members
        await node.command(cmd="group_add", group=GROUP, channel=channel, presence=channel != slow)
    await node.command(cmd="group_add", group="quiet", channel=untouched)
    for i in range(6):
        await layer.group_send(GROUP, {"type": "room.message", "i": i})
    sent = time.monotonic()
    # Keep the slow consumer busy past several expiry periods; the idle one's messages expire.
    while time.monotonic() - sent < 7:
        await layer.group_send(GROUP, {"type": "room.message", "i": "more"})
        await asyncio.sleep(0.5)
    assert await layer.channel_groups(idle) == {GROUP}, "an idle live consumer is never dropped"
    assert await layer.channel_groups(slow) == {GROUP}, "a slow consumer is never dropped"
    assert await layer.channel_groups(live) == {GROUP}
    assert await layer.channel_groups(untouched) == {"quiet"}
    assert len(node.messages(slow)) >= 3, "the slow consumer kept receiving"
    assert node.messages(idle) == []
    assert leaves_of(node.messages(live)) == [], "nobody left"


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
async def test_daphne_stopped_by_signal_removes_node_at_once(
    layer, spawn_node, prefix, redis_url, signum
):
    from websockets.asyncio.client import connect

    from tests.helpers_daphne import start_daphne

    watcher = spawn_node(channels=1, group=GROUP, presence=True)  # default timings
    await watcher.ready()
    watch = watcher.info["channels"][0]

    env = {
        "NODE_APP_REDIS_URL": redis_url,
        "NODE_APP_PREFIX": prefix,
        "NODE_APP_GROUP": GROUP,
        "NODE_APP_PRESENCE": "1",
    }  # default timings: no pruning
    daphne = await asyncio.to_thread(start_daphne, "tests.node_app:application", env)
    clients = []
    try:
        hello = []
        for _ in range(3):
            ws = await connect(f"{daphne.url}/ws/", open_timeout=10)
            clients.append(ws)
            async with asyncio.timeout(10):
                hello.append(json.loads(await ws.recv()))
        node_id = hello[0]["node_id"]
        connections = {h["channel"] for h in hello}
        assert await layer.group_channels(GROUP) == connections | set(watcher.channels)
        assert node_id in node_ids(await layer.nodes())

        daphne.proc.send_signal(signum)
        signalled = time.monotonic()
        try:
            code = await asyncio.to_thread(daphne.proc.wait, 15)
        except subprocess.TimeoutExpired:
            pytest.fail(f"daphne still running 15 s after {signum.name}:\n{daphne.log_tail()}")
        exited = time.monotonic() - signalled
        print(f"\ndaphne exited {exited:.2f} s after {signum.name} (code {code})")
        # At once: as soon as the process is gone, with node_timeout 6 s nobody pruned it.
        assert node_id not in node_ids(await layer.nodes()), daphne.log_tail()
        assert await layer.group_channels(GROUP) == set(watcher.channels), daphne.log_tail()
        assert await layer.node_channels(node_id) == set()
        await eventually(
            lambda: connections <= set(leaves_of(watcher.messages(watch))),
            2,
            what="leaves of the daphne node's connections",
        )
    finally:
        for ws in clients:
            try:
                async with asyncio.timeout(2):
                    await ws.close()
            except (TimeoutError, OSError):
                pass
        await asyncio.to_thread(daphne.terminate)
