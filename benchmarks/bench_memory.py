"""Redis memory per group membership: channels_redis core, pub/sub and channels_distrib.

One process per layer holds ``--memberships`` process-local channels (``new_channel()``),
spread over ``--groups`` groups with ``group_add``. Two measures, both on a private
redis-server unless ``--redis-url`` is given:

* ``INFO memory`` delta of ``used_memory - mem_clients_normal``: everything the layer made
  Redis hold, including pub/sub subscriptions, which own no key, but not the buffers of its
  connections (a pool of idle connections is not a cost per membership);
* the sum of ``MEMORY USAGE`` over the keys under the layer's prefix (found with SCAN).

    python -m benchmarks.bench_memory --memberships 10000 --groups 1,100
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import time
from dataclasses import dataclass

if not __package__:  # run as a script: make `benchmarks` importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks._common import (
    LAYERS,
    LayerSpec,
    machine_description,
    private_redis,
    redis_info,
    run_prefix,
)
from benchmarks._nodes import clean_up, close_layer

BATCH = 50  # group_adds in flight at once (channels_redis core's pool allows 100)


@dataclass
class MemoryResult:
    label: str
    memberships: int
    groups: int
    used_delta: int = 0
    keys: int = 0
    key_bytes: int = 0
    seconds: float = 0.0
    skipped: str = ""
    key: str = ""


def key_usage(url: str, prefix: str) -> tuple[int, int]:
    """(number of keys, sum of MEMORY USAGE) under ``prefix``, via SCAN."""
    import redis

    client = redis.Redis.from_url(url)
    try:
        keys = list(client.scan_iter(match=f"{prefix}*", count=1000))
        pipe = client.pipeline(transaction=False)
        for key in keys:
            pipe.memory_usage(key, samples=0)
        sizes = pipe.execute() if keys else []
        return len(keys), sum(int(size or 0) for size in sizes)
    finally:
        client.close()


def used_memory(url: str) -> int:
    """``used_memory`` minus client buffers: a pool of idle connections is not membership cost."""
    info = redis_info(url, "memory")
    return int(info["used_memory"]) - int(info.get("mem_clients_normal", 0))


def settled_memory(url: str, timeout: float = 5.0) -> int:
    """used_memory once it stops moving: closed clients and freed keys are released lazily."""
    deadline = time.monotonic() + timeout
    last = used_memory(url)
    while time.monotonic() < deadline:
        time.sleep(0.3)
        now = used_memory(url)
        if abs(now - last) < 1024:
            return now
        last = now
    return last


async def populate(spec: LayerSpec, url: str, prefix: str, memberships: int, groups: int,
                   out: MemoryResult) -> None:
    before = settled_memory(url)
    layer = spec.make(url, prefix)
    started = time.monotonic()
    try:
        channels = [await layer.new_channel() for _ in range(memberships)]
        for start in range(0, memberships, BATCH):
            await asyncio.gather(*(
                layer.group_add(f"room{i % groups}", channel)
                for i, channel in enumerate(channels[start:start + BATCH], start)
            ))
        out.seconds = time.monotonic() - started
        await asyncio.sleep(0.5)  # let background work (heartbeats, subscriptions) settle
        out.used_delta = used_memory(url) - before
        out.keys, out.key_bytes = key_usage(url, prefix)
    finally:
        await close_layer(layer)


def measure(spec: LayerSpec, url: str, memberships: int, groups: int) -> MemoryResult:
    out = MemoryResult(spec.label, memberships, groups, key=spec.key)
    reason = spec.available()
    if reason:
        out.skipped = reason
        return out
    url = spec.server(url)
    prefix = run_prefix(spec.key)
    try:
        asyncio.run(asyncio.wait_for(populate(spec, url, prefix, memberships, groups, out), 120))
    except Exception as exc:
        out.skipped = f"failed: {type(exc).__name__}: {exc}"
    finally:
        clean_up(spec, url, prefix)
    return out


def report(results: list[MemoryResult], machine: str) -> str:
    lines = [
        f"Machine: {machine}",
        "",
        "| layer | memberships | groups | memory delta (no client buffers) | bytes / membership "
        "| keys | MEMORY USAGE of keys | bytes / membership (keys) | group_adds/s |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        if r.skipped:
            lines.append(f"| {r.label} | {r.memberships:,} | {r.groups} | skipped: {r.skipped} "
                         "| | | | | |")
            continue
        lines.append(
            f"| {r.label} | {r.memberships:,} | {r.groups} | {r.used_delta / 1024:,.0f} KiB "
            f"| {r.used_delta / r.memberships:,.0f} | {r.keys:,} | {r.key_bytes / 1024:,.0f} KiB "
            f"| {r.key_bytes / r.memberships:,.0f} | {r.memberships / r.seconds:,.0f} |"
        )
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="Redis memory per group membership")
    parser.add_argument("--layers", default="core,pubsub,distrib")
    parser.add_argument("--redis-url")
    parser.add_argument("--memberships", type=int, default=10_000)
    parser.add_argument("--groups", default="1,100",
                        help="comma-separated group counts to spread the memberships over")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    group_counts = [int(g) for g in args.groups.split(",")]

    def run(url: str) -> int:
        results = []
        for groups in group_counts:
            for key in args.layers.split(","):
                print(f"... {key} x {groups} groups", file=sys.stderr, flush=True)
                results.append(measure(LAYERS[key], url, args.memberships, groups))
        print(report(results, machine_description(url)))
        return 0 if all(not r.skipped for r in results) else 1

    if args.redis_url:
        return run(args.redis_url)
    with private_redis() as url:
        return run(url)


if __name__ == "__main__":
    sys.exit(main())
