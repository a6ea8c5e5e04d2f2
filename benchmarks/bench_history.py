"""What room history costs per room send: round trips, Redis CPU and bytes per kept message.

Two rooms of ``--members`` process-local channels on ``--nodes`` layers (nodes), one with
history (``history_configure(count=--keep)``) and one without; ``--sends`` ``room_send`` calls
to each, alternating in rounds. Measured on a private redis-server (``--redis-url`` for
another one):

* round trips per send: the calls ``room_send`` makes to Redis (counted on the transport);
* Redis CPU per send: ``INFO commandstats`` ``cmdstat_evalsha`` usec delta / sends (every
  other command of the layer, such as the nodes' inbox reads, is left out);
* bytes per kept message: ``MEMORY USAGE`` of the room's history stream / entries kept,
  next to the encoded payload size.

    python -m benchmarks.bench_history --sends 5000 --payload 200
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
from typing import Any

if not __package__:  # run as a script: make `benchmarks` importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks._common import delete_prefix, redis_info, run_on_redis, run_prefix


def _evalsha_usec(url: str) -> tuple[int, int]:
    stats = redis_info(url, "commandstats").get("cmdstat_evalsha", {})
    return int(stats.get("usec", 0)), int(stats.get("calls", 0))


async def _drain(layer: Any, channels: list[str], expected: int) -> None:
    async def one(channel: str) -> None:
        for _ in range(expected):
            await layer.receive(channel)

    await asyncio.wait_for(asyncio.gather(*(one(c) for c in channels)), 120)


async def _round(
    url: str, sender: Any, layers: list[Any], channels: dict[str, list[list[str]]],
    room: str, sends: int, payload: str,
) -> tuple[float, float]:
    """(round trips per send, Redis evalsha usec per send) for ``sends`` sends to ``room``."""
    transport = sender._transport()
    calls: list[int] = [0]
    original = transport.run

    async def counted(operation: Any, **options: Any) -> Any:
        calls[0] += 1
        return await original(operation, **options)

    transport.run = counted
    usec0, _ = _evalsha_usec(url)
    try:
        for i in range(sends):
            await sender.room_send(room, {"type": "m", "n": i, "text": payload})
    finally:
        transport.run = original
    usec1, _ = _evalsha_usec(url)
    await asyncio.gather(*(_drain(layer, chans, sends)
                           for layer, chans in zip(layers, channels[room], strict=True)))
    return calls[0] / sends, (usec1 - usec0) / sends


async def run(url: str, args: argparse.Namespace) -> None:
    from channels_distrib.layers import DistributedChannelLayer

    prefix = run_prefix("hist")
    layers = [DistributedChannelLayer(hosts=[url], prefix=prefix, capacity=args.sends + 10)
              for _ in range(args.nodes)]
    sender = DistributedChannelLayer(hosts=[url], prefix=prefix)
    rooms = {"plain": "bench-plain", "history": "bench-history"}
    channels: dict[str, list[list[str]]] = {room: [] for room in rooms.values()}
    try:
        per_node = max(1, args.members // args.nodes)
        for room in rooms.values():
            for layer in layers:
                made = [await layer.new_channel() for _ in range(per_node)]
                for channel in made:
                    await layer.group_add(room, channel)
                channels[room].append(made)
        await sender.history_configure(rooms["history"], count=args.keep, ttl=3600,
                                       max_bytes=64 * 1024 * 1024)
        payload = "x" * args.payload
        figures: dict[str, list[tuple[float, float]]] = {name: [] for name in rooms}
        for _ in range(args.rounds):
            for name, room in rooms.items():
                figures[name].append(await _round(url, sender, layers, channels, room,
                                                  args.sends, payload))
        info = await sender.room_history_info(rooms["history"])
        encoded = len(sender.serializer.dumps({"type": "m", "n": 1, "text": payload}))
        print(f"{args.nodes} nodes x {per_node} members per room, {args.sends} sends x "
              f"{args.rounds} rounds per room, payload {encoded} B encoded, keep {args.keep}")
        print("| room | round trips / send | Redis CPU us / send (evalsha) |")
        print("|---|---|---|")
        for name, rows in figures.items():
            trips = sorted(r[0] for r in rows)[len(rows) // 2]
            usec = sorted(r[1] for r in rows)[len(rows) // 2]
            print(f"| {name} | {trips:.2f} | {usec:.1f} |")
        if info is not None:
            print(f"history kept {info.entries} entries, payload {info.payload_bytes} B, "
                  f"MEMORY USAGE {info.memory_bytes} B: "
                  f"{info.memory_bytes / max(1, info.entries):.0f} B per kept message "
                  f"({encoded} B of it payload)")
    finally:
        await sender.flush()
        for layer in [sender, *layers]:
            await layer.close()
        delete_prefix(url, prefix)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--redis-url", default=None)
    parser.add_argument("--nodes", type=int, default=3)
    parser.add_argument("--members", type=int, default=30)
    parser.add_argument("--sends", type=int, default=2000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--keep", type=int, default=100)
    parser.add_argument("--payload", type=int, default=200)
    run_on_redis(run, parser.parse_args())


if __name__ == "__main__":
    main()
