"""Big groups and many rooms: the two group shapes besides bench_layers' one group of 300.

* ``big``: one group of ``--big-members`` (10,000) process-local channels over
  ``--big-nodes`` node processes (4). The sender makes ``--big-sends`` (20) group_sends one
  at a time, each after the previous one reached every member: the sender-side
  ``group_send`` call time (median, p99) and the time from the send until the last member
  received it (median, max), plus loss and node CPU per delivery.
* ``rooms``: ``--rooms`` rooms (2,000) of ``--room-size`` members (5) over ``--room-nodes``
  node processes (3), every room with members on several nodes. Sends go to a random room
  (seeded): paced at ``--room-rate`` sends/s (500) for p50/p99 latency, then back to back
  for the throughput (deliveries/s, backlog included, as in bench_layers).

The node processes are bench_layers' (``benchmarks/_nodes.py``): one receive task per
channel, deliveries counted per phase, duplicates per channel.

    python -m benchmarks.bench_groups                     # both, every layer
    python -m benchmarks.bench_groups --scenarios rooms --layers pubsub,distrib
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import statistics
import sys
import time
from dataclasses import dataclass, field

if not __package__:  # run as a script: make `benchmarks` importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks._common import (
    LAYERS,
    LayerSpec,
    add_cluster_layer,
    machine_description,
    private_redis,
    redis_info,
    run_prefix,
)
from benchmarks._nodes import MAX, WARMUP, clean_up, close_layer, member_group
from benchmarks._results import PhaseResult, fmt_int, fmt_ms, percentile
from benchmarks.bench_layers import (
    GROUP,
    Node,
    cpu_sample,
    max_phase,
    paced_phase,
    send_one,
    start_nodes,
    stop_nodes,
    wait_drained,
)


@dataclass
class BigResult:
    key: str
    label: str
    members: int = 0
    sent: int = 0
    expected: int = 0
    received: int = 0
    dups: int = 0
    call_ms: list[float] = field(default_factory=list)  # sender-side group_send durations
    last_ms: list[float] = field(default_factory=list)  # send -> last member received
    node_us_per_delivery: float = 0.0
    # Where a call's time goes: the sender's own CPU during each call (its thread), and the
    # Redis command that took the most time during the sends, with its µs per call (INFO
    # commandstats; the nodes' commands count too, so it is named).
    call_cpu_ms: list[float] = field(default_factory=list)
    redis_command: str = ""
    redis_us_per_call: float = 0.0
    skipped: str = ""

    @property
    def lost_pct(self) -> float:
        unique = self.received - self.dups
        return 100.0 * max(0, self.expected - unique) / self.expected if self.expected else 0.0


@dataclass
class RoomsResult:
    key: str
    label: str
    rooms: int = 0
    members: int = 0
    paced: PhaseResult | None = None
    max: PhaseResult | None = None
    warm_up: str = ""  # delivered / expected of one send to every room
    skipped: str = ""


def node_args(nodes: int, channels: int, rooms: int, args: argparse.Namespace) -> argparse.Namespace:
    """The namespace bench_layers' start_nodes and phases read."""
    return argparse.Namespace(nodes=nodes, channels=channels, rooms=rooms, idle=args.idle,
                              drain_cap=args.drain_cap, ready_timeout=180, profile=None,
                              rate=args.room_rate, paced_seconds=args.room_seconds,
                              max_count=args.room_max_count, max_seconds=args.room_seconds)


async def big_drive(spec: LayerSpec, url: str, prefix: str, nodes: list[Node],
                    args: argparse.Namespace, out: BigResult) -> None:
    layer = spec.make(url, prefix)
    phase = PhaseResult()
    try:
        for i in range(3):  # warm-up: the setup must deliver to every member
            await send_one(layer, WARMUP, i, phase, GROUP, out.members)
        count, _, _, _ = await wait_drained(nodes, WARMUP, 3 * out.members, idle=5, cap=60)
        if count < 3 * out.members:
            raise RuntimeError(f"warm-up delivered {count:,} of {3 * out.members:,}")
        before = cpu_sample(nodes, url)
        stats_before: dict[str, tuple[int, int]] = {}
        run = PhaseResult()
        seen = 0
        for i in range(args.big_sends):
            await asyncio.sleep(0.05)
            sent_at = time.time()
            cpu_at = time.thread_time()
            await send_one(layer, MAX, i, run, GROUP, out.members)
            out.call_cpu_ms.append(1000 * (time.thread_time() - cpu_at))
            if i == 0:  # the first call may load the script: Redis is judged from the second
                stats_before = command_stats(url)
            count, dups, last, _ = await wait_drained(
                nodes, MAX, run.expected, idle=args.idle, cap=args.drain_cap)
            if count > seen:  # else nothing of this send arrived: no "last member" time
                out.last_ms.append(1000 * (last - sent_at))
            seen = count
        after = cpu_sample(nodes, url)
        out.redis_command, out.redis_us_per_call = busiest_command(stats_before, command_stats(url))
        out.sent, out.expected, out.received, out.dups = run.sent, run.expected, count, dups
        out.call_ms = [1000 * t for t in run.call_times]
        nodes_cpu = after["nodes"] - before["nodes"]
        out.node_us_per_delivery = 1e6 * nodes_cpu / count if count else 0.0
    finally:
        await close_layer(layer)


def command_stats(url: str) -> dict[str, tuple[int, int]]:
    """Redis ``INFO commandstats``: command -> (calls, usec)."""
    return {name.removeprefix("cmdstat_"): (int(v["calls"]), int(v["usec"]))
            for name, v in redis_info(url, "commandstats").items()}


def busiest_command(before: dict[str, tuple[int, int]],
                    after: dict[str, tuple[int, int]]) -> tuple[str, float]:
    """The command with the most server time between two snapshots, and its µs per call."""
    deltas = {name: (calls - before.get(name, (0, 0))[0], usec - before.get(name, (0, 0))[1])
              for name, (calls, usec) in after.items() if name != "info"}
    name, (calls, usec) = max(deltas.items(), key=lambda kv: kv[1][1], default=("", (0, 0)))
    return name, usec / calls if calls else 0.0


async def rooms_drive(spec: LayerSpec, url: str, prefix: str, nodes: list[Node],
                      nargs: argparse.Namespace, out: RoomsResult) -> None:
    sizes: dict[str, int] = {}
    for index in range(nargs.nodes):
        for i in range(nargs.channels):
            name = member_group(GROUP, nargs.rooms, index, nargs.channels, i)
            sizes[name] = sizes.get(name, 0) + 1
    names = sorted(sizes)
    rng = random.Random(9)

    def pick(_i: int) -> tuple[str, int]:
        name = names[rng.randrange(len(names))]
        return name, sizes[name]

    layer = spec.make(url, prefix)
    try:
        warm = PhaseResult()
        for i, name in enumerate(names):  # warm-up: one send to every room, 2 ms apart
            await send_one(layer, WARMUP, i, warm, name, sizes[name])
            await asyncio.sleep(0.002)
        count, _, _, _ = await wait_drained(nodes, WARMUP, warm.expected, idle=5, cap=60)
        out.warm_up = f"{count:,} / {warm.expected:,}"
        # Every room must work; a layer that loses a few messages (channels_redis core under
        # load) still gets measured, its warm-up figure is in the table.
        if count < 0.95 * warm.expected:
            raise RuntimeError(f"warm-up delivered {count:,} of {warm.expected:,}")
        await asyncio.sleep(0.5)
        out.paced = await paced_phase(layer, nodes, url, 0, nargs, pick)
        await asyncio.sleep(0.5)
        out.max = await max_phase(layer, nodes, url, 0, nargs, [], pick)
    finally:
        await close_layer(layer)


def run_one(spec: LayerSpec, url: str, nargs: argparse.Namespace,
            out: BigResult | RoomsResult, args: argparse.Namespace) -> None:
    reason = spec.available()
    if reason:
        out.skipped = reason
        return
    url = spec.server(url)
    prefix = run_prefix(spec.key)
    nodes: list[Node] = []
    try:
        nodes = start_nodes(spec, url, prefix, nargs)
        coro = (big_drive(spec, url, prefix, nodes, args, out) if isinstance(out, BigResult)
                else rooms_drive(spec, url, prefix, nodes, nargs, out))
        asyncio.run(coro)
    except Exception as exc:
        out.skipped = f"failed: {type(exc).__name__}: {exc}"
    finally:
        stop_nodes(nodes)
        clean_up(spec, url, prefix)


def run_big(url: str, keys: list[str], args: argparse.Namespace) -> list[BigResult]:
    results = []
    per_node = -(-args.big_members // args.big_nodes)
    nargs = node_args(args.big_nodes, per_node, 0, args)
    for key in keys:
        print(f"... big group: {key}, {per_node * args.big_nodes:,} members over "
              f"{args.big_nodes} nodes", file=sys.stderr, flush=True)
        out = BigResult(key, LAYERS[key].label, members=per_node * args.big_nodes)
        run_one(LAYERS[key], url, nargs, out, args)
        if not out.skipped:
            print(f"    group_send median {fmt_ms(median(out.call_ms))} ms, last member "
                  f"{fmt_ms(median(out.last_ms))} ms, lost {out.lost_pct:.2f}%",
                  file=sys.stderr, flush=True)
        else:
            print(f"    {out.skipped}", file=sys.stderr, flush=True)
        results.append(out)
    return results


def run_rooms(url: str, keys: list[str], args: argparse.Namespace) -> list[RoomsResult]:
    results = []
    members = args.rooms * args.room_size
    per_node = -(-members // args.room_nodes)
    nargs = node_args(args.room_nodes, per_node, args.rooms, args)
    for key in keys:
        print(f"... many rooms: {key}, {args.rooms:,} rooms of {args.room_size} over "
              f"{args.room_nodes} nodes", file=sys.stderr, flush=True)
        out = RoomsResult(key, LAYERS[key].label, rooms=args.rooms,
                          members=per_node * args.room_nodes)
        run_one(LAYERS[key], url, nargs, out, args)
        if out.paced and out.max:
            print(f"    {fmt_int(out.max.deliveries_per_s)} deliveries/s, paced p99 "
                  f"{fmt_ms(out.paced.latencies_ms['p99'])} ms, lost "
                  f"{out.paced.lost_pct:.2f}% / {out.max.lost_pct:.2f}%",
                  file=sys.stderr, flush=True)
        else:
            print(f"    {out.skipped}", file=sys.stderr, flush=True)
        results.append(out)
    return results


def median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


def report_big(results: list[BigResult], args: argparse.Namespace) -> str:
    lines = [
        f"Big group: {args.big_members:,} members over {args.big_nodes} node processes, "
        f"{args.big_sends} group_sends one at a time.",
        "",
        "| layer | group_send call median / p99 (ms) | send → last member median / max (ms) "
        "| lost | delivered / expected | node CPU µs / delivery "
        "| call: sender CPU median (ms) | Redis: busiest command, µs / call |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        if r.skipped:
            lines.append(f"| {r.label} | skipped: {r.skipped} | | | | | | |")
            continue
        calls = sorted(r.call_ms)
        lines.append(
            f"| {r.label} | {fmt_ms(median(calls))} / {fmt_ms(percentile(calls, 0.99))} "
            f"| {fmt_ms(median(r.last_ms))} / {fmt_ms(max(r.last_ms, default=float('nan')))} "
            f"| {r.lost_pct:.2f}% | {r.received:,} / {r.expected:,} "
            f"| {r.node_us_per_delivery:.1f} | {median(r.call_cpu_ms):.2f} "
            f"| {r.redis_command or 'n/a'} {r.redis_us_per_call:.0f} |")
    return "\n".join(lines)


def report_rooms(results: list[RoomsResult], args: argparse.Namespace) -> str:
    lines = [
        f"Many rooms: {args.rooms:,} rooms of {args.room_size} over {args.room_nodes} node "
        f"processes, random rooms; paced {args.room_rate:g} sends/s for {args.room_seconds:g} s, "
        f"then back to back for up to {args.room_seconds:g} s.",
        "",
        "| layer | deliveries/s (back to back) | group_sends/s | p50 / p99 paced (ms) "
        "| lost paced / back to back | group_send call p50 (ms) | node CPU µs / delivery |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in results:
        if not (r.paced and r.max):
            lines.append(f"| {r.label} | skipped: {r.skipped} | | | | | |")
            continue
        lat = r.paced.latencies_ms
        lines.append(
            f"| {r.label} | {fmt_int(r.max.deliveries_per_s)} "
            f"| {fmt_int(r.max.sent / r.max.send_seconds if r.max.send_seconds else 0)} "
            f"| {fmt_ms(lat['p50'])} / {fmt_ms(lat['p99'])} "
            f"| {r.paced.lost_pct:.2f}% / {r.max.lost_pct:.2f}% | {r.paced.call_ms(0.5):.2f} "
            f"| {r.max.node_us_per_delivery:.1f} |")
    return "\n".join(lines)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of both scenarios (the suite, benchmarks.run, shares them)."""
    parser.add_argument("--big-members", type=int, default=10_000)
    parser.add_argument("--big-nodes", type=int, default=4)
    parser.add_argument("--big-sends", type=int, default=20)
    parser.add_argument("--rooms", type=int, default=2_000)
    parser.add_argument("--room-size", type=int, default=5)
    parser.add_argument("--room-nodes", type=int, default=3)
    parser.add_argument("--room-rate", type=float, default=500.0, help="paced sends per second")
    parser.add_argument("--room-seconds", type=float, default=5.0)
    parser.add_argument("--room-max-count", type=int, default=20_000)
    parser.add_argument("--idle", type=float, default=2.0,
                        help="a phase ends when no delivery arrived for this long")
    parser.add_argument("--drain-cap", type=float, default=20.0,
                        help="longest wait for deliveries after the last send")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--scenarios", default="big,rooms")
    parser.add_argument("--layers", default="core,pubsub,distrib")
    parser.add_argument("--redis-url", help="use this Redis instead of a private one")
    parser.add_argument("--cluster-url", help="also offer the layer 'cluster' on this node")
    add_arguments(parser)
    args = parser.parse_args(argv)
    if args.cluster_url:
        add_cluster_layer(args.cluster_url)
    keys = args.layers.split(",")

    def run(url: str) -> int:
        print(f"Machine: {machine_description(url)}\n")
        skipped = False
        if "big" in args.scenarios:
            big = run_big(url, keys, args)
            print(report_big(big, args) + "\n")
            skipped |= any(r.skipped for r in big)
        if "rooms" in args.scenarios:
            rooms = run_rooms(url, keys, args)
            print(report_rooms(rooms, args))
            skipped |= any(r.skipped for r in rooms)
        return 1 if skipped else 0

    if args.redis_url:
        return run(args.redis_url)
    with private_redis() as url:
        return run(url)


if __name__ == "__main__":
    sys.exit(main())
