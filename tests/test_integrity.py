"""Integrity under races and faults (issue 8): no ghost member, no leaked key, no lost message.

Black-box: every test drives the public API against a real Redis; raw Redis is used only to
observe (SCAN over the prefix, TYPE, PTTL) or to inject what a foreign or corrupt writer could.
Key names are never hard-coded: keys are judged by type and TTL, so the tests hold across the
key layout change the issue asks for. Faults come from the loopback TCP proxy in
``tests/helpers_layers.py`` (cut, slow link, a reply that never comes).

Each test failed on the code before the fix of issue 8 (the membership owner, key layout 2,
the channel-life rule). A broken precondition (the fault did not happen as intended) raises
``SetupError``, so a test can only pass through the contract check itself.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import signal
import sys
import time
import uuid
from collections.abc import Awaitable, Callable
from typing import Any

import pytest
from channels.exceptions import ChannelFull
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from channels_distrib.exceptions import RedisUnavailable
from tests.helpers_layers import (
    ROOT,
    ProcReceiver,
    RoundTripProxy,
    nothing_arrives,
    own_layer,
    own_prefix_keys,
    proc_env,
    raw_redis,
    recv,
    url_host_port,
)

HB = 0.2
TIMEOUT = 0.8
FAST: dict[str, Any] = {"heartbeat_interval": HB, "node_timeout": TIMEOUT}
TWO_BEATS = 2 * HB
SLACK = 0.5
"""Polling, scheduling and one reconnect on top of a contract bound."""
RECONNECT = 1.2
"""A node's heartbeat backs off (up to 1 s) while Redis is unreachable; the first beat after
Redis answers again can come that much later."""
GROUP = "room"
# What a failed Redis write may raise (the contract allows raising, not hanging or retrying).
WRITE_ERRORS = (RedisUnavailable, RedisConnectionError, RedisTimeoutError)


class SetupError(Exception):
    """The fault or precondition a test needs did not happen: a broken test, never an xfail."""


async def poll(
    probe: Callable[[], Awaitable[Any]],
    predicate: Callable[[Any], bool],
    timeout: float,
    what: str,
    error: type[Exception] = AssertionError,
    interval: float = 0.02,
) -> tuple[Any, float]:
    """Poll ``probe`` until ``predicate(value)``; returns (value, seconds). Raises ``error``."""
    start = time.monotonic()
    while True:
        value = await asyncio.wait_for(probe(), 10)
        if predicate(value):
            return value, time.monotonic() - start
        if time.monotonic() - start > timeout:
            raise error(f"{what}: not within {timeout:.2f} s; last value {value!r}")
        await asyncio.sleep(interval)


async def holds_for(
    probe: Callable[[], Awaitable[Any]], predicate: Callable[[Any], bool], seconds: float, what: str
) -> None:
    """Fail as soon as ``predicate(probe())`` is false during ``seconds``."""
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        value = await probe()
        assert predicate(value), f"{what}: {value!r}"
        await asyncio.sleep(0.05)


@contextlib.asynccontextmanager
async def proxy_to(redis_url: str) -> Any:
    proxy = await RoundTripProxy(*url_host_port(redis_url)).start()
    try:
        yield proxy
    finally:
        await proxy.stop()


async def close_quietly(*layers: Any) -> None:
    """Close layers whose Redis link may be cut: never let cleanup hide the test's outcome."""
    for layer in layers:
        with contextlib.suppress(Exception):
            await asyncio.wait_for(layer.close(), 10)


async def received(layer: Any, channel: str, timeout: float = 2.0) -> dict[str, Any] | None:
    """The next message on ``channel``, or None when none comes within ``timeout`` (so a lost
    message fails an assertion, not the test's machinery)."""
    try:
        return await recv(layer, channel, timeout)
    except TimeoutError:
        return None


async def stream_keys(redis_url: str, prefix: str) -> set[bytes]:
    async with raw_redis(redis_url) as client:
        keys = await own_prefix_keys(client, prefix)
    return {key for key, (kind, _ttl) in keys.items() if kind == "stream"}


# ---------------------------------------------------------------- 1. foreign adds


@pytest.mark.parametrize("kind", ["closed-owner", "never-issued", "bang-name"])
async def test_foreign_add_of_a_channel_no_live_node_issued_is_never_recorded(
    make_layer, redis_url, prefix, kind
):
    """A process that is not the owner adds a process-local name no live node issued (a stale
    name re-added after a restart, a `!` name this layer never made): ignored or refused, never
    recorded, and a group_send to the group writes no stream for the dead token."""
    live = make_layer(**FAST)
    await live.new_channel()  # a live node in the cluster, doing housekeeping
    if kind == "closed-owner":
        owner = make_layer(**FAST)
        channel = await owner.new_channel()
        await owner.close()
    elif kind == "never-issued":
        channel = f"specific.{uuid.uuid4().hex[:8]}!abc"
    else:
        channel = "worker!x"
    adder = make_layer(**FAST)  # sends only (a view): never a node
    streams_before = await stream_keys(redis_url, prefix)
    with contextlib.suppress(ValueError, TypeError):  # refusing is allowed
        await adder.group_add(GROUP, channel)
    await poll(
        lambda: adder.group_size(GROUP), lambda n: n == 0, TWO_BEATS + SLACK, "group_size 0"
    )
    assert channel not in await adder.group_channels(GROUP)
    assert await adder.channel_groups(channel) == set()
    for n in range(3):
        await adder.group_send(GROUP, {"type": "test.message", "n": n})
    new_streams = await stream_keys(redis_url, prefix) - streams_before
    assert new_streams == set(), "a stream was created for a token no live node holds"


# ---------------------------------------------------------------- 2. failed / cancelled removals


async def test_failed_discard_is_retried_once_redis_answers(make_layer, redis_url):
    """The node's link is cut: the discard may raise, but once Redis answers again the node
    finishes it within two heartbeats (it is never pruned meanwhile: node_timeout is long)."""
    observer = make_layer()
    async with proxy_to(redis_url) as proxy:
        node = make_layer(
            hosts=[proxy.url], heartbeat_interval=HB, node_timeout=10.0, retry_timeout=0.3
        )
        try:
            channel = await node.new_channel()
            await node.group_add(GROUP, channel)
            await node.group_add("kept", channel)
            proxy.cut()
            with contextlib.suppress(*WRITE_ERRORS):
                await asyncio.wait_for(node.group_discard(GROUP, channel), 5)
            if await observer.group_channels(GROUP) != {channel}:
                raise SetupError("the discard reached Redis although the link was cut")
            proxy.heal()
            await poll(
                lambda: observer.group_size(GROUP),
                lambda n: n == 0,
                RECONNECT + TWO_BEATS + SLACK,
                "membership gone after Redis answers again",
            )
            assert await observer.channel_groups(channel) == {"kept"}
            assert node.node_id in {n.node_id for n in await observer.nodes()}, "never pruned"
        finally:
            proxy.heal()
            await close_quietly(node)


async def test_discard_cancelled_during_outage_is_still_done(make_layer, redis_url):
    """A consumer's cleanup times out (is cancelled) while Redis is unreachable: the node has
    forgotten the membership, so it must finish the removal once Redis answers."""
    observer = make_layer()
    async with proxy_to(redis_url) as proxy:
        node = make_layer(
            hosts=[proxy.url], heartbeat_interval=HB, node_timeout=10.0, retry_timeout=5.0
        )
        try:
            channel = await node.new_channel()
            await node.group_add(GROUP, channel)
            proxy.delay = 3.0  # the link hangs: the discard's request is held in the proxy
            task = asyncio.ensure_future(node.group_discard(GROUP, channel))
            await asyncio.sleep(0.3)
            if task.done():
                raise SetupError(f"discard ended while its request was held: {task!r}")
            task.cancel()  # the consumer's cleanup timeout
            with contextlib.suppress(asyncio.CancelledError, *WRITE_ERRORS):
                await task
            proxy.cut()  # drops the held request: it never reaches Redis
            proxy.delay = 0.0
            if await observer.group_channels(GROUP) != {channel}:
                raise SetupError("the discard reached Redis although it was held back")
            proxy.heal()
            await poll(
                lambda: observer.group_size(GROUP),
                lambda n: n == 0,
                RECONNECT + TWO_BEATS + SLACK,
                "membership gone after Redis answers again",
            )
            await observer.group_send(GROUP, {"type": "test.message", "n": 1})
            assert await nothing_arrives(node, channel, 0.3)
        finally:
            proxy.heal()
            await close_quietly(node)


async def test_add_cancelled_after_its_write_ran_leaves_redis_and_node_agreeing(
    make_layer, redis_url
):
    """A group_add whose script ran but whose reply never came is cancelled: afterwards Redis
    and the node agree (member listed <=> the node delivers the group's messages to it), and
    that stays so over several heartbeats."""
    observer = make_layer()
    group = f"cancelled-add-{uuid.uuid4().hex[:8]}"
    async with proxy_to(redis_url) as proxy:
        node = make_layer(hosts=[proxy.url], heartbeat_interval=HB, node_timeout=10.0)
        try:
            channel = await node.new_channel()
            await node.group_add("warmup", channel)  # scripts loaded, connections open
            proxy.mute_reply_to = group.encode()
            task = asyncio.ensure_future(node.group_add(group, channel))
            await poll(
                lambda: observer.group_size(group),
                lambda n: n == 1,
                3,
                "the add's write ran",
                error=SetupError,
            )
            if task.done() or proxy.muted != 1:
                raise SetupError(f"the add's reply was not held back: {task!r}")
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
            await asyncio.sleep(TWO_BEATS + SLACK)
            listed = channel in await observer.group_channels(group)
            await observer.group_send(group, {"type": "test.message", "n": 1})
            if listed:
                assert await received(node, channel, 3) == {"type": "test.message", "n": 1}
            else:
                assert await nothing_arrives(node, channel, 0.5)
            await holds_for(
                lambda: observer.group_channels(group),
                lambda members: (channel in members) == listed,
                3 * HB,
                "membership changed after the cancelled add settled",
            )
        finally:
            await close_quietly(node)


# ---------------------------------------------------------------- 5. the idle rule


async def test_channels_redis_message_expiry_group_send(make_layer):
    """channels_redis's test_message_expiry__group_send, with a short heartbeat so housekeeping
    surely runs in the 2 s gap: m1 expires, m2 and m3 arrive, in order."""
    layer = make_layer(expiry=1, **FAST)
    channel = await layer.new_channel()
    await layer.group_add("test-group", channel)
    await layer.group_send("test-group", {"type": "message.1"})
    await asyncio.sleep(2)
    await layer.group_send("test-group", {"type": "message.2"})
    await layer.group_send("test-group", {"type": "message.3"})
    assert await received(layer, channel, 2) == {"type": "message.2"}
    assert await received(layer, channel, 2) == {"type": "message.3"}


async def test_busy_consumer_keeps_memberships_and_unexpired_messages(make_layer):
    """A live consumer that does not receive for longer than expiry (its handler is slow) keeps
    every membership; expired messages go, unexpired ones are delivered when it receives."""
    layer = make_layer(expiry=1, **FAST)
    sender = make_layer(expiry=1, **FAST)
    channel = await layer.new_channel()
    await layer.group_add(GROUP, channel)
    await layer.group_add("other", channel)
    await sender.group_send(GROUP, {"type": "test.message", "n": 1})
    await sender.send(channel, {"type": "test.message", "n": 2})
    await asyncio.sleep(1.5)  # both expired; the consumer is busy, not gone
    await sender.group_send(GROUP, {"type": "test.message", "n": 3})
    await holds_for(
        lambda: sender.channel_groups(channel),
        lambda groups: groups == {GROUP, "other"},
        4 * HB,
        "a busy consumer lost memberships",
    )
    assert await sender.group_size(GROUP) == 1
    assert await received(layer, channel, 2) == {"type": "test.message", "n": 3}
    await sender.group_send("other", {"type": "test.message", "n": 4})
    assert await received(layer, channel, 2) == {"type": "test.message", "n": 4}


async def _make_channel_in_task(layer: Any, group: str, presence: bool) -> str:
    async def helper() -> str:
        channel: str = await layer.new_channel()
        await layer.group_add(group, channel, presence=presence)
        return channel

    return await asyncio.ensure_future(helper())


async def test_channel_whose_creating_task_ended_loses_memberships_with_a_leave(make_layer):
    """Its task ended without group_discard and nobody receives on it: within two heartbeats
    (after two heartbeats of no receive) it leaves, and presence members get the leave."""
    watcher_layer = make_layer(**FAST)
    watcher = await watcher_layer.new_channel()
    await watcher_layer.group_add(GROUP, watcher, presence=True)
    if (await recv(watcher_layer, watcher))["type"] != "presence.state":
        raise SetupError("no presence.state for the watcher")
    gone_layer = make_layer(**FAST)
    gone = await _make_channel_in_task(gone_layer, GROUP, presence=True)
    await gone_layer.group_add("plain", "named.keeps")  # normal channels never time out
    diff = await recv(watcher_layer, watcher)
    if [e["channel"] for e in diff["joins"]] != [gone]:
        raise SetupError(f"expected the join of {gone}: {diff!r}")
    ended = time.monotonic()
    leave = await received(watcher_layer, watcher, 4 * HB + SLACK + 1)
    took = time.monotonic() - ended
    assert leave is not None, "no leave"
    assert leave["type"] == "presence.diff" and [e["channel"] for e in leave["leaves"]] == [gone]
    assert took <= 4 * HB + SLACK, f"leave after {took:.2f} s"
    assert await watcher_layer.group_channels(GROUP) == {watcher}
    assert await watcher_layer.group_channels("plain") == {"named.keeps"}


async def test_channel_made_in_a_helper_task_and_received_elsewhere_stays(make_layer):
    """A channel made in a short helper task and received on by another task is alive: its
    memberships stay over many heartbeats and it gets the group's messages."""
    layer = make_layer(**FAST)
    observer = make_layer()
    channel = await _make_channel_in_task(layer, GROUP, presence=False)
    got: list[dict[str, Any]] = []

    async def consume() -> None:
        while True:
            got.append(await layer.receive(channel))

    consumer = asyncio.ensure_future(consume())
    try:
        await holds_for(
            lambda: observer.group_channels(GROUP),
            lambda members: members == {channel},
            6 * HB,
            "a received-on channel lost its membership",
        )
        await observer.group_send(GROUP, {"type": "test.message", "n": 1})
        await poll(lambda: asyncio.sleep(0, got), lambda g: len(g) == 1, 2, "message received")
        assert got == [{"type": "test.message", "n": 1}]
    finally:
        consumer.cancel()
        await asyncio.gather(consumer, return_exceptions=True)


# ---------------------------------------------------------------- 7. prefixes containing ':'

NAMES = ["nodes", "ni", "nid", "tid", "qc", "flush", "g", "in", "q"]
"""Group and channel names that read like the internal parts of a key (today's and common)."""


async def fill_short_prefix(short: Any, channel: str) -> None:
    """Groups and queued messages of prefix P under names like internal keys."""
    for name in [GROUP, *NAMES]:
        await short.group_add(name, channel)
        await short.group_add(name, "plain.member")
    for name in NAMES:
        await short.group_add("named", name)
        await short.send(name, {"type": "test.message", "name": name})


async def check_short_prefix(short: Any, channel: str) -> None:
    for name in [GROUP, *NAMES]:
        assert await short.group_channels(name) == {channel, "plain.member"}, name
    assert await short.channel_groups(channel) == {GROUP, *NAMES}
    assert await short.channel_groups("plain.member") == {GROUP, *NAMES}
    for name in NAMES:
        assert await short.channel_groups(name) == {"named"}, name
        assert await received(short, name, 2) == {"type": "test.message", "name": name}, name
    assert [n.node_id for n in await short.nodes()] == [short.node_id]
    await short.group_send(GROUP, {"type": "test.message", "n": 1})
    assert await received(short, channel, 2) == {"type": "test.message", "n": 1}


async def check_longer_prefix(other: Any, channel: str) -> None:
    assert [n.node_id for n in await other.nodes()] == [other.node_id]
    assert await other.group_channels(GROUP) == {channel, "other.plain"}
    metas = {m.channel: m.meta for m in await other.group_members(GROUP)}
    assert metas == {channel: {"k": 1}, "other.plain": None}
    assert await other.node_channels(other.node_id) == {channel}
    await other.group_send(GROUP, {"type": "test.message", "n": 2})
    assert await received(other, channel, 2) == {"type": "test.message", "n": 2}


@pytest.mark.parametrize("suffix", ["g", "q"])
async def test_names_like_internal_keys_do_not_collide_with_a_longer_prefix(
    make_layer, redis_url, prefix, suffix
):
    """Prefix P's groups and queues named like internal keys live beside prefix
    ``P:<suffix>``'s node, whichever writes first; both keep working over heartbeats."""
    short = make_layer(**FAST)
    channel = await short.new_channel()
    errors = []
    try:
        await fill_short_prefix(short, channel)
    except Exception as exc:  # noqa: BLE001 - reported by the assertion, never hidden
        errors.append(repr(exc))
    async with own_layer(hosts=[redis_url], prefix=f"{prefix}:{suffix}", **FAST) as other:
        try:
            mine = await other.new_channel()
            await other.group_add(GROUP, mine, meta={"k": 1})
            await other.group_add(GROUP, "other.plain")
        except Exception as exc:  # noqa: BLE001
            errors.append(repr(exc))
        assert errors == [], "a write failed on a colliding key"
        await asyncio.sleep(3 * HB)  # both nodes heartbeat over their keys
        await check_longer_prefix(other, mine)
        await check_short_prefix(short, channel)


@pytest.mark.parametrize("suffix", ["g", "q", "in", "cg"])
async def test_flush_of_a_prefix_leaves_a_longer_prefix_alone(
    make_layer, redis_url, prefix, suffix
):
    """``flush()`` of P keeps every key of ``P:<suffix>``. That node beats slowly here, so a
    deleted key cannot be healed before it is checked (healing is not the contract)."""
    short = make_layer(**FAST)
    await short.group_add("mine", "plain.member")
    slow = {"heartbeat_interval": 2.0, "node_timeout": 6.0}
    async with own_layer(hosts=[redis_url], prefix=f"{prefix}:{suffix}", **slow) as other:
        channel = await other.new_channel()
        await other.group_add(GROUP, channel, meta={"k": 1})
        await other.group_add(GROUP, "other.plain")
        await other.send("other.queue", {"type": "test.message", "n": 1})
        await short.flush()
        assert await short.group_size("mine") == 0, "the flush did flush its own prefix"
        await check_longer_prefix(other, channel)
        assert await other.channel_groups("other.plain") == {GROUP}
        assert await received(other, "other.queue", 2) == {"type": "test.message", "n": 1}


@pytest.mark.parametrize("suffix", ["g", "q", "cg"])
async def test_flush_of_a_longer_prefix_leaves_the_shorter_alone(
    make_layer, redis_url, prefix, suffix
):
    short = make_layer(heartbeat_interval=2.0, node_timeout=6.0)
    channel = await short.new_channel()
    await fill_short_prefix(short, channel)
    async with own_layer(hosts=[redis_url], prefix=f"{prefix}:{suffix}", _flush=False) as other:
        await other.flush()  # a sender-only process (a management command, say)
    await check_short_prefix(short, channel)


# ---------------------------------------------------------------- 10. corrupt payloads


async def test_corrupt_inbox_entries_are_logged_rate_limited(make_layer, redis_url, prefix, caplog):
    """1,000 corrupt entries injected into a node's inbox: a handful of error lines, and the
    next real message is delivered. The inbox and its payload field are found generically:
    the only stream of the prefix, and the field holding a real message's encoded bytes."""
    caplog.set_level(logging.WARNING)
    layer = make_layer(capacity=2000, **FAST)  # room for all: no drop warnings mixed in
    sender = make_layer(capacity=2000)
    channel = await layer.new_channel()
    probe = {"type": "test.message", "n": 0}
    await sender.send(channel, probe)
    assert await received(layer, channel) == probe
    streams = await stream_keys(redis_url, prefix)
    if len(streams) != 1:
        raise SetupError(f"expected exactly one inbox stream, found {streams!r}")
    (inbox,) = streams
    receiver = asyncio.ensure_future(received(layer, channel, 10))
    async with raw_redis(redis_url) as client:
        entries = await client.xrange(inbox)
        encoded = layer.serializer.dumps(probe)
        real = [f for _id, f in entries if encoded in f.values()]
        if not real:
            raise SetupError(f"no inbox entry holds the encoded message: {entries!r}")
        fields = real[-1]
        corrupt = {k: (b"\xc1not msgpack" if v == encoded else v) for k, v in fields.items()}
        started = time.monotonic()
        async with client.pipeline(transaction=False) as pipe:
            for _ in range(1000):
                pipe.xadd(inbox, corrupt)
            await pipe.execute()
    await sender.send(channel, {"type": "test.message", "n": 1})
    assert await receiver == {"type": "test.message", "n": 1}, "delivery continues"
    await asyncio.sleep(max(0.0, 1.0 - (time.monotonic() - started)))
    errors = [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(errors) <= 5, f"{len(errors)} log lines for 1,000 corrupt entries"


# ---------------------------------------------------------------- 3. re-registration race

REREGISTERED = 1600
"""Memberships of the node that comes back: several re-registration batches (200 today)."""


async def test_discard_during_reregistration_is_not_written_back(make_layer, redis_url):
    """A node pruned while alive comes back over a slow link and re-registers its memberships
    in batches; a group_discard it makes before the last batch lands must stay done."""
    observer = make_layer()
    groups = [f"r{i}" for i in range(REREGISTERED)]
    async with proxy_to(redis_url) as proxy:
        node = make_layer(hosts=[proxy.url], retry_timeout=0.3, **FAST)
        try:
            channel = await node.new_channel()
            for group in groups:
                await node.group_add(group, channel)
            proxy.cut()
            await poll(
                observer.prune,
                lambda ids: node.node_id in ids,
                TIMEOUT + 1,
                "the cut-off node pruned",
                error=SetupError,
            )
            if await observer.group_size(groups[0]) != 0:
                raise SetupError("pruning left the memberships")
            proxy.delay = 0.15  # every request of the node now takes a slow round trip
            proxy.heal()
            await poll(
                lambda: observer.group_size(groups[0]),
                lambda n: n == 1,
                RECONNECT + 3,
                "re-registration started",
                error=SetupError,
            )
            if await observer.group_size(groups[-2]) != 0:
                raise SetupError("re-registration finished before the discard was made")
            await node.group_discard(groups[-1], channel)
            await poll(
                lambda: observer.group_size(groups[-2]),
                lambda n: n == 1,
                10,
                "re-registration finished",
                error=SetupError,
            )
            proxy.delay = 0.0
            await asyncio.sleep(TWO_BEATS + SLACK)
            assert await observer.group_size(groups[-1]) == 0, "the discard was written back"
            assert groups[-1] not in await observer.channel_groups(channel)
            await observer.group_send(groups[-1], {"type": "test.message", "n": 1})
            assert await nothing_arrives(node, channel, 0.3)
        finally:
            proxy.heal()
            proxy.delay = 0.0
            await close_quietly(node)


# ---------------------------------------------------------------- 4. flush race


async def test_heartbeat_during_flush_does_not_bring_memberships_back(own_redis, prefix):
    """The flushing process talks to Redis over a slow link, so the node beats several times
    between the flush's deletes and its last write. Afterwards the flushed groups stay empty."""
    url = own_redis.url  # a private server: the flush's SCAN sees only this test's keys
    async with own_layer(hosts=[url], prefix=prefix, **FAST) as node, own_layer(
        hosts=[url], prefix=prefix, _flush=False
    ) as observer, proxy_to(url) as proxy, own_layer(
        hosts=[proxy.url], prefix=prefix, _flush=False
    ) as flusher:
        channel = await node.new_channel()
        for group in ("a", "b", "c"):
            await node.group_add(group, channel, presence=group == "c")
        await node.group_add("a", "plain.member")
        await flusher.group_size("a")  # connection open before the link slows down
        proxy.delay = 0.5  # > 2 heartbeats between any two of the flush's round trips
        await asyncio.wait_for(flusher.flush(), 20)
        proxy.delay = 0.0
        await asyncio.sleep(3 * HB)
        for group in ("a", "b", "c"):
            assert await observer.group_channels(group) == set(), f"{group} came back"
        assert await observer.channel_groups(channel) == set()
        await node.group_add("d", channel)  # the node still works after the flush
        assert await observer.group_channels("d") == {channel}
        await observer.group_send("d", {"type": "test.message", "n": 1})
        assert await received(node, channel) == {"type": "test.message", "n": 1}


# ---------------------------------------------------------------- 8. pruned node's inbox


async def test_group_send_never_recreates_a_pruned_nodes_inbox(make_layer, redis_url, prefix):
    """A node cut off past node_timeout is pruned by a live node. A view then re-adds its
    stored channel name and sends to the group: no stream appears for the pruned node, the
    group stays empty, and once every node is gone no key of the prefix is left without a
    TTL."""
    live = make_layer(**FAST)
    await live.new_channel()
    observer = make_layer()
    async with proxy_to(redis_url) as proxy:
        owner = make_layer(hosts=[proxy.url], retry_timeout=0.3, **FAST)
        try:
            channel = await owner.new_channel()
            await owner.group_add(GROUP, channel)
            proxy.cut()
            await poll(
                observer.nodes,
                lambda nodes: [n.node_id for n in nodes] == [live.node_id],
                TIMEOUT + HB + SLACK + 1,
                "the cut-off node pruned by the live one",
                error=SetupError,
            )
            await poll(
                lambda: observer.group_size(GROUP),
                lambda n: n == 0,
                1,
                "its membership removed",
                error=SetupError,
            )
            streams = await stream_keys(redis_url, prefix)
            with contextlib.suppress(ValueError, TypeError):  # refusing is allowed
                await observer.group_add(GROUP, channel)
            for n in range(3):
                await observer.group_send(GROUP, {"type": "test.message", "n": n})
            assert await stream_keys(redis_url, prefix) == streams, "an inbox was re-created"
            await poll(
                lambda: observer.group_size(GROUP), lambda n: n == 0, TWO_BEATS + SLACK, "empty"
            )
        finally:
            await close_quietly(owner)
    await live.close()
    async with raw_redis(redis_url) as client:
        keys = await own_prefix_keys(client, prefix)
    assert {k: v for k, v in keys.items() if v[1] == -1} == {}, "keys without a TTL"


async def test_no_key_without_ttl_once_every_node_is_gone(make_layer, redis_url, prefix):
    """Everyday use (groups of local and normal channels, presence, meta, direct and group
    sends, a node pruned, the others closed): afterwards every key left has a TTL."""
    observer = make_layer()
    nodes = [make_layer(**FAST) for _ in range(2)]
    channels = [await node.new_channel() for node in nodes]
    for node, channel in zip(nodes, channels, strict=True):
        await node.group_add(GROUP, channel, presence=True, meta={"u": channel})
        await node.group_add("plain", channel)
        await node.group_add("plain", "named.worker")
    await observer.send("named.worker", {"type": "test.message", "n": 0})
    await observer.group_send(GROUP, {"type": "test.message", "n": 1})
    await observer.group_send("plain", {"type": "test.message", "n": 2})
    await observer.send(channels[0], {"type": "test.message", "n": 3})
    assert await received(nodes[0], channels[0]) is not None
    assert await received(observer, "named.worker") is not None
    async with proxy_to(redis_url) as proxy:
        doomed = make_layer(hosts=[proxy.url], retry_timeout=0.3, **FAST)
        gone = await doomed.new_channel()
        await doomed.group_add(GROUP, gone, presence=True)
        proxy.cut()
        await poll(
            observer.nodes,
            lambda ns: doomed.node_id not in {n.node_id for n in ns},
            TIMEOUT + HB + SLACK + 1,
            "doomed node pruned",
            error=SetupError,
        )
        await close_quietly(doomed)
    for node in nodes:
        await node.close()
    async with raw_redis(redis_url) as client:
        keys = await own_prefix_keys(client, prefix)
    assert keys, "the test left nothing to judge"
    assert {k: v for k, v in keys.items() if v[1] == -1} == {}, "keys without a TTL"


# ---------------------------------------------------------------- 6. cancellation hang

UNCLOSED_ROUNDS = 12
ROUND_LIMIT = 2.0
"""Each asyncio.run round must end within this (the contract: every task ends within 1 s of
being cancelled); a round that does not is a hang (redis-py's read parks it again)."""


async def run_unclosed_rounds(
    python: str, redis_url: str, prefix: str, rounds: int
) -> tuple[list[dict[str, Any]], str]:
    """Run tests/layer_proc.py `unclosed` under ``python``; stop at the first round that
    overruns ROUND_LIMIT (killing that process by its pid). Returns (rounds, stderr tail)."""
    proc = await asyncio.create_subprocess_exec(
        python,
        os.path.join(ROOT, "tests", "layer_proc.py"),
        "unclosed",
        redis_url,
        prefix,
        str(rounds),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        cwd=ROOT,
        env=proc_env(),
    )
    assert proc.stdout is not None and proc.stderr is not None
    done: list[dict[str, Any]] = []
    try:
        ready = await asyncio.wait_for(proc.stdout.readline(), 30)
        if not ready.startswith(b'{"ready"'):
            raise SetupError(f"child did not start: {ready!r} {await proc.stderr.read()!r}")
        for _ in range(rounds):
            try:
                line = await asyncio.wait_for(proc.stdout.readline(), ROUND_LIMIT + 0.5)
            except asyncio.TimeoutError:
                break
            if not line:
                break
            done.append(json.loads(line))
    finally:
        if proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()  # this child's pid only
        await proc.wait()
    err = (await proc.stderr.read()).decode(errors="replace")[-2000:]
    return done, err


async def test_unclosed_layer_never_hangs_asyncio_run(make_layer, redis_url, prefix):
    """Rounds of asyncio.run(...) that make a node, receive through Redis, get one more
    message just before returning, and never close the layer: each ends within 2 s.

    Before the fix of issue 8 this hung in round 0 (rarely later) on Python 3.10 and 3.11:
    the inbox task stayed "cancelling" inside redis-py's XREAD (3.12/3.13 never hung)."""
    make_layer()  # its teardown flushes whatever the child's nodes left on the prefix
    rounds, err = await run_unclosed_rounds(sys.executable, redis_url, prefix, UNCLOSED_ROUNDS)
    assert len(rounds) == UNCLOSED_ROUNDS, (
        f"round {len(rounds)} of {UNCLOSED_ROUNDS} did not end within {ROUND_LIMIT} s "
        f"(Python {sys.version.split()[0]}); stderr: {err}"
    )
    assert max(r["seconds"] for r in rounds) <= ROUND_LIMIT, rounds


# ---------------------------------------------------------------- 9. full marks lapsing


async def test_full_mark_that_lapses_while_still_full_is_renewed(make_layer, redis_url, prefix):
    """A channel that stopped receiving (its consumer is alive, busy) is full and marked so in
    Redis; when the mark lapses there while the channel is still full, senders get
    ChannelFull again within two heartbeats, and what was queued is still delivered.

    The lapse is made with a DEL of the one set-typed key of the prefix that holds the
    channel's name (found generically: type and membership, never the key's name)."""
    node = make_layer(capacity=2, **FAST)
    sender = make_layer()
    channel = await node.new_channel()
    for n in range(2):
        await sender.send(channel, {"type": "test.message", "n": n})

    async def send_refused() -> bool:
        try:
            await sender.send(channel, {"type": "test.message", "n": -1})
        except ChannelFull:
            return True
        return False

    await poll(send_refused, bool, 2, "the channel marked full", error=SetupError)
    async with raw_redis(redis_url) as client:
        keys = await own_prefix_keys(client, prefix)
        marks = [
            key
            for key, (kind, _ttl) in keys.items()
            if kind == "set" and await client.sismember(key, channel)
        ]
        if len(marks) != 1:
            raise SetupError(f"expected one full-mark set holding {channel}: {keys!r}")
        await client.delete(marks[0])  # the mark lapses while the channel is still full
    if await send_refused():
        raise SetupError("senders still refused right after the mark was removed")
    await poll(send_refused, bool, TWO_BEATS + SLACK, "senders refused again")
    assert await received(node, channel) == {"type": "test.message", "n": 0}
    assert await received(node, channel) == {"type": "test.message", "n": 1}


# ---------------------------------------------------------------- heartbeat starvation

EXPIRING = 2000
MASS_EXPIRY = 5.0


async def test_mass_expiry_does_not_starve_the_heartbeat(make_layer, redis_url):
    """Thousands of memberships reach group_expiry together on a node whose link is slow
    (10 ms a round trip): the node keeps beating (never unlisted, so never pruned while
    alive) and still removes them all, in batches rather than a round trip each.

    group_expiry (5 s) leaves the 2,000 adds room to finish before the first expires on a
    loaded machine; the watch spans from then until 3 s past the last one's expiry."""
    observer = make_layer()
    async with proxy_to(redis_url) as proxy:
        node = make_layer(hosts=[proxy.url], group_expiry=MASS_EXPIRY, **FAST)
        try:
            channels = [await node.new_channel() for _ in range(EXPIRING)]
            first_join = time.monotonic()
            for start in range(0, EXPIRING, 50):
                await asyncio.gather(
                    *(node.group_add(GROUP, ch) for ch in channels[start : start + 50])
                )
            expires_at = time.monotonic() + MASS_EXPIRY
            if await observer.group_size(GROUP) != EXPIRING:
                took = time.monotonic() - first_join
                raise SetupError(f"the memberships were not all added ({took:.1f} s of adds)")
            proxy.delay = 0.01
            await holds_for(
                observer.nodes,
                lambda ns: node.node_id in {n.node_id for n in ns},
                expires_at + 3.0 - time.monotonic(),
                "the node was unlisted (its heartbeat starved) during the mass expiry",
            )
            await poll(
                lambda: observer.group_size(GROUP),
                lambda n: n == 0,
                max(0.5, expires_at + 6.0 - time.monotonic()),
                "every expired membership removed",
            )
            assert node.node_id in {n.node_id for n in await observer.nodes()}
        finally:
            proxy.delay = 0.0
            await close_quietly(node)


# ---------------------------------------------------------------- in-flight leftovers


async def test_receiver_killed_between_pop_and_ack_leaves_no_key_without_ttl(
    make_layer, redis_url, prefix
):
    """A process receiving on a normal channel is frozen (SIGSTOP) while its blocking pop is
    pending; a message arrives, so Redis moves it to that receiver's in-flight list; then the
    process is SIGKILLed before it can acknowledge. No key is left without a TTL."""
    sender = make_layer()
    receiver = ProcReceiver(redis_url, prefix, "inflight.q")
    await receiver.start()
    try:
        await asyncio.wait_for(receiver.ready.wait(), 30)
        await asyncio.sleep(0.2)  # the pop is pending in Redis
        assert receiver.proc is not None
        os.kill(receiver.proc.pid, signal.SIGSTOP)
        await sender.send("inflight.q", {"type": "test.message", "n": 1})
        await asyncio.sleep(0.2)
        os.kill(receiver.proc.pid, signal.SIGKILL)
        await receiver.proc.wait()
    finally:
        await receiver.stop()
    if receiver.received:
        raise SetupError(f"the receiver got the message before it was frozen: {receiver.received}")
    async with raw_redis(redis_url) as client:
        keys = await own_prefix_keys(client, prefix)
    if not [k for k, (kind, _ttl) in keys.items() if kind == "list"]:
        raise SetupError(f"the pop never moved the message (no list left): {keys!r}")
    assert {k: v for k, v in keys.items() if v[1] == -1} == {}, "keys without a TTL"
