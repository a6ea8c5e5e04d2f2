"""Presence messages (DESIGN.md "Registry and presence"): state to the joiner, diffs to the other
presence members only, one diff per group for a pruned node, none after Redis data loss.
"""

from __future__ import annotations

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
    wait_until,
)


@pytest.fixture
async def spawn_node(redis_url, prefix, make_layer):
    """Node processes on the test's prefix; killed (by pid) before make_layer's flush."""
    async with node_spawner(redis_url, prefix) as spawn:
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
