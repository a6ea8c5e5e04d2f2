"""Backpressure at the owning node: busy consumers that keep receiving lose nothing, and a
consumer that stopped receiving never holds the node back."""

from __future__ import annotations

import asyncio
import time
from typing import Any


async def _drain(layer: Any, channel: str, count: int, delay: float) -> list[int]:
    got: list[int] = []
    async with asyncio.timeout(30):
        while len(got) < count:
            message = await layer.receive(channel)
            got.append(message["n"])
            if delay:
                await asyncio.sleep(delay)
    return got


async def test_burst_to_a_receiving_consumer_is_paced_not_dropped(make_layer: Any) -> None:
    node = make_layer(capacity=10)
    sender = make_layer()
    channel = await node.new_channel()
    await node.group_add("paced", channel)
    consumer = asyncio.create_task(_drain(node, channel, 300, 0.001))
    await asyncio.sleep(0.05)  # the consumer is receiving before the burst
    for n in range(300):
        await sender.group_send("paced", {"type": "m", "n": n})
    assert await consumer == list(range(300))  # every one, in order, none dropped
    assert node._node.dropped == 0


async def test_a_stopped_consumer_does_not_hold_back_its_node(make_layer: Any) -> None:
    node = make_layer(capacity=5)
    sender = make_layer()
    stalled = await node.new_channel()
    busy = await node.new_channel()
    for channel in (stalled, busy):
        await node.group_add("mixed", channel)
    # The stalled consumer received once, long enough ago to count as stopped.
    await sender.send(stalled, {"type": "m", "n": -1})
    assert (await node.receive(stalled))["n"] == -1
    await asyncio.sleep(1.2)
    consumer = asyncio.create_task(_drain(node, busy, 200, 0))
    started = time.monotonic()
    for n in range(200):
        await sender.group_send("mixed", {"type": "m", "n": n})
    assert await consumer == list(range(200))
    elapsed = time.monotonic() - started
    assert elapsed < 5.0, f"the busy consumer waited {elapsed:.1f} s behind the stalled one"
    kept = []
    while True:
        try:
            kept.append((await asyncio.wait_for(node.receive(stalled), 0.3))["n"])
        except asyncio.TimeoutError:
            break
    assert kept == list(range(5))  # what fitted is kept; the overflow was dropped
    assert node._node.dropped == 195
