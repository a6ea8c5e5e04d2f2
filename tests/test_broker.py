"""The broker path (CONFIG["broker"], channels_distrib/broker/) against the machine's RabbitMQ.

The layer suite itself (tests/test_layers.py and the others with BOTH_MESSAGE_PATHS) runs on
this path too; here is what only the broker path has: routing, bindings that follow the
memberships, queue arguments, flush and pruning of broker objects, connection cuts.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import subprocess
import sys
from typing import Any

import pytest

pytest.importorskip("aiormq", reason="the broker path needs aiormq (the test group has it)")

from channels.exceptions import ChannelFull  # noqa: E402
from django.core.exceptions import ImproperlyConfigured  # noqa: E402

from channels_distrib.broker import names  # noqa: E402
from channels_distrib.exceptions import BrokerUnavailable  # noqa: E402
from channels_distrib.layers import DistributedChannelLayer  # noqa: E402
from tests.helpers_broker import (  # noqa: E402
    amqp,
    close_connections,
    exists,
    queue_arguments,
    queue_bindings,
)
from tests.helpers_layers import (  # noqa: E402
    ROOT,
    eventually,
    msg,
    nothing_arrives,
    proc_env,
    raw_redis,
    recv,
    recv_n,
)


@pytest.fixture
def message_path() -> str:
    return "broker"


def test_nothing_of_the_broker_is_imported_without_the_option(redis_url, prefix):
    """A layer without ``broker`` (node, sends, groups) never imports aiormq or broker/."""
    code = f"""
import asyncio, json, sys
from channels_distrib.layers import DistributedChannelLayer
async def main():
    layer = DistributedChannelLayer(hosts=[{redis_url!r}], prefix={prefix + "imp"!r})
    channel = await layer.new_channel()
    await layer.group_add("g", channel)
    await layer.group_send("g", {{"type": "x"}})
    await layer.send("named.q", {{"type": "x"}})
    await layer.receive(channel)
    await layer.receive("named.q")
    await layer.flush()
    await layer.close()
asyncio.run(main())
print(json.dumps(sorted(m for m in sys.modules if "aiormq" in m or "pamqp" in m or ".broker" in m)))
"""
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, cwd=ROOT,
        env=proc_env(),
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert json.loads(done.stdout.strip().splitlines()[-1]) == []


@pytest.mark.parametrize(
    "value", ["redis://127.0.0.1:6379", "http://x", 5, "amqp://user:s3cret@/vhost"]
)
def test_bad_broker_option_fails_at_startup(value, redis_url):
    with pytest.raises(ImproperlyConfigured, match="amqp") as info:
        DistributedChannelLayer(hosts=[redis_url], broker=value)
    assert "s3cret" not in str(info.value)


@pytest.mark.parametrize(
    ("value", "match"),
    [
        ("amqp://guest:s3cret@127.0.0.1:notaport/", "no valid port"),
        ("amqp://guest:s3cret@127.0.0.1:70000/", "no valid port"),
        ("amqp://guest:s3cret@127.0.0.1:0/", "no valid port"),
        ("amqp://guest:pa/s3cret@127.0.0.1/", "must be percent-encoded"),
        ("amqp://guest:s3cret@127.0.0.1/?cafile=/etc/hostname", "with amqp://"),
        ("amqp://guest:s3cret@127.0.0.1/?no_verify_ssl=1", "with amqp://"),
        ("amqps://guest:s3cret@127.0.0.1/?ca_file=/etc/hostname", "unknown option"),
        ("amqps://guest:s3cret@127.0.0.1/?connection_attempts=3", "unknown option"),
        ("amqps://guest:s3cret@127.0.0.1/?cafile=/nonexistent/ca.pem", "names no readable file"),
        ("amqps://guest:s3cret@127.0.0.1/?capath=/nonexistent", "names no directory"),
        ("amqps://guest:s3cret@127.0.0.1/?no_verify_ssl=yes", "must be 0 or 1"),
        ("amqps://guest:s3cret@127.0.0.1/?keyfile=/etc/hostname", "keyfile needs certfile"),
        ("amqps://guest:s3cret@127.0.0.1/?cafile=/etc/hostname", "TLS files do not load"),
        ("amqp://guest:s3cret@127.0.0.1/?heartbeat=soon", "whole number"),
        ("amqp://guest:s3cret@127.0.0.1/?auth=kerberos", "must be one of"),
    ],
)
def test_bad_broker_url_fails_at_startup_saying_why(value, match, redis_url):
    """What aiormq would ignore (a misspelt option, TLS options on amqp://, which connects
    in clear text) or fail on only when connecting (a port that is not one, a CA file that
    does not exist or is not a certificate) fails when the layer is made, without the
    password. Before, each of these was accepted."""
    with pytest.raises(ImproperlyConfigured, match=match) as info:
        DistributedChannelLayer(hosts=[redis_url], broker=value)
    assert "s3cret" not in str(info.value)


def _ca_file(directory: Any) -> str:
    """A throwaway self-signed CA certificate made with openssl."""
    import shutil

    if shutil.which("openssl") is None:
        pytest.skip("openssl not on PATH (needed to make a CA certificate)")
    path = str(directory / "ca.pem")
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
         "-keyout", str(directory / "ca.key"), "-out", path, "-subj", "/CN=test ca"],
        check=True, capture_output=True, timeout=60,
    )
    return path


async def test_amqps_url_with_tls_options_reaches_aiormq_with_tls(redis_url, prefix, tmp_path):
    """An amqps:// URL with cafile (and the other options aiormq reads) is accepted as
    written and handed to aiormq unchanged, which then connects with TLS and that CA.
    (tests: test_amqps_with_the_ca_given_as_cafile_and_a_wrong_ca_fails_at_once, -m faults,
    connects to a TLS broker.)"""
    import aiormq

    ca = _ca_file(tmp_path)
    url = f"amqps://guest:guest@127.0.0.1:5671/vhost?cafile={ca}&heartbeat=30&name=app"
    layer = DistributedChannelLayer(hosts=[redis_url], prefix=prefix, broker=url)
    try:
        conn = layer._state().broker.conn
        assert conn.url == url
        connection = aiormq.Connection(conn.url)
        assert type(connection._transport_factory).__name__ == "TLSTransportFactory"
        assert connection.ssl_certs.cafile == ca and connection.ssl_certs.verify
        assert "guest:guest" not in conn.address
    finally:
        await layer.close()


@pytest.mark.parametrize(
    ("options", "match"),
    [({"broker_persistent": "yes"}, "True or False"), ({"broker_persistent": True}, "needs broker")],
)
def test_bad_broker_persistent_fails_at_startup(options, match, redis_url):
    with pytest.raises(ImproperlyConfigured, match=match):
        DistributedChannelLayer(hosts=[redis_url], **options)


async def test_broker_persistent_publishes_persistent_messages(make_layer):
    assert make_layer()._state().broker.delivery_mode == 1
    assert make_layer(broker_persistent=True)._state().broker.delivery_mode == 2


async def test_unreachable_broker_raises_within_retry_timeout(redis_url, prefix):
    layer = DistributedChannelLayer(
        hosts=[redis_url], prefix=prefix, broker="amqp://guest:guest@127.0.0.1:1/",
        retry_timeout=0.5,
    )
    try:
        async with asyncio.timeout(5):
            with pytest.raises(BrokerUnavailable, match="guest:\\*\\*\\*"):
                await layer.send("unreachable.q", msg(1))
    finally:
        await layer.close()


async def test_send_cancelled_while_the_broker_is_unreachable_leaves_nothing_running(
    redis_url, prefix
):
    """A send waiting for an unreachable broker, cancelled: the send and the layer's close
    both end within a second (no connect loop left retrying for retry_timeout)."""
    layer = DistributedChannelLayer(
        hosts=[redis_url], prefix=prefix, broker="amqp://guest:guest@127.0.0.1:1/",
        retry_timeout=30,
    )
    before = asyncio.all_tasks()
    task = asyncio.ensure_future(layer.send("unreachable.q", msg(1)))
    await asyncio.sleep(0.5)
    task.cancel()
    async with asyncio.timeout(1):
        await asyncio.gather(task, return_exceptions=True)
        await layer.close()
    await asyncio.sleep(0.1)
    assert not [t for t in asyncio.all_tasks() if t not in before and not t.done()]


async def test_group_message_once_per_node_and_never_to_nodes_without_members(make_layer):
    a, b, idle = make_layer(), make_layer(), make_layer()
    a_channels = [await a.new_channel() for _ in range(3)]
    b_channel = await b.new_channel()
    idle_channel = await idle.new_channel()
    for channel in a_channels:
        await a.group_add("fan", channel)
    await b.group_add("fan", b_channel)
    await idle.group_add("other", idle_channel)
    for i in range(5):
        await idle.group_send("fan", msg(i))
    for channel in a_channels:
        assert [m["n"] for m in await recv_n(a, channel, 5)] == list(range(5))
    assert [m["n"] for m in await recv_n(b, b_channel, 5)] == list(range(5))
    assert a._node.broker_queue.received == 5  # once per node, fanned out locally to 3
    assert b._node.broker_queue.received == 5
    assert idle._node.broker_queue.received == 0  # bound to "other" only
    assert await nothing_arrives(idle, idle_channel, 0.2)


async def test_bindings_follow_the_memberships(make_layer):
    layer, sender = make_layer(), make_layer()
    one, two = await layer.new_channel(), await layer.new_channel()
    queue = layer._node.broker_queue
    await layer.group_add("follow", one)
    await layer.group_add("follow", two)
    assert queue.bound == {"follow"}
    await layer.group_discard("follow", one)
    assert queue.bound == {"follow"}  # two is still a member
    await layer.group_discard("follow", two)

    async def unbound() -> bool:
        return queue.bound == set()

    assert await eventually(unbound, 3)
    before = queue.received
    await sender.group_send("follow", msg(1))
    await asyncio.sleep(0.3)
    assert queue.received == before, "a node without members got the group message"


async def _inbox_entries(redis_url: str, layer: Any) -> list[dict[bytes, bytes]]:
    async with raw_redis(redis_url) as client:
        entries = await client.xrange(layer.keys.inbox(layer._node.token))
    return [fields for _id, fields in entries]


async def test_no_message_travels_through_the_redis_inboxes(make_layer, redis_url):
    """Presence diffs (a node's own batched ones, another process's join and leave, a
    pruned node's leaves), presence states, membership notes of another process's
    group_add/group_discard, group, room and direct messages: all go through RabbitMQ. The
    nodes' Redis inboxes keep only the heartbeat's marker that made them."""
    # a announces its watcher's join at once (presence_interval=0): a batched diff sent
    # later would reach b's member too, before its presence.state, once b is a member.
    a = make_layer(heartbeat_interval=0.2, node_timeout=1.0, presence_interval=0)
    b, other = make_layer(), make_layer()
    watcher, mine = await a.new_channel(), await a.new_channel()
    theirs = await b.new_channel()
    await a.group_add("room", watcher, presence=True)
    assert (await recv(a, watcher))["type"] == "presence.state"
    await other.group_add("room", theirs, presence=True, meta={"n": 1})  # a note to b
    diff = await recv(a, watcher)
    assert diff["type"] == "presence.diff" and diff["joins"][0]["channel"] == theirs
    assert (await recv(b, theirs))["type"] == "presence.state"
    await other.group_add("room", mine)  # a note to a, of a plain member
    await other.group_send("room", msg(1))
    await other.room_send("room", msg(2))
    await other.send(mine, msg(3))
    assert [m["n"] for m in await recv_n(a, mine, 3)] == [1, 2, 3]
    assert [m.get("n") for m in await recv_n(a, watcher, 2)] == [1, 2]
    assert [m.get("n") for m in await recv_n(b, theirs, 2)] == [1, 2]
    await other.group_discard("room", theirs)  # a note to b, a leave to a
    diff = await recv(a, watcher)
    assert diff["type"] == "presence.diff" and diff["leaves"][0]["channel"] == theirs
    assert not b._node.memberships.members("room")
    await b.group_add("room", theirs, presence=True)  # b's own join, batched by b
    assert (await recv(b, theirs))["type"] == "presence.state"
    assert (await recv(a, watcher))["joins"][0]["channel"] == theirs
    node = b._node  # dies: a prunes it and announces the leave
    b._node = None
    await node.stop(deregister=False)
    async with asyncio.timeout(10):
        diff = await a.receive(watcher)
    assert diff["leaves"][0]["channel"] == theirs
    for layer in (a,):
        assert await _inbox_entries(redis_url, layer) == [{b"o": b"n"}]
    b._node = node
    assert await _inbox_entries(redis_url, b) in ([], [{b"o": b"n"}])
    b._node = None


async def test_another_process_group_add_binds_the_nodes_queue_before_returning(make_layer):
    """A process adds node B's channel to a group node A already receives: a group_send
    right after the call reaches B too, although the broker routes it to A's queue (so it
    is not returned as unroutable) before B has read the membership's note."""
    a, b, other = make_layer(), make_layer(), make_layer()
    on_a, on_b = await a.new_channel(), await b.new_channel()
    await a.group_add("both", on_a)
    for i in range(20):
        group = f"both{i}"
        await a.group_add(group, on_a)
        await other.group_add(group, on_b)
        await other.group_send(group, msg(i))
    got = sorted(m["n"] for m in await recv_n(b, on_b, 20))
    assert got == list(range(20))
    assert [m["n"] for m in await recv_n(a, on_a, 20)] == list(range(20))


async def test_presence_key_bound_while_the_node_has_presence_members(make_layer):
    """group_add(presence=True) returns once the node's queue is bound with the group's
    presence key too (diffs sent right after reach it); the key goes with the last presence
    member, the group's own key stays while a plain member remains."""
    layer = make_layer()
    watcher, plain = await layer.new_channel(), await layer.new_channel()
    queue = layer._node.broker_queue
    await layer.group_add("seen", plain)
    assert queue.bound == {"seen"}
    await layer.group_add("seen", watcher, presence=True)
    assert queue.bound == {"seen", names.presence_key("seen")}
    await layer.group_discard("seen", watcher)

    async def only_the_group() -> bool:
        return queue.bound == {"seen"}

    assert await eventually(only_the_group, 3)


async def test_node_queue_expires_with_node_timeout_and_pruning_deletes_it(make_layer, broker_url):
    dead = make_layer(heartbeat_interval=0.2, node_timeout=0.8)
    pruner = make_layer(heartbeat_interval=0.2, node_timeout=0.8)
    await dead.new_channel()
    await pruner.new_channel()
    node = dead._node
    name = names.node_queue(dead.prefix, node.token)
    assert '"x-expires",1600' in (queue_arguments(name) or "")  # 2 x node_timeout
    # Die without deregistering: tasks stop, the broker connection goes.
    dead._node = None
    await node.stop(deregister=False)
    assert await exists(broker_url, name)

    async def pruned() -> bool:
        return not await exists(broker_url, name)

    assert await eventually(pruned, 5), "the pruning node did not delete the dead node's queue"


async def test_named_channel_capacity_nack_raises_channel_full(make_layer):
    layer = make_layer(capacity=3)
    for i in range(3):
        await layer.send("full.q", msg(i))
    with pytest.raises(ChannelFull):
        await layer.send("full.q", msg(3))
    assert [m["n"] for m in await recv_n(layer, "full.q", 3)] == [0, 1, 2]
    await layer.send("full.q", msg(4))  # room again
    assert (await recv(layer, "full.q"))["n"] == 4


async def test_processes_with_different_capacities_share_a_named_channel(make_layer, caplog):
    """The first declaration's x-max-length holds; a later process with another capacity
    does not fail (PRECONDITION_FAILED -> passive declare) and gets ChannelFull at that limit."""
    first, second = make_layer(capacity=2), make_layer(capacity=5)
    await first.send("mixed.q", msg(0))
    for i in range(1, 2):
        await second.send("mixed.q", msg(i))
    with pytest.raises(ChannelFull):
        await second.send("mixed.q", msg(2))
    assert "another capacity" in caplog.text
    assert [m["n"] for m in await recv_n(second, "mixed.q", 2)] == [0, 1]


async def test_named_channel_messages_expire(make_layer):
    layer = make_layer(expiry=0.5)
    await layer.send("ttl.q", msg(1))
    await asyncio.sleep(0.8)
    await layer.send("ttl.q", msg(2))
    assert (await recv(layer, "ttl.q"))["n"] == 2


async def test_named_message_taken_only_while_a_receive_waits(make_layer, broker_url):
    """Cancelled receives leave every message in the broker's queue (or this process's
    buffer for the next receive): 50 cancelled receives, then all 20 messages in order."""
    layer = make_layer()
    for round_ in range(50):
        task = asyncio.ensure_future(layer.receive("wait.q"))
        await asyncio.sleep(0.001 * (round_ % 5))
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
    for i in range(20):
        await layer.send("wait.q", msg(i))
    other = make_layer()
    got = [m["n"] for m in await recv_n(other, "wait.q", 20)]
    assert got == list(range(20))


async def test_flush_removes_this_prefixs_queues_and_exchanges(make_layer, broker_url, prefix):
    sender = make_layer()  # sends only: no node queue re-creates anything
    await sender.group_add("flushed", "flushed.q")
    await sender.group_send("flushed", msg(1))
    exchange = names.exchange(prefix)
    named = names.named_queue(prefix, "flushed.q")
    assert await exists(broker_url, exchange, "exchange")
    assert await exists(broker_url, named)
    await sender.flush()
    assert not await exists(broker_url, exchange, "exchange")
    assert not await exists(broker_url, named)


async def test_flush_deletes_a_live_nodes_queue_and_the_node_carries_on(
    make_layer, broker_url, prefix
):
    layer = make_layer(heartbeat_interval=0.3, node_timeout=2)
    channel = await layer.new_channel()
    await layer.group_add("flushed", channel)
    await layer.send(channel, msg(0))  # queued in memory, then dropped by the flush
    queue = names.node_queue(prefix, layer._node.token)
    assert await exists(broker_url, queue)
    await layer.flush()
    assert await nothing_arrives(layer, channel, 0.2)
    await layer.group_add("after", channel)
    await layer.group_send("after", msg(2))
    await layer.group_send("flushed", msg(3))  # the flush ended that membership
    assert (await recv(layer, channel))["n"] == 2
    assert await nothing_arrives(layer, channel, 0.3)
    assert layer._node.broker_queue.bound == {"after"}


async def _delete_queue(url: str, name: str) -> None:
    """Delete a queue from outside, as a broker restarted without its state loses it."""
    async with amqp(url) as connection:
        channel = await connection.channel()
        await channel.queue_delete(name)
        await channel.close()


async def test_messages_sent_while_the_broker_lost_a_nodes_queue_wait_for_it(
    make_layer, broker_url, prefix
):
    """The node's queue (and so its bindings) vanish from the broker, as in a restart that
    kept nothing: group, room and direct messages sent before the node re-creates them are
    published again once it has (the broker returned them unroutable, so none is queued
    twice), and arrive once each, in order."""
    node = make_layer(heartbeat_interval=1.0, node_timeout=5)
    sender = make_layer(retry_timeout=10)
    channel = await node.new_channel()
    await node.group_add("lost", channel)
    await sender.send(channel, msg(0))
    assert (await recv(node, channel))["n"] == 0
    await _delete_queue(broker_url, names.node_queue(prefix, node._node.token))
    await sender.group_send("lost", msg(1))  # the node re-declares within a heartbeat
    await sender.send(channel, msg(2))
    await sender.room_send("lost", msg(3))
    assert [m["n"] for m in await recv_n(node, channel, 3)] == [1, 2, 3]
    assert await nothing_arrives(node, channel, 0.3)
    assert node._node.broker_queue.bound == {"lost"}
    assert sender._state().broker.unrouted == 0


async def test_unroutable_messages_with_no_receiver_return_at_once(make_layer):
    """A group with no members, or whose only member is excluded, and a channel of a node
    that is gone: the broker routes these nowhere and the send returns without waiting for
    ``retry_timeout`` (nobody should get them)."""
    layer = make_layer(retry_timeout=20)
    member = await layer.new_channel()
    await layer.group_add("alone", member)
    gone = member.replace(layer._node.token, "f" * len(layer._node.token))
    started = asyncio.get_running_loop().time()
    await layer.group_send("nobody-here", msg(1))
    await layer.room_send("alone", msg(2), exclude=member)
    await layer.send(gone, msg(3))
    assert asyncio.get_running_loop().time() - started < 5
    assert layer._state().broker.unrouted == 0
    assert await nothing_arrives(layer, member, 0.2)


async def test_a_receiver_that_never_binds_costs_one_wait_per_retry_timeout(make_layer, caplog):
    """Redis lists a member on a live node that has no binding for the group (here a
    membership recorded for a channel the node does not hold): the first send waits
    ``retry_timeout`` for a binding that never comes, is dropped and counted, and the next
    sends within ``retry_timeout`` drop at once instead of each waiting again."""
    owner, sender = make_layer(), make_layer(retry_timeout=1.5)
    held = await owner.new_channel()
    stranger = held + "x"  # on the owner's (live) node, but not one of its channels
    # Written to Redis alone: a group_add would also bind the owner's queue (and tell it).
    await sender.registry.add(
        sender._transport(), "unbound", stranger, None, None, False, notify=False
    )
    assert stranger in await sender.group_channels("unbound")
    clock = asyncio.get_running_loop().time
    started = clock()
    await sender.group_send("unbound", msg(1))
    first = clock() - started
    started = clock()
    for i in range(3):
        await sender.group_send("unbound", msg(2 + i))
    rest = clock() - started
    assert 1.4 < first < 4, first
    assert rest < 1.0, rest
    assert sender._state().broker.unrouted == 4
    assert "routed messages for 'unbound' to no queue" in caplog.text


async def test_connection_cut_node_reconnects_and_gets_what_was_sent_meanwhile(make_layer):
    """rabbitmqctl close_connection on a node's connection: its queue outlives the cut, the
    node consumes it again and rebinds, and nothing is lost or duplicated."""
    node, sender = make_layer(heartbeat_interval=0.3, node_timeout=3), make_layer()
    channel = await node.new_channel()
    await node.group_add("cut", channel)
    await sender.send(channel, msg(0))
    assert (await recv(node, channel))["n"] == 0
    token = node._node.token
    assert close_connections(f"distrib:{node.prefix}:node:{token}") == 1
    for i in range(1, 21):  # while the node is reconnecting
        await sender.send(channel, msg(i))
        await sender.group_send("cut", msg(100 + i))
    got = [m["n"] for m in await recv_n(node, channel, 40, 15)]
    assert sorted(got) == sorted([*range(1, 21), *range(101, 121)])
    assert [n for n in got if n < 100] == list(range(1, 21))  # FIFO per sender
    assert await nothing_arrives(node, channel, 0.5)  # no duplicates
    assert node.counters.reconnects >= 1


async def test_sender_connection_cut_raises_or_reconnects_never_duplicates(make_layer):
    """The sender's connection closed by the broker: the next send reconnects (nothing of it
    was written), and every message whose send returned arrives exactly once."""
    receiver, sender = make_layer(), make_layer()
    channel = await receiver.new_channel()
    await sender.send(channel, msg(0))
    assert close_connections(f"distrib:{sender.prefix}\"") >= 1
    await asyncio.sleep(0.2)
    sent = [0]
    for i in range(1, 11):
        try:
            await sender.send(channel, msg(i))
            sent.append(i)
        except BrokerUnavailable:
            pass  # at most one: a publish written on the dying connection
    assert len(sent) >= 10
    got = [m["n"] for m in await recv_n(receiver, channel, len(sent))]
    assert got == sent
    assert await nothing_arrives(receiver, channel, 0.3)


@pytest.mark.faults
async def test_broker_restarted_while_messages_flow(redis_url, prefix):
    """A private RabbitMQ restarted (its non-durable queues gone) under a node that receives
    and a sender that keeps sending: the node re-creates its queue and bindings, sends wait
    for the broker (or raise BrokerUnavailable, never twice), and every message sent after
    the restart arrives once, in order."""
    from tests.rabbitmq_server import private_rabbitmq

    with private_rabbitmq() as broker:
        config = {"hosts": [redis_url], "prefix": prefix, "broker": broker.url}
        node = DistributedChannelLayer(
            **config, heartbeat_interval=0.3, node_timeout=3, capacity=1000
        )
        sender = DistributedChannelLayer(**config, retry_timeout=30)
        try:
            await _restart_under_traffic(broker, node, sender)
        finally:  # while the private broker still runs
            await node.flush()
            await node.close()
            await sender.close()


async def _restart_under_traffic(broker: Any, node: Any, sender: Any) -> None:
    """The body of the test above, on layers the private broker outlives."""
    channel = await node.new_channel()
    await node.group_add("restart", channel)
    returned: list[int] = []
    failed: list[int] = []
    restarted = asyncio.Event()

    async def keep_sending() -> None:
        for i in range(400):
            try:
                await sender.group_send("restart", msg(i))
                returned.append(i)
            except BrokerUnavailable:
                failed.append(i)
            await asyncio.sleep(0.01)
            if i == 100:
                await asyncio.to_thread(broker.restart)
                restarted.set()

    flow = asyncio.ensure_future(keep_sending())
    await restarted.wait()
    first_after = len(returned) + len(failed)  # every send from here on ran after it
    await flow
    assert len(failed) <= 1, failed  # at most the publish written on the dying connection

    async def bound_again() -> bool:
        return node._node.broker_queue.bound == {"restart"}

    assert await eventually(bound_again, 10)
    got: list[int] = []
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(10):
            while not got or got[-1] != 399:
                got.append((await node.receive(channel))["n"])
    assert len(got) == len(set(got)), "a message arrived twice"
    after = [n for n in returned if n >= first_after]
    assert [n for n in got if n >= first_after] == after, "lost after the restart"
    assert node._node.broker_queue.conn.reconnects >= 1
    assert sender._state().broker.conn.reconnects >= 1


@pytest.mark.faults
@pytest.mark.parametrize("persistent", [True, False], ids=["persistent", "transient"])
async def test_messages_queued_for_a_disconnected_node_across_a_broker_restart(
    redis_url, prefix, persistent
):
    """A node cut off from a private RabbitMQ (it cannot reconnect), direct and group
    messages confirmed into its durable queue meanwhile, then the broker killed and started
    again: with ``broker_persistent`` every message reaches the node once it reconnects, in
    order; without, they are gone (transient messages die with the broker)."""
    from tests.rabbitmq_server import private_rabbitmq

    with private_rabbitmq() as broker:
        config = {"hosts": [redis_url], "prefix": prefix, "broker": broker.url}
        config["broker_persistent"] = persistent
        node = DistributedChannelLayer(**config, heartbeat_interval=0.3, node_timeout=30)
        sender = DistributedChannelLayer(**config, retry_timeout=30)
        try:
            channel = await node.new_channel()
            await node.group_add("kept", channel)
            await sender.send(channel, msg(0))
            assert (await recv(node, channel))["n"] == 0
            queue = node._node.broker_queue
            url, queue.conn.url = queue.conn.url, "amqp://guest:guest@127.0.0.1:1/"
            await queue.conn.close()  # disconnected; reconnecting fails until url is back
            for i in range(1, 6):
                await sender.send(channel, msg(i))
                await sender.group_send("kept", msg(100 + i))
            await asyncio.to_thread(broker.restart)  # SIGKILL, then start on the same port
            queue.conn.url = url
            queue.groups_changed()  # wake the keeper now rather than at its next retry
            if persistent:
                got = [m["n"] for m in await recv_n(node, channel, 10, 20)]
                assert got == [1, 101, 2, 102, 3, 103, 4, 104, 5, 105]
            assert await nothing_arrives(node, channel, 3.0 if not persistent else 0.5)
            await node.flush()
        finally:
            await node.close()
            await sender.close()


@pytest.mark.faults
async def test_amqps_with_the_ca_given_as_cafile_and_a_wrong_ca_fails_at_once(redis_url, prefix):
    """A private RabbitMQ with a TLS listener (a throwaway CA and server certificate made
    with openssl): ``broker="amqps://...?cafile=<CA>"`` carries direct, group and named
    messages; a CA that did not sign the server's certificate fails the first use at once
    (no retrying until ``retry_timeout``), saying so, without the password."""
    from tests.rabbitmq_server import private_rabbitmq

    with private_rabbitmq(tls=True) as broker:
        config = {"hosts": [redis_url], "prefix": prefix, "broker": broker.tls_url()}
        node = DistributedChannelLayer(**config)
        sender = DistributedChannelLayer(**config)
        wrong = DistributedChannelLayer(
            **{**config, "broker": broker.tls_url("wrong-ca.pem")}, retry_timeout=20
        )
        try:
            channel = await node.new_channel()
            await node.group_add("tls", channel)
            await sender.send(channel, msg(1))
            await sender.group_send("tls", msg(2))
            await sender.send("tls.named", msg(3))
            assert [m["n"] for m in await recv_n(node, channel, 2)] == [1, 2]
            assert (await recv(node, "tls.named"))["n"] == 3
            started = asyncio.get_running_loop().time()
            with pytest.raises(BrokerUnavailable) as info:
                await wrong.send("tls.named", msg(4))
            assert asyncio.get_running_loop().time() - started < 5
            text = str(info.value)
            assert "certificate verify failed" in text and "guest:***" in text, text
            assert ":guest@" not in text
            await node.flush()
        finally:
            for layer in (wrong, sender, node):
                await layer.close()


# ------------------------------------------------------------------ bindings, as the broker has them


def _bindings(layer: Any, node: str | None = None) -> set[str]:
    """The routing keys the layer's node queue is bound with on the broker (rabbitmqctl)."""
    queue = layer._node.broker_queue
    return queue_bindings(queue.queue, queue.exchange, node)


async def test_bindings_after_a_connection_cut_are_the_groups_the_node_holds(make_layer):
    """The broker closes a node's connection and the node leaves a group before it has
    reconnected: its queue (durable, so it kept its bindings) must lose that group's binding
    when the node re-binds, or the broker keeps routing the group's messages to a node with
    no member for them. Before the fix the node forgot what was bound on a new connection,
    re-bound only the groups it holds and left the old binding in place."""
    node, sender = make_layer(heartbeat_interval=0.3, node_timeout=3), make_layer()
    channel = await node.new_channel()
    for group in ("kept", "left"):
        await node.group_add(group, channel)
    queue = node._node.broker_queue
    assert _bindings(node) == {"kept", "left"}
    # Its reconnects fail until the URL is back, so the discard surely falls in the gap.
    url, queue.conn.url = queue.conn.url, "amqp://guest:guest@127.0.0.1:1/"
    assert close_connections(f"distrib:{node.prefix}:node:{node._node.token}") == 1

    async def cut() -> bool:
        return not queue.conn.connected

    assert await eventually(cut, 5)
    await node.group_discard("left", channel)  # while the node is not connected
    queue.conn.url = url
    queue.groups_changed()  # wake the keeper now rather than at its next retry

    async def rebound() -> bool:
        return queue.conn.connected and queue.bound == {"kept"} and not queue._wake.is_set()

    assert await eventually(rebound, 10)
    await asyncio.sleep(0.2)  # the pass that re-bound has finished its unbinds too
    assert _bindings(node) == {"kept"}
    before = queue.received
    await sender.group_send("left", msg(1))
    await sender.group_send("kept", msg(2))
    assert (await recv(node, channel))["n"] == 2
    assert queue.received == before + 1, "the group the node left still reaches its queue"


async def test_a_bind_by_another_process_landing_after_the_nodes_sync_is_undone(make_layer):
    """Another process adds a channel of this node that the node no longer has: it sends the
    node a note, then binds the node's queue. When the node reads the note and syncs before
    that bind lands, a later sync must still remove the binding (the node has no member in
    the group). Before the fix only the first sync after the note unbound it."""
    node, other = make_layer(heartbeat_interval=0.3, node_timeout=3), make_layer()
    channel = await node.new_channel()
    stranger = channel + "x"  # this node's token, not one of its channels: refused
    token = node._node.token
    queue = node._node.broker_queue
    broker = other._state().broker
    received = queue.received
    live = other._node_is_live(other._transport(), token)
    assert await broker.send_note(token, "a", "late", stranger, live, record=b":x")

    async def noted() -> bool:
        return queue.received > received

    assert await eventually(noted, 5)
    for _ in range(2):  # two keeper passes: the one the note woke has ended
        await asyncio.wait_for(asyncio.shield(queue._passed), 5)
    await broker.bind_node(token, "late", presence=False)  # the adder's bind, late
    assert "late" in _bindings(node)

    async def unbound() -> bool:
        return "late" not in _bindings(node)

    assert await eventually(unbound, 5, interval=0.3), "the late binding stayed"
    assert node._node.memberships.members("late") is None


async def test_bindings_follow_changes_by_another_process_and_pruning(make_layer, broker_url):
    """Another process adds and removes this node's channel (the broker's bindings follow:
    bound before group_add returns, unbound once the node reads the note), and a dead node
    pruned takes its queue and bindings with it while the pruner's own stay as they are."""
    node = make_layer(heartbeat_interval=0.2, node_timeout=0.8)
    other, dead = make_layer(), make_layer(heartbeat_interval=0.2, node_timeout=0.8)
    mine, theirs = await node.new_channel(), await dead.new_channel()
    await node.group_add("shared", mine)
    await dead.group_add("shared", theirs)
    await other.group_add("remote", mine)
    assert _bindings(node) == {"shared", "remote"}
    await other.group_discard("remote", mine)

    async def only_shared() -> bool:
        return _bindings(node) == {"shared"}

    assert await eventually(only_shared, 5, interval=0.2)
    dead_queue = dead._node.broker_queue
    assert _bindings(dead) == {"shared"}
    gone, dead._node = dead._node, None
    await gone.stop(deregister=False)  # dies: tasks stop, the broker connection goes

    async def pruned() -> bool:
        return not await exists(broker_url, dead_queue.queue)

    assert await eventually(pruned, 5)
    assert queue_bindings(dead_queue.queue, dead_queue.exchange) == set()
    assert _bindings(node) == {"shared"}


@pytest.mark.faults
async def test_bindings_after_a_broker_restart_are_the_groups_the_node_holds(redis_url, prefix):
    """A private RabbitMQ stopped; the node leaves one group and joins another while it is
    down; started again (the durable queue kept its old bindings): once the node has
    reconnected, its bindings are exactly the groups it holds."""
    from tests.rabbitmq_server import private_rabbitmq

    with private_rabbitmq() as broker:
        config = {"hosts": [redis_url], "prefix": prefix, "broker": broker.url}
        node = DistributedChannelLayer(**config, heartbeat_interval=0.3, node_timeout=30)
        try:
            channel = await node.new_channel()
            for group in ("kept", "left"):
                await node.group_add(group, channel)
            assert _bindings(node, broker.node) == {"kept", "left"}
            await asyncio.to_thread(broker.stop)
            await node.group_discard("left", channel)
            joined = asyncio.ensure_future(node.group_add("joined", channel))
            await asyncio.to_thread(broker.start)
            with contextlib.suppress(BrokerUnavailable):
                await joined  # it may give up waiting for the binding; the node binds anyway
            queue = node._node.broker_queue

            async def rebound() -> bool:
                return queue.conn.connected and queue.bound == {"kept", "joined"}

            assert await eventually(rebound, 20)
            await asyncio.sleep(0.5)  # the pass that re-bound has finished its unbinds too
            assert _bindings(node, broker.node) == {"kept", "joined"}
            await node.flush()
        finally:
            await node.close()


async def test_amqps_to_a_port_without_tls_fails_at_once_saying_so(redis_url, prefix, broker_url):
    """``amqps://`` naming the broker's plain AMQP port (5672): every TLS handshake fails
    the same way, so the first use raises at once, saying the port does not speak TLS,
    without the password. Before, it retried for the whole retry_timeout."""
    from urllib.parse import urlsplit

    url = urlsplit(broker_url)._replace(scheme="amqps").geturl()
    layer = DistributedChannelLayer(hosts=[redis_url], prefix=prefix, broker=url, retry_timeout=20)
    try:
        started = asyncio.get_running_loop().time()
        async with asyncio.timeout(10):
            with pytest.raises(BrokerUnavailable, match="does not speak TLS") as info:
                await layer.send("plain.q", msg(1))
        assert asyncio.get_running_loop().time() - started < 3
        assert ":guest@" not in str(info.value)
    finally:
        await layer.close()
