"""The broker path with a hung broker: a loopback proxy in front of the machine's RabbitMQ
(tests/helpers_faults.FaultProxy) stops forwarding in both directions while connections
stay open, as a broker that stopped answering or a link that blackholes does.

The project's rule: every call the library makes ends within a second of being cancelled,
whatever the client does, and close() ends in bounded time. Nothing here stands in for
RabbitMQ or Redis: the layer talks to the real ones, through the proxy for RabbitMQ.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable, Coroutine
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import pytest

pytest.importorskip("aiormq", reason="the broker path needs aiormq (the test group has it)")

from channels_distrib.exceptions import BrokerUnavailable  # noqa: E402
from channels_distrib.layers import DistributedChannelLayer  # noqa: E402
from tests.helpers_faults import FaultProxy  # noqa: E402
from tests.helpers_layers import msg, recv  # noqa: E402

#: retry_timeout of the layer behind the proxy (s).
RETRY = 1.0
#: close() on a hung broker: the node's and the sender's connection each get aiormq's
#: 2 s for the broker's close-ok, the node's queue delete fails after RETRY.
CLOSE_BOUND = 4 * RETRY + 5.0


@pytest.fixture
def message_path() -> str:
    return "broker"


def _through(url: str, port: int) -> str:
    """``url`` with its host and port replaced by the proxy's."""
    parts = urlsplit(url)
    userinfo = parts.netloc.rpartition("@")[0]
    netloc = f"{userinfo}@127.0.0.1:{port}" if userinfo else f"127.0.0.1:{port}"
    return urlunsplit(parts._replace(netloc=netloc))


@dataclass
class Hung:
    layer: DistributedChannelLayer  # a node whose broker connections go through the proxy
    peer: DistributedChannelLayer  # another node, straight to the broker
    proxy: FaultProxy
    member: str  # a channel of layer's node, in group "hung"
    theirs: str  # a channel of peer's node


@pytest.fixture
async def hung(
    make_layer: Callable[..., Any], broker_url: str, redis_url: str, prefix: str
) -> AsyncIterator[Hung]:
    """Both nodes warmed up (every kind of send made once), then the proxy stalled."""
    port = urlsplit(broker_url).port or 5672
    proxy = await FaultProxy(port).start()
    peer = make_layer()  # made first: make_layer's flush runs straight to the broker
    layer = DistributedChannelLayer(
        hosts=[redis_url], prefix=prefix, broker=_through(broker_url, proxy.port),
        retry_timeout=RETRY, heartbeat_interval=0.3, node_timeout=3,
    )
    try:
        member, theirs = await layer.new_channel(), await peer.new_channel()
        await layer.group_add("hung", member)
        await layer.group_send("hung", msg(0))
        await layer.send("hung.named", msg(0))
        await layer.send(theirs, msg(0))
        assert (await recv(layer, member))["n"] == 0
        assert (await recv(layer, "hung.named"))["n"] == 0
        assert (await recv(peer, theirs))["n"] == 0
        proxy.stall()
        yield Hung(layer, peer, proxy, member, theirs)
    finally:
        proxy.unstall()
        try:
            async with asyncio.timeout(CLOSE_BOUND + 5):
                await layer.close()
        finally:
            await proxy.stop()


CALLS: dict[str, Callable[[Hung], Coroutine[Any, Any, Any]]] = {
    "group_send": lambda h: h.layer.group_send("hung", msg(1)),
    "room_send": lambda h: h.layer.room_send("hung", msg(1)),
    "send_direct": lambda h: h.layer.send(h.theirs, msg(1)),
    "send_named": lambda h: h.layer.send("hung.named", msg(1)),
    "send_new_named": lambda h: h.layer.send("hung.fresh", msg(1)),
    "receive_named": lambda h: h.layer.receive("hung.named"),
    "group_add_own": lambda h: h.layer.group_add("hung.other", h.member),
    "group_add_other_node": lambda h: h.layer.group_add("hung.remote", h.theirs),
    "group_add_named": lambda h: h.layer.group_add("hung.remote", "hung.named"),
    "group_discard_other_node": lambda h: h.layer.group_discard("hung", h.theirs),
    "flush": lambda h: h.layer.flush(),
}


@pytest.mark.parametrize("call", sorted(CALLS))
async def test_a_call_on_a_hung_broker_ends_within_a_second_of_being_cancelled(hung, call):
    task = asyncio.ensure_future(CALLS[call](hung))
    await asyncio.sleep(0.3)
    assert not task.done(), f"{call} did not wait for the hung broker: {task}"
    task.cancel()
    started = time.monotonic()
    done, _ = await asyncio.wait({task}, timeout=1.0)
    took = time.monotonic() - started
    assert done, f"{call} still running 1 s after it was cancelled"
    assert task.cancelled(), task
    print(f"{call}: ended {took:.3f} s after cancel")


#: Calls that raise BrokerUnavailable on a hung broker (a receive waits instead: it never
#: raises connection errors).
RAISING = sorted(set(CALLS) - {"receive_named"})


@pytest.mark.parametrize("call", RAISING)
async def test_a_call_on_a_hung_broker_raises_within_retry_timeout(hung, call):
    """No cancel: a confirm, declare, bind or delete that gets no answer raises
    BrokerUnavailable once retry_timeout has passed (a publish may have been queued; it is
    never published again), the password masked. Before, sends and flush waited for ever."""
    started = time.monotonic()
    async with asyncio.timeout(RETRY + 5):
        with pytest.raises(BrokerUnavailable, match="guest:\\*\\*\\*"):
            await CALLS[call](hung)
    took = time.monotonic() - started
    print(f"{call}: raised after {took:.2f} s")
    assert took < RETRY + 3


def _library_tasks() -> list[asyncio.Task[Any]]:
    """Pending tasks running code of this library or of aiormq."""
    found = []
    for task in asyncio.all_tasks():
        code = getattr(task.get_coro(), "cr_code", None)
        filename = code.co_filename if code is not None else ""
        if not task.done() and ("channels_distrib" in filename or "aiormq" in filename):
            found.append(task)
    return found


async def test_close_on_a_hung_broker_is_bounded_and_leaves_no_task(hung):
    """close() after cancelled calls (a receive, a send, a group_add of its own channel)
    ends within CLOSE_BOUND with the broker still hung, and no task of the layer or of
    aiormq runs on once the other node has closed too."""
    calls = [
        asyncio.ensure_future(hung.layer.receive("hung.named")),
        asyncio.ensure_future(hung.layer.group_send("hung", msg(1))),
        asyncio.ensure_future(hung.layer.group_add("hung.other", hung.member)),
    ]
    await asyncio.sleep(0.3)
    for task in calls:
        task.cancel()
    await asyncio.wait(calls, timeout=1.0)
    started = time.monotonic()
    async with asyncio.timeout(CLOSE_BOUND):
        await hung.layer.close()
    took = time.monotonic() - started
    print(f"close on a hung broker took {took:.2f} s")
    await hung.peer.close()
    await asyncio.sleep(1.0)
    assert not _library_tasks()


def _sockets_to(port: int) -> list[Any]:
    """This process's open TCP connections whose far end is ``port``."""
    import psutil

    return [c for c in psutil.Process().net_connections(kind="tcp") if c.raddr and c.raddr.port == port]


async def test_close_right_after_a_connection_was_given_up_closes_its_socket(broker_url):
    """A round trip that got no answer gives its connection up: its close handshake runs in
    the background and the hung broker never answers it (aiormq waits about 2 s). close()
    called at once must still leave no socket open (before, it waited 1 s for that close and
    returned with the socket open, left to the garbage collector: a ResourceWarning seen on
    Python 3.10 with aiormq 6)."""
    from channels_distrib.broker.connection import BrokerConnection

    proxy = await FaultProxy(urlsplit(broker_url).port or 5672).start()
    conn = BrokerConnection(_through(broker_url, proxy.port), retry_timeout=RETRY, name="t")
    try:
        channel = await conn.channel()
        proxy.stall()
        with pytest.raises(BrokerUnavailable):
            await conn.bounded(channel.queue_declare("hung.given-up", auto_delete=True), "a declare")
        assert _sockets_to(proxy.port)  # given up, its close waiting for the broker
        async with asyncio.timeout(CLOSE_BOUND):
            await conn.close()
        assert _sockets_to(proxy.port) == []
    finally:
        proxy.unstall()
        await proxy.stop()


@pytest.mark.parametrize("call", ["flush", "group_send", "send_named"])
async def test_close_after_a_call_gave_up_on_a_hung_broker_closes_every_socket(hung, call):
    """A call that got no answer gives its connection up (closed in the background, the
    broker never sending close-ok); close() then closes those sockets itself rather than
    leave them to the garbage collector (seen on Python 3.10 with aiormq 6 as a
    ResourceWarning for an unclosed socket)."""
    with pytest.raises(BrokerUnavailable):
        await CALLS[call](hung)
    assert _sockets_to(hung.proxy.port)  # the given-up connection, still open
    async with asyncio.timeout(CLOSE_BOUND):
        await hung.layer.close()
    assert _sockets_to(hung.proxy.port) == []
