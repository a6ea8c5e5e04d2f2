"""One consumer never slows another (DESIGN.md, "Delivery guarantees").

A node reads its inbox without ever waiting for a consumer. A channel holds up to
``capacity`` messages in memory; past that its messages wait in Redis (the node remembers
their inbox entry ids) up to its budget, ``capacity * DEFER_FACTOR``; past the budget the
overflow is dropped and counted. Direct senders get ``ChannelFull`` while it is backlogged.
Checked with counts, not timings.
"""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from channels.exceptions import ChannelFull

from channels_distrib.inbox import DEFER_FACTOR
from tests.helpers_layers import msg


async def _drain(layer: Any, channel: str, count: int, delay: float, got: list[int]) -> None:
    while len(got) < count:
        got.append((await layer.receive(channel))["n"])
        if delay:
            await asyncio.sleep(delay)


async def _leftover(layer: Any, channel: str) -> list[int]:
    left: list[int] = []
    while True:
        try:
            left.append((await asyncio.wait_for(layer.receive(channel), 0.3))["n"])
        except asyncio.TimeoutError:
            return left


async def test_burst_within_budget_to_a_slow_receiver_is_delivered_in_full(make_layer):
    node, sender = make_layer(capacity=50), make_layer()
    channel = await node.new_channel()
    await node.group_add("burst", channel)
    got: list[int] = []
    consumer = asyncio.create_task(_drain(node, channel, 50, 0.005, got))
    try:
        for n in range(50):  # faster than the consumer drains: the backlog waits in its queue
            await sender.group_send("burst", msg(n))
        async with asyncio.timeout(10):
            await asyncio.shield(consumer)
    finally:
        consumer.cancel()
        await asyncio.gather(consumer, return_exceptions=True)
    assert got == list(range(50))
    assert node._node.dropped == 0


async def test_burst_past_capacity_to_a_slow_receiver_waits_in_redis_and_loses_nothing(
    make_layer,
):
    node, sender = make_layer(capacity=10), make_layer()
    channel = await node.new_channel()
    await node.group_add("burst", channel)
    got: list[int] = []
    consumer = asyncio.create_task(_drain(node, channel, 300, 0.002, got))
    try:
        for n in range(300):
            await sender.group_send("burst", msg(n))
        async with asyncio.timeout(15):
            await asyncio.shield(consumer)
    finally:
        consumer.cancel()
        await asyncio.gather(consumer, return_exceptions=True)
    assert got == list(range(300)), "every one, in order"
    assert node._node.dropped == 0


async def test_a_slow_consumer_never_holds_back_the_fast_one(make_layer):
    """The fast member gets all 200 while the slow one (10 msg/s) has taken only a few: the
    reader never waited for the slow one's queue (with any waiting, even bounded, the fast
    one could not get past the slow one's capacity before the slow one drained it). The slow
    one's backlog waits in Redis: it loses nothing, in order."""
    node, sender = make_layer(capacity=20), make_layer()
    fast, slow = await node.new_channel(), await node.new_channel()
    for channel in (fast, slow):
        await node.group_add("speeds", channel)
    fast_got: list[int] = []
    slow_got: list[int] = []
    consumers = [
        asyncio.create_task(_drain(node, fast, 200, 0, fast_got)),
        asyncio.create_task(_drain(node, slow, 200, 0.1, slow_got)),
    ]
    try:
        for n in range(200):
            await sender.group_send("speeds", msg(n))
        async with asyncio.timeout(10):
            await asyncio.shield(consumers[0])
        slow_when_fast_done = len(slow_got)
    finally:
        consumers[1].cancel()
        await asyncio.gather(*consumers, return_exceptions=True)
    assert fast_got == list(range(200))
    # Waiting for the slow queue would need the slow one to take 20 (2 s) before the fast
    # one got message 41; the 200 sends take well under 1.5 s.
    assert slow_when_fast_done < 15, slow_when_fast_done
    slow_all = slow_got + await _leftover(node, slow)
    assert slow_all == list(range(200)), "the slow one's backlog (within budget) is all kept"
    assert node._node.dropped == 0


@pytest.mark.parametrize("receiving", [False, True], ids=["stopped", "receiving-slowly"])
async def test_overflow_past_the_budget_is_dropped_and_direct_senders_get_channel_full(
    make_layer, receiving
):
    capacity = 5
    budget = capacity + capacity * DEFER_FACTOR  # in memory, then waiting in Redis
    sent = budget + 100
    node, sender = make_layer(capacity=capacity), make_layer()
    stalled, busy = await node.new_channel(), await node.new_channel()
    for channel in (stalled, busy):
        await node.group_add("mixed", channel)
    busy_got: list[int] = []
    consumer = asyncio.create_task(_drain(node, busy, sent, 0, busy_got))
    slow: asyncio.Task[None] | None = None
    slow_got: list[int] = []
    if receiving:  # receives, but only once a second: alive, and far behind
        slow = asyncio.create_task(_drain(node, stalled, sent, 1.0, slow_got))
    try:
        for n in range(sent):
            await sender.group_send("mixed", msg(n))
        async with asyncio.timeout(10):
            await asyncio.shield(consumer)
    finally:
        consumer.cancel()
        if slow is not None:
            slow.cancel()
        await asyncio.gather(consumer, *([slow] if slow else []), return_exceptions=True)
    assert busy_got == list(range(sent))
    # The node marks the dropping channel full in Redis: another process's send raises.
    async with asyncio.timeout(5):
        while True:
            try:
                await sender.send(stalled, msg(-1))
            except ChannelFull:
                break
            await asyncio.sleep(0.05)
    kept = slow_got + await _leftover(node, stalled)
    assert kept == sorted(kept) and kept[:budget] == list(range(budget)), kept[:10]
    assert budget <= len(kept) <= budget + len(slow_got) + 1, len(kept)
    assert node._node.dropped == sent - len(kept), "every message past the budget is counted"


async def test_a_backlog_spread_over_other_traffic_is_fetched_back_whole(make_layer):
    # The backlog's entries lie far apart in the inbox (30 entries of other traffic between
    # two of them), so the one XRANGE over their span is capped and the rest is fetched by id.
    node, sender = make_layer(capacity=5), make_layer()
    channel = await node.new_channel()
    await node.group_add("spread", channel)
    ghost = channel.split("!")[0] + "!nobody"  # this node's token, no such channel: dropped
    for n in range(20):
        await sender.group_send("spread", msg(n))
        for _ in range(30):
            await sender.send(ghost, msg(-1))
    got: list[int] = []
    async with asyncio.timeout(10):
        await _drain(node, channel, 20, 0, got)
    assert got == list(range(20)), "every one, in order"
    assert node._node.inbox.dropped_by.get("trimmed", 0) == 0
    assert node._node.inbox.dropped_by["no_channel"] == 20 * 30


@pytest.mark.redis_internals
async def test_one_read_of_many_group_entries_goes_out_as_runs_in_the_inbox_order(
    make_layer, redis_url, monkeypatch
):
    """Consecutive group messages of one inbox read are fanned out as runs (batched local
    fan-out): every member still gets exactly its groups' messages, in the inbox's order,
    whether it has room for a whole run (capacity 100) or overflows into Redis (4)."""
    import threading

    import redis.asyncio as aioredis

    from channels_distrib.inbox import InboxReader

    runs: list[int] = []
    fan_out_run = InboxReader._fan_out_run

    def counted(self: InboxReader, group: str, run: list[tuple[bytes, bytes]]) -> None:
        runs.append(len(run))
        fan_out_run(self, group, run)

    monkeypatch.setattr(InboxReader, "_fan_out_run", counted)
    node, sender = make_layer(capacity=4, channel_capacity={"roomy*": 100}), make_layer()
    both, one = await node.new_channel("roomy"), await node.new_channel()
    for group, channel in (("r1", both), ("r2", both), ("r1", one)):
        await node.group_add(group, channel)
    groups = ["r1", "r1", "r1", "r2"]

    async def burst() -> None:
        for n in range(48):
            await sender.group_send(groups[n % 4], msg(n))

    # The sends come from another thread while this loop (the node's) is held: they all
    # wait in the inbox, so the node's next read returns them together.
    thread = threading.Thread(target=lambda: asyncio.run(burst()))
    thread.start()
    thread.join()
    got_both = await asyncio.wait_for(_all(node, both, 48), 15)
    got_one = await asyncio.wait_for(_all(node, one, 36), 15)
    client = aioredis.from_url(redis_url)
    try:
        entries = await client.xrange(node.keys.inbox(node._node.token))
    finally:
        await client.aclose()
    order = [(f[b"g"], node.serializer.loads(f[b"m"])["n"]) for _, f in entries if b"m" in f]
    assert got_both == [n for _, n in order]
    assert got_one == [n for g, n in order if g == b"r1"]
    assert max(runs) > 1, "the run path was taken"
    assert node._node.dropped == 0


async def _all(layer: Any, channel: str, count: int) -> list[int]:
    return [(await layer.receive(channel))["n"] for _ in range(count)]
