"""The inbox doorbell (channels_distrib.doorbell, issue 9): an idle reader arms and waits for
its bell; a send rings it; a lost subscriber or a cancellation never stalls the reader."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator
from typing import Any

import msgpack
import pytest
from redis.asyncio.client import PubSub

from channels_distrib.inbox import BUSY_READ
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


@contextlib.asynccontextmanager
async def armed_reader(
    redis_url: str, prefix: str, **config: Any
) -> AsyncIterator[tuple[Any, Any, Any, str, str]]:
    """(node, sender, raw client, a channel of the node, its token), once the node's reader
    is armed and waiting for its bell."""
    async with (
        own_layer(hosts=[redis_url], prefix=prefix, **config) as node,
        own_layer(hosts=[redis_url], prefix=prefix, _flush=False) as sender,
        raw_redis(redis_url) as raw,
    ):
        local = await node.new_channel()
        token = token_of(local)
        assert await eventually(lambda: armed_and_subscribed(raw, prefix, token), 5)
        yield node, sender, raw, local, token


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
    async with armed_reader(redis_url, prefix) as (node, sender, raw, local, token):
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


async def test_a_busy_reader_reads_with_xread_and_arms_only_when_it_finds_nothing(
    redis_url: str, prefix: str
) -> None:
    """ARM_INBOX costs Redis several times an XREAD's CPU for a full read (its entries pass
    through Lua tables; benchmarks/bench_inbox_read.py): after a read that found a backlog
    (BUSY_READ entries or more) the reader reads with a plain XREAD, and goes back to
    ARM_INBOX after a short read."""
    async with armed_reader(redis_url, prefix, capacity=5000) as (node, sender, raw, local, token):
        reader = node._node.inbox
        found: dict[str, list[int]] = {"xread": [], "arm": []}
        for name, method in (("xread", reader._xread), ("arm", reader._arm)):

            def counting(*args: Any, _m: Any = method, _n: str = name) -> Any:
                async def call() -> Any:
                    entries = await _m(*args)
                    found[_n].append(len(entries))
                    return entries

                return call()

            setattr(reader, "_" + name, counting)
        # 2,000 entries that ring nothing, then a send that rings: the reader wakes, finds
        # the bell's entry is not next, and reads the lot, READ_COUNT (500) at a time.
        pipe = raw.pipeline(transaction=False)
        for i in range(2000):
            pipe.xadd(Keys(prefix).inbox(token),
                      {"c": local, "m": msgpack.packb(msg(i), use_bin_type=True)})
        await pipe.execute()
        await sender.send(local, msg(2000))
        got = [await recv(node, local) for _ in range(2001)]
        assert [m["n"] for m in got] == list(range(2001))
        assert await eventually(lambda: armed_and_subscribed(raw, prefix, token), 5)

        # Redis answers the arming read before the reader's coroutine resumes to count it
        # (the check above can see the armed inbox first): wait for the count as well.
        async def counted_the_arming() -> bool:
            return len(found["arm"]) >= 2 and found["arm"][-1] == 0

        assert await eventually(counted_the_arming, 5), found
        # One ARM_INBOX read found the first 500; XREADs of 500 took the rest up to a short
        # one (the send's entry, and a heartbeat's marker or two that may have come in);
        # then ARM_INBOX found nothing and armed.
        reads = found["xread"]
        assert found["arm"][0] == 500, found
        assert reads[:3] == [500, 500, 500] and all(n == 500 for n in reads[:-1]), found
        assert 1 <= reads[-1] < BUSY_READ, found
        assert [n for n in found["arm"] if n] == [500] and found["arm"][-1] == 0, found


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
