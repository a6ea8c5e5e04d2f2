"""Presence messages (DESIGN.md "Registry and presence"): state to the joiner, diffs to the other
presence members only, one diff per group for a pruned node, none after Redis data loss.
"""

from __future__ import annotations

import asyncio
import time

import pytest
import redis.asyncio as aioredis

from tests.helpers_nodes import (
    FAST,
    collect,
    joins_of,
    leaves_of,
    node_spawner,
    presence_events,
    receive_all,
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


GROUP = "lobby"
ENTRY_KEYS = {"channel", "node_id", "meta"}


def entry(channel: str, node_id: str | None, meta: dict | None) -> dict:
    return {"channel": channel, "node_id": node_id, "meta": meta}


def first_of(messages: list[dict], kind: str) -> dict:
    found = [m for m in messages if m.get("type") == kind]
    assert found, f"no {kind} in {messages!r}"
    return found[0]


async def test_state_to_joiner_and_diffs_to_other_presence_members(make_layer):
    x_node, y_node = make_layer(**FAST), make_layer(**FAST)
    x1 = await x_node.new_channel()
    y1 = await y_node.new_channel()
    plain = await y_node.new_channel()

    await x_node.group_add(GROUP, x1, presence=True, meta={"name": "x"})
    got = await collect(x_node, x1, lambda ms: len(ms) >= 1, timeout=5)
    state = first_of(got, "presence.state")
    assert state["group"] == GROUP
    assert all(set(e) == ENTRY_KEYS for e in state["members"])
    assert {e["channel"] for e in state["members"]} <= {x1}

    # A member with meta but without presence: costs nothing, sees nothing, is seen by no diff.
    await y_node.group_add(GROUP, plain, meta={"name": "plain"})
    await y_node.group_add(GROUP, y1, presence=True, meta={"name": "y"})

    got_y = await collect(y_node, y1, lambda ms: len(ms) >= 1, timeout=5)
    state = first_of(got_y, "presence.state")
    assert got_y[0]["type"] == "presence.state", "state is the joiner's first message"
    assert state["group"] == GROUP
    assert entry(x1, x_node.node_id, {"name": "x"}) in state["members"]
    # The presence members (the joiner may be listed too); never the non-presence ``plain``:
    # a big group without presence must cost nothing per presence join.
    assert {e["channel"] for e in state["members"]} <= {x1, y1}

    got_x = await collect(x_node, x1, lambda ms: bool(joins_of(ms)), timeout=5)
    diff = first_of(got_x, "presence.diff")
    assert diff == {
        "type": "presence.diff",
        "group": GROUP,
        "joins": [entry(y1, y_node.node_id, {"name": "y"})],
        "leaves": [],
    }

    await y_node.group_discard(GROUP, y1)
    got_x = await collect(x_node, x1, lambda ms: bool(leaves_of(ms)), timeout=5)
    diff = first_of(got_x, "presence.diff")
    assert diff["group"] == GROUP and diff["joins"] == []
    assert diff["leaves"] == [entry(y1, y_node.node_id, {"name": "y"})]

    # Nothing else: no diff of its own join for y1, no second copy for x1, nothing for plain.
    assert await receive_all(x_node, x1, quiet=0.5) == []
    assert presence_events(await receive_all(y_node, y1, quiet=0.3)) == []
    assert await receive_all(y_node, plain, quiet=0.3) == []


async def test_join_and_leave_made_by_another_process_are_announced(make_layer):
    """A view (sender-only layer) adding and discarding a node's channel: same presence."""
    owner, watching, view = make_layer(**FAST), make_layer(**FAST), make_layer()
    watcher = await watching.new_channel()
    await watching.group_add(GROUP, watcher, presence=True)
    await receive_all(watching, watcher, quiet=0.3)
    channel = await owner.new_channel()

    await view.group_add(GROUP, channel, presence=True, meta={"via": "view"})
    state = (await collect(owner, channel, lambda ms: len(ms) >= 1, timeout=5))[0]
    assert state["type"] == "presence.state", state
    assert {e["channel"] for e in state["members"]} >= {watcher}
    got = await collect(watching, watcher, lambda ms: bool(joins_of(ms)), timeout=5)
    assert joins_of(got) == [channel]

    await view.group_discard(GROUP, channel)
    got = await collect(watching, watcher, lambda ms: bool(leaves_of(ms)), timeout=5)
    assert leaves_of(got) == [channel]
    assert await receive_all(watching, watcher, quiet=0.5) == []


async def test_joining_again_is_not_a_new_join(make_layer):
    """Re-adding a channel (how channels apps keep memberships past group_expiry) announces no
    second join. A changed meta is announced once, with the new meta among the joins (a leave of
    the old entry in the same diff is allowed, as Phoenix presence does)."""
    node = make_layer(**FAST)
    watcher, member = await node.new_channel(), await node.new_channel()
    await node.group_add(GROUP, watcher, presence=True)
    await node.group_add(GROUP, member, presence=True, meta={"v": 1})
    for _ in range(2):
        await node.group_add(GROUP, member, presence=True, meta={"v": 1})
    got = await receive_all(node, watcher, quiet=0.5)
    assert joins_of(got) == [member] and leaves_of(got) == [], got

    await node.group_add(GROUP, member, presence=True, meta={"v": 2})
    got = await receive_all(node, watcher, quiet=0.5)
    diffs = [m for m in got if m.get("type") == "presence.diff"]
    assert len(diffs) == 1, got
    assert diffs[0]["joins"] == [entry(member, node.node_id, {"v": 2})]
    assert diffs[0]["leaves"] in ([], [entry(member, node.node_id, {"v": 1})])
    assert [m.meta for m in await node.group_members(GROUP) if m.channel == member] == [{"v": 2}]


async def test_non_presence_members_get_no_presence_messages(make_layer):
    node = make_layer(**FAST)
    channels = [await node.new_channel() for _ in range(3)]
    for i, channel in enumerate(channels):
        await node.group_add(GROUP, channel, meta={"i": i})
    await node.group_discard(GROUP, channels[0])
    watcher = await node.new_channel()
    await node.group_add(GROUP, watcher, presence=True)
    await node.group_discard(GROUP, channels[1])
    for channel in channels:
        assert await receive_all(node, channel, quiet=0.3) == [], channel
    # The presence member sees no diff for non-presence members coming and going.
    got = await receive_all(node, watcher, quiet=0.5)
    assert [m["type"] for m in got] == ["presence.state"]
    assert {e["channel"] for e in got[0]["members"]} <= {watcher}


async def test_pruned_node_leaves_arrive_in_at_most_three_diffs(make_layer, spawn_node):
    """1,000 presence members on a node that is SIGKILLed; the survivor prunes it by itself."""
    victim = spawn_node(channels=0, idle=1000, group=GROUP, presence=True, **FAST)
    await victim.ready(timeout=120)
    survivor = make_layer(**FAST)
    watcher = await survivor.new_channel()
    await survivor.group_add(GROUP, watcher, presence=True)
    state = (await collect(survivor, watcher, lambda ms: len(ms) >= 1, timeout=10))[0]
    assert state["type"] == "presence.state"
    assert set(victim.channels) <= {e["channel"] for e in state["members"]}

    victim.kill()
    killed = time.monotonic()
    expected = set(victim.channels)
    got = await collect(
        survivor,
        watcher,
        lambda ms: set(leaves_of(ms)) >= expected,
        timeout=FAST["node_timeout"] + FAST["heartbeat_interval"] + 10,
    )
    elapsed = time.monotonic() - killed
    got += await receive_all(survivor, watcher, quiet=2 * FAST["heartbeat_interval"])
    diffs = [m for m in got if m.get("type") == "presence.diff" and m["leaves"]]
    leaves = leaves_of(got)
    print(f"\n1,000 leaves in {len(diffs)} diff(s), {elapsed:.2f} s after SIGKILL")
    assert len(diffs) <= 3, [len(d["leaves"]) for d in diffs]
    assert len(leaves) == len(set(leaves)) == 1000, "each leave exactly once"
    assert all(e["node_id"] == victim.node_id for d in diffs for e in d["leaves"])
    assert await survivor.group_channels(GROUP) == {watcher}


async def test_pruned_node_leaves_arrive_as_one_diff_per_group(make_layer, spawn_node):
    victim = spawn_node(channels=0, idle=5, group=[GROUP, "second"], presence=True, **FAST)
    await victim.ready()
    survivor = make_layer(**FAST)
    watchers = {}
    for group in (GROUP, "second"):
        watchers[group] = await survivor.new_channel()
        await survivor.group_add(group, watchers[group], presence=True)
        await receive_all(survivor, watchers[group], quiet=0.2)  # the state
    victim.kill()
    for group, watcher in watchers.items():
        got = await collect(
            survivor,
            watcher,
            lambda ms: set(leaves_of(ms)) >= set(victim.channels),
            timeout=FAST["node_timeout"] + FAST["heartbeat_interval"] + 5,
        )
        got += await receive_all(survivor, watcher, quiet=2 * FAST["heartbeat_interval"])
        diffs = [m for m in got if m.get("type") == "presence.diff"]
        assert len(diffs) == 1, f"{group}: {diffs}"
        assert diffs[0]["group"] == group and diffs[0]["joins"] == []
        assert sorted(e["channel"] for e in diffs[0]["leaves"]) == sorted(victim.channels)


async def test_reregistration_after_flushdb_sends_no_join_diffs(own_redis, make_layer):
    x_node = make_layer(hosts=[own_redis.url], **FAST)
    y_node = make_layer(hosts=[own_redis.url], **FAST)
    x1 = await x_node.new_channel()
    y1 = await y_node.new_channel()
    await x_node.group_add(GROUP, x1, presence=True, meta={"n": "x"})
    await y_node.group_add(GROUP, y1, presence=True, meta={"n": "y"})
    await receive_all(x_node, x1, quiet=0.5)  # state + y1's join
    await receive_all(y_node, y1, quiet=0.3)  # state

    client = aioredis.from_url(own_redis.url)
    try:
        await client.flushdb()
    finally:
        await client.aclose()
    # The heartbeats rebuild the registry: the node's own memory is the truth.
    _, took = await wait_until(
        lambda: x_node.group_size(GROUP),
        lambda n: n == 2,
        timeout=FAST["heartbeat_interval"] + 1.0,
        what="group rebuilt",
    )
    members = {m.channel: m for m in await x_node.group_members(GROUP)}
    assert members[x1].meta == {"n": "x"} and members[y1].node_id == y_node.node_id

    # Nobody saw anybody leave, so nobody is told anybody joined.
    x_got = await receive_all(x_node, x1, quiet=3 * FAST["heartbeat_interval"])
    y_got = await receive_all(y_node, y1, quiet=FAST["heartbeat_interval"])
    assert joins_of(x_got) == [] and joins_of(y_got) == [], (x_got, y_got)
    assert leaves_of(x_got) == [] and leaves_of(y_got) == []

    # And delivery to the rebuilt group works.
    await x_node.group_send(GROUP, {"type": "after.flush"})
    assert (await collect(x_node, x1, lambda ms: bool(ms), 5))[-1]["type"] == "after.flush"
    assert (await collect(y_node, y1, lambda ms: bool(ms), 5))[-1]["type"] == "after.flush"
    print(f"\nregistry rebuilt {took:.2f} s after FLUSHDB")


async def test_presence_state_of_a_normal_channel_member(make_layer):
    """Normal channels may be presence members too: their messages go through the queue."""
    node = make_layer(**FAST)
    x1 = await node.new_channel()
    await node.group_add(GROUP, x1, presence=True)
    await receive_all(node, x1, quiet=0.3)
    await node.group_add(GROUP, "workers.presence", presence=True, meta={"w": 1})
    state = (await collect(node, "workers.presence", lambda ms: len(ms) >= 1, 5))[0]
    assert state["type"] == "presence.state"
    assert entry(x1, node.node_id, None) in state["members"]
    diff = (await collect(node, x1, lambda ms: bool(joins_of(ms)), 5))[-1]
    assert diff["joins"] == [entry("workers.presence", None, {"w": 1})]


async def test_a_normal_channel_presence_member_gets_the_diffs(make_layer):
    """A normal channel that joined with presence gets the later joins and leaves as
    ``presence.diff`` in its queue, like any presence member (not only its state)."""
    node, other = make_layer(**FAST), make_layer(**FAST)
    await node.group_add(GROUP, "workers.watch", presence=True)
    assert (await collect(node, "workers.watch", lambda ms: len(ms) >= 1, 5))[0]["type"] == (
        "presence.state"
    )
    x1 = await other.new_channel()
    await other.group_add(GROUP, x1, presence=True, meta={"n": 1})
    joined = await collect(node, "workers.watch", lambda ms: bool(joins_of(ms)), 5)
    assert diffs_of(joined)[-1]["joins"] == [entry(x1, other.node_id, {"n": 1})]
    await other.group_discard(GROUP, x1)
    left = await collect(node, "workers.watch", lambda ms: bool(leaves_of(ms)), 5)
    assert leaves_of(left) == [x1]


# -- presence at scale (DESIGN.md "Presence at scale"): counts, not timings ----------------


def diffs_of(messages: list[dict]) -> list[dict]:
    return [m for m in messages if m.get("type") == "presence.diff"]


async def output_bytes(url: str) -> int:
    client = aioredis.from_url(url)
    try:
        return int((await client.info("stats"))["total_net_output_bytes"])
    finally:
        await client.aclose()


async def fill_room(node, n: int) -> tuple[list[str], float]:
    """``n`` presence members of one node joining GROUP one after the other; the seconds taken."""
    channels = [await node.new_channel() for _ in range(n)]
    start = time.monotonic()
    for i, channel in enumerate(channels):
        await node.group_add(GROUP, channel, presence=True, meta={"name": f"user-{i}"})
    return channels, time.monotonic() - start


async def drain(node, channels: list[str], quiet: float) -> dict[str, list[dict]]:
    """Every channel's messages, once nothing arrives for ``quiet`` s (windows flushed)."""
    got = {channel: [] for channel in channels}
    while True:
        await asyncio.sleep(quiet)
        more = 0
        for channel in channels:
            while node._node.channels[channel].items:
                got[channel].append(await node.receive(channel))
                more += 1
        if not more:
            return got


@pytest.mark.parametrize("n", [100, 400])
async def test_joins_cost_redis_output_linear_in_members(own_redis, make_layer, n):
    """N members joining one room on one node: Redis output grows with N (each join reads no
    presence table; each window's diff is written once per node), and each member's view ends
    as the whole room without ever being told of its own join."""
    node = make_layer(hosts=[own_redis.url], capacity=4 * n)
    before = await output_bytes(own_redis.url)
    channels, took = await fill_room(node, n)
    got = await drain(node, channels, quiet=0.5)
    output = await output_bytes(own_redis.url) - before
    print(
        f"\n{n} presence joins: {took:.2f} s, {output:,} B of Redis output ({output / n:.0f} B/member)"
    )
    # Quadratic (a state read per join) is ~90 B x n^2 / 2: 450 KB at 100, 7 MB at 400.
    assert output < 1200 * n, f"{output} B of Redis output for {n} joins"
    for channel, messages in got.items():
        assert messages[0]["type"] == "presence.state", channel
        assert view_of(messages) == set(channels), channel
        assert channel not in joins_of(messages), f"{channel} was told of its own join"


async def test_one_diff_per_window_and_one_state_read(own_redis, make_layer):
    """Each member gets at most one diff per node per window, and only the room's first
    local join reads the presence table (later joiners' states come from the replica)."""
    from tests.helpers_nodes import commandstats, stats_delta

    interval = 0.2
    node = make_layer(hosts=[own_redis.url], capacity=1000, presence_interval=interval)
    first = await node.new_channel()
    await node.group_add(GROUP, first, presence=True)
    stats = await commandstats(own_redis.url)
    channels, took = await fill_room(node, 300)
    reads = stats_delta(stats, await commandstats(own_redis.url)).get("hgetall", 0)
    got = await drain(node, [first, *channels], quiet=2 * interval)
    windows = int(took / interval) + 2
    diffs = diffs_of(got[first])
    print(f"\n300 joins in {took:.2f} s: {len(diffs)} diff(s) to the first member")
    assert reads == 0, f"{reads} HGETALL for 300 joins into a room the node already replicates"
    assert 1 <= len(diffs) <= windows, [len(d["joins"]) for d in diffs]
    assert sorted(joins_of(got[first])) == sorted(channels), "every join, once"
    for channel in channels:
        assert len(diffs_of(got[channel])) <= windows, channel
        assert channel not in joins_of(got[channel])


async def test_a_leave_costs_each_other_member_one_frame(make_layer):
    a_node, b_node = make_layer(**FAST), make_layer(**FAST)
    a_members, _ = await fill_room(a_node, 20)
    b_members, _ = await fill_room(b_node, 20)
    await drain(a_node, a_members, quiet=0.5)
    await drain(b_node, b_members, quiet=0.3)

    leaver = a_members[7]
    await a_node.group_discard(GROUP, leaver)
    got = await drain(a_node, a_members, quiet=0.5)
    got.update(await drain(b_node, b_members, quiet=0.1))
    expected = {
        "type": "presence.diff",
        "group": GROUP,
        "joins": [],
        "leaves": [entry(leaver, a_node.node_id, {"name": "user-7"})],
    }
    assert got.pop(leaver) == []
    for channel, messages in got.items():
        assert messages == [expected], channel


async def test_join_and_leave_inside_one_window_cancel_out(make_layer):
    interval = 0.5
    watching, busy = make_layer(presence_interval=interval), make_layer(presence_interval=interval)
    watcher = await watching.new_channel()
    await watching.group_add(GROUP, watcher, presence=True)
    assert [m["type"] for m in await receive_all(watching, watcher, quiet=0.3)] == [
        "presence.state"
    ]

    gone, first, second = [await busy.new_channel() for _ in range(3)]
    await busy.group_add(GROUP, gone, presence=True)
    await busy.group_add(GROUP, first, presence=True)
    await busy.group_discard(GROUP, gone)
    await busy.group_add(GROUP, second, presence=True)
    got = await receive_all(watching, watcher, quiet=interval + 0.5)
    assert diffs_of(got) == [
        {
            "type": "presence.diff",
            "group": GROUP,
            "joins": [entry(first, busy.node_id, None), entry(second, busy.node_id, None)],
            "leaves": [],
        }
    ], got
    # Joiners of one window: each is told only of what changed after its own join.
    first_got = await receive_all(busy, first, quiet=0.2)
    assert first_got[0]["type"] == "presence.state"
    assert {e["channel"] for e in first_got[0]["members"]} == {watcher, gone, first}
    assert diffs_of(first_got) == [
        {
            "type": "presence.diff",
            "group": GROUP,
            "joins": [entry(second, busy.node_id, None)],
            "leaves": [entry(gone, busy.node_id, None)],
        }
    ]
    second_got = await receive_all(busy, second, quiet=0.2)
    assert [m["type"] for m in second_got] == ["presence.state"]
    assert {e["channel"] for e in second_got[0]["members"]} == {watcher, first, second}


async def test_presence_interval_zero_sends_each_change_at_once(make_layer):
    node = make_layer(presence_interval=0)
    first = await node.new_channel()
    await node.group_add(GROUP, first, presence=True)
    channels, _ = await fill_room(node, 10)
    await node.group_discard(GROUP, channels[0])
    got = await drain(node, [first, *channels], quiet=0.5)
    assert [(d["joins"], d["leaves"]) for d in diffs_of(got[first])] == [
        *[([entry(c, node.node_id, {"name": f"user-{i}"})], []) for i, c in enumerate(channels)],
        ([], [entry(channels[0], node.node_id, {"name": "user-0"})]),
    ]
    for channel in channels[1:]:
        assert channel not in joins_of(got[channel])
        assert view_of(got[channel]) == {first, *channels[1:]}


async def test_replica_follows_other_nodes(make_layer):
    """A node's later joiners get their state from its replica: it has every other node's
    joins, leaves and meta changes, and matches group_members."""
    x_node, y_node = make_layer(**FAST), make_layer(**FAST)
    x1 = await x_node.new_channel()
    await x_node.group_add(GROUP, x1, presence=True)
    ys, _ = await fill_room(y_node, 5)
    await y_node.group_discard(GROUP, ys[0])
    await y_node.group_add(GROUP, ys[1], presence=True, meta={"name": "renamed"})
    await collect(
        x_node,
        x1,
        lambda ms: view_of(ms) == {x1, *ys[1:]} and bool(diffs_of(ms)) and "renamed" in repr(ms),
        timeout=5,
    )
    x2 = await x_node.new_channel()
    await x_node.group_add(GROUP, x2, presence=True)
    state = (await collect(x_node, x2, lambda ms: len(ms) >= 1, timeout=5))[0]
    assert state["type"] == "presence.state"
    members = await x_node.group_members(GROUP)
    assert sorted(state["members"], key=lambda e: e["channel"]) == sorted(
        (entry(m.channel, m.node_id, m.meta) for m in members), key=lambda e: e["channel"]
    )
    assert entry(ys[1], y_node.node_id, {"name": "renamed"}) in state["members"]

    # A change after a state was made from the replica reaches the next joiner's state too.
    await x_node.group_add(GROUP, x2, presence=True, meta={"name": "again"})
    x3 = await x_node.new_channel()
    await x_node.group_add(GROUP, x3, presence=True)
    state = (await collect(x_node, x3, lambda ms: len(ms) >= 1, timeout=5))[0]
    assert entry(x2, x_node.node_id, {"name": "again"}) in state["members"]
    assert entry(x2, x_node.node_id, None) not in state["members"]


@pytest.mark.parametrize("bad", [-0.1, "0.1", True, None])
def test_presence_interval_is_validated(bad):
    from django.core.exceptions import ImproperlyConfigured

    from channels_distrib.layers import DistributedChannelLayer

    with pytest.raises(ImproperlyConfigured, match="presence_interval"):
        DistributedChannelLayer(presence_interval=bad)
    assert DistributedChannelLayer(presence_interval=0).config.presence_interval == 0.0


@pytest.mark.parametrize("size", [0, 1, 15, 16, 300, 5000, 70_000])
def test_a_state_packed_from_encoded_entries_is_the_message_encoded(size):
    """The replica's pre-encoded states are byte for byte what the msgpack serializer makes."""
    from channels_distrib.presence import Replica, pack_state
    from channels_distrib.serializers import MsgPackSerializer

    replica = Replica(
        entry(f"specific.t!{i}", "node-a", {"name": f"n{i}", "b": b"\x00"} if i % 2 else None)
        for i in range(size)
    )

    def check() -> None:
        members = list(replica.entries.values())
        expected = {"type": "presence.state", "group": GROUP, "members": members}
        packed = pack_state(GROUP, *replica.packed_members())
        assert packed == MsgPackSerializer().dumps(expected)
        assert MsgPackSerializer().loads(packed) == expected

    check()
    # Joins, leaves and changes in place, in every order: the packed body follows them.
    replica.put("specific.t!new", entry("specific.t!new", "node-b", None))
    check()
    if size:
        replica.remove("specific.t!0")
        replica.put("specific.t!new2", entry("specific.t!new2", "node-b", {"x": 1}))
        check()
        replica.put("specific.t!new", entry("specific.t!new", "node-b", {"renamed": True}))
        replica.put("specific.t!new3", entry("specific.t!new3", "node-c", None))
        check()


async def test_views_lose_a_node_that_died_while_redis_lost_its_data(own_redis, make_layer, prefix):
    """A node is SIGKILLed while Redis restarts empty (here: FLUSHALL). Its entries are gone
    with the data, so no pruning will ever announce their leaves, and every diff written to
    an inbox before its node's heartbeat re-created it went nowhere. Each surviving presence
    member must still end up (last state, then diffs) seeing exactly the live members, within
    a few heartbeats, and keep getting diffs afterwards."""
    async with node_spawner(own_redis.url, prefix) as spawn:
        victim = spawn(channels=0, idle=3, group=GROUP, presence=True, **FAST)
        await victim.ready()
        x_node = make_layer(hosts=[own_redis.url], **FAST)
        y_node = make_layer(hosts=[own_redis.url], **FAST)
        x1, y1 = await x_node.new_channel(), await y_node.new_channel()
        await x_node.group_add(GROUP, x1, presence=True)
        await y_node.group_add(GROUP, y1, presence=True)
        x_got = await receive_all(x_node, x1, quiet=0.5)
        y_got = await receive_all(y_node, y1, quiet=0.3)
        assert view_of(x_got) == view_of(y_got) == {x1, y1, *victim.channels}

        victim.kill()
        client = aioredis.from_url(own_redis.url)
        try:
            await client.flushall()
        finally:
            await client.aclose()
        lost = time.monotonic()
        bound = 4 * FAST["heartbeat_interval"] + 2.0
        x_got += await collect(x_node, x1, lambda ms: view_of(x_got + ms) == {x1, y1}, bound)
        took = time.monotonic() - lost
        y_got += await collect(y_node, y1, lambda ms: view_of(y_got + ms) == {x1, y1}, 1.0)
        # Nothing later undoes it (a stale diff, a state read too early).
        x_got += await receive_all(x_node, x1, quiet=2 * FAST["heartbeat_interval"])
        y_got += await receive_all(y_node, y1, quiet=0.2)
        assert view_of(x_got) == view_of(y_got) == {x1, y1}, presence_events(x_got)[-3:]
        print(f"\nviews exact {took:.2f} s after the data loss")

        # Diffs flow again: a new member on y is seen by x.
        y2 = await y_node.new_channel()
        await y_node.group_add(GROUP, y2, presence=True)
        x_got += await receive_all(x_node, x1, quiet=1.0)
        assert view_of(x_got) == {x1, y1, y2}
