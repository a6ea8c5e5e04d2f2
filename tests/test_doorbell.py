"""The inbox doorbell (channels_distrib.doorbell, issue 9): an idle reader arms and waits for
its bell; a send rings it; a lost subscriber or a cancellation never stalls the reader."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import msgpack
import pytest
from redis.asyncio.client import PubSub

from channels_distrib.keys import Keys
from channels_distrib.transport import BLOCK_SECONDS
from tests.helpers_layers import (
    commandstats,
    eventually,
    layer_clients,
    msg,
    own_layer,
    raw_redis,
    recv,
    stats_delta,
)

pytestmark = pytest.mark.timeout(60)


def token_of(channel: str) -> str:
    return channel.split(".", 1)[1].split("!", 1)[0]


async def armed_and_subscribed(raw: Any, prefix: str, token: str) -> bool:
    """The node's reader is waiting for its bell: its mark is set and it listens."""
    subscribers = [c for c in await layer_clients(raw, prefix) if c.get("cmd") == "subscribe"]
    return bool(subscribers) and bool(await raw.exists(Keys(prefix).armed(token)))


async def test_a_send_to_an_armed_reader_rings_its_bell(redis_url: str, prefix: str) -> None:
    async with own_layer(hosts=[redis_url], prefix=prefix) as node, \
            own_layer(hosts=[redis_url], prefix=prefix, _flush=False) as sender, \
            raw_redis(redis_url) as raw:
        local = await node.new_channel()
        member = await node.new_channel()
        await node.group_add("bellgroup", member)
        token = token_of(local)
        assert await eventually(lambda: armed_and_subscribed(raw, prefix, token), 5)
        reader = node._node.inbox
        bell = reader.bell
        rings, taken = bell.rings, reader.from_bell
        stats0 = await commandstats(raw)
        started = time.monotonic()
        await sender.send(local, msg(1))
        assert await recv(node, local) == msg(1)
        took = time.monotonic() - started
        # Well inside the safety timeout: the bell woke the reader, not its timeout.
        assert took < BLOCK_SECONDS / 2, took
        assert bell.rings == rings + 1
        assert reader.from_bell == taken + 1  # the entry came with the bell: no read
        delta = stats_delta(stats0, await commandstats(raw))
        assert delta.get("publish", 0) >= 1, delta
        # Armed again once it read that (and found nothing more); a group send rings too.
        assert await eventually(lambda: armed_and_subscribed(raw, prefix, token), 5)
        started = time.monotonic()
        await sender.group_send("bellgroup", msg(2))
        assert await recv(node, member) == msg(2)
        assert time.monotonic() - started < BLOCK_SECONDS / 2
        assert bell.rings == rings + 2


async def test_an_entry_that_rang_no_bell_is_never_skipped(redis_url: str, prefix: str) -> None:
    """An entry appended without ringing (a raw XADD; the heartbeats' markers are the only
    such writers) lies before the next bell's entry: the reader then reads instead of taking
    the bell's entry, so both arrive, in order."""
    async with (
        own_layer(hosts=[redis_url], prefix=prefix) as node,
        own_layer(hosts=[redis_url], prefix=prefix, _flush=False) as sender,
        raw_redis(redis_url) as raw,
    ):
        local = await node.new_channel()
        token = token_of(local)
        assert await eventually(lambda: armed_and_subscribed(raw, prefix, token), 5)
        reader = node._node.inbox
        taken = reader.from_bell
        entry = {"c": local, "m": msgpack.packb(msg(1), use_bin_type=True)}
        await raw.xadd(Keys(prefix).inbox(token), entry)  # rings nothing: the reader waits on
        await sender.send(local, msg(2))  # rings; its bell names msg 1's entry as the one before
        assert [await recv(node, local), await recv(node, local)] == [msg(1), msg(2)]
        assert reader.from_bell == taken


async def test_back_to_back_sends_ring_less_than_once_each(redis_url: str, prefix: str) -> None:
    """Under load the reader keeps finding entries and does not arm: few bells."""
    async with own_layer(hosts=[redis_url], prefix=prefix, capacity=1000) as node, \
            own_layer(hosts=[redis_url], prefix=prefix, _flush=False) as sender, \
            raw_redis(redis_url) as raw:
        member = await node.new_channel()
        await node.group_add("busy", member)
        assert await eventually(lambda: armed_and_subscribed(raw, prefix, token_of(member)), 5)
        stats0 = await commandstats(raw)
        sends = 300
        for start in range(0, sends, 20):  # 20 at a time: faster than one reader takes them
            await asyncio.gather(*(sender.group_send("busy", msg(i)) for i in range(start, start + 20)))
        got = [await recv(node, member) for _ in range(sends)]
        assert sorted(m["n"] for m in got) == list(range(sends))
        delta = stats_delta(stats0, await commandstats(raw))
        assert delta.get("publish", 0) < sends / 2, delta


async def test_subscriber_killed_then_a_send_is_still_delivered(redis_url: str, prefix: str) -> None:
    """CLIENT KILL of the bell's connection alone, then a send: the bell is lost, the safety
    timeout (or the resubscription, which reads first) delivers it all the same."""
    async with own_layer(hosts=[redis_url], prefix=prefix) as node, \
            own_layer(hosts=[redis_url], prefix=prefix, _flush=False) as sender, \
            raw_redis(redis_url) as raw:
        local = await node.new_channel()
        token = token_of(local)
        assert await eventually(lambda: armed_and_subscribed(raw, prefix, token), 5)
        subscribers = [c for c in await layer_clients(raw, prefix) if c.get("cmd") == "subscribe"]
        assert len(subscribers) == 1, subscribers
        pipe = raw.pipeline(transaction=False)
        pipe.execute_command("CLIENT", "KILL", "ID", subscribers[0]["id"])
        await pipe.execute()
        started = time.monotonic()
        await sender.send(local, msg(1))
        assert await recv(node, local, timeout=BLOCK_SECONDS + 3) == msg(1)
        assert time.monotonic() - started < BLOCK_SECONDS + 1.0
        # And the bell is back: the next send to the re-armed reader is prompt.
        assert await eventually(lambda: armed_and_subscribed(raw, prefix, token), 5)
        started = time.monotonic()
        await sender.send(local, msg(2))
        assert await recv(node, local) == msg(2)
        assert time.monotonic() - started < BLOCK_SECONDS / 2


async def _reader_task(node: Any) -> asyncio.Task[None]:
    tasks = [t for t in node._node._tasks if t.get_name().startswith("channels_distrib.inbox.")]
    assert len(tasks) == 1
    return tasks[0]


async def test_reader_cancelled_while_waiting_for_its_bell_ends_within_a_second(
    redis_url: str, prefix: str
) -> None:
    async with own_layer(hosts=[redis_url], prefix=prefix) as node, raw_redis(redis_url) as raw:
        local = await node.new_channel()
        assert await eventually(lambda: armed_and_subscribed(raw, prefix, token_of(local)), 5)
        task = await _reader_task(node)
        started = time.monotonic()
        task.cancel()
        await asyncio.wait({task}, timeout=2)
        assert task.done() and time.monotonic() - started < 1.0
        assert node._node.inbox.bell._pubsub is None  # closed on the way out


async def test_reader_cancelled_in_a_wait_that_swallows_cancellation_ends_within_a_second(
    redis_url: str, prefix: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """redis-py may not let go of a cancelled read: the reader closes the subscription's
    connection under it (tasks.cancellable) and still ends within a second."""
    entered: list[float] = []

    async def stubborn(self: PubSub, *args: Any, **kwargs: Any) -> Any:
        entered.append(time.monotonic())
        while self.connection is not None and self.connection.is_connected:
            try:
                await asyncio.sleep(0.05)
            except asyncio.CancelledError:
                pass  # swallowed, as a racing read timeout can in redis-py
        return None

    async with own_layer(hosts=[redis_url], prefix=prefix) as node, raw_redis(redis_url) as raw:
        local = await node.new_channel()
        assert await eventually(lambda: armed_and_subscribed(raw, prefix, token_of(local)), 5)
        monkeypatch.setattr(PubSub, "get_message", stubborn)
        await asyncio.sleep(BLOCK_SECONDS + 0.5)  # the wait after the next arm is stubborn
        task = await _reader_task(node)
        started = time.monotonic()
        task.cancel()
        await asyncio.wait({task}, timeout=3)
        assert entered  # the reader was in the stubborn wait
        assert task.done() and time.monotonic() - started < 1.0
