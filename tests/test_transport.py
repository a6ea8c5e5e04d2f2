"""Connection loss, reconnects and Redis outages (DESIGN.md "Delivery guarantees").

Only the layer's own connections are killed (CLIENT KILL ID of clients named
distrib:<prefix>); outages use a private server (`own_redis`) so no other test is touched.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import os
import signal
import subprocess
import time
from typing import Any

import msgpack
import pytest
from asgiref.sync import async_to_sync
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from channels_distrib.exceptions import RedisUnavailable
from channels_distrib.keys import Keys
from tests.helpers_layers import (
    RoundTripProxy,
    eventually,
    kill_layer_clients,
    layer_clients,
    msg,
    nothing_arrives,
    own_layer,
    raw_redis,
    recv,
    recv_n,
    url_host_port,
)
from tests.redis_server import free_port, ping, server_binary, start_server


async def _collect(layer: Any, channel: str, into: list[int]) -> None:
    while True:
        into.append((await layer.receive(channel))["n"])


# ------------------------------------------------------------------ CLIENT KILL while flowing


async def test_client_kill_while_messages_flow(make_layer, redis_url, prefix):
    """Every message whose send returned arrives exactly once; none arrives twice."""
    await _kill_flow(make_layer, redis_url, prefix, iterations=500, kill_every=0.05)


@pytest.mark.slow
@pytest.mark.timeout(120)
async def test_client_kill_soak(make_layer, redis_url, prefix):
    """The same, for longer, killing the layer's connections every 50 ms."""
    await _kill_flow(make_layer, redis_url, prefix, iterations=2500, kill_every=0.05)


async def _kill_flow(make_layer: Any, redis_url: str, prefix: str, *, iterations: int,
                     kill_every: float) -> None:
    sender = make_layer(capacity=10000, retry_timeout=5)
    node = make_layer(capacity=10000, retry_timeout=5)
    local = await node.new_channel()
    member = await node.new_channel()
    await node.group_add("killgroup", member)
    await node.group_add("killgroup", "kill.groupq")

    targets = {"local": local, "named": "kill.named", "member": member, "groupq": "kill.groupq"}
    received: dict[str, list[int]] = {k: [] for k in targets}
    accepted: dict[str, set[int]] = {k: set() for k in targets}
    failed: dict[str, set[int]] = {k: set() for k in targets}
    consumers = [asyncio.create_task(_collect(node, ch, received[k])) for k, ch in targets.items()]
    kills = 0
    errors: collections.Counter[str] = collections.Counter()
    stop = asyncio.Event()

    async def killer() -> None:
        nonlocal kills
        async with raw_redis(redis_url) as raw:
            while not stop.is_set():
                await asyncio.sleep(kill_every)
                kills += await kill_layer_clients(raw, prefix)

    async def produce() -> None:
        for i in range(iterations):
            for key, channel in (("local", local), ("named", "kill.named")):
                try:
                    await sender.send(channel, msg(i))
                    accepted[key].add(i)
                except Exception as exc:  # noqa: BLE001 - at most once: a failed send may raise
                    failed[key].add(i)
                    errors[type(exc).__name__] += 1
            try:
                await sender.group_send("killgroup", msg(i))
                accepted["member"].add(i)
                accepted["groupq"].add(i)
            except Exception as exc:  # noqa: BLE001
                errors[type(exc).__name__] += 1
                failed["member"].add(i)
                failed["groupq"].add(i)
            await asyncio.sleep(0.005)

    killing = asyncio.create_task(killer())
    try:
        async with asyncio.timeout(40 + iterations * 0.02):
            await produce()
        stop.set()
        await killing

        async def all_accepted_arrived() -> bool:
            return all(accepted[k] <= set(received[k]) for k in targets)

        arrived = await eventually(all_accepted_arrived, 20)
        await asyncio.sleep(0.5)  # room for duplicates to show up
        crashed = [t.exception() for t in consumers if t.done() and not t.cancelled()]
        assert not crashed, f"receive() raised: {crashed}"
    finally:
        stop.set()
        for task in [*consumers, killing]:
            task.cancel()
        await asyncio.gather(*consumers, killing, return_exceptions=True)

    assert kills >= 5, f"only {kills} connections were killed: the test did not bite"
    problems = []
    for key in targets:
        dupes = [n for n, c in collections.Counter(received[key]).items() if c > 1]
        if dupes:
            problems.append(f"{key}: delivered twice: {dupes[:10]}")
        missing = sorted(accepted[key] - set(received[key]))
        if missing:
            problems.append(f"{key}: accepted but lost: {missing[:20]} of {len(accepted[key])}")
        if not set(received[key]) <= accepted[key] | failed[key]:
            problems.append(f"{key}: received messages never sent")
        if received[key] != sorted(received[key]):
            problems.append(f"{key}: order broken by reconnects")
        if len(accepted[key]) < iterations // 2:
            problems.append(f"{key}: too few sends succeeded: {errors}")
    assert not problems, f"{problems} (all arrived in time: {arrived}; send errors: {dict(errors)})"


async def test_layer_connections_are_named(make_layer, redis_url, prefix):
    layer = make_layer()
    local = await layer.new_channel()
    await layer.send(local, msg(1))
    assert await recv(layer, local) == msg(1)
    async with raw_redis(redis_url) as raw:
        assert await layer_clients(raw, prefix)


async def test_no_connection_leak_across_event_loops(make_layer, redis_url, prefix):
    layer = make_layer()
    await layer.send("leak.named", msg(0))
    for i in range(15):
        await asyncio.to_thread(async_to_sync(layer.send), "leak.named", msg(i + 1))
    async with raw_redis(redis_url) as raw:

        async def few_connections() -> bool:
            return len(await layer_clients(raw, prefix)) <= 6

        ok = await eventually(few_connections, 5)
        assert ok, f"{len(await layer_clients(raw, prefix))} connections left for 1 live loop"


# ------------------------------------------------------------------ Redis unreachable


async def test_send_to_unreachable_redis_raises_after_retry_timeout():
    port = free_port()
    async with own_layer(hosts=[f"redis://127.0.0.1:{port}/0"], prefix="unreach",
                         retry_timeout=1.0, _flush=False) as layer:
        for call in (lambda: layer.send("x.y", msg(1)), lambda: layer.group_send("g", msg(1)),
                     lambda: layer.group_add("g", "x.y")):
            started = time.monotonic()
            with pytest.raises(RedisUnavailable) as info:
                await asyncio.wait_for(call(), 10)
            waited = time.monotonic() - started
            assert 0.8 <= waited <= 4.0, waited
            assert f"127.0.0.1:{port}" in str(info.value)
            assert isinstance(info.value, ConnectionError)


async def test_send_while_redis_killed_raises(own_redis, prefix):
    async with own_layer(hosts=[own_redis.url], prefix=prefix, retry_timeout=1.0,
                         _flush=False) as layer:
        await layer.send("down.named", msg(1))
        own_redis.kill()
        started = time.monotonic()
        with pytest.raises(RedisUnavailable) as info:
            await asyncio.wait_for(layer.send("down.named", msg(2)), 10)
        assert 0.8 <= time.monotonic() - started <= 4.0
        assert str(own_redis.port) in str(info.value)
        own_redis.restart()
        await layer.send("down.named", msg(3))  # usable again, no new layer needed
        assert await recv(layer, "down.named") == msg(3)


async def test_send_waits_for_redis_to_come_back(own_redis, prefix):
    async with own_layer(hosts=[own_redis.url], prefix=prefix, retry_timeout=8.0) as layer:
        await layer.send("back.named", msg(0))
        assert await recv(layer, "back.named") == msg(0)
        own_redis.kill()
        sending = asyncio.create_task(layer.send("back.named", msg(1)))
        await asyncio.sleep(1.0)
        assert not sending.done(), "send gave up before retry_timeout"
        await asyncio.to_thread(own_redis.restart)
        await asyncio.wait_for(sending, 10)
        assert await recv(layer, "back.named") == msg(1)


# ------------------------------------------------------------------ Redis restart


async def test_receive_survives_redis_restart(own_redis, prefix, caplog):
    caplog.set_level(logging.WARNING)
    config = {"hosts": [own_redis.url], "prefix": prefix, "heartbeat_interval": 0.5,
              "node_timeout": 2}
    # the receiving node's retry_timeout is shorter than the outage: receive() must not care
    async with own_layer(**config, retry_timeout=0.5) as node, \
            own_layer(**config, retry_timeout=10, _flush=False) as sender:
        local = await node.new_channel()
        member = await node.new_channel()
        await node.group_add("restartgroup", member)
        await sender.send(local, msg(0))
        assert await recv(node, local) == msg(0)

        pending = {
            "local": asyncio.create_task(node.receive(local)),
            "named": asyncio.create_task(node.receive("restart.named")),
            "member": asyncio.create_task(node.receive(member)),
        }
        await asyncio.sleep(0.3)
        own_redis.kill()
        await asyncio.sleep(2.5)  # longer than node_timeout and the node's retry_timeout
        for name, task in pending.items():
            assert not task.done(), f"receive on {name} ended while Redis was down: {task}"
        await asyncio.to_thread(own_redis.restart)
        await asyncio.sleep(1.5)  # node re-registers its memberships within a heartbeat
        await sender.send(local, msg(1))
        await sender.send("restart.named", msg(1))
        await sender.group_send("restartgroup", msg(1))
        async with asyncio.timeout(15):
            results = {k: await t for k, t in pending.items()}
        assert results == {"local": msg(1), "named": msg(1), "member": msg(1)}
        # and it keeps working afterwards
        await sender.send(local, msg(2))
        assert await recv(node, local) == msg(2)


async def test_client_kill_of_idle_receiver(make_layer, redis_url, prefix):
    node = make_layer()
    local = await node.new_channel()
    pending = [asyncio.create_task(node.receive(local)),
               asyncio.create_task(node.receive("idlekill.named"))]
    await asyncio.sleep(0.3)
    async with raw_redis(redis_url) as raw:
        for _ in range(3):
            assert await kill_layer_clients(raw, prefix) >= 1
            await asyncio.sleep(0.4)
    assert not any(t.done() for t in pending), [t for t in pending if t.done()]
    sender = make_layer()
    await sender.send(local, msg(1))
    await sender.send("idlekill.named", msg(1))
    async with asyncio.timeout(10):
        assert [await t for t in pending] == [msg(1), msg(1)]


# ------------------------------------------------------------------ idle


async def test_idle_receive_with_server_idle_timeout(own_redis, prefix):
    """A server that closes idle clients (CONFIG timeout) does not surface as an error."""
    async with raw_redis(own_redis.url) as raw:
        await raw.config_set("timeout", 1)
    async with own_layer(hosts=[own_redis.url], prefix=prefix) as layer:
        local = await layer.new_channel()
        await layer.send(local, msg(0))
        assert await recv(layer, local) == msg(0)
        pending = [asyncio.create_task(layer.receive(local)),
                   asyncio.create_task(layer.receive("idle.named"))]
        await asyncio.sleep(3.5)
        assert not any(t.done() for t in pending), [t for t in pending if t.done()]
        await layer.send(local, msg(1))
        await layer.send("idle.named", msg(1))
        async with asyncio.timeout(10):
            assert [await t for t in pending] == [msg(1), msg(1)]


@pytest.mark.slow
@pytest.mark.timeout(90)
async def test_idle_receive_30_seconds(make_layer):
    layer = make_layer()
    local = await layer.new_channel()
    pending = [asyncio.create_task(layer.receive(local)),
               asyncio.create_task(layer.receive("idle30.named"))]
    done, _ = await asyncio.wait(pending, timeout=31)
    assert not done, [t.exception() for t in done]
    await layer.send(local, msg(1))
    await layer.send("idle30.named", msg(1))
    async with asyncio.timeout(10):
        assert [await t for t in pending] == [msg(1), msg(1)]
    # an idle layer still sends and receives promptly
    await layer.send(local, msg(2))
    assert await recv(layer, local, 2) == msg(2)


@pytest.mark.slow
@pytest.mark.timeout(90)
async def test_idle_sender_connection_after_30_seconds(make_layer):
    """A pooled connection idle for 30 s (past socket and server timeouts) still sends."""
    sender, receiver = make_layer(), make_layer()
    await sender.send("idlesend.named", msg(0))
    assert await recv(receiver, "idlesend.named") == msg(0)
    await asyncio.sleep(31)
    await sender.send("idlesend.named", msg(1))
    assert await recv(receiver, "idlesend.named") == msg(1)
    assert await nothing_arrives(receiver, "idlesend.named", 0.2)


# ------------------------------------------------------------------ hosts forms, for real


async def _round_trip(config: dict[str, Any], prefix: str) -> None:
    async with own_layer(prefix=prefix, **config) as layer:
        local = await layer.new_channel()
        await layer.group_add("hostsgroup", local)
        await layer.send("hosts.named", msg(1))
        await layer.group_send("hostsgroup", msg(2))
        assert await recv(layer, "hosts.named") == msg(1)
        assert await recv(layer, local) == msg(2)


async def test_tuple_and_dict_hosts_work(redis_url, prefix):
    host, port = url_host_port(redis_url)
    await _round_trip({"hosts": [(host, port)]}, prefix + "t")
    await _round_trip({"hosts": [{"address": redis_url, "socket_connect_timeout": 2,
                                  "health_check_interval": 5}]}, prefix + "d")


async def test_unix_socket_host(tmp_path, prefix):
    sock = tmp_path / "redis.sock"
    server = await asyncio.to_thread(start_server, ["--unixsocket", str(sock),
                                                    "--unixsocketperm", "700"])
    try:
        await _round_trip({"hosts": [f"unix://{sock}"]}, prefix)
    finally:
        await asyncio.to_thread(server.stop)


async def test_sentinel_host(own_redis, prefix, tmp_path):
    binary = server_binary()
    assert binary, "no redis-server to run a sentinel with"
    port = free_port()
    conf = tmp_path / "sentinel.conf"
    conf.write_text(
        f"port {port}\nbind 127.0.0.1\ndir {tmp_path}\n"
        f"sentinel monitor mymaster 127.0.0.1 {own_redis.port} 1\n"
        "sentinel down-after-milliseconds mymaster 60000\n"
    )
    proc = subprocess.Popen([binary, str(conf), "--sentinel"], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 10
        while not ping("127.0.0.1", port):
            assert proc.poll() is None and time.monotonic() < deadline, "sentinel did not start"
            await asyncio.sleep(0.05)
        await _round_trip({"hosts": [{"sentinels": [("127.0.0.1", port)],
                                      "master_name": "mymaster"}]}, prefix)
    finally:
        proc.terminate()
        try:
            await asyncio.to_thread(proc.wait, 10)
        except subprocess.TimeoutExpired:
            os.kill(proc.pid, signal.SIGKILL)
            await asyncio.to_thread(proc.wait, 10)


async def test_named_message_survives_kill_of_the_blocked_receiver(make_layer, redis_url, prefix):
    """Deterministic form of the CLIENT KILL race for a normal channel.

    A message is pushed and the receiver's blocked connection is killed in the same server
    event-loop turn (one pipelined write: RPUSH then CLIENT KILL), so Redis hands the item to
    the blocked pop and then drops the reply with the connection. The item is written in the
    layer's own queue format (keys.py: P:q:<channel>, b"<expire ms>:<payload>"), exactly what a
    send() would have written; its send "returned", so it must still be delivered.
    """
    layer = make_layer()
    pending = asyncio.create_task(layer.receive("popkill.named"))
    blocking_cmds = {"blpop", "brpop", "blmove", "brpoplpush", "blmpop", "xread", "xreadgroup"}
    try:
        async with raw_redis(redis_url) as raw:

            async def poppers() -> list[dict[str, Any]]:
                return [c for c in await layer_clients(raw, prefix) if c.get("cmd") in blocking_cmds]

            async def blocked() -> bool:
                return bool(await poppers())

            assert await eventually(blocked, 5), await layer_clients(raw, prefix)
            item = b"%d:" % int((time.time() + 60) * 1000) + msgpack.packb(msg(1), use_bin_type=True)
            pipe = raw.pipeline(transaction=False)
            pipe.rpush(Keys(prefix).queue("popkill.named"), item)
            for client in await poppers():
                pipe.execute_command("CLIENT", "KILL", "ID", client["id"])
            await pipe.execute()
            try:
                got = await asyncio.wait_for(asyncio.shield(pending), 10)
            except asyncio.TimeoutError:
                left = await raw.llen(Keys(prefix).queue("popkill.named"))
                raise AssertionError(
                    f"message never delivered; {left} item(s) left in the queue "
                    "(0 = popped by the killed connection and lost)"
                ) from None
        assert got == msg(1)
    finally:
        pending.cancel()
        await asyncio.gather(pending, return_exceptions=True)


async def test_inbox_message_survives_kill_of_the_waiting_reader(make_layer, redis_url, prefix):
    """The same race for a process-local channel: the reader is armed and waits for its
    doorbell (keys.py: P:{n.<token>}:armed, P:{n.<token>}:bell); an XADD to its inbox (fields
    c=<channel>, m=<payload>) with its bell rung (DEL armed, PUBLISH bell: what SEND_INBOX
    does) and CLIENT KILL of both its connections (the subscriber and the reader's, whose
    last command was the arming EVALSHA) in one server turn. The bell is lost with the
    connection; the reader resubscribes and reads from its cursor, so the entry is delivered."""
    node = make_layer()
    local = await node.new_channel()
    token = local.split(".", 1)[1].split("!", 1)[0]
    keys = Keys(prefix)
    pending = asyncio.create_task(node.receive(local))
    try:
        async with raw_redis(redis_url) as raw:

            async def readers() -> list[dict[str, Any]]:
                return [c for c in await layer_clients(raw, prefix)
                        if c.get("cmd") in ("subscribe", "evalsha")]

            async def armed() -> bool:
                subscribed = [c for c in await readers() if c.get("cmd") == "subscribe"]
                return bool(subscribed) and bool(await raw.exists(keys.armed(token)))

            assert await eventually(armed, 5), await layer_clients(raw, prefix)
            pipe = raw.pipeline(transaction=False)
            pipe.xadd(keys.inbox(token), {"c": local, "m": msgpack.packb(msg(1), use_bin_type=True)})
            pipe.delete(keys.armed(token))
            pipe.publish(keys.bell(token), "")
            for client in await readers():
                pipe.execute_command("CLIENT", "KILL", "ID", client["id"])
            await pipe.execute()
        assert await asyncio.wait_for(asyncio.shield(pending), 10) == msg(1)
    finally:
        pending.cancel()
        await asyncio.gather(pending, return_exceptions=True)


async def test_node_partitioned_from_redis_gets_everything_after(redis_url, prefix):
    """A node cut off from Redis for 2 s (< node_timeout, < expiry) then reconnected receives
    every message sent to it meanwhile, exactly once, and keeps its group memberships."""
    host, port = url_host_port(redis_url)
    proxy = await RoundTripProxy(host, port).start()
    try:
        async with own_layer(hosts=[proxy.url], prefix=prefix, capacity=1000,
                             _flush=False) as node, \
                own_layer(hosts=[redis_url], prefix=prefix, capacity=1000) as sender:
            local = await node.new_channel()
            member = await node.new_channel()
            await node.group_add("partgroup", member)
            await sender.send(local, msg(-1))
            assert await recv(node, local) == msg(-1)
            pending = asyncio.create_task(recv_n(node, local, 40, 20))
            pending_group = asyncio.create_task(recv_n(node, member, 40, 20))
            await asyncio.sleep(0.2)
            proxy.cut()
            for i in range(40):
                await sender.send(local, msg(i))
                await sender.group_send("partgroup", msg(i))
                await asyncio.sleep(0.05)
            proxy.heal()
            got, got_group = await pending, await pending_group
            assert [m["n"] for m in got] == list(range(40))
            assert [m["n"] for m in got_group] == list(range(40))
            assert await nothing_arrives(node, local, 0.3)
            assert await nothing_arrives(node, member, 0.1)
    finally:
        await proxy.stop()


# ------------------------------------------------------------------ at most once


@pytest.mark.parametrize("kind", ["named", "local", "group"])
async def test_send_whose_reply_is_lost_is_not_retried(redis_url, prefix, kind):
    """The command reached Redis but the connection died before the reply: the send may raise,
    but must not be retried (that would deliver twice)."""
    host, port = url_host_port(redis_url)
    proxy = await RoundTripProxy(host, port).start()
    try:
        async with own_layer(hosts=[redis_url], prefix=prefix) as node, \
                own_layer(hosts=[proxy.url], prefix=prefix, retry_timeout=3,
                          _flush=False) as sender:
            local = await node.new_channel()
            await node.group_add("oncegroup", "once.member")
            target = {"named": "once.named", "local": local, "group": "once.member"}[kind]
            # warm up: connection open and every script loaded (EVALSHA must not hit NOSCRIPT)
            await sender.send("once.named", msg(-1))
            await sender.send(local, msg(-1))
            await sender.group_send("oncegroup", msg(-1))
            for channel in ("once.named", local, "once.member"):
                assert await recv(node, channel) == msg(-1)
            proxy.sever_next_request = True
            # The reply is lost, so the send cannot know it worked: it must raise a connection
            # error (anything else is a bug), and must not have sent again before raising.
            with pytest.raises((ConnectionError, RedisConnectionError, RedisTimeoutError)):
                if kind == "group":
                    await sender.group_send("oncegroup", msg(1))
                else:
                    await sender.send(target, msg(1))
            assert proxy.severed == 1
            assert await recv(node, target) == msg(1)  # it did reach Redis
            assert await nothing_arrives(node, target, 0.5), "delivered twice"
    finally:
        await proxy.stop()


async def test_database_number_in_url_is_used(redis_url, prefix):
    host, port = url_host_port(redis_url)
    url5 = f"redis://{host}:{port}/5"
    async with own_layer(hosts=[url5], prefix=prefix) as layer:
        await layer.send("db.named", msg(1))
        async with raw_redis(url5) as raw5, raw_redis(f"redis://{host}:{port}/0") as raw0:
            assert await raw5.exists(Keys(prefix).queue("db.named"))
            assert not await raw0.exists(Keys(prefix).queue("db.named"))
        assert await recv(layer, "db.named") == msg(1)


@pytest.mark.parametrize("kind", ["named", "local", "group"])
async def test_send_whose_reply_times_out_is_not_retried(redis_url, prefix, kind):
    """The command ran but its reply never comes (socket timeout): raise, never send again."""
    host, port = url_host_port(redis_url)
    proxy = await RoundTripProxy(host, port).start()
    try:
        async with own_layer(hosts=[redis_url], prefix=prefix) as node, \
                own_layer(hosts=[proxy.url], prefix=prefix, retry_timeout=1,
                          _flush=False) as sender:
            local = await node.new_channel()
            await node.group_add("stallgroup", "stall.member")
            target = {"named": "stall.named", "local": local, "group": "stall.member"}[kind]
            await sender.send("stall.named", msg(-1))
            await sender.send(local, msg(-1))
            await sender.group_send("stallgroup", msg(-1))
            for channel in ("stall.named", local, "stall.member"):
                assert await recv(node, channel) == msg(-1)
            proxy.stall_next_request = True
            started = time.monotonic()
            # The socket timeout (about 5 s), not the 30 s guard: a connection-level error.
            with pytest.raises((ConnectionError, RedisConnectionError, RedisTimeoutError)) as info:
                if kind == "group":
                    await asyncio.wait_for(sender.group_send("stallgroup", msg(1)), 30)
                else:
                    await asyncio.wait_for(sender.send(target, msg(1)), 30)
            assert not isinstance(info.value, asyncio.TimeoutError), "send hung for 30 s"
            assert time.monotonic() - started < 15
            assert proxy.stalled == 1
            assert await recv(node, target) == msg(1)
            assert await nothing_arrives(node, target, 0.5), "delivered twice"
    finally:
        await proxy.stop()


async def test_named_receiver_cut_off_after_a_pop_never_duplicates(redis_url, prefix):
    """A receiving process loses Redis right after a message reached it (the reply carrying
    the message arrived; the connection dies before its next command) and stays cut off a
    little longer than its retry_timeout. When it is back, that message must not be
    delivered again, here or to another worker."""
    host, port = url_host_port(redis_url)
    proxy = await RoundTripProxy(host, port).start()
    try:
        async with own_layer(hosts=[redis_url], prefix=prefix) as sender, \
                own_layer(hosts=[redis_url], prefix=prefix) as successor, \
                own_layer(hosts=[proxy.url], prefix=prefix, retry_timeout=0.3,
                          _flush=False) as worker:
            await sender.send("cutoff.q", msg(-1))
            assert await recv(worker, "cutoff.q") == msg(-1)
            proxy.cut_after_reply_with = b"CUT-AFTER-THIS"
            # two consumers of the channel in the worker process, as runworker may have
            first = asyncio.create_task(worker.receive("cutoff.q"))
            second = asyncio.create_task(worker.receive("cutoff.q"))
            await asyncio.sleep(0.3)
            await sender.send("cutoff.q", msg(1, mark="CUT-AFTER-THIS"))
            done, _ = await asyncio.wait({first, second}, timeout=5,
                                         return_when=asyncio.FIRST_COMPLETED)
            got = [t.result()["n"] for t in done]
            await asyncio.sleep(1.0)
            assert proxy.cut_fired == 1, "the connection was not cut after the message"
            proxy.heal()
            await asyncio.sleep(0.5)
            await sender.send("cutoff.q", msg(2))
            for task in (first, second):
                if task not in done:
                    got.append((await asyncio.wait_for(task, 5))["n"])
            # one more short outage while a receive waits, then a clean shutdown
            third = asyncio.create_task(worker.receive("cutoff.q"))
            await asyncio.sleep(0.2)
            proxy.cut()
            await asyncio.sleep(1.0)
            proxy.heal()
            await asyncio.sleep(1.0)
            if third.done():
                got.append(third.result()["n"])
            else:
                third.cancel()
                await asyncio.gather(third, return_exceptions=True)
            await worker.close()
            while True:
                try:
                    message = await asyncio.wait_for(successor.receive("cutoff.q"), 1.0)
                except asyncio.TimeoutError:
                    break
                got.append(message["n"])
            assert sorted(got) == [1, 2], f"received {got}"
    finally:
        await proxy.stop()
