"""Registry queries (DESIGN.md "Registry and presence"), against a real Redis.

Membership answers come from Redis, cluster-wide, in at most two round trips and without
SCAN/KEYS: ``test_queries_cost_two_round_trips_and_no_scan`` proves it on a private server
whose only other clients are SIGSTOPped node processes.
"""

from __future__ import annotations

import asyncio
import os
import socket
import statistics
import time
from typing import Any

import pytest
import redis.asyncio as aioredis
from channels.layers import BaseChannelLayer

from channels_distrib.types import Member, NodeInfo
from tests.helpers_nodes import (
    FAST,
    RoundTripProxy,
    commandstats,
    node_spawner,
    start_nodes,
    stats_delta,
    wait_until,
)

# Every test here that makes layers runs with messages through Redis and through RabbitMQ.
BOTH_MESSAGE_PATHS = True

@pytest.fixture
async def spawn_node(redis_url, prefix, make_layer):
    """Node processes on the test's prefix; killed (by pid) before make_layer's flush."""
    async with node_spawner(redis_url, prefix) as spawn:
        yield spawn


GROUP = "room"


async def redis_now(url: str) -> float:
    client = aioredis.from_url(url)
    try:
        seconds, micros = await client.time()
    finally:
        await client.aclose()
    return seconds + micros / 1e6


async def test_group_members_carry_node_meta_and_join_time(make_layer, redis_url):
    node = make_layer(**FAST)
    a = await node.new_channel()
    b = await node.new_channel()
    before = await redis_now(redis_url)
    await node.group_add(GROUP, a, meta={"user": 7, "name": "ada"})
    await node.group_add(GROUP, b)
    await node.group_add(GROUP, "worker.queue", meta={"kind": "worker"}, presence=False)
    after = await redis_now(redis_url)

    members = await node.group_members(GROUP)

    assert all(isinstance(m, Member) for m in members)
    by_channel = {m.channel: m for m in members}
    assert len(members) == 3 and set(by_channel) == {a, b, "worker.queue"}
    assert by_channel[a].node_id == node.node_id == by_channel[b].node_id
    assert by_channel["worker.queue"].node_id is None, "normal channels belong to no node"
    assert by_channel[a].meta == {"user": 7, "name": "ada"}
    assert by_channel[b].meta is None
    assert by_channel["worker.queue"].meta == {"kind": "worker"}
    for member in members:
        assert isinstance(member.joined_at, float)
        # Redis server time, not ours: inside the TIME readings taken around the joins.
        assert before - 0.01 <= member.joined_at <= after + 0.01, (member, before, after)


async def test_group_channels_size_and_channel_groups(make_layer):
    node = make_layer(**FAST)
    a = await node.new_channel()
    b = await node.new_channel()
    loner = await node.new_channel()  # in no group: not in node_channels
    await node.group_add(GROUP, a)
    await node.group_add(GROUP, b, meta={"x": 1})
    await node.group_add(GROUP, "worker.queue")
    await node.group_add("lobby", a, presence=True)
    await node.group_add(GROUP, a)  # joining twice is one membership

    assert await node.group_channels(GROUP) == {a, b, "worker.queue"}
    assert await node.group_size(GROUP) == 3
    assert await node.group_size("lobby") == 1
    assert await node.channel_groups(a) == {GROUP, "lobby"}
    assert await node.channel_groups("worker.queue") == {GROUP}
    assert await node.channel_groups(loner) == set()
    assert await node.node_channels(node.node_id) == {a, b}

    await node.group_discard(GROUP, b)
    await node.group_discard(GROUP, b)  # not a member any more: does nothing
    await node.group_discard("never-existed", a)

    assert await node.group_channels(GROUP) == {a, "worker.queue"}
    assert await node.group_size(GROUP) == 2
    assert await node.channel_groups(b) == set()
    assert await node.node_channels(node.node_id) == {a}
    assert [m.channel for m in await node.group_members("lobby")] == [a]


async def test_other_layer_sees_the_same_registry(make_layer):
    """Cluster-wide: a second layer (another node, or a sender) reads what the first wrote."""
    first = make_layer(**FAST)
    reader = make_layer()
    a = await first.new_channel()
    await first.group_add(GROUP, a, meta={"n": 1})
    assert await reader.group_channels(GROUP) == {a}
    assert await reader.group_size(GROUP) == 1
    assert await reader.group_members(GROUP) == [
        Member(a, first.node_id, {"n": 1}, (await reader.group_members(GROUP))[0].joined_at)
    ]
    assert await reader.channel_groups(a) == {GROUP}
    assert await reader.node_channels(first.node_id) == {a}


async def test_member_added_by_another_layer_names_the_owning_node(make_layer):
    """A view (sender-only layer) adding a node's channel: node_id is still the owner's node id."""
    owner = make_layer(**FAST)
    view = make_layer()
    channel = await owner.new_channel()
    await view.group_add(GROUP, channel, meta={"by": "view"})
    assert await view.node_channels(owner.node_id) == {channel}
    assert await view.channel_groups(channel) == {GROUP}
    (member,) = await view.group_members(GROUP)
    assert member.meta == {"by": "view"}
    assert member.node_id == owner.node_id, member


async def test_nodes_reports_live_node_info(make_layer, redis_url):
    node = make_layer(**FAST)
    channels = [await node.new_channel() for _ in range(2)]
    receivers = [asyncio.ensure_future(node.receive(ch)) for ch in channels]
    try:
        infos, _ = await wait_until(
            node.nodes,
            lambda ns: any(n.node_id == node.node_id and n.channel_count == 2 for n in ns),
            timeout=3 * FAST["heartbeat_interval"] + 1,
            what="node with 2 receiving channels",
        )
    finally:
        for task in receivers:
            task.cancel()
        await asyncio.gather(*receivers, return_exceptions=True)
    now = await redis_now(redis_url)
    info = next(n for n in infos if n.node_id == node.node_id)
    assert all(isinstance(n, NodeInfo) for n in infos)
    assert info.hostname == socket.gethostname()
    assert info.pid == os.getpid()
    assert isinstance(info.started_at, float) and isinstance(info.last_seen, float)
    assert info.started_at <= info.last_seen <= now + 0.01
    assert now - info.last_seen <= FAST["node_timeout"]
    # The heartbeat keeps last_seen moving; started_at stays.
    await asyncio.sleep(2 * FAST["heartbeat_interval"])
    later = next(n for n in await node.nodes() if n.node_id == node.node_id)
    assert later.started_at == info.started_at
    assert later.last_seen - info.last_seen >= FAST["heartbeat_interval"] * 0.9


async def test_channel_count_counts_channels_receiving_now(layer, spawn_node):
    """``channel_count`` is the node's process-local channels with a receive pending."""
    node = spawn_node(channels=3, idle=2, group=GROUP, **FAST)
    await node.ready()
    listed, _ = await wait_until(
        layer.nodes,
        lambda ns: [n.channel_count for n in ns if n.node_id == node.node_id] == [3],
        timeout=3 * FAST["heartbeat_interval"] + 1,
        what="channel_count 3 (the 2 idle channels never receive)",
    )
    info = next(n for n in listed if n.node_id == node.node_id)
    assert info.pid == node.pid
    assert await layer.node_channels(node.node_id) == set(node.channels), "idle ones are members"


async def test_unknown_names_give_empty_results(layer):
    assert await layer.group_channels("no-such-group") == set()
    assert await layer.group_size("no-such-group") == 0
    assert await layer.group_members("no-such-group") == []
    assert await layer.channel_groups("specific.nobody!x1") == set()
    assert await layer.channel_groups("no.such.queue") == set()
    assert await layer.node_channels("no-such-node") == set()
    assert await layer.nodes() == []


@pytest.mark.parametrize(
    "meta, error",
    [
        ([("a", 1)], (TypeError, ValueError)),
        ("a string", (TypeError, ValueError)),
        ({"when": object()}, (TypeError, ValueError)),
    ],
    ids=["list", "str", "unserialisable"],
)
async def test_bad_meta_is_refused_and_leaves_nothing(make_layer, meta, error):
    node = make_layer()
    channel = await node.new_channel()
    with pytest.raises(error):
        await node.group_add(GROUP, channel, meta=meta)
    assert await node.group_size(GROUP) == 0
    assert await node.channel_groups(channel) == set()


async def test_meta_over_max_meta_size_names_the_limit(make_layer):
    node = make_layer()
    channel = await node.new_channel()
    with pytest.raises((TypeError, ValueError), match="max_meta_size"):
        await node.group_add(GROUP, channel, meta={"blob": "x" * 5000})  # default 4 KiB
    assert await node.group_size(GROUP) == 0

    small = make_layer(max_meta_size=100)
    other = await small.new_channel()
    with pytest.raises((TypeError, ValueError), match="max_meta_size"):
        await small.group_add(GROUP, other, meta={"blob": "x" * 200})
    await small.group_add(GROUP, other, meta={"blob": "x" * 20})  # well under: accepted
    assert [m.meta for m in await small.group_members(GROUP)] == [{"blob": "x" * 20}]


def channels_message(check: Any, name: Any) -> str:
    """The TypeError text channels' own validator gives for this name."""
    with pytest.raises(TypeError) as caught:
        check(BaseChannelLayer(), name)
    return str(caught.value)


BAD_GROUPS = ["has space", "x" * 100, 123, "", "ünïcode"]
BAD_CHANNELS = ["has space", "x" * 100, 7, "", "two!bangs!here"]


@pytest.mark.parametrize("bad", BAD_GROUPS, ids=["space", "long", "int", "empty", "unicode"])
async def test_bad_group_names_raise_channels_type_error(make_layer, bad):
    node = make_layer()
    channel = await node.new_channel()
    expected = channels_message(BaseChannelLayer.require_valid_group_name, bad)
    calls = [
        lambda: node.group_add(bad, channel),
        lambda: node.group_discard(bad, channel),
        lambda: node.group_channels(bad),
        lambda: node.group_size(bad),
        lambda: node.group_members(bad),
    ]
    for call in calls:
        with pytest.raises(TypeError) as caught:
            await call()
        assert str(caught.value) == expected


@pytest.mark.parametrize("bad", BAD_CHANNELS, ids=["space", "long", "int", "empty", "bangs"])
async def test_bad_channel_names_raise_channels_type_error(layer, bad):
    expected = channels_message(BaseChannelLayer.require_valid_channel_name, bad)
    for call in (
        lambda: layer.group_add(GROUP, bad),
        lambda: layer.group_discard(GROUP, bad),
        lambda: layer.channel_groups(bad),
    ):
        with pytest.raises(TypeError) as caught:
            await call()
        assert str(caught.value) == expected


async def test_queries_cost_two_round_trips_and_no_scan(own_redis, spawn_node, prefix):
    """INFO commandstats deltas and a round-trip-counting proxy, with every node frozen.

    The member nodes are SIGSTOPped while the queries run: their heartbeats cannot pollute the
    command counts, and a query that asked the nodes instead of Redis would time out.
    """
    slow_beat = {"heartbeat_interval": 5.0, "node_timeout": 120.0}
    nodes = await start_nodes(
        spawn_node,
        2,
        url=own_redis.url,
        channels=3,
        group=GROUP,
        presence=True,
        meta={"app": "t"},
        **slow_beat,
    )
    await nodes[0].command(cmd="group_add", group="other", channel=nodes[0].channels[0])
    node_ids = {n.node_id for n in nodes}
    probe_channel = nodes[0].channels[0]

    from channels_distrib.layers import DistributedChannelLayer

    async with RoundTripProxy(own_redis.port) as proxy:
        query = DistributedChannelLayer(hosts=[proxy.url], prefix=prefix)
        try:
            # Let both nodes publish a heartbeat with their channel counts, then freeze them.
            await wait_until(
                query.nodes,
                lambda ns: {n.node_id for n in ns} == node_ids,
                timeout=10,
                what="both nodes listed",
            )
            for node in nodes:
                node.pause()
            queries = {
                "group_channels": lambda: query.group_channels(GROUP),
                "group_size": lambda: query.group_size(GROUP),
                "group_members": lambda: query.group_members(GROUP),
                "channel_groups": lambda: query.channel_groups(probe_channel),
                "nodes": query.nodes,
                "node_channels": lambda: query.node_channels(nodes[0].node_id),
                "group_size(unknown)": lambda: query.group_size("nobody-here"),
                "group_members(unknown)": lambda: query.group_members("nobody-here"),
                "node_channels(unknown)": lambda: query.node_channels("no-such-node"),
            }
            report = {}
            for name, call in queries.items():
                for _ in range(2):  # warm: connection handshake, script loading
                    async with asyncio.timeout(5):
                        await call()
                before = await commandstats(own_redis.url)
                trips = proxy.round_trips
                async with asyncio.timeout(5):
                    result = await call()
                trips = proxy.round_trips - trips
                delta = stats_delta(before, await commandstats(own_redis.url))
                report[name] = (trips, delta)
                assert trips <= 2, f"{name}: {trips} round trips ({delta})"
                assert not any(cmd.split("|")[0] in ("scan", "keys") for cmd in delta), (
                    f"{name} used {delta}"
                )
                assert delta, f"{name} issued no command at all?"
                if name == "group_size":
                    assert result == 6
            print("\nround trips / commands per query:", report)
        finally:
            for node in nodes:
                node.resume()
            await query.close()


async def test_sender_only_process_is_not_a_node(spawn_node, layer, prefix):
    sender = spawn_node(sender=True, group="news", channels=0, **FAST)
    member = spawn_node(channels=1, group="news", **FAST)
    await asyncio.gather(sender.ready(), member.ready())
    # Wait three heartbeats: anything that heartbeats would be listed by then.
    await asyncio.sleep(3 * FAST["heartbeat_interval"])
    listed = await layer.nodes()
    assert member.node_id in {n.node_id for n in listed}, "positive control: the real node"
    assert sender.pid not in {n.pid for n in listed}
    if sender.info.get("node_id"):
        assert sender.info["node_id"] not in {n.node_id for n in listed}
    assert layer.node_id not in {n.node_id for n in listed}, "the test's own sender-only layer"
    # The sender did real work meanwhile: its group_add and group_sends went through.
    assert "sender.queue" in await layer.group_channels("news")
    assert sender.proc.poll() is None, sender.describe()
    assert member.messages(member.channels[0]), "member got the sender's group_sends"


async def test_sender_only_layer_starts_no_heartbeat(own_redis, prefix):
    """After sends and queries, a layer that never called new_channel is silent in Redis."""
    from channels_distrib.layers import DistributedChannelLayer

    sender = DistributedChannelLayer(hosts=[own_redis.url], prefix=prefix, **FAST)
    try:
        await sender.group_add(GROUP, "workers.q")
        await sender.group_send(GROUP, {"type": "job"})
        await sender.send("workers.q", {"type": "job"})
        assert await sender.group_size(GROUP) == 1
        assert await sender.nodes() == []
        before = await commandstats(own_redis.url)
        await asyncio.sleep(3 * FAST["heartbeat_interval"])
        assert stats_delta(before, await commandstats(own_redis.url)) == {}
    finally:
        await sender.close()


def pct(samples: list[float], q: float) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


async def prefix_memory(client: Any, prefix: str) -> int:
    """Sum of MEMORY USAGE (exact, SAMPLES 0) over every key under the prefix."""
    total = 0
    async for key in client.scan_iter(match=prefix + "*", count=1000):
        total += await client.memory_usage(key, samples=0) or 0
    return total


@pytest.mark.slow
@pytest.mark.timeout(240)
async def test_ten_thousand_members_over_four_nodes(own_redis, spawn_node, prefix, capsys):
    """Counts are right at 10,000 members; latency and memory per membership are printed."""
    per_node = 2500
    nodes = await start_nodes(spawn_node, 4, url=own_redis.url, channels=per_node, **FAST)
    client = aioredis.from_url(own_redis.url)

    from channels_distrib.layers import DistributedChannelLayer

    query = DistributedChannelLayer(hosts=[own_redis.url], prefix=prefix)
    try:
        await asyncio.sleep(2 * FAST["heartbeat_interval"])
        mem_before = await prefix_memory(client, prefix)
        used_before = (await client.info("memory"))["used_memory"]
        joined = await asyncio.gather(
            *(n.command(timeout=120, cmd="join_all", group="big", meta={"u": 1}) for n in nodes)
        )
        assert [j.get("result") for j in joined] == [per_node] * 4, joined
        await asyncio.sleep(2 * FAST["heartbeat_interval"])
        mem_after = await prefix_memory(client, prefix)
        used_after = (await client.info("memory"))["used_memory"]

        everyone = {ch for n in nodes for ch in n.channels}
        assert len(everyone) == 4 * per_node
        assert await query.group_size("big") == 4 * per_node
        assert await query.group_channels("big") == everyone
        members = await query.group_members("big")
        assert len(members) == 4 * per_node
        for node in nodes:
            mine = {m.channel for m in members if m.node_id == node.node_id}
            assert mine == set(node.channels)
            assert await query.node_channels(node.node_id) == mine
        listed, _ = await wait_until(
            query.nodes,
            lambda ns: sorted(n.channel_count for n in ns) == [per_node] * 4,
            timeout=5,
            what="4 nodes with 2500 channels each",
        )
        assert {n.node_id for n in listed} == {n.node_id for n in nodes}

        timings: dict[str, list[float]] = {}
        for name, call, rounds in (
            ("group_size", lambda: query.group_size("big"), 200),
            ("group_channels", lambda: query.group_channels("big"), 20),
            ("group_members", lambda: query.group_members("big"), 10),
        ):
            samples = []
            for _ in range(rounds):
                start = time.perf_counter()
                await call()
                samples.append((time.perf_counter() - start) * 1000)
            timings[name] = samples

        # channels_redis keeps a group as one sorted set: channel -> join time.
        from channels_redis.core import RedisChannelLayer

        theirs = RedisChannelLayer(hosts=[own_redis.url], prefix="cr" + prefix)
        names = [await theirs.new_channel() for _ in range(4 * per_node)]
        for start in range(0, len(names), 50):  # its pool allows 100 connections
            await asyncio.gather(*(theirs.group_add("big", n) for n in names[start : start + 50]))
        their_key = f"cr{prefix}:group:big"
        their_bytes = await client.memory_usage(their_key, samples=0)
        # The same sorted set holding our (shorter) channel names, for a like-for-like figure.
        await client.zadd(f"cmp{prefix}", {channel: time.time() for channel in everyone})
        same_names_bytes = await client.memory_usage(f"cmp{prefix}", samples=0)
        await theirs.flush()
        await theirs.close_pools()

        # Prune at scale: SIGKILL one node (2,500 memberships); the others prune it by
        # themselves. Meanwhile a PING loop sees how long the pruning script blocks Redis.
        pings: list[float] = []
        stop = asyncio.Event()

        async def ping_loop() -> None:
            while not stop.is_set():
                start = time.perf_counter()
                await client.ping()
                pings.append((time.perf_counter() - start) * 1000)
                await asyncio.sleep(0.002)

        pinger = asyncio.ensure_future(ping_loop())
        nodes[0].kill()
        try:
            _, prune_took = await wait_until(
                lambda: query.group_size("big"),
                lambda n: n == 3 * per_node,
                FAST["node_timeout"] + FAST["heartbeat_interval"] + 5,
                what="2,500 memberships of the killed node pruned",
            )
        finally:
            stop.set()
            await pinger
        assert await query.group_channels("big") == {c for n in nodes[1:] for c in n.channels}
    finally:
        await query.close()
        await client.aclose()

    ours = (mem_after - mem_before) / (4 * per_node)
    ours_used = (used_after - used_before) / (4 * per_node)
    with capsys.disabled():
        print("\n10,000 members over 4 nodes (own redis-server, loopback):")
        for name, samples in timings.items():
            print(
                f"  {name:15s} p50 {statistics.median(samples):8.2f} ms  "
                f"p99 {pct(samples, 0.99):8.2f} ms  ({len(samples)} calls)"
            )
        print(
            f"  memory per membership, ours: {ours:.0f} B (MEMORY USAGE delta over the "
            f"prefix), {ours_used:.0f} B (used_memory delta); meta {{'u': 1}}; "
            f"channel names {len(next(iter(everyone)))} chars"
        )
        print(
            f"  memory per membership, channels_redis sorted set: "
            f"{their_bytes / (4 * per_node):.0f} B with its {len(names[0])}-char names, "
            f"{same_names_bytes / (4 * per_node):.0f} B with our names"
        )
        print(
            f"  SIGKILL of a node with 2,500 members: pruned after {prune_took:.2f} s "
            f"(fast settings); slowest PING meanwhile {max(pings):.1f} ms"
        )
    assert statistics.median(timings["group_size"]) < 5, "group_size is O(1): one small reply"
    assert statistics.median(timings["group_channels"]) < 500
    assert ours > 0
