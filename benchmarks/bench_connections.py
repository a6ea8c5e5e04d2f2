"""Connections: as many concurrent WebSocket connections as the machine holds, per layer.

Per layer: ``--nodes`` server processes (3, ``--server`` uvicorn or daphne) serve
``benchmarks.e2e_app``; one client process opens ``--connections`` WebSockets (5,000),
round-robin over the nodes, each in one of ``--rooms`` rooms (100). Measured once every
client got its ``ready`` frame and 2 s passed: the servers' RSS growth per connection, the
growth of Redis ``used_memory`` (client buffers excluded, as bench_memory does) per
connection, and ``--broadcasts`` (3) broadcasts, one group_send per room, each stamped with
its start: the time until the last connection received it, and loss.

    python -m benchmarks.bench_connections --connections 5000
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from multiprocessing.connection import Connection

if not __package__:  # run as a script: make `benchmarks` importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks._common import (
    LAYERS,
    LayerSpec,
    add_cluster_layer,
    machine_description,
    private_redis,
    proc_rss_bytes,
    run_prefix,
)
from benchmarks._nodes import clean_up, close_layer
from benchmarks.bench_e2e import (
    client_urls,
    start_clients,
    start_servers,
    stop_clients,
    stop_process,
)
from benchmarks.bench_memory import settled_memory


@dataclass
class ConnResult:
    key: str
    label: str
    server: str
    wanted: int = 0
    connected: int = 0
    rss_per_conn: float = 0.0  # bytes, summed over the server processes
    redis_per_conn: float = 0.0  # bytes
    reach_ms: list[float] = field(default_factory=list)  # per broadcast: start -> last frame
    expected: int = 0
    received: int = 0
    notes: list[str] = field(default_factory=list)

    @property
    def lost_pct(self) -> float:
        return 100.0 * max(0, self.expected - self.received) / self.expected if self.expected else 0.0


def ask(conn: Connection, command: str) -> object:
    conn.send(command)
    return conn.recv()


async def broadcasts(spec: LayerSpec, url: str, prefix: str, conn: Connection,
                     per_room: dict[str, int], args: argparse.Namespace, out: ConnResult) -> None:
    """``--broadcasts`` times: one group_send per room, then wait until every client has it."""
    layer = spec.make(url, prefix)
    try:
        for b in range(args.broadcasts):
            start = time.time()
            text = json.dumps({"phase": "run", "t": start, "i": b})
            for room in per_room:
                await layer.group_send(room, {"type": "room.message", "text": text})
            out.expected += out.connected
            seen, progress = -1, time.monotonic()
            while time.monotonic() - progress < args.idle:
                got = ask(conn, "stats")["received"]  # type: ignore[index]
                if got >= out.expected:
                    break
                if got != seen:
                    seen, progress = got, time.monotonic()
                await asyncio.sleep(0.05)
            latencies = ask(conn, "latencies")
            assert isinstance(latencies, list)
            mine = latencies[out.received:]
            out.received = len(latencies)
            if mine:
                out.reach_ms.append(1000 * max(mine))
            await asyncio.sleep(0.5)
    finally:
        await close_layer(layer)


def run_layer(spec: LayerSpec, url: str, args: argparse.Namespace) -> ConnResult:
    out = ConnResult(spec.key, spec.label, args.server, wanted=args.connections)
    reason = spec.available()
    if reason:
        out.notes.append(f"skipped: {reason}")
        return out
    url = spec.server(url)
    prefix = run_prefix(spec.key)
    servers: list[tuple[int, subprocess.Popen[bytes]]] = []
    proc, conn = None, None
    try:
        servers = start_servers(spec, url, prefix, args.nodes, args.server)
        time.sleep(1.0)
        rss_before = sum(proc_rss_bytes(p.pid) for _port, p in servers)
        redis_before = settled_memory(url)
        urls, per_room = client_urls([port for port, _ in servers], args.connections, args.rooms)
        proc, conn, hello = start_clients(urls)
        out.connected = int(hello["connected"])
        if hello["failures"]:
            out.notes.append(f"{hello['failures']} connections failed: {hello['error']}")
        time.sleep(2.0)
        if out.connected:
            rss = sum(proc_rss_bytes(p.pid) for _port, p in servers) - rss_before
            out.rss_per_conn = rss / out.connected
            out.redis_per_conn = (settled_memory(url) - redis_before) / out.connected
            asyncio.run(broadcasts(spec, url, prefix, conn, per_room, args, out))
    except Exception as exc:
        out.notes.append(f"failed: {type(exc).__name__}: {exc}")
    finally:
        stop_clients(proc, conn)
        for _port, server in servers:
            stop_process(server)
        clean_up(spec, url, prefix)
    return out


def run_all(url: str, keys: list[str], args: argparse.Namespace) -> list[ConnResult]:
    results = []
    for key in keys:
        print(f"... connections: {key} under {args.server}, {args.connections:,} WebSockets "
              f"in {args.rooms} rooms", file=sys.stderr, flush=True)
        r = run_layer(LAYERS[key], url, args)
        print(f"    {r.connected:,} connected, RSS {r.rss_per_conn / 1024:,.1f} KiB and Redis "
              f"{r.redis_per_conn:,.0f} B per connection, broadcast reached all in "
              f"{median(r.reach_ms):,.0f} ms, lost {r.lost_pct:.2f}%"
              + (f" ({'; '.join(r.notes)})" if r.notes else ""), file=sys.stderr, flush=True)
        results.append(r)
    return results


def median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


def report_rows(results: list[ConnResult]) -> list[str]:
    lines = [
        "| layer | server | connected / wanted | server RSS per connection | Redis per connection "
        "| broadcast → all, median / max (ms) | lost | notes |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        lines.append(
            f"| {r.label} | {r.server} | {r.connected:,} / {r.wanted:,} "
            f"| {r.rss_per_conn / 1024:,.1f} KiB | {r.redis_per_conn:,.0f} B "
            f"| {median(r.reach_ms):,.0f} / {max(r.reach_ms, default=float('nan')):,.0f} "
            f"| {r.lost_pct:.2f}% | {'; '.join(r.notes)} |")
    return lines


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--connections", type=int, default=5_000)
    parser.add_argument("--conn-rooms", dest="rooms", type=int, default=100)
    parser.add_argument("--server", default="uvicorn", choices=("daphne", "uvicorn"))
    parser.add_argument("--broadcasts", type=int, default=3)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--layers", default="core,pubsub,distrib")
    parser.add_argument("--redis-url")
    parser.add_argument("--cluster-url", help="also offer the layer 'cluster' on this node")
    parser.add_argument("--nodes", type=int, default=3)
    parser.add_argument("--idle", type=float, default=5.0,
                        help="a broadcast ends when no frame arrived for this long")
    add_arguments(parser)
    args = parser.parse_args(argv)
    if args.cluster_url:
        add_cluster_layer(args.cluster_url)

    def run(url: str) -> int:
        results = run_all(url, args.layers.split(","), args)
        print(f"Machine: {machine_description(url)}\n")
        print("\n".join(report_rows(results)))
        return 0 if all(not r.notes for r in results) else 1

    if args.redis_url:
        return run(args.redis_url)
    with private_redis() as url:
        return run(url)


if __name__ == "__main__":
    sys.exit(main())
