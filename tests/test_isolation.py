"""One consumer never slows another (DESIGN.md, "Delivery guarantees").

A node reads its inbox without ever waiting for a consumer: a channel's backlog is bounded by
its budget (``capacity`` messages); past it the overflow is dropped and counted, and direct
senders get ``ChannelFull``. Checked with counts, not timings.
"""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from channels.exceptions import ChannelFull

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


async def test_a_slow_consumer_never_holds_back_the_fast_one(make_layer):
    """The fast member gets all 200 while the slow one (10 msg/s) has taken only a few: the
    reader never waited for the slow one's queue (with any waiting, even bounded, the fast
    one could not get past the slow one's budget before the slow one drained it). The slow
    one keeps its budget, in order; the rest is dropped and counted."""
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
    assert slow_all == sorted(slow_all) and slow_all[:1] == [0]
    assert len(slow_all) >= 20, "the slow consumer keeps at least its budget"
    assert node._node.dropped == 200 - len(slow_all), "every overflow message is counted"


@pytest.mark.parametrize("receiving", [False, True], ids=["stopped", "receiving-slowly"])
async def test_overflow_is_dropped_and_direct_senders_get_channel_full(make_layer, receiving):
    node, sender = make_layer(capacity=5), make_layer()
    stalled, busy = await node.new_channel(), await node.new_channel()
    for channel in (stalled, busy):
        await node.group_add("mixed", channel)
    busy_got: list[int] = []
    consumer = asyncio.create_task(_drain(node, busy, 100, 0, busy_got))
    slow: asyncio.Task[None] | None = None
    slow_got: list[int] = []
    if receiving:  # receives, but only once a second: alive, and far behind
        slow = asyncio.create_task(_drain(node, stalled, 100, 1.0, slow_got))
    try:
        for n in range(100):
            await sender.group_send("mixed", msg(n))
        async with asyncio.timeout(10):
            await asyncio.shield(consumer)
    finally:
        consumer.cancel()
        if slow is not None:
            slow.cancel()
        await asyncio.gather(consumer, *([slow] if slow else []), return_exceptions=True)
    assert busy_got == list(range(100))
    # The node marks the dropping channel full in Redis: another process's send raises.
    async with asyncio.timeout(5):
        while True:
            try:
                await sender.send(stalled, msg(-1))
            except ChannelFull:
                break
            await asyncio.sleep(0.05)
    kept = slow_got + await _leftover(node, stalled)
    assert kept == sorted(kept) and 5 <= len(kept) <= 5 + len(slow_got) + 1, kept
