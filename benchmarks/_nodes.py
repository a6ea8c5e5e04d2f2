"""The receiver side of bench_layers: one OS process per node, driven over a pipe.

A node builds its layer, creates ``channels`` process-local channels with ``new_channel()``,
adds each to the group, answers ``ready`` and then receives on every channel at once, the
way a daphne process with that many WebSocket consumers would. Every delivery is counted
per phase; in the latency phase the send timestamp in the message gives its latency
(sender and nodes share one host clock). Duplicates are counted per channel and phase.

Commands on the pipe (answered from the event loop, so answers never race the counters):
``("snapshot",)`` → counters and CPU seconds; ``("latencies", phase)`` → list of seconds;
``("stop",)`` → cancel the receivers, close the layer, exit.

Before it answers ``ready``, a node measures what its own receive loop costs per delivery
(:func:`harness_cost`: the loop over a stub layer, less the stub alone), so a report can show
node CPU per delivery net of the benchmark's bookkeeping, the same amount for every layer.
"""

from __future__ import annotations

import asyncio
import os
import sys
import time
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from typing import Any

from benchmarks._common import LAYERS, LayerSpec, delete_prefix

WARMUP, PACED, MAX, IDLE = 0, 1, 2, 3
PHASES = (WARMUP, PACED, MAX, IDLE)


@dataclass
class PhaseStats:
    count: int = 0
    first: float = 0.0
    last: float = 0.0
    dups: int = 0
    latencies: list[float] = field(default_factory=list)


@dataclass
class NodeStats:
    phases: dict[int, PhaseStats] = field(default_factory=lambda: {p: PhaseStats() for p in PHASES})
    errors: int = 0
    last_error: str = ""


async def receive_loop(layer: Any, channel: str, stats: NodeStats) -> None:
    """Receive on one channel until cancelled; errors are counted, never fatal.

    Kept lean, since its cost is in every layer's node CPU figure: duplicates are found by
    a set of send numbers per phase (no tuple per message). ``layer.receive`` is looked up
    on every call, as a consumer does (a layer's attribute lookup is part of its price).
    """
    seen: dict[int, set[int]] = {p: set() for p in PHASES}
    phases = stats.phases
    clock = time.time
    while True:
        try:
            message = await layer.receive(channel)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # e.g. channels_redis core's idle TimeoutError on redis-py 8
            stats.errors += 1
            stats.last_error = f"{type(exc).__name__}: {exc}"
            await asyncio.sleep(0.01)
            continue
        now = clock()
        number = message["p"]
        phase = phases[number]
        phase.count += 1
        if not phase.first:
            phase.first = now
        phase.last = now
        marks = seen[number]
        before = len(marks)
        marks.add(message["i"])
        if len(marks) == before:
            phase.dups += 1
        if number == PACED:
            phase.latencies.append(now - message["t"])


class _StubLayer:
    """A layer whose receive() hands out ready messages at once: what is left of a receive
    loop over it is the loop's own cost."""

    def __init__(self, count: int) -> None:
        self.left = count
        self.number = 0

    async def receive(self, channel: str) -> dict[str, Any]:
        if not self.left:
            raise asyncio.CancelledError  # the end of a calibration run
        self.left -= 1
        self.number += 1
        return {"type": "bench.message", "p": MAX, "i": self.number, "t": 0.0, "body": channel}


async def _stub_only(stub: _StubLayer) -> None:
    while True:
        await stub.receive("stub")


async def _cpu_of(coro: Any) -> float:
    started = time.process_time()
    try:
        await coro
    except asyncio.CancelledError:
        pass
    return time.process_time() - started


async def harness_cost(count: int = 20_000, runs: int = 5) -> float:
    """CPU µs per delivery that :func:`receive_loop` itself costs: the loop over a stub layer
    less the stub alone, the lowest of ``runs`` (what other processes add is never the
    loop's). The same for every layer: subtracting it compares layers net of the harness."""
    best = float("inf")
    for _ in range(runs):
        with_loop = await _cpu_of(receive_loop(_StubLayer(count), "stub", NodeStats()))
        alone = await _cpu_of(_stub_only(_StubLayer(count)))
        best = min(best, max(0.0, with_loop - alone))
    return 1e6 * best / count


def snapshot(stats: NodeStats) -> dict[str, Any]:
    return {
        "pid": os.getpid(),
        "cpu": time.process_time(),
        "phases": {p: (s.count, s.first, s.last, s.dups) for p, s in stats.phases.items()},
        "errors": stats.errors,
        "last_error": stats.last_error,
    }


async def close_layer(layer: Any) -> None:
    """Close whatever the layer offers: ``close()`` (ours), ``close_pools()`` (core), or
    ``flush()`` (pub/sub, where it only drops local state and connections)."""
    for name in ("close", "close_pools", "flush"):
        try:
            method = getattr(layer, name)
        except AttributeError:
            continue
        await method()
        return


def member_group(group: str, rooms: int, index: int, channels: int, i: int) -> str:
    """The group of channel ``i`` on node ``index``: ``group`` itself, or with ``rooms`` > 0
    room ``(index * channels + i) % rooms``, so every room has members on several nodes."""
    return f"{group}{(index * channels + i) % rooms}" if rooms else group


async def node_main(key: str, url: str, prefix: str, group: str, channels: int,
                    conn: Connection, rooms: int = 0, index: int = 0) -> None:
    layer = LAYERS[key].make(url, prefix)
    scrape_every = float(os.environ.get("BENCH_METRICS_SCRAPE", "0") or 0)
    if scrape_every > 0 and key == "distrib":
        start_scraper(layer, scrape_every)
    names = [await layer.new_channel() for _ in range(channels)]
    for i, name in enumerate(names):
        await layer.group_add(member_group(group, rooms, index, channels, i), name)
    stats = NodeStats()
    tasks = [asyncio.create_task(receive_loop(layer, name, stats)) for name in names]
    stop = asyncio.Event()

    def on_command() -> None:
        command = conn.recv()
        if command[0] == "snapshot":
            conn.send(snapshot(stats))
        elif command[0] == "latencies":
            conn.send(stats.phases[command[1]].latencies)
        elif command[0] == "stop":
            stop.set()

    loop = asyncio.get_running_loop()
    harness_us = await harness_cost()
    loop.add_reader(conn.fileno(), on_command)
    conn.send(("ready", os.getpid(), harness_us))
    try:
        await stop.wait()
    finally:
        loop.remove_reader(conn.fileno())
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await asyncio.wait_for(close_layer(layer), 10)


async def flush_prefix(spec: LayerSpec, url: str, prefix: str) -> None:
    """``flush()`` the layer's prefix (not pub/sub's: its flush only drops local state)."""
    layer = spec.make(url, prefix)
    try:
        if spec.key != "pubsub":
            await layer.flush()
    finally:
        await close_layer(layer)


def clean_up(spec: LayerSpec, url: str, prefix: str, timeout: float = 30.0) -> int:
    """After a run: flush the layer, then delete whatever is left under ``prefix``. Returns
    how many keys were left, or -1 when Redis could not be cleaned; a failure is printed
    (credentials scrubbed), never raised, so one broken layer keeps the others' figures."""
    from channels_distrib.masking import scrub

    try:
        asyncio.run(asyncio.wait_for(flush_prefix(spec, url, prefix), timeout))
    except Exception as exc:
        print(scrub(f"{spec.key}: flush failed: {exc!r}"), file=sys.stderr)
    try:
        return delete_prefix(url, prefix)
    except Exception as exc:
        print(scrub(f"{spec.key}: cleanup failed: {exc!r}"), file=sys.stderr)
        return -1


def start_scraper(layer: Any, every: float) -> None:
    """With BENCH_METRICS_SCRAPE=<seconds>: the metrics extra on, and this node's metrics
    rendered (as a Prometheus scrape would) from a thread every <seconds>, to measure what
    metrics cost a node."""
    import threading

    from prometheus_client import generate_latest

    from channels_distrib import metrics

    metrics.register(layer)

    def scrape() -> None:
        while True:
            generate_latest(metrics.REGISTRY)
            time.sleep(every)

    threading.Thread(target=scrape, name="bench-metrics-scrape", daemon=True).start()


def node_process(key: str, url: str, prefix: str, group: str, channels: int,
                 conn: Connection, rooms: int = 0, index: int = 0) -> None:
    """Entry point of a node process (spawned, so it starts with a clean interpreter)."""
    try:
        asyncio.run(node_main(key, url, prefix, group, channels, conn, rooms, index))
    except Exception as exc:
        # Tell the orchestrator instead of leaving it waiting for "ready".
        try:
            conn.send(("failed", f"{type(exc).__name__}: {exc}"))
        except OSError:
            pass
        raise
