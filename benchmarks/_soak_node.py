"""One node of the soak and of the fault tests: a layer with many consumers, driven over stdin.

Run as ``python -m benchmarks._soak_node --hosts JSON --prefix P [options]`` from the repo root.
The process builds one ``DistributedChannelLayer`` and keeps ``--consumers`` consumers, each a
process-local channel (``new_channel``) with a receive loop, in the group ``soak-all`` and in
one room (``soak-room-<i>``, a presence membership), the way a daphne process holds its
WebSocket consumers. With ``--rate R`` a churn loop connects, joins, leaves and disconnects
consumers, R operations a second in total, each as its own task (one consumer's operations run
one at a time, as its handler would).

What a consumer holds is what the application believes: a group whose ``group_add`` returned.
A ``group_add`` that raised is followed by a ``group_discard`` (the layer retries removals until
Redis confirms them), so the consumer is then not a member. A receive that raises is a consumer
error: counted, reported, and the loop goes on.

Everything goes to stdout as one JSON object per line: ``{"event": "ready", "node_id", "pid"}``
once the consumers are in their groups, ``{"event": "error", "where", "type", "message"}`` for
each consumer error, and one ``{"event": "reply", "cmd", ...}`` per command. Commands arrive on
stdin, one JSON object per line:

``{"cmd": "state"}``      channels held by live consumers and their groups (``channels``)
``{"cmd": "stats"}``      counters: received, presence leaves received, consumer errors,
                          ops and op failures by exception type
``{"cmd": "received"}``   with ``--record``: the ``id`` fields each channel received, in order
``{"cmd": "churn", "rate": R}``  change the churn rate (0 stops it; waits for running ops)
``{"cmd": "reset"}``      disconnect every consumer, then connect ``--consumers`` fresh ones
``{"cmd": "release"}``    close the layer's idle pooled Redis connections (its readers keep
                          theirs), so a memory reading sees the same connections each time
``{"cmd": "close"}``      disconnect every consumer and ``layer.close()``; ``{"cmd": "exit"}``
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import random
import sys
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)
os.environ.setdefault("DJANGO_SETTINGS_MODULE", "tests.settings")

ALL_GROUP = "soak-all"


def room_name(index: int) -> str:
    return f"soak-room-{index}"


def emit(**fields: Any) -> None:
    sys.stdout.write(json.dumps(fields, default=repr) + "\n")
    sys.stdout.flush()


@dataclass
class Consumer:
    channel: str
    index: int
    groups: set[str] = field(default_factory=set)
    received: list[Any] = field(default_factory=list)
    count: int = 0
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    task: asyncio.Task[None] | None = None
    gone: bool = False


class SoakNode:
    """The consumers of one node process and the operations on them."""

    def __init__(self, layer: Any, args: argparse.Namespace) -> None:
        self.layer = layer
        self.args = args
        self.consumers: dict[str, Consumer] = {}
        self.rate = float(args.rate)
        self.ops: Counter[str] = Counter()
        self.op_errors: Counter[str] = Counter()
        self.errors = 0
        self.received = 0
        self.presence_leaves = 0
        self.next_index = 0
        self.running: set[asyncio.Task[None]] = set()
        self.rng = random.Random(args.seed)

    # -- one consumer -------------------------------------------------------------------

    async def receive_loop(self, consumer: Consumer) -> None:
        while True:
            try:
                message = await self.layer.receive(consumer.channel)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                self.errors += 1
                emit(event="error", where="receive", type=type(exc).__name__, message=str(exc))
                await asyncio.sleep(0.05)
                continue
            consumer.count += 1
            self.received += 1
            if message.get("type") == "presence.diff":
                self.presence_leaves += len(message.get("leaves", ()))
            if self.args.record and "id" in message:
                consumer.received.append(message["id"])

    async def join(self, consumer: Consumer, group: str) -> None:
        presence = group != ALL_GROUP and self.args.presence
        meta = {"i": consumer.index}
        try:
            await self.layer.group_add(group, consumer.channel, meta=meta, presence=presence)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            self.op_errors[f"group_add:{type(exc).__name__}"] += 1
            await self.discard(consumer, group)
            return
        consumer.groups.add(group)

    async def discard(self, consumer: Consumer, group: str) -> None:
        # Not a member from here on, whatever Redis says now: the layer retries the removal.
        consumer.groups.discard(group)
        try:
            await self.layer.group_discard(group, consumer.channel)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            self.op_errors[f"group_discard:{type(exc).__name__}"] += 1

    async def connect(self) -> None:
        index = self.next_index
        self.next_index += 1
        try:
            channel = await self.layer.new_channel()
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            self.op_errors[f"new_channel:{type(exc).__name__}"] += 1
            return
        consumer = Consumer(channel, index)
        consumer.task = asyncio.create_task(self.receive_loop(consumer))
        self.consumers[channel] = consumer
        async with consumer.lock:
            await self.join(consumer, ALL_GROUP)
            if self.args.rooms:
                await self.join(consumer, room_name(index % self.args.rooms))

    async def disconnect(self, consumer: Consumer) -> None:
        async with consumer.lock:
            if consumer.gone:
                return
            consumer.gone = True
            for group in sorted(consumer.groups):
                await self.discard(consumer, group)
            self.consumers.pop(consumer.channel, None)
            if consumer.task is not None:
                consumer.task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await consumer.task

    async def join_room(self, consumer: Consumer) -> None:
        async with consumer.lock:
            if consumer.gone or not self.args.rooms:
                return
            room = room_name(self.rng.randrange(self.args.rooms))
            if room not in consumer.groups:
                await self.join(consumer, room)

    async def leave_room(self, consumer: Consumer) -> None:
        async with consumer.lock:
            rooms = sorted(g for g in consumer.groups if g != ALL_GROUP)
            if consumer.gone or not rooms:
                return
            await self.discard(consumer, self.rng.choice(rooms))

    # -- churn --------------------------------------------------------------------------

    def pick_op(self) -> str:
        target = self.args.consumers
        count = len(self.consumers)
        if count < target * 0.8 or not self.consumers:
            return "connect"
        if count > target * 1.2:
            return "disconnect"
        return self.rng.choice(("connect", "join", "leave", "disconnect"))

    async def run_op(self, name: str) -> None:
        self.ops[name] += 1
        if name == "connect":
            await self.connect()
            return
        consumer = self.consumers[self.rng.choice(sorted(self.consumers))]
        if name == "join":
            await self.join_room(consumer)
        elif name == "leave":
            await self.leave_room(consumer)
        else:
            await self.disconnect(consumer)

    async def churn_loop(self) -> None:
        next_at = time.monotonic()
        while True:
            if self.rate <= 0:
                await asyncio.sleep(0.05)
                next_at = time.monotonic()
                continue
            next_at += 1.0 / self.rate
            delay = next_at - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
            elif delay < -1.0:
                next_at = time.monotonic()  # fell behind (Redis down): do not burst afterwards
            if self.rate <= 0:
                continue  # stopped while sleeping: start nothing after a drain
            if len(self.running) > 200:
                continue  # operations are stuck waiting for Redis; do not pile up more
            self.spawn(self.run_op(self.pick_op()))

    def spawn(self, coro: Any) -> None:
        task = asyncio.create_task(coro)
        self.running.add(task)
        task.add_done_callback(self.running.discard)

    async def drain_ops(self) -> None:
        while self.running:
            await asyncio.gather(*list(self.running), return_exceptions=True)

    # -- commands -----------------------------------------------------------------------

    async def reset(self) -> None:
        for consumer in list(self.consumers.values()):
            await self.disconnect(consumer)
        self.next_index = 0
        await asyncio.gather(*(self.connect() for _ in range(self.args.consumers)))

    def state(self) -> dict[str, Any]:
        return {
            "node_id": self.layer.node_id,
            "channels": {ch: sorted(c.groups) for ch, c in self.consumers.items()},
        }

    def stats(self) -> dict[str, Any]:
        return {
            "received": self.received,
            "presence_leaves": self.presence_leaves,
            "errors": self.errors,
            "consumers": len(self.consumers),
            "ops": dict(self.ops),
            "op_errors": dict(self.op_errors),
            "running": len(self.running),
        }

    async def command(self, command: dict[str, Any]) -> dict[str, Any]:
        name = command["cmd"]
        if name == "state":
            return self.state()
        if name == "stats":
            return self.stats()
        if name == "received":
            return {"channels": {ch: c.received for ch, c in self.consumers.items()}}
        if name == "churn":
            self.rate = float(command["rate"])
            if self.rate <= 0:
                await self.drain_ops()
            return {"rate": self.rate}
        if name == "reset":
            self.rate = 0
            await self.drain_ops()
            await self.reset()
            return self.state()
        if name == "release":
            return {"closed": await release_idle_connections(self.layer)}
        if name == "close":
            self.rate = 0
            await self.drain_ops()
            for consumer in list(self.consumers.values()):
                await self.disconnect(consumer)
            await self.layer.close()
            return {}
        raise ValueError(f"unknown command {name!r}")


async def release_idle_connections(layer: Any) -> int:
    """Close the idle connections of the layer's pools on this loop; returns how many.

    Redis charges every connection its buffers (about 38 KB each on Redis 7.0 right after it
    connects, measured), and the pools grow during reconnect storms; two memory readings with
    different numbers of pooled connections differ by hundreds of KB for that alone. The
    readers' own connections and connections in use stay. (Reaches into the layer's transport
    and redis-py's pools: a benchmark helper, not an API.)
    """
    from redis.asyncio import Redis
    from redis.asyncio.cluster import RedisCluster

    transport = layer._transport()
    closed = 0
    for client in (transport.client, transport.blocking):
        if isinstance(client, RedisCluster):
            for node in client.get_nodes():
                free = getattr(node, "_free", None)
                while free:
                    conn = free.popleft()
                    with contextlib.suppress(ValueError):
                        node._connections.remove(conn)
                    await conn.disconnect()
                    closed += 1
        elif isinstance(client, Redis):
            pool = client.connection_pool
            closed += len(getattr(pool, "_available_connections", []))
            await pool.disconnect(inuse_connections=False)
    return closed


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m benchmarks._soak_node")
    parser.add_argument("--hosts", required=True, help="the layer's hosts option, as JSON")
    parser.add_argument("--prefix", required=True)
    parser.add_argument("--consumers", type=int, default=20)
    parser.add_argument("--rooms", type=int, default=4)
    parser.add_argument("--rate", type=float, default=0.0, help="churn operations per second")
    parser.add_argument("--presence", action="store_true", help="rooms are presence memberships")
    parser.add_argument("--record", action="store_true", help="keep the ids each channel got")
    parser.add_argument("--seed", type=int, default=None)
    for option in ("heartbeat-interval", "node-timeout", "expiry", "retry-timeout"):
        parser.add_argument(f"--{option}", type=float, default=None)
    return parser.parse_args(argv)


def make_layer(args: argparse.Namespace) -> Any:
    from channels_distrib.layers import DistributedChannelLayer

    hosts = json.loads(args.hosts)
    for host in hosts:
        if isinstance(host, dict) and "sentinels" in host:
            host["sentinels"] = [tuple(pair) for pair in host["sentinels"]]
    config: dict[str, Any] = {"hosts": hosts, "prefix": args.prefix}
    for name in ("heartbeat_interval", "node_timeout", "expiry", "retry_timeout"):
        value = getattr(args, name)
        if value is not None:
            config[name] = int(value) if name == "expiry" and value.is_integer() else value
    return DistributedChannelLayer(**config)


async def main(args: argparse.Namespace) -> int:
    node = SoakNode(make_layer(args), args)
    try:
        await asyncio.gather(*(node.connect() for _ in range(args.consumers)))
    except Exception as exc:
        emit(event="error", where="setup", type=type(exc).__name__, message=str(exc))
        return 3
    churn = asyncio.create_task(node.churn_loop())
    emit(event="ready", node_id=node.layer.node_id, pid=os.getpid())
    loop = asyncio.get_running_loop()
    commands: asyncio.Queue[dict[str, Any] | None] = asyncio.Queue()

    def pump() -> None:
        for line in sys.stdin:
            if line.strip():
                loop.call_soon_threadsafe(commands.put_nowait, json.loads(line))
        loop.call_soon_threadsafe(commands.put_nowait, None)

    threading.Thread(target=pump, daemon=True).start()
    while (command := await commands.get()) is not None and command["cmd"] != "exit":
        try:
            reply = await node.command(command)
        except Exception as exc:
            emit(event="reply", cmd=command["cmd"], error=f"{type(exc).__name__}: {exc}")
        else:
            emit(event="reply", cmd=command["cmd"], **reply)
    churn.cancel()
    for consumer in node.consumers.values():
        if consumer.task is not None:
            consumer.task.cancel()
    await asyncio.gather(churn, *node.running, return_exceptions=True)
    return 0


if __name__ == "__main__":
    sys.exit(asyncio.run(main(parse_args())))
