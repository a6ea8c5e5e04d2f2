"""The Channels layer spec, behaviour by behaviour, against a real Redis (DESIGN.md
"The channel layer" is the contract; docs/channel_layer_spec.rst in django/channels the spec).
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import random
import re
import socket
import threading
import time
from typing import Any

import msgpack
import pytest
from asgiref.sync import async_to_sync
from channels.exceptions import ChannelFull, MessageTooLarge

from channels_distrib.keys import Keys
from tests.helpers_layers import (
    ProcReceiver,
    RoundTripProxy,
    commandstats,
    eventually,
    msg,
    nothing_arrives,
    own_layer,
    prefix_keys,
    raw_redis,
    recv,
    recv_n,
    run_proc_sync,
    stats_delta,
    url_host_port,
)

# Every test here runs with messages through Redis and through RabbitMQ (CONFIG["broker"]).
BOTH_MESSAGE_PATHS = True

CHANNEL_ERROR = "Channel name must be a valid unicode string"
GROUP_ERROR = "Group name must be a valid unicode string"
SPECIFIC_RE = re.compile(r"^specific\.[A-Za-z0-9_\-.]+![A-Za-z0-9_\-.]+$")

BAD_CHANNELS = [
    "",
    "a" * 100,
    "has space",
    "slash/char",
    "unicodé",
    "two!bangs!here",
    "question?mark",
    "colon:name",
    123,
    None,
    b"bytes.name",
]
BAD_GROUPS = ["", "g" * 100, "has!bang", "sp ace", "ünï", "a:b", 5, None, b"grp"]
NOT_DICTS = ["a string", ["type", "x"], ("type", "x"), None, 5, b"bytes", {"type", "x"}]


# ------------------------------------------------------------------ send / receive


async def test_extensions(layer):
    for name in ("groups", "flush", "registry", "presence"):
        assert name in layer.extensions


async def test_send_receive_named(layer):
    await layer.send("test.named", msg(1, text="hello"))
    assert await recv(layer, "test.named") == msg(1, text="hello")


async def test_receive_pending_before_send(layer):
    task = asyncio.create_task(recv(layer, "test.waiting"))
    await asyncio.sleep(0.1)
    assert not task.done()
    await layer.send("test.waiting", msg(7))
    assert await asyncio.wait_for(task, 5) == msg(7)


async def test_send_receive_process_local(layer):
    channel = await layer.new_channel()
    await layer.send(channel, msg(2))
    assert await recv(layer, channel) == msg(2)


async def test_named_channel_between_instances(make_layer):
    a, b = make_layer(), make_layer()
    await a.send("between.named", msg(3))
    assert await recv(b, "between.named") == msg(3)


async def test_process_local_channel_of_another_instance(make_layer):
    a, b = make_layer(), make_layer()
    channel = await b.new_channel()
    waiting = asyncio.create_task(recv(b, channel))
    await asyncio.sleep(0.05)
    await a.send(channel, msg(4))
    assert await asyncio.wait_for(waiting, 5) == msg(4)
    await a.send(channel, msg(5))  # and while nobody is waiting
    assert await recv(b, channel) == msg(5)


async def test_process_local_channels_are_separate(layer):
    one, two = await layer.new_channel(), await layer.new_channel()
    await layer.send(one, msg(1))
    await layer.send(two, msg(2))
    assert await recv(layer, two) == msg(2)
    assert await recv(layer, one) == msg(1)
    assert await nothing_arrives(layer, one, 0.2)


async def test_spec_value_types_round_trip(layer):
    message = {
        "type": "types.all",
        "bytes": b"\x00\xff\x10binary",
        "text": "unicode ✓ ünï",
        "int": 2**63 - 1,
        "neg": -(2**63),
        "float": 1.5e300,
        "list": [1, "two", [3.0], {"four": 4}],
        "dict": {"nested": {"deeper": [None, True, False]}},
        "none": None,
        "true": True,
        "false": False,
    }
    channel = await layer.new_channel()
    for target in ("types.named", channel):
        await layer.send(target, message)
        assert await recv(layer, target) == message


async def test_tuples_arrive_as_lists(layer):
    await layer.send("types.tuple", {"type": "t", "value": (1, 2)})
    assert (await recv(layer, "types.tuple"))["value"] == [1, 2]


async def test_two_receivers_same_process_each_message_once(layer):
    got: list[int] = []

    async def consume() -> None:
        while True:
            got.append((await layer.receive("shared.inproc"))["n"])

    consumers = [asyncio.create_task(consume()) for _ in range(3)]
    try:
        for i in range(30):
            await layer.send("shared.inproc", msg(i))
        assert await eventually(lambda: _ready(len(got) >= 30), 5)
        await asyncio.sleep(0.2)
    finally:
        for task in consumers:
            task.cancel()
        await asyncio.gather(*consumers, return_exceptions=True)
    assert sorted(got) == list(range(30))


async def _ready(value: bool) -> bool:
    return value


# ------------------------------------------------------------------ new_channel


async def test_new_channel_names(layer):
    names = [await layer.new_channel() for _ in range(200)]
    assert len(set(names)) == 200
    for name in names:
        assert SPECIFIC_RE.match(name), name
        assert len(name) < 100
        assert layer.require_valid_channel_name(name)


async def test_new_channel_custom_prefix(layer):
    name = await layer.new_channel(prefix="chat")
    assert name.startswith("chat.") and "!" in name and len(name) < 100
    await layer.send(name, msg(1))
    assert await recv(layer, name) == msg(1)


async def test_new_channel_names_short_with_long_hostname_and_node_id(make_layer, monkeypatch):
    long_host = ("very-long-host-name-" * 12)[:250]
    monkeypatch.setattr(socket, "gethostname", lambda: long_host)
    monkeypatch.setattr(socket, "getfqdn", lambda *a: long_host)
    monkeypatch.setattr("platform.node", lambda: long_host)
    layer = make_layer(node_id="n" * 100)
    for _ in range(20):
        name = await layer.new_channel()
        assert len(name) < 100, name
        assert SPECIFIC_RE.match(name), name
    await layer.send(name, msg(9))
    assert await recv(layer, name) == msg(9)


async def test_node_id_attribute(make_layer):
    named = make_layer(node_id="web-7")
    assert named.node_id == "web-7"
    anon = make_layer()
    await anon.new_channel()
    assert isinstance(anon.node_id, str) and anon.node_id


# ------------------------------------------------------------------ validation


@pytest.mark.parametrize("name", BAD_CHANNELS, ids=repr)
async def test_send_bad_channel_name(layer, name):
    with pytest.raises(TypeError, match=CHANNEL_ERROR):
        await layer.send(name, msg(1))


@pytest.mark.parametrize("name", BAD_CHANNELS, ids=repr)
async def test_receive_bad_channel_name(layer, name):
    with pytest.raises(TypeError, match=CHANNEL_ERROR):
        await asyncio.wait_for(layer.receive(name), 2)


@pytest.mark.parametrize("name", BAD_CHANNELS, ids=repr)
async def test_group_add_discard_bad_channel_name(layer, name):
    with pytest.raises(TypeError, match=CHANNEL_ERROR):
        await layer.group_add("okgroup", name)
    with pytest.raises(TypeError, match=CHANNEL_ERROR):
        await layer.group_discard("okgroup", name)


@pytest.mark.parametrize("name", BAD_GROUPS, ids=repr)
async def test_bad_group_names(layer, name):
    with pytest.raises(TypeError, match=GROUP_ERROR):
        await layer.group_add(name, "ok.channel")
    with pytest.raises(TypeError, match=GROUP_ERROR):
        await layer.group_discard(name, "ok.channel")
    with pytest.raises(TypeError, match=GROUP_ERROR):
        await layer.group_send(name, msg(1))


@pytest.mark.parametrize(
    "message", NOT_DICTS, ids=lambda m: type(m).__name__ + (repr(m) if isinstance(m, str) else "")
)
async def test_non_dict_messages(layer, message):
    channel = await layer.new_channel()
    for target in ("ok.named", channel):
        with pytest.raises(TypeError):
            await layer.send(target, message)
    with pytest.raises(TypeError):
        await layer.group_send("okgroup", message)


async def test_longest_valid_names_work(layer):
    channel, group = "c" * 99, "g" * 99
    await layer.group_add(group, channel)
    await layer.group_send(group, msg(1))
    assert await recv(layer, channel) == msg(1)


async def test_nothing_sent_after_validation_errors(layer):
    with pytest.raises(TypeError):
        await layer.send("valid.name", "not a dict")
    assert await nothing_arrives(layer, "valid.name", 0.2)


def test_validation_survives_python_O(redis_url, prefix):
    """Names and message types are validated under `python -O` too (no assert)."""
    result = run_proc_sync(["validate", redis_url, prefix + "o"], optimize=True)
    assert result.pop("optimize") == 1
    assert result.pop("unknown_option") == "ImproperlyConfigured"
    bad = {k: v for k, v in result.items() if not str(v).startswith("TypeError")}
    assert not bad, f"not a TypeError under -O: {bad}"
    assert CHANNEL_ERROR in result["send_bad_channel"]
    assert GROUP_ERROR in result["group_send_bad_group"]


# ------------------------------------------------------------------ capacity


async def test_capacity_named_channel(make_layer):
    layer = make_layer(capacity=3)
    for i in range(3):
        await layer.send("cap.named", msg(i))
    with pytest.raises(ChannelFull):
        await layer.send("cap.named", msg(3))
    assert await recv(layer, "cap.named") == msg(0)
    await layer.send("cap.named", msg(4))  # room again
    with pytest.raises(ChannelFull):
        await layer.send("cap.named", msg(5))
    assert [m["n"] for m in await recv_n(layer, "cap.named", 3)] == [1, 2, 4]


async def test_capacity_seen_by_another_sender(make_layer):
    a, b = make_layer(capacity=2), make_layer(capacity=2)
    await a.send("cap.shared", msg(0))
    await b.send("cap.shared", msg(1))
    with pytest.raises(ChannelFull):
        await a.send("cap.shared", msg(2))


async def test_capacity_process_local_channel_of_this_node_burst(make_layer):
    """Capacity is per full channel name: the 4th send in a burst raises, not gets dropped."""
    layer = make_layer(capacity=3)
    channel = await layer.new_channel()
    outcomes = []
    for i in range(10):
        try:
            await layer.send(channel, msg(i))
            outcomes.append("ok")
        except ChannelFull:
            outcomes.append("full")
    assert outcomes == ["ok"] * 3 + ["full"] * 7
    assert [m["n"] for m in await recv_n(layer, channel, 3)] == [0, 1, 2]
    assert await nothing_arrives(layer, channel, 0.3)


async def test_capacity_process_local_after_delivery(make_layer):
    layer = make_layer(capacity=3)
    channel = await layer.new_channel()
    other = await layer.new_channel()
    for i in range(3):
        await layer.send(channel, msg(i))
    await asyncio.sleep(0.3)  # messages have reached the node's local queue
    with pytest.raises(ChannelFull):
        await layer.send(channel, msg(3))
    await layer.send(other, msg(100))  # per full name: the sibling channel is not full
    assert await recv(layer, channel) == msg(0)
    await layer.send(channel, msg(4))
    assert [m["n"] for m in await recv_n(layer, channel, 3)] == [1, 2, 4]
    assert await recv(layer, other) == msg(100)


async def test_capacity_remote_process_local_drops_or_raises(make_layer):
    """Sender on another node: what fits (capacity) is kept, in order; the overflow is dropped
    at the owner, which then marks the channel full, so senders get ChannelFull."""
    sender, owner = make_layer(capacity=3), make_layer(capacity=3)
    channel = await owner.new_channel()
    accepted = []
    for i in range(10):
        try:
            await sender.send(channel, msg(i))
            accepted.append(i)
        except ChannelFull:
            pass
    assert accepted[:3] == [0, 1, 2], "refused before the channel was full"
    # The owner has dropped the overflow by now or soon; it must tell senders.
    refused, deadline = False, time.monotonic() + 3
    while not refused and time.monotonic() < deadline:
        try:
            await sender.send(channel, msg(100))
            accepted.append(100)
            await asyncio.sleep(0.05)
        except ChannelFull:
            refused = True
    assert refused, "senders never got ChannelFull from a full remote channel"
    got = []
    while True:
        try:
            got.append((await asyncio.wait_for(owner.receive(channel), 0.5))["n"])
        except asyncio.TimeoutError:
            break
    assert got[:3] == [0, 1, 2], f"lost messages that fit: {got}"
    assert got == sorted(got) and set(got) <= set(accepted), got


async def test_channel_capacity_globs(make_layer):
    layer = make_layer(capacity=3, channel_capacity={"limited.*": 2, "big.*": 5, "exact": 1})
    for name, cap in (("limited.a", 2), ("big.b", 5), ("exact", 1), ("other.c", 3),
                      ("limitedx", 3)):
        for i in range(cap):
            await layer.send(name, msg(i))
        with pytest.raises(ChannelFull):
            await layer.send(name, msg(cap))


async def test_channel_capacity_first_match_wins(make_layer):
    layer = make_layer(capacity=10, channel_capacity={"first.*": 1, "first.x*": 4, "*": 2})
    await layer.send("first.xyz", msg(0))
    with pytest.raises(ChannelFull):
        await layer.send("first.xyz", msg(1))
    await layer.send("zzz", msg(0))
    await layer.send("zzz", msg(1))
    with pytest.raises(ChannelFull):
        await layer.send("zzz", msg(2))


async def test_channel_capacity_glob_on_process_local(make_layer):
    layer = make_layer(capacity=10, channel_capacity={"specific.*": 2})
    channel = await layer.new_channel()
    await layer.send(channel, msg(0))
    await layer.send(channel, msg(1))
    with pytest.raises(ChannelFull):
        await layer.send(channel, msg(2))


async def test_group_send_never_raises_channel_full(make_layer):
    layer = make_layer(capacity=1)
    local = await layer.new_channel()
    await layer.group_add("fullgroup", "full.named")
    await layer.group_add("fullgroup", local)
    await layer.send("full.named", msg(0))
    await layer.send(local, msg(0))
    for i in range(1, 20):
        await layer.group_send("fullgroup", msg(i))  # must not raise
    assert await recv(layer, "full.named") == msg(0)
    assert await recv(layer, local) == msg(0)


async def test_group_send_respects_channel_capacity_glob(make_layer):
    layer = make_layer(capacity=100, channel_capacity={"tiny.*": 2})
    await layer.group_add("capgroup", "tiny.q")
    for i in range(5):
        await layer.group_send("capgroup", msg(i))
    got = [m["n"] for m in await recv_n(layer, "tiny.q", 2)]
    assert got == [0, 1]
    assert await nothing_arrives(layer, "tiny.q", 0.3)


# ------------------------------------------------------------------ groups


async def test_group_send_reaches_all_members(make_layer):
    a, b = make_layer(), make_layer()
    local_a, local_b = await a.new_channel(), await b.new_channel()
    await a.group_add("room", local_a)
    await b.group_add("room", local_b)
    await a.group_add("room", "room.worker")
    await a.group_send("room", msg(1))
    assert await recv(a, local_a) == msg(1)
    assert await recv(b, local_b) == msg(1)
    assert await recv(b, "room.worker") == msg(1)


async def test_group_add_twice_delivers_once(layer):
    local = await layer.new_channel()
    for _ in range(3):
        await layer.group_add("twice", local)
        await layer.group_add("twice", "twice.named")
    await layer.group_send("twice", msg(1))
    assert await recv(layer, local) == msg(1)
    assert await recv(layer, "twice.named") == msg(1)
    assert await nothing_arrives(layer, local, 0.2)
    assert await nothing_arrives(layer, "twice.named", 0.1)


async def test_group_discard(make_layer):
    a, b = make_layer(), make_layer()
    local = await a.new_channel()
    await a.group_add("leave", local)
    await a.group_add("leave", "leave.named")
    await b.group_discard("leave", local)  # any process may discard
    await a.group_discard("leave", "leave.named")
    await a.group_discard("leave", "never.added")  # no error
    await a.group_discard("no-such-group", local)
    await b.group_send("leave", msg(1))
    assert await nothing_arrives(a, local, 0.3)
    assert await nothing_arrives(a, "leave.named", 0.1)


async def test_group_send_to_empty_group(layer):
    await layer.group_send("nobody-here", msg(1))


async def test_group_mixed_members_added_by_different_instances(make_layer):
    """A process-local channel of one node plus a normal channel added by a third instance."""
    node, adder, sender = make_layer(), make_layer(), make_layer()
    local = await node.new_channel()
    await node.group_add("mixed", local)
    await adder.group_add("mixed", "mixed.worker")
    await sender.group_send("mixed", msg(1))
    assert await recv(node, local) == msg(1)
    assert await recv(adder, "mixed.worker") == msg(1)


async def test_group_add_of_another_nodes_channel(make_layer):
    """group_add by a process that does not own the process-local channel still delivers."""
    node, other = make_layer(), make_layer()
    local = await node.new_channel()
    await other.group_add("foreign", local)
    await other.group_send("foreign", msg(1))
    assert await recv(node, local) == msg(1)


async def test_group_send_fifo(layer):
    local = await layer.new_channel()
    await layer.group_add("ordered", local)
    await layer.group_add("ordered", "ordered.named")
    for i in range(50):
        await layer.group_send("ordered", msg(i))
    assert [m["n"] for m in await recv_n(layer, local, 50)] == list(range(50))
    assert [m["n"] for m in await recv_n(layer, "ordered.named", 50)] == list(range(50))


async def test_group_expiry(make_layer):
    """Memberships end group_expiry after the most recent group_add; a new add renews them."""
    layer = make_layer(group_expiry=2, heartbeat_interval=0.3, node_timeout=1.5)
    sender = make_layer(group_expiry=2)
    local, renewed = await layer.new_channel(), await layer.new_channel()
    for channel in (local, "short.named"):
        await layer.group_add("short", channel)
    for channel in (renewed, "renewed.named"):
        await layer.group_add("renewed", channel)
    await asyncio.sleep(1.2)
    for channel in (renewed, "renewed.named"):
        await layer.group_add("renewed", channel)
    await asyncio.sleep(1.6)  # 2.8 s after the first adds, 1.6 s after the renewal
    await sender.group_send("short", msg(1))
    await sender.group_send("renewed", msg(2))
    assert await nothing_arrives(layer, local, 0.3)
    assert await nothing_arrives(layer, "short.named", 0.1)
    outcome = {}
    for channel in (renewed, "renewed.named"):
        try:
            outcome[channel] = await recv(layer, channel, 2)
        except TimeoutError:
            outcome[channel] = "membership expired despite the renewing group_add"
    assert outcome == {renewed: msg(2), "renewed.named": msg(2)}


async def test_slow_consumer_keeps_its_memberships(make_layer):
    """Messages expiring in a slow consumer's queue do not cost it its group membership
    while it keeps receiving (the spec lets a layer drop only channels that stopped)."""
    node, sender = make_layer(expiry=1, capacity=100), make_layer(expiry=1, capacity=100)
    local = await node.new_channel()
    await node.group_add("slowgroup", local)
    await node.group_add("slowgroup", "slow.named")
    got: list[int] = []

    async def slow_consumer(channel: str) -> None:
        while True:
            got.append((await node.receive(channel))["n"])
            await asyncio.sleep(0.3)

    consumers = [asyncio.create_task(slow_consumer(c)) for c in (local, "slow.named")]
    try:
        for i in range(50):  # ~2.5 s at 20/s: far more than 2 consumers at ~3/s take
            await sender.group_send("slowgroup", msg(i))
            await asyncio.sleep(0.05)
        await asyncio.sleep(1.5)  # the backlog has expired by now
        before = len(got)
        await sender.group_send("slowgroup", msg(1000))

        async def final_arrived() -> bool:
            return got.count(1000) == 2

        assert await eventually(final_arrived, 3), got[before:]
    finally:
        for task in consumers:
            task.cancel()
        await asyncio.gather(*consumers, return_exceptions=True)
    assert len(got) < 100  # the test really made messages expire


# ------------------------------------------------------------------ expiry and size


async def test_message_expiry(make_layer):
    """Unread messages expire: same-node sends, sends from another node, group sends."""
    layer, other = make_layer(expiry=1), make_layer(expiry=1)
    local, remote_target, group_target = [await layer.new_channel() for _ in range(3)]
    await layer.group_add("expgroup", group_target)
    await layer.group_add("expgroup", "exp.groupq")
    await layer.send("exp.named", msg(0))
    await layer.send(local, msg(0))
    await other.send(remote_target, msg(0))
    await other.group_send("expgroup", msg(0))
    await asyncio.sleep(2.2)
    for channel in ("exp.named", local, remote_target, group_target, "exp.groupq"):
        await other.send(channel, msg(1))
        assert await recv(layer, channel) == msg(1), channel


async def test_expired_messages_free_capacity(make_layer):
    layer = make_layer(expiry=1, capacity=2)
    await layer.send("exp.cap", msg(0))
    await layer.send("exp.cap", msg(1))
    await asyncio.sleep(2.2)
    await layer.send("exp.cap", msg(2))  # the expired two no longer count
    assert await recv(layer, "exp.cap") == msg(2)


async def test_one_megabyte_messages(layer):
    big = {"type": "big", "blob": b"\xab" * (1024 * 1024), "text": "x" * (1024 * 1024 - 100)}
    local = await layer.new_channel()
    await layer.group_add("bigroom", local)
    await layer.send("big.named", big)
    assert await recv(layer, "big.named") == big
    await layer.send(local, big)
    assert await recv(layer, local) == big
    await layer.group_send("bigroom", big)
    assert await recv(layer, local) == big


async def test_message_too_large(make_layer):
    layer = make_layer(max_message_size=2 * 1024 * 1024)
    local = await layer.new_channel()
    huge = {"type": "huge", "blob": b"x" * (3 * 1024 * 1024)}
    with pytest.raises(MessageTooLarge):
        await layer.send("huge.named", huge)
    with pytest.raises(MessageTooLarge):
        await layer.send(local, huge)
    with pytest.raises(MessageTooLarge):
        await layer.group_send("hugegroup", huge)
    ok = {"type": "ok", "blob": b"x" * (1024 * 1024)}
    await layer.send("huge.named", ok)
    assert await recv(layer, "huge.named") == ok


async def test_default_max_message_size_is_16_mib(layer):
    with pytest.raises(MessageTooLarge):
        await layer.send("huge.default", {"type": "huge", "blob": b"x" * (17 * 1024 * 1024)})


def test_message_too_large_is_channels_exception():
    from channels_distrib import exceptions

    assert exceptions.MessageTooLarge is MessageTooLarge
    assert exceptions.ChannelFull is ChannelFull


# ------------------------------------------------------------------ ordering


async def test_fifo_named_one_sender_one_receiver(make_layer):
    sender, receiver = make_layer(), make_layer()
    for i in range(80):
        await sender.send("fifo.named", msg(i))
    assert [m["n"] for m in await recv_n(receiver, "fifo.named", 80)] == list(range(80))


async def test_fifo_process_local(make_layer):
    sender, node = make_layer(), make_layer()
    channel = await node.new_channel()
    for i in range(80):
        await sender.send(channel, msg(i))
    assert [m["n"] for m in await recv_n(node, channel, 80)] == list(range(80))


async def test_fifo_while_receiving_concurrently(make_layer):
    sender, receiver = make_layer(), make_layer()
    channel = await receiver.new_channel()

    async def produce() -> None:
        for i in range(200):
            await sender.send("fifo.live", msg(i))
            await sender.send(channel, msg(i))
            if i % 20 == 0:
                await asyncio.sleep(0.005)

    producer = asyncio.create_task(produce())
    named, local = await asyncio.gather(
        recv_n(receiver, "fifo.live", 200, 20), recv_n(receiver, channel, 200, 20)
    )
    await producer
    assert [m["n"] for m in named] == list(range(200))
    assert [m["n"] for m in local] == list(range(200))


# ------------------------------------------------------------------ two OS processes


async def test_normal_channel_two_receiver_processes(make_layer, redis_url, prefix, path_options):
    """Each message to a shared queue goes to at most one receiver; none lost while both receive."""
    sender = make_layer(capacity=1000)
    broker = path_options.get("broker")
    # The receivers have the sender's capacity too: on the broker path the queue's limit is
    # its first declarer's, and the receivers declare it first.
    children = [
        ProcReceiver(redis_url, prefix, "work.shared", broker, capacity=1000) for _ in range(2)
    ]
    try:
        for child in children:
            await child.start()
        async with asyncio.timeout(30):
            for child in children:
                await child.ready.wait()
        total = 400
        for i in range(total):
            await sender.send("work.shared", msg(i))
            if i % 50 == 0:
                await asyncio.sleep(0.01)

        async def all_arrived() -> bool:
            return sum(len(c.received) for c in children) >= total

        assert await eventually(all_arrived, 20), [len(c.received) for c in children]
        await asyncio.sleep(0.3)  # a duplicate would show up now
    finally:
        codes = [await child.stop() for child in children]
    everything = children[0].received + children[1].received
    assert len(everything) == total, "duplicates" if len(everything) > total else "lost"
    assert sorted(everything) == list(range(total))
    assert all(len(c.received) > 0 for c in children), "both processes should get some"
    assert codes == [0, 0], [c.stderr.decode()[-2000:] for c in children]
    for child in children:  # each receiver sees its share in send order
        assert child.received == sorted(child.received)


# ------------------------------------------------------------------ cancellation


DELAYS = [None, 0, 0, 0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05]


async def _cancelling_consumer(layer: Any, channel: str, total: int, got: list[int]) -> int:
    """Receive with a cancel after each delay in DELAYS in turn; returns how many were cancelled."""
    cancelled = 0
    k = 0
    while len(got) < total:
        delay = DELAYS[k % len(DELAYS)]
        k += 1
        task = asyncio.ensure_future(layer.receive(channel))
        if delay is not None:
            await asyncio.sleep(delay)
        if task.done():
            got.append(task.result()["n"])
            continue
        task.cancel()
        try:
            message = await task
        except asyncio.CancelledError:
            cancelled += 1
            continue
        got.append(message["n"])
    return cancelled


async def test_receive_cancellation_loses_nothing(make_layer, caplog):
    caplog.set_level(logging.WARNING)
    before = asyncio.all_tasks()
    sender = make_layer(capacity=1000)
    layer = make_layer(capacity=1000)
    local = await layer.new_channel()
    total = 300

    async def produce() -> None:
        for i in range(total):
            await sender.send(local, msg(i))
            await sender.send("cancel.named", msg(i))
            if i % 5 == 0:
                await asyncio.sleep(0.002)

    got_local: list[int] = []
    got_named: list[int] = []
    async with asyncio.timeout(45):
        producer = asyncio.create_task(produce())
        cancels = await asyncio.gather(
            _cancelling_consumer(layer, local, total, got_local),
            _cancelling_consumer(layer, "cancel.named", total, got_named),
        )
        await producer
    assert min(cancels) > 20, f"the test did not actually cancel many receives: {cancels}"
    assert got_local == list(range(total))
    assert got_named == list(range(total))
    assert await nothing_arrives(layer, local, 0.3)
    assert await nothing_arrives(layer, "cancel.named", 0.1)

    await sender.close()
    await layer.close()
    await asyncio.sleep(0.1)
    gc.collect()
    leftover = [t for t in asyncio.all_tasks() if t not in before and not t.done()]
    assert not leftover, leftover
    destroyed = [r for r in caplog.records if "Task was destroyed" in r.getMessage()]
    assert not destroyed


async def test_worker_shutdown_after_cancelled_receives_loses_nothing(make_layer):
    """A worker cancelling receives while messages flow, then closing (runworker shutting
    down): what it did not return is still in the queue for the next worker, none twice."""
    worker, successor, sender = (make_layer(capacity=10000) for _ in range(3))
    total = 300
    rnd = random.Random(11)

    async def produce() -> None:
        for i in range(total):
            await sender.send("handoff.shutdown", msg(i))
            await asyncio.sleep(rnd.choice([0, 0.0005, 0.001, 0.003]))

    producer = asyncio.create_task(produce())
    got_worker: list[int] = []
    k = 0
    async with asyncio.timeout(30):
        while not producer.done():
            task = asyncio.ensure_future(worker.receive("handoff.shutdown"))
            delay = DELAYS[k % len(DELAYS)]
            k += 1
            if delay is not None:
                await asyncio.sleep(delay)
            task.cancel()
            try:
                got_worker.append((await task)["n"])
            except asyncio.CancelledError:
                pass
        await producer
    await worker.close()
    got_successor: list[int] = []
    while True:
        try:
            message = await asyncio.wait_for(successor.receive("handoff.shutdown"), 1.0)
        except asyncio.TimeoutError:
            break
        got_successor.append(message["n"])
    everything = got_worker + got_successor
    assert len(everything) == len(set(everything)), "delivered twice"
    assert sorted(everything) == list(range(total)), sorted(set(range(total)) - set(everything))
    assert got_worker and got_successor


async def test_cancelling_several_receivers_of_one_channel(make_layer):
    """Three receive loops on one named channel (and three on one process-local channel),
    each cancelling at varied points: every message arrives once, none lost."""
    sender = make_layer(capacity=1000)
    layer = make_layer(capacity=1000)
    local = await layer.new_channel()
    total = 200
    got: dict[str, list[int]] = {"shared.cancel": [], local: []}

    async def produce() -> None:
        for i in range(total):
            await sender.send("shared.cancel", msg(i))
            await sender.send(local, msg(i))
            if i % 4 == 0:
                await asyncio.sleep(0.002)

    async with asyncio.timeout(45):
        producer = asyncio.create_task(produce())
        await asyncio.gather(*(
            _cancelling_consumer(layer, channel, total, got[channel])
            for channel in got for _ in range(3)
        ))
        await producer
    await asyncio.sleep(0.2)
    for channel, numbers in got.items():
        assert sorted(numbers) == list(range(total)), channel
        assert await nothing_arrives(layer, channel, 0.2)


async def test_receive_cancelled_while_idle_leaves_nothing(make_layer, caplog):
    caplog.set_level(logging.WARNING)
    before = asyncio.all_tasks()
    layer = make_layer()
    local = await layer.new_channel()
    for channel in (local, "idle.named"):
        for _ in range(5):
            task = asyncio.ensure_future(layer.receive(channel))
            await asyncio.sleep(0.05)
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
    await layer.send(local, msg(1))
    await layer.send("idle.named", msg(1))
    assert await recv(layer, local) == msg(1)
    assert await recv(layer, "idle.named") == msg(1)
    await layer.close()
    await asyncio.sleep(0.1)
    gc.collect()
    assert not [t for t in asyncio.all_tasks() if t not in before and not t.done()]
    assert not [r for r in caplog.records if "Task was destroyed" in r.getMessage()]


async def test_cancelled_receive_leaves_no_task_behind(make_layer):
    """The contract's words: a cancelled receive "leaves no task behind" (not only after close)."""
    layer = make_layer()
    local = await layer.new_channel()
    # The layer's connections (a broker connection has a reader task) are opened first.
    await layer.send("notask.named", msg(0))
    assert await recv(layer, "notask.named") == msg(0)
    await asyncio.sleep(0.1)
    baseline = asyncio.all_tasks()  # the node's own long-lived tasks
    for channel in ("notask.named", local):
        task = asyncio.create_task(layer.receive(channel))
        await asyncio.sleep(0.2)
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
    await asyncio.sleep(0.1)
    extra = [t for t in asyncio.all_tasks() if t not in baseline and not t.done()]
    assert not extra, extra


async def test_close_is_idempotent_and_leaves_no_tasks(make_layer):
    before = asyncio.all_tasks()
    layer = make_layer(heartbeat_interval=0.2, node_timeout=1)
    local = await layer.new_channel()
    await layer.group_add("closing", local)
    await layer.send(local, msg(1))
    assert await recv(layer, local) == msg(1)
    await layer.close()
    await layer.close()
    await asyncio.sleep(0.3)
    assert not [t for t in asyncio.all_tasks() if t not in before and not t.done()]


# ------------------------------------------------------------------ several event loops


async def test_async_to_sync_senders_in_threads(make_layer, caplog):
    caplog.set_level(logging.WARNING)
    layer = make_layer(capacity=1000)
    local = await layer.new_channel()

    def worker(k: int) -> None:
        for i in range(10):
            async_to_sync(layer.send)(local, msg(k * 100 + i))
            async_to_sync(layer.send)("loops.named", msg(k * 100 + i))
            async_to_sync(layer.group_send)("loopgroup", msg(k * 100 + i))

    await layer.group_add("loopgroup", "loops.viagroup")
    threads = asyncio.gather(*(asyncio.to_thread(worker, k) for k in range(4)))
    got = await asyncio.gather(
        recv_n(layer, local, 40, 30), recv_n(layer, "loops.named", 40, 30),
        recv_n(layer, "loops.viagroup", 40, 30),
    )
    await threads
    expected = sorted(k * 100 + i for k in range(4) for i in range(10))
    for messages in got:
        assert sorted(m["n"] for m in messages) == expected
    gc.collect()
    assert not [r.getMessage() for r in caplog.records
                if "destroyed" in r.getMessage() or "Unclosed" in r.getMessage()]


async def test_sync_receiver_while_main_loop_sends(make_layer):
    layer = make_layer()
    received: list[int] = []
    errors: list[BaseException] = []

    def sync_consumer() -> None:
        try:
            for _ in range(10):
                received.append(async_to_sync(layer.receive)("loops.tosync")["n"])
        except BaseException as exc:  # reported below
            errors.append(exc)

    thread = threading.Thread(target=sync_consumer, daemon=True)
    thread.start()
    for i in range(10):
        await layer.send("loops.tosync", msg(i))
        await asyncio.sleep(0.01)
    await asyncio.to_thread(thread.join, 20)
    assert not thread.is_alive()
    assert not errors, errors
    assert received == list(range(10))


async def test_layer_first_used_from_a_foreign_loop(make_layer, caplog):
    """A layer whose first call is async_to_sync in a thread still works in the main loop."""
    caplog.set_level(logging.WARNING)
    layer = make_layer()
    await asyncio.to_thread(async_to_sync(layer.send), "loops.first", msg(1))
    assert await recv(layer, "loops.first") == msg(1)
    await asyncio.to_thread(async_to_sync(layer.group_add), "g1", "loops.first")
    await layer.group_send("g1", msg(2))
    assert await recv(layer, "loops.first") == msg(2)
    # a node made inside a short-lived loop (async_to_sync) is stopped when that loop closes
    channel = await asyncio.to_thread(async_to_sync(layer.new_channel))
    assert channel.startswith("specific.")
    gc.collect()
    assert not [r.getMessage() for r in caplog.records
                if "destroyed" in r.getMessage() or "Unclosed" in r.getMessage()]
    local = await layer.new_channel()  # and the main loop can become the node afterwards
    await layer.send(local, msg(3))
    assert await recv(layer, local) == msg(3)


async def test_own_channel_joined_and_left_from_a_sync_view_thread(make_layer):
    """A sync view in the node's own process (async_to_sync: another thread, another loop)
    adds and removes one of the node's channels: the change runs on the node's loop."""
    layer = make_layer()
    local = await layer.new_channel()
    await asyncio.to_thread(async_to_sync(layer.group_add), "viewgroup", local)
    assert await layer.group_channels("viewgroup") == {local}
    await layer.group_send("viewgroup", msg(1))
    assert await recv(layer, local) == msg(1)
    await asyncio.to_thread(async_to_sync(layer.group_discard), "viewgroup", local)
    assert await layer.group_size("viewgroup") == 0
    await layer.group_send("viewgroup", msg(2))
    assert await nothing_arrives(layer, local, 0.3)


# ------------------------------------------------------------------ prefix isolation, flush


@pytest.mark.parametrize("suffix", ["x", ":q", ":sub"])
async def test_prefixes_isolated(make_layer, redis_url, prefix, suffix):
    """Prefixes that extend each other as strings (now that ':' is allowed, "p" and "p:q"
    too) never see each other's messages or groups, and flush() of one leaves the other."""
    other_prefix = prefix + suffix
    mine = make_layer()
    async with own_layer(hosts=[redis_url], prefix=other_prefix) as theirs:
        await mine.send("iso.chan", msg(1))
        await theirs.send("iso.chan", msg(2))
        await mine.group_add("isogroup", "iso.member")
        await theirs.group_add("isogroup", "iso.member")
        await mine.group_send("isogroup", msg(3))
        await theirs.group_send("isogroup", msg(4))
        assert await recv(mine, "iso.chan") == msg(1)
        assert await recv(theirs, "iso.chan") == msg(2)
        assert await recv(mine, "iso.member") == msg(3)
        assert await recv(theirs, "iso.member") == msg(4)
        assert await nothing_arrives(mine, "iso.member", 0.2)
        assert await nothing_arrives(theirs, "iso.member", 0.1)

        # flush() of one prefix leaves the other's messages and groups alone
        await theirs.send("iso.kept", msg(5))
        await theirs.group_add("keptgroup", "iso.kept2")
        await mine.send("iso.gone", msg(6))
        await mine.flush()
        survived = {}
        await theirs.group_send("keptgroup", msg(7))
        for channel in ("iso.kept", "iso.kept2"):
            try:
                survived[channel] = (await recv(theirs, channel, 2))["n"]
            except TimeoutError:
                survived[channel] = f"wiped by flush() of prefix {prefix!r}"
        assert survived == {"iso.kept": 5, "iso.kept2": 7}
        assert await nothing_arrives(mine, "iso.gone", 0.2)


async def test_flush_empties_only_this_prefix(make_layer, redis_url, prefix):
    layer = make_layer()
    local = await layer.new_channel()
    await layer.send("flush.named", msg(1))
    await layer.send(local, msg(1))
    await layer.group_add("flushgroup", local)
    await layer.group_add("flushgroup", "flush.member")
    async with raw_redis(redis_url) as raw:
        await raw.set(f"{prefix}x:unrelated", b"keep me")
        await raw.set(f"not{prefix}", b"keep me too")
        try:
            await layer.flush()
            assert await raw.get(f"{prefix}x:unrelated") == b"keep me"
            assert await raw.get(f"not{prefix}") == b"keep me too"
        finally:
            await raw.delete(f"{prefix}x:unrelated", f"not{prefix}")
    assert await nothing_arrives(layer, "flush.named", 0.2)
    assert await nothing_arrives(layer, local, 0.2)
    await layer.group_send("flushgroup", msg(2))
    assert await nothing_arrives(layer, local, 0.3)
    assert await nothing_arrives(layer, "flush.member", 0.1)
    # the layer keeps working after a flush, including receives pending across it
    await layer.send(local, msg(3))
    assert await recv(layer, local) == msg(3)
    pending = asyncio.create_task(layer.receive("flush.across"))
    await asyncio.sleep(0.2)
    await layer.flush()
    await layer.send("flush.across", msg(4))
    assert await asyncio.wait_for(pending, 5) == msg(4)


async def test_flush_leaves_no_message_or_group_keys(make_layer, redis_url, prefix):
    """A sender-only layer (never a node) leaves nothing at all under its prefix after flush."""
    layer = make_layer()
    await layer.send("flush.raw", msg(1))
    await layer.group_add("rawgroup", "flush.raw")
    await layer.group_send("rawgroup", msg(2))
    async with raw_redis(redis_url) as raw:
        assert await prefix_keys(raw, prefix)
        await layer.flush()
        left = await prefix_keys(raw, prefix)
        # only the flush epoch marker (keys.py: P:{x}:flush) may remain: no messages, no groups
        assert [k for k in left if k != Keys(prefix).flush.encode()] == []


# ------------------------------------------------------------------ corrupt payloads


@pytest.mark.redis_internals
async def test_corrupt_payloads_are_logged_and_skipped(make_layer, redis_url, prefix, caplog):
    caplog.set_level(logging.DEBUG, logger="channels_distrib")
    layer, sender = make_layer(), make_layer()
    local = await layer.new_channel()
    await layer.group_add("corruptgroup", local)
    await sender.send("corrupt.named", msg(1))
    await sender.send(local, msg(1))  # from another instance: goes through the inbox stream
    assert await recv(layer, local) == msg(1)

    future_ms = int((time.time() + 600) * 1000)
    garbage = [b"\xc1\xc1\xc1 not msgpack", b"", msgpack.packb("a foreign string"),
               msgpack.packb([1, 2, 3])]
    async with raw_redis(redis_url) as raw:
        queue = Keys(prefix).queue("corrupt.named")
        assert await raw.type(queue) == b"list", await prefix_keys(raw, prefix)
        for junk in garbage:
            await raw.rpush(queue, junk)  # no expiry header at all
            await raw.rpush(queue, b"%d:" % future_ms + junk)  # right header, bad payload
        streams = [k for k in await prefix_keys(raw, prefix) if await raw.type(k) == b"stream"]
        assert streams, "the node's inbox stream was not found"
        for stream in streams:
            for junk in garbage:
                await raw.xadd(stream, {"c": local, "m": junk})
                await raw.xadd(stream, {"g": "corruptgroup", "m": junk})
            await raw.xadd(stream, {"hello": "world"})
            await raw.xadd(stream, {"c": local})
            await raw.xadd(stream, {"c": "no-such!channel", "m": msgpack.packb({"type": "x"})})
    await sender.send("corrupt.named", msg(2))
    await sender.send(local, msg(2))
    await sender.group_send("corruptgroup", msg(3))
    assert await recv(layer, "corrupt.named") == msg(1)
    assert await recv(layer, "corrupt.named") == msg(2)
    assert await recv(layer, local) == msg(2)
    assert await recv(layer, local) == msg(3)
    assert await nothing_arrives(layer, local, 0.2)
    logged = [r for r in caplog.records if r.name.startswith("channels_distrib")
              and r.levelno >= logging.WARNING]
    assert logged, "corrupt payloads must be logged"


# ------------------------------------------------------------------ group_send cost


async def test_group_send_cost_does_not_grow_with_group_size(own_redis, prefix):
    """One round trip and one EVALSHA per group_send for the sender (the README's promise);
    one inbox append per node, whatever the group size; each member gets each message once."""
    host, port = url_host_port(own_redis.url)
    config = {"hosts": [own_redis.url], "prefix": prefix, "heartbeat_interval": 20,
              "node_timeout": 60, "capacity": 1000}
    proxy = await RoundTripProxy(host, port).start()
    try:
        async with own_layer(**config) as n1, own_layer(**config) as n2, \
                own_layer(**config) as n3, \
                own_layer(**{**config, "hosts": [proxy.url]}, _flush=False) as sender, \
                raw_redis(own_redis.url) as raw:
            nodes = [n1, n2, n3]
            solo = await n1.new_channel()
            await n1.group_add("solo", solo)
            members: list[tuple[Any, str]] = []
            for i in range(1000):
                node = nodes[i % 3]
                members.append((node, await node.new_channel()))
            for start in range(0, 1000, 100):
                await asyncio.gather(*(node.group_add("crowd", ch)
                                       for node, ch in members[start:start + 100]))

            # warm-up: connection, CLIENT SETNAME, SCRIPT LOAD happen once, not per send
            await sender.group_send("solo", msg(-1))
            await sender.send("warm.up", msg(-1))
            assert await recv(n1, solo) == msg(-1)

            sends = 5
            results = {}
            for group, targets in (("solo", [(n1, solo)]), ("crowd", members)):
                stats0 = await commandstats(raw)
                turns0, sent0 = proxy.turns(), len(proxy.sent)
                for k in range(sends):
                    await sender.group_send(group, msg(k))
                turns = proxy.turns() - turns0
                evalshas = proxy.count_sent(b"EVALSHA", sent0)
                got = await asyncio.gather(*(recv_n(node, ch, sends, 30) for node, ch in targets))
                for messages in got:
                    assert [m["n"] for m in messages] == list(range(sends))
                await asyncio.sleep(0.2)
                extra = await asyncio.gather(*(nothing_arrives(node, ch, 0.2)
                                               for node, ch in targets[:50]))
                assert all(extra)
                delta = stats_delta(stats0, await commandstats(raw))
                delta.pop("info", None)
                results[group] = (turns, delta)
                assert evalshas == sends, f"{group}: {evalshas} EVALSHA for {sends} group_sends"

            for group, (turns, delta) in results.items():
                per_send = turns / sends
                assert turns == sends, f"{group}: {per_send:.1f} round trips per group_send"
                appends = sum(delta.get(c, 0) for c in ("xadd", "rpush", "lpush"))
                nodes_with_members = 1 if group == "solo" else 3
                assert appends >= sends, (group, delta)  # the measurement sees the writes
                assert appends <= nodes_with_members * sends, (group, delta)
                # A doorbell (scripts.py) rings at most once per append, for an armed reader.
                assert delta.get("publish", 0) <= delta.get("xadd", 0), (group, delta)
            solo_total = sum(results["solo"][1].values())
            crowd_total = sum(results["crowd"][1].values())
            # 3 nodes instead of 1 may cost a few more reads; 1000 members must not cost more
            assert crowd_total <= 3 * solo_total + 10 * sends, results
            assert crowd_total <= 40 * sends, results
    finally:
        await proxy.stop()


async def test_group_send_round_trips_do_not_grow_with_node_count(own_redis, prefix):
    """12 nodes with one member each: still one round trip and one EVALSHA per group_send,
    one inbox append per node."""
    host, port = url_host_port(own_redis.url)
    config = {"hosts": [own_redis.url], "prefix": prefix, "heartbeat_interval": 20,
              "node_timeout": 60}
    proxy = await RoundTripProxy(host, port).start()
    try:
        async with contextlib.AsyncExitStack() as stack:
            nodes = [await stack.enter_async_context(own_layer(**config)) for _ in range(12)]
            sender = await stack.enter_async_context(
                own_layer(**{**config, "hosts": [proxy.url]}, _flush=False))
            raw = await stack.enter_async_context(raw_redis(own_redis.url))
            members = []
            for node in nodes:
                channel = await node.new_channel()
                await node.group_add("wide", channel)
                members.append((node, channel))
            await sender.group_send("wide", msg(-1))  # warm-up
            for node, channel in members:
                assert await recv(node, channel) == msg(-1)
            stats0, turns0, sent0 = await commandstats(raw), proxy.turns(), len(proxy.sent)
            for k in range(5):
                await sender.group_send("wide", msg(k))
            turns = proxy.turns() - turns0
            assert proxy.count_sent(b"EVALSHA", sent0) == 5, "one script call per group_send"
            for node, channel in members:
                assert [m["n"] for m in await recv_n(node, channel, 5)] == list(range(5))
                assert await nothing_arrives(node, channel, 0.05)
            delta = stats_delta(stats0, await commandstats(raw))
            assert turns == 5, f"{turns / 5:.1f} round trips per group_send"
            assert delta.get("xadd", 0) <= 12 * 5, delta
    finally:
        await proxy.stop()


# ------------------------------------------------------------------ drops (isolation: tests/test_isolation.py)


async def test_group_send_drops_are_logged_rate_limited(make_layer, caplog):
    """Drops for full channels are counted and logged at most once per second, never raised."""
    caplog.set_level(logging.DEBUG, logger="channels_distrib")
    sender, node = make_layer(capacity=1), make_layer(capacity=1)
    stuck = await node.new_channel()
    await sender.group_add("dropgroup", "drop.named")
    await node.group_add("dropgroup", stuck)
    started = time.monotonic()
    for i in range(80):
        await sender.group_send("dropgroup", msg(i))
    await asyncio.sleep(0.5)  # the owning node counts its drops as it reads its inbox
    elapsed = time.monotonic() - started
    drops = [r for r in caplog.records if r.name.startswith("channels_distrib")
             and r.levelno >= logging.WARNING]
    assert drops, "dropped group messages must be logged"
    # one sender-side and one node-side log line per second at most
    assert len(drops) <= 2 * (1 + int(elapsed)), [r.getMessage() for r in drops]
    assert await recv(sender, "drop.named") == msg(0)
    assert await recv(node, stuck) == msg(0)


async def test_flush_is_not_undone_by_self_healing(make_layer, redis_url, prefix):
    """After flush() nodes drop their local membership state: heartbeats do not re-register it."""
    node = make_layer(heartbeat_interval=0.3, node_timeout=1.5)
    sender = make_layer(heartbeat_interval=0.3, node_timeout=1.5)
    local = await node.new_channel()
    await node.group_add("healgroup", local)
    await sender.group_send("healgroup", msg(0))
    assert await recv(node, local) == msg(0)
    await sender.flush()
    await asyncio.sleep(1.5)  # several heartbeats
    await sender.group_send("healgroup", msg(1))
    assert await nothing_arrives(node, local, 0.5)
    async with raw_redis(redis_url) as raw:
        keys = Keys(prefix)
        assert not await raw.exists(keys.group("healgroup"), keys.group_nodes("healgroup"))
    # the node itself keeps working
    await sender.send(local, msg(2))
    assert await recv(node, local) == msg(2)


# ------------------------------------------------------------------ more group and node edges


async def test_discard_by_another_process_while_siblings_stay(make_layer):
    """The owner node still has other members of the group: the discarded one gets nothing."""
    owner, other = make_layer(), make_layer()
    kept, dropped = await owner.new_channel(), await owner.new_channel()
    await owner.group_add("siblings", kept)
    await owner.group_add("siblings", dropped)
    await other.group_discard("siblings", dropped)
    await other.group_send("siblings", msg(1))
    assert await recv(owner, kept) == msg(1)
    assert await nothing_arrives(owner, dropped, 0.3)


async def test_channel_capacity_glob_character_class(make_layer):
    """fnmatch globs include [seq]; send and group_send must agree on what matches."""
    layer = make_layer(capacity=100, channel_capacity={"room[12].*": 2})
    await layer.send("room2.q", msg(0))
    await layer.send("room2.q", msg(1))
    with pytest.raises(ChannelFull):
        await layer.send("room2.q", msg(2))
    await layer.group_add("classgroup", "room1.q")
    for i in range(5):
        await layer.group_send("classgroup", msg(i))
    assert [m["n"] for m in await recv_n(layer, "room1.q", 2)] == [0, 1]
    assert await nothing_arrives(layer, "room1.q", 0.3)
    await layer.send("room3.q", msg(0))  # no match: default capacity
    await layer.send("room3.q", msg(1))
    await layer.send("room3.q", msg(2))


async def test_channel_capacity_compiled_regex(make_layer):
    """channels_redis also takes precompiled regexes as channel_capacity keys."""
    layer = make_layer(capacity=100, channel_capacity={re.compile(r"^rx\.\d+$"): 2})
    await layer.send("rx.5", msg(0))
    await layer.send("rx.5", msg(1))
    with pytest.raises(ChannelFull):
        await layer.send("rx.5", msg(2))
    await layer.group_add("rxgroup", "rx.1")
    for i in range(5):
        await layer.group_send("rxgroup", msg(i))
    assert [m["n"] for m in await recv_n(layer, "rx.1", 2)] == [0, 1]
    assert await nothing_arrives(layer, "rx.1", 0.3)


async def test_concurrent_first_new_channel_calls_make_one_node(make_layer):
    layer, other = make_layer(), make_layer()
    names = await asyncio.gather(*(layer.new_channel() for _ in range(50)))
    assert len(set(names)) == 50
    assert len({name.split(".", 1)[1].split("!")[0] for name in names}) == 1
    for name in names[:5]:
        await other.send(name, msg(1))
        assert await recv(layer, name) == msg(1)


async def test_send_to_own_channel_from_other_threads_keeps_order(make_layer):
    layer = make_layer(capacity=1000)
    local = await layer.new_channel()

    def worker() -> None:
        for i in range(50):
            async_to_sync(layer.send)(local, msg(i))

    thread = asyncio.create_task(asyncio.to_thread(worker))
    got = await recv_n(layer, local, 50, 20)
    await thread
    assert [m["n"] for m in got] == list(range(50))


async def test_cancelled_receive_does_not_take_later_messages(make_layer):
    """A worker stops receiving on a shared queue (its receive is cancelled); messages sent
    afterwards go to the receivers still receiving, not into the stopped one's process."""
    stopped, active, sender = make_layer(), make_layer(), make_layer()
    task = asyncio.create_task(stopped.receive("handoff.q"))
    await asyncio.sleep(0.2)
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)
    waiting = asyncio.create_task(active.receive("handoff.q"))
    await asyncio.sleep(0.1)
    for i in range(3):
        await sender.send("handoff.q", msg(i))
    got: list[int] = []
    try:
        async with asyncio.timeout(5):
            got.append((await waiting)["n"])
            while len(got) < 3:
                got.append((await active.receive("handoff.q"))["n"])
    except TimeoutError:
        waiting.cancel()
        await asyncio.gather(waiting, return_exceptions=True)
        taken = []
        while True:
            try:
                taken.append((await asyncio.wait_for(stopped.receive("handoff.q"), 0.5))["n"])
            except asyncio.TimeoutError:
                break
        raise AssertionError(f"active receiver got {got}; the cancelled one's process had "
                             f"taken {taken}") from None
    assert got == [0, 1, 2]


async def test_cancelled_sends_leave_connections_sane(make_layer):
    """Sends cancelled at varied points (a consumer torn down mid-send) may or may not have
    been delivered, but are never delivered twice, and leave no half-read reply behind that
    would confuse the next command."""
    sender, node = make_layer(capacity=10000), make_layer(capacity=10000)
    local = await node.new_channel()
    await node.group_add("cancelsend", "cancelsend.gq")
    completed: dict[str, set[int]] = {"named": set(), "local": set(), "group": set()}
    rnd = random.Random(7)
    for i in range(300):
        kind = ("named", "local", "group")[i % 3]
        if kind == "named":
            task = asyncio.ensure_future(sender.send("cancelsend.q", msg(i)))
        elif kind == "local":
            task = asyncio.ensure_future(sender.send(local, msg(i)))
        else:
            task = asyncio.ensure_future(sender.group_send("cancelsend", msg(i)))
        # Up to 20 ms, and sometimes 150 ms: a send through the broker waits for its confirm,
        # which takes far longer than a Redis round trip (more so in asyncio's debug mode or
        # on a loaded machine, where no send finished within 20 ms).
        delay = rnd.choice([None, 0, 0.0001, 0.0005, 0.001, 0.002, 0.005, 0.02, 0.15])
        if delay is not None:
            await asyncio.sleep(delay)
        task.cancel()
        try:
            await task
            completed[kind].add(i)
        except asyncio.CancelledError:
            pass
    for j in range(1000, 1020):
        await sender.send("cancelsend.q", msg(j))
        await sender.send(local, msg(j))
        await sender.group_send("cancelsend", msg(j))
    for kind, channel in (("named", "cancelsend.q"), ("local", local), ("group", "cancelsend.gq")):
        got: list[int] = []
        while True:
            try:
                got.append((await asyncio.wait_for(node.receive(channel), 0.5))["n"])
            except asyncio.TimeoutError:
                break
        tried = set(range(("named", "local", "group").index(kind), 300, 3))
        assert len(got) == len(set(got)), f"{kind}: delivered twice"
        assert set(range(1000, 1020)) <= set(got), kind
        assert [n for n in got if n >= 1000] == list(range(1000, 1020)), kind
        assert completed[kind] <= set(got), f"{kind}: completed sends lost"
        assert set(got) - set(range(1000, 1020)) <= tried, kind
    assert all(0 < len(c) < 100 for c in completed.values()), "cancels must hit mid-send"


async def test_flush_uses_scan_never_keys(own_redis, prefix):
    async with own_layer(hosts=[own_redis.url], prefix=prefix) as layer, \
            raw_redis(own_redis.url) as raw:
        local = await layer.new_channel()
        for i in range(50):
            await layer.send(f"scan.q{i}", msg(i))
            await layer.group_add(f"scang{i}", local)
        before = await commandstats(raw)
        await layer.flush()
        delta = stats_delta(before, await commandstats(raw))
        assert "keys" not in delta, delta
        assert delta.get("scan", 0) >= 1, delta
        assert [k for k in await prefix_keys(raw, prefix) if k != Keys(prefix).flush.encode()] == []


# ------------------------------------------------------------------ drop-in under Channels


async def test_plain_channels_consumer_with_groups(
    settings, redis_url, prefix, make_layer, path_options
):
    """A stock Channels consumer (groups attribute, handler per type) works unchanged."""
    from channels.generic.websocket import AsyncJsonWebsocketConsumer
    from channels.layers import get_channel_layer
    from channels.testing import WebsocketCommunicator

    class RoomConsumer(AsyncJsonWebsocketConsumer):
        groups = ["plainroom"]

        async def room_message(self, event: dict[str, Any]) -> None:
            await self.send_json({"got": event["n"]})

    settings.CHANNEL_LAYERS = {"default": {
        "BACKEND": "channels_distrib.layers.DistributedChannelLayer",
        "CONFIG": {"hosts": [redis_url], "prefix": prefix, **path_options},
    }}
    layer = get_channel_layer()
    try:
        sender = make_layer()
        clients = [WebsocketCommunicator(RoomConsumer.as_asgi(), "/ws/") for _ in range(3)]
        for client in clients:
            connected, _ = await client.connect()
            assert connected
        for n in range(3):
            await sender.group_send("plainroom", {"type": "room.message", "n": n})
        for client in clients:
            assert [(await client.receive_json_from(timeout=5))["got"] for _ in range(3)] == [0, 1, 2]
        await clients[0].disconnect()  # channels cancels its receive loop and discards it
        await sender.group_send("plainroom", {"type": "room.message", "n": 9})
        for client in clients[1:]:
            assert (await client.receive_json_from(timeout=5)) == {"got": 9}
            await client.disconnect()
    finally:
        await layer.close()


async def test_expiry_judged_by_redis_time_not_the_local_clock(make_layer, monkeypatch):
    """A host whose clock is 2 minutes ahead of Redis (no NTP in a container, say) must not
    treat fresh messages as expired: expiry is stamped with Redis TIME, so it must be judged
    against Redis time (as node inboxes already are, via their clock offset)."""
    real_time = time.time
    monkeypatch.setattr(time, "time", lambda: real_time() + 120)
    node, sender = make_layer(), make_layer()
    local = await node.new_channel()
    await sender.send("skew.named", msg(1))
    await sender.send(local, msg(2))
    outcome: dict[str, Any] = {}
    for channel in ("skew.named", local):
        try:
            outcome[channel] = await recv(node, channel, 2)
        except TimeoutError:
            outcome[channel] = "dropped as expired"
    assert outcome == {"skew.named": msg(1), local: msg(2)}
