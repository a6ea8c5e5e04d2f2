"""A channel-layer node in its own OS process, driven by the node tests.

Run as ``python -m tests.node_proc --url URL --prefix P --channels N --group G [--presence]``.
It builds a ``DistributedChannelLayer``, creates channels with ``new_channel`` (which makes the
process a node), joins them to the groups, prints one ``ready`` line and then keeps receiving.
Everything it has to say goes to stdout as one JSON object per line:

``{"event": "ready", "node_id", "pid", "channels", "idle", "slow"}``
    after every channel joined. ``channels`` receive continuously, ``idle`` never receive,
    ``slow`` sleep ``--slow-delay`` seconds after each message.
``{"event": "message", "channel", "message", "t"}``
    each message a channel received (``t`` is ``time.time()`` at receipt).
``{"event": "done", "cmd", "result"}`` / ``{"event": "error", "where", "type", "message"}``
    the outcome of a stdin command, or an exception (then the process exits with status 3
    when it happened before ``ready``).

Commands arrive on stdin, one JSON object per line: ``{"cmd": "group_add", "group",
"channel", "presence", "meta"}``, ``{"cmd": "group_discard", "group", "channel"}``,
``{"cmd": "join_all", "group", "presence", "meta"}`` (every channel of this process),
``{"cmd": "close"}`` (``layer.close()``, then stay alive), ``{"cmd": "flush"}``,
``{"cmd": "exit"}``.

``--sender`` makes a sender-only process instead: it never calls ``new_channel``; it sends,
group-sends and queries through ``async_to_sync`` (as a Django view would) every 0.2 s.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import threading
import time
from typing import Any

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "tests.settings")


def emit(**fields: Any) -> None:
    sys.stdout.write(json.dumps(fields, default=repr) + "\n")
    sys.stdout.flush()


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m tests.node_proc")
    parser.add_argument("--url", required=True)
    parser.add_argument("--prefix", required=True)
    parser.add_argument("--channels", type=int, default=1, help="channels that keep receiving")
    parser.add_argument("--idle", type=int, default=0, help="channels that never receive")
    parser.add_argument("--slow", type=int, default=0, help="channels that receive slowly")
    parser.add_argument("--slow-delay", type=float, default=1.0)
    parser.add_argument("--group", action="append", default=[], help="group every channel joins")
    parser.add_argument("--presence", action="store_true")
    parser.add_argument("--meta", default=None, help="JSON dict; each channel adds its index 'i'")
    parser.add_argument("--node-id", default=None)
    parser.add_argument("--heartbeat-interval", type=float, default=None)
    parser.add_argument("--node-timeout", type=float, default=None)
    parser.add_argument("--expiry", type=float, default=None)
    parser.add_argument("--group-expiry", type=float, default=None)
    parser.add_argument("--sender", action="store_true", help="never call new_channel")
    parser.add_argument("--quiet", action="store_true", help="receive without reporting")
    parser.add_argument("--cluster", action="store_true", help="--url is a Redis Cluster node")
    return parser.parse_args(argv)


def layer_config(args: argparse.Namespace) -> dict[str, Any]:
    host: Any = {"address": args.url, "cluster": True} if args.cluster else args.url
    config: dict[str, Any] = {"hosts": [host], "prefix": args.prefix}
    for name in ("node_id", "heartbeat_interval", "node_timeout", "expiry", "group_expiry"):
        value = getattr(args, name)
        if value is not None:
            # expiry and group_expiry are ints in channels_redis; keep whole numbers whole.
            if name in ("expiry", "group_expiry") and float(value).is_integer():
                value = int(value)
            config[name] = value
    if os.environ.get("NODE_PROC_BROKER"):
        config["broker"] = os.environ["NODE_PROC_BROKER"]  # the parent test's broker path
    return config


def make_layer(args: argparse.Namespace) -> Any:
    from channels_distrib.layers import DistributedChannelLayer

    return DistributedChannelLayer(**layer_config(args))


async def receive_forever(layer: Any, channel: str, delay: float, quiet: bool = False) -> None:
    while True:
        message = await layer.receive(channel)
        if not quiet:
            emit(event="message", channel=channel, message=message, t=time.time())
        if delay:
            await asyncio.sleep(delay)


async def read_commands(queue: asyncio.Queue[dict[str, Any] | None]) -> None:
    """Feed stdin lines into the queue from a thread (stdin is not a socket)."""
    loop = asyncio.get_running_loop()

    def pump() -> None:
        for line in sys.stdin:
            line = line.strip()
            if line:
                loop.call_soon_threadsafe(queue.put_nowait, json.loads(line))
        loop.call_soon_threadsafe(queue.put_nowait, None)

    threading.Thread(target=pump, daemon=True).start()


async def run_command(layer: Any, command: dict[str, Any], channels: list[str]) -> Any:
    name = command["cmd"]
    if name == "join_all":
        for channel in channels:
            await layer.group_add(
                command["group"],
                channel,
                meta=command.get("meta"),
                presence=bool(command.get("presence")),
            )
        return len(channels)
    if name == "group_add":
        return await layer.group_add(
            command["group"],
            command["channel"],
            meta=command.get("meta"),
            presence=bool(command.get("presence")),
        )
    if name == "group_discard":
        return await layer.group_discard(command["group"], command["channel"])
    if name == "close":
        return await layer.close()
    if name == "flush":
        return await layer.flush()
    raise ValueError(f"unknown command {name!r}")


async def node_main(args: argparse.Namespace) -> int:
    layer = make_layer(args)
    base_meta = json.loads(args.meta) if args.meta else None
    kinds = [("channels", args.channels), ("idle", args.idle), ("slow", args.slow)]
    made: dict[str, list[str]] = {kind: [] for kind, _ in kinds}
    try:
        index = 0
        for kind, count in kinds:
            for _ in range(count):
                channel = await layer.new_channel()
                made[kind].append(channel)
                meta = None if base_meta is None else {**base_meta, "i": index}
                for group in args.group:
                    await layer.group_add(group, channel, meta=meta, presence=args.presence)
                index += 1
    except Exception as exc:
        emit(event="error", where="setup", type=type(exc).__name__, message=str(exc))
        return 3
    tasks = [
        asyncio.ensure_future(receive_forever(layer, ch, 0.0, args.quiet))
        for ch in made["channels"]
    ]
    tasks += [
        asyncio.ensure_future(receive_forever(layer, ch, args.slow_delay)) for ch in made["slow"]
    ]
    emit(event="ready", node_id=layer.node_id, pid=os.getpid(), **made)
    commands: asyncio.Queue[dict[str, Any] | None] = asyncio.Queue()
    await read_commands(commands)
    while True:
        command = await commands.get()
        if command is None or command["cmd"] == "exit":
            break
        try:
            result = await run_command(layer, command, [c for k in made.values() for c in k])
        except Exception as exc:
            emit(event="error", where=command["cmd"], type=type(exc).__name__, message=str(exc))
        else:
            emit(event="done", cmd=command["cmd"], result=result)
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    return 0


def sender_main(args: argparse.Namespace) -> int:
    """Behave like Django views: sync code calling the layer through async_to_sync."""
    from asgiref.sync import async_to_sync

    layer = make_layer(args)
    group = args.group[0] if args.group else "sender-group"
    async_to_sync(layer.group_add)(group, "sender.queue")
    emit(
        event="ready",
        node_id=getattr(layer, "node_id", None),
        pid=os.getpid(),
        channels=[],
        idle=[],
        slow=[],
    )
    async_to_sync(layer.send)("sender.queue", {"type": "tick"})
    while True:
        async_to_sync(layer.group_send)(group, {"type": "tick"})
        async_to_sync(layer.group_size)(group)
        async_to_sync(layer.nodes)()
        time.sleep(0.2)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.sender:
        return sender_main(args)
    return asyncio.run(node_main(args))


if __name__ == "__main__":
    sys.exit(main())
