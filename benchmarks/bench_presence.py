"""Presence fill: N presence members joining one room on one node, on a private Redis.

For each N: the time until every ``group_add`` returned, the time until the node had sent and
read every diff (settled), Redis output bytes (``INFO stats`` ``total_net_output_bytes``
delta), the presence messages queued to the members, and a check that every member's view
(its state plus the diffs after it) ends up as the full room.

    python -m benchmarks.bench_presence --sizes 250 500 1000
    python -m benchmarks.bench_presence --sizes 1000 --interval 0
    python -m benchmarks.bench_presence --nodes 4 --sizes 2500 5000 10000

``--interval`` sets ``presence_interval`` (omit it for the layer's default; a layer that has
no such option is run without it, so older code can be measured the same way).
"""

from __future__ import annotations

import argparse
import asyncio
import inspect
import time
from typing import Any

from benchmarks._common import private_redis, redis_info

ROOM = "room"


def output_bytes(url: str) -> int:
    return int(redis_info(url, "stats")["total_net_output_bytes"])


async def settle(layer: Any, url: str) -> None:
    """Until the node has no diff waiting for its window and has read its whole inbox."""
    import redis.asyncio as aioredis

    node = layer._node
    client = aioredis.from_url(url)
    calm = 0
    try:
        # Calm twice in a row, 20 ms apart: a window's diff may be on its way to Redis.
        while calm < 2:
            presence = getattr(node, "presence", None)
            waiting = bool(getattr(presence, "_windows", None))
            newest = await client.xrevrange(node.keys.inbox(node.token), count=1)
            if not waiting and (not newest or node.inbox.has_read(newest[0][0])):
                calm += 1
            else:
                calm = 0
            await asyncio.sleep(0.02)
    finally:
        await client.aclose()


def views(layer: Any, channels: list[str]) -> tuple[int, int, int]:
    """(members whose view is the full room, presence messages queued, their bytes)."""
    node = layer._node
    loads = layer.serializer.loads
    everyone = set(channels)
    complete = messages = size = 0
    for name in channels:
        view: set[str] = set()
        for item in node.channels[name].items:  # (expires, payload, shared)
            payload = item[1]
            message = loads(payload)
            if not str(message.get("type", "")).startswith("presence."):
                continue
            messages += 1
            size += len(payload)
            if message["type"] == "presence.state":
                view = {e["channel"] for e in message["members"]}
            else:
                view -= {e["channel"] for e in message["leaves"]}
                view |= {e["channel"] for e in message["joins"]}
        complete += view == everyone
    return complete, messages, size


async def run_one(url: str, n: int, interval: float | None) -> dict[str, Any]:
    from channels_distrib.layers import DistributedChannelLayer

    config: dict[str, Any] = {"hosts": [url], "prefix": f"bp{n}", "capacity": 4 * n + 100}
    if interval is not None:
        if "presence_interval" not in inspect.signature(DistributedChannelLayer).parameters:
            raise SystemExit("this layer has no presence_interval option; omit --interval")
        config["presence_interval"] = interval
    layer = DistributedChannelLayer(**config)
    try:
        channels = [await layer.new_channel() for _ in range(n)]
        await asyncio.sleep(0.2)
        before = output_bytes(url)
        start = time.perf_counter()
        for i, channel in enumerate(channels):
            await layer.group_add(ROOM, channel, presence=True, meta={"name": f"user-{i}"})
        joined = time.perf_counter() - start
        await settle(layer, url)
        settled = time.perf_counter() - start
        out = output_bytes(url) - before
        complete, messages, size = views(layer, channels)
        return {
            "n": n,
            "joined_s": joined,
            "settled_s": settled,
            "redis_out_mb": out / 1e6,
            "messages": messages,
            "queued_mb": size / 1e6,
            "complete": complete,
        }
    finally:
        await layer.flush()
        await layer.close()


async def worker(url: str, prefix: str, n: int, total: int, start_at: float) -> None:
    """One node process of a multi-node fill: ``n`` of the ``total`` members; prints one JSON
    line. Members' queues are emptied as they fill (standing in for consumers), counted."""
    import json

    from channels_distrib.layers import DistributedChannelLayer

    layer = DistributedChannelLayer(hosts=[url], prefix=prefix, capacity=1_000_000)
    channels = [await layer.new_channel() for _ in range(n)]
    node = layer._node
    counted = {"messages": 0, "bytes": 0}

    def take() -> None:
        for name in channels:
            items = node.channels[name].items
            counted["messages"] += len(items)
            counted["bytes"] += sum(len(item[1]) for item in items)  # (expires, payload, ...)
            items.clear()

    print(json.dumps({"event": "ready"}), flush=True)
    await asyncio.sleep(max(0.0, start_at - time.time()))
    start = time.perf_counter()
    for i, channel in enumerate(channels):
        await layer.group_add(ROOM, channel, presence=True, meta={"name": f"{prefix}-{i}"})
        if i % 100 == 99:
            take()
    joined = time.perf_counter() - start
    while True:
        take()
        replica = node.presence.replicas.get(ROOM)
        if replica is not None and len(replica.entries) == total:
            break
        await asyncio.sleep(0.02)
    await settle(layer, url)
    take()
    settled = time.perf_counter() - start
    result = {"event": "done", "joined_s": joined, "settled_s": settled, **counted}
    print(json.dumps(result), flush=True)
    await layer.close()


def fill(url: str, sizes: list[int], nodes: int) -> list[dict[str, Any]]:
    """For each N: ``nodes`` worker processes with N / nodes presence members each, joining
    one room at once. Per N: joins and settled seconds (the slowest node), Redis output MB,
    presence messages queued to the members and their MB."""
    import json
    import os
    import subprocess
    import sys

    from benchmarks._common import ROOT

    rows = []
    for n in sizes:
        print(f"... presence fill: {n:,} members over {nodes} nodes", file=sys.stderr, flush=True)
        prefix = f"bm{n}-{os.getpid()}"
        start_at = time.time() + 3.0 + n / 2000
        env = dict(os.environ, PYTHONPATH=ROOT)
        procs = [
            subprocess.Popen(
                [sys.executable, "-m", "benchmarks.bench_presence", "--worker", url, prefix,
                 str(n // nodes), str(n), str(start_at)],
                stdout=subprocess.PIPE, cwd=ROOT, env=env,
            )
            for _ in range(nodes)
        ]
        results = []
        try:
            for proc in procs:
                assert proc.stdout is not None
                json.loads(proc.stdout.readline())  # ready
            before = output_bytes(url)
            for proc in procs:
                assert proc.stdout is not None
                results.append(json.loads(proc.stdout.readline()))
            out = output_bytes(url) - before
        finally:
            for proc in procs:
                try:
                    proc.wait(300)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait(5)
        row = {
            "n": n, "nodes": nodes,
            "joined_s": max(r["joined_s"] for r in results),
            "settled_s": max(r["settled_s"] for r in results),
            "redis_out_mb": out / 1e6,
            "messages": sum(r["messages"] for r in results),
            "queued_mb": sum(r["bytes"] for r in results) / 1e6,
        }
        print(f"    settled in {row['settled_s']:.2f} s, Redis output {row['redis_out_mb']:.1f} MB",
              file=sys.stderr, flush=True)
        rows.append(row)
    return rows


def report_fill(rows: list[dict[str, Any]]) -> list[str]:
    lines = [
        "| members | nodes | all joins returned (s) | settled (s) | Redis output (MB) "
        "| presence messages queued | their size (MB) |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(f"| {r['n']:,} | {r['nodes']} | {r['joined_s']:.2f} | {r['settled_s']:.2f} "
                     f"| {r['redis_out_mb']:.1f} | {r['messages']:,} | {r['queued_mb']:.1f} |")
    return lines


async def multi(sizes: list[int], nodes: int) -> None:
    with private_redis() as url:
        print(f"{nodes} node processes, members joining one room at once:")
        print("\n".join(report_fill(fill(url, sizes, nodes))))


async def main(sizes: list[int], interval: float | None) -> None:
    with private_redis() as url:
        print(
            f"{'N':>6} {'joins s':>8} {'settled s':>9} {'Redis out MB':>12} "
            f"{'messages':>9} {'queued MB':>9} {'full views':>10}"
        )
        for n in sizes:
            r = await run_one(url, n, interval)
            print(
                f"{r['n']:>6} {r['joined_s']:>8.2f} {r['settled_s']:>9.2f} "
                f"{r['redis_out_mb']:>12.2f} {r['messages']:>9} {r['queued_mb']:>9.1f} "
                f"{r['complete']:>5}/{r['n']}",
                flush=True,
            )


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[250, 500, 1000])
    parser.add_argument("--interval", type=float, default=None)
    parser.add_argument("--nodes", type=int, default=1, help="node processes (default 1)")
    parser.add_argument("--worker", nargs=5, help=argparse.SUPPRESS)
    args = parser.parse_args()
    import django
    from django.conf import settings

    if not settings.configured:
        settings.configure()
        django.setup()
    if args.worker:
        url, prefix, n, total, start_at = args.worker
        asyncio.run(worker(url, prefix, int(n), int(total), float(start_at)))
    elif args.nodes > 1:
        asyncio.run(multi(args.sizes, args.nodes))
    else:
        asyncio.run(main(args.sizes, args.interval))
