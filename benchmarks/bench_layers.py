"""Layer-level benchmark: channels_redis core, channels_redis pub/sub and channels_distrib,
side by side in one run, on one Redis.

Scenario (DESIGN.md "Anchor figures"): ``--nodes`` receiver processes (3) with
``--channels`` process-local member channels each (100), all in one group; this process
is the sender. Per layer:

1. warm-up: 3 group_sends, every member must get them (proves the setup); then
   ``--idle-sends`` (40) group_sends ``--idle-gap`` (30 ms) apart, each call made while the
   nodes are idle: the group_send call time on an idle machine;
2. paced: ``--rate`` group_sends/s (100) for ``--paced-seconds`` (5 s): p50/p99 latency
   from the send timestamp carried in the message, and % lost (expected = sends x members);
3. max rate: the sender awaits group_send back to back, ``--max-count`` sends or
   ``--max-seconds``, whichever first; deliveries/s = deliveries / (last delivery - first send).

Each layer gets its own prefix; the run starts a private redis-server on a free loopback
port unless ``--redis-url`` is given, and deletes what it wrote either way. All processes
share one host: on a 2-core machine 3 nodes + sender + Redis compete for CPU, so the
report shows how many cores each side used.

    python -m benchmarks.bench_layers                  # all available layers
    python -m benchmarks.bench_layers --layers pubsub,distrib --profile /tmp/prof
    python -m benchmarks.bench_layers --layers distrib --cluster  # + channels_distrib on a 3-master Redis Cluster
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing as mp
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from multiprocessing.connection import Connection
from multiprocessing.process import BaseProcess
from typing import Any

if not __package__:  # run as a script: make `benchmarks` importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks._common import (
    LAYERS,
    LayerSpec,
    add_cluster_layer,
    add_extra_layers,
    machine_busy_seconds,
    machine_description,
    private_redis,
    redis_cpu_seconds,
    run_prefix,
    wait_quiet,
)
from benchmarks._nodes import IDLE, MAX, PACED, WARMUP, clean_up, close_layer, node_process
from benchmarks._results import (
    LayerResult,
    PhaseResult,
    fmt_int,
    fmt_ms,
    percentile,
    report,
    summarise,
)

GROUP = "bench"
BODY = "x" * 100  # a chat-sized payload


@dataclass
class Node:
    proc: BaseProcess
    conn: Connection
    harness_us: float = 0.0  # CPU µs per delivery of the node's own receive loop

    def ask(self, *command: Any, timeout: float = 10.0) -> Any:
        self.conn.send(command)
        if not self.conn.poll(timeout):
            raise TimeoutError(f"node {self.proc.pid} did not answer {command[0]}")
        reply = self.conn.recv()
        if isinstance(reply, tuple) and reply and reply[0] == "failed":
            raise RuntimeError(f"node {self.proc.pid} failed: {reply[1]}")
        return reply


# -- orchestration -----------------------------------------------------------------------


def start_nodes(spec: LayerSpec, url: str, prefix: str, args: argparse.Namespace) -> list[Node]:
    ctx = mp.get_context("spawn")
    nodes: list[Node] = []
    rooms = getattr(args, "rooms", 0)  # > 0: the many-rooms scenario (bench_groups)
    for index in range(args.nodes):
        parent, child = ctx.Pipe()
        proc = ctx.Process(target=node_process, daemon=True,
                           args=(spec.key, url, prefix, GROUP, args.channels, child,
                                 rooms, index))
        proc.start()
        child.close()
        nodes.append(Node(proc, parent))
    for node in nodes:
        if not node.conn.poll(args.ready_timeout if "ready_timeout" in args else 60):
            raise TimeoutError(f"node {node.proc.pid} not ready in time")
        reply = node.conn.recv()
        if reply[0] != "ready":
            raise RuntimeError(f"node {node.proc.pid} failed to start: {reply[1]}")
        node.harness_us = reply[2]
    return nodes


def stop_nodes(nodes: list[Node]) -> None:
    """Ask each node to stop; end the ones that do not, by pid (they are ours)."""
    for node in nodes:
        try:
            node.conn.send(("stop",))
        except OSError:
            pass
    for node in nodes:
        node.proc.join(15)
        if node.proc.is_alive():
            node.proc.terminate()
            node.proc.join(5)
        if node.proc.is_alive():
            node.proc.kill()
            node.proc.join(5)
        node.conn.close()


def totals(nodes: list[Node], phase: int) -> tuple[int, int, float, float, list[dict[str, Any]]]:
    snaps = [node.ask("snapshot") for node in nodes]
    count = sum(s["phases"][phase][0] for s in snaps)
    dups = sum(s["phases"][phase][3] for s in snaps)
    firsts = [s["phases"][phase][1] for s in snaps if s["phases"][phase][1]]
    last = max((s["phases"][phase][2] for s in snaps), default=0.0)
    return count, dups, min(firsts, default=0.0), last, snaps


async def wait_drained(nodes: list[Node], phase: int, expected: int, idle: float,
                       cap: float) -> tuple[int, int, float, list[dict[str, Any]]]:
    """Poll the nodes until every expected delivery arrived, or none arrived for ``idle`` s,
    or ``cap`` s passed. Returns (received, duplicates, last delivery time, snapshots)."""
    deadline = time.monotonic() + cap
    seen, progress_at = -1, time.monotonic()
    while True:
        count, dups, _, last, snaps = totals(nodes, phase)
        now = time.monotonic()
        if count != seen:
            seen, progress_at = count, now
        if count >= expected or now - progress_at > idle or now > deadline:
            return count, dups, last, snaps
        await asyncio.sleep(0.1)


def cpu_sample(nodes: list[Node], url: str) -> dict[str, float]:
    snaps = [node.ask("snapshot") for node in nodes]
    return {"nodes": sum(s["cpu"] for s in snaps), "sender": time.process_time(),
            "redis": redis_cpu_seconds(url), "machine": machine_busy_seconds()}


def cores_used(before: dict[str, float], after: dict[str, float], wall: float) -> dict[str, float]:
    """Cores used per side over ``wall`` seconds; "others" is every process not in this run."""
    if wall <= 0:
        return {}
    used = {k: (after[k] - before[k]) / wall for k in before}
    used["others"] = max(0.0, used.pop("machine") - used["nodes"] - used["sender"] - used["redis"])
    return {k: round(v, 2) for k, v in used.items()}


# Send number -> (group, its member count); the default is (GROUP, every member).
Pick = Callable[[int], tuple[str, int]]


async def send_one(layer: Any, phase: int, i: int, result: PhaseResult,
                   group: str = GROUP, members: int = 0) -> None:
    """One timed group_send; ``members`` (the deliveries it should make) adds to expected."""
    message = {"type": "bench.message", "p": phase, "i": i, "t": time.time(), "body": BODY}
    started = time.perf_counter()
    try:
        await layer.group_send(group, message)
        result.sent += 1
        result.expected += members
        result.call_times.append(time.perf_counter() - started)
    except Exception:
        result.send_errors += 1


async def warm_up(layer: Any, nodes: list[Node], members: int) -> None:
    result = PhaseResult()
    for i in range(3):
        await send_one(layer, WARMUP, i, result)
        await asyncio.sleep(0.1)
    count, _, _, _ = await wait_drained(nodes, WARMUP, 3 * members, idle=5, cap=10)
    if count < 3 * members:
        raise RuntimeError(f"warm-up delivered {count} of {3 * members}: setup is broken")


async def idle_phase(layer: Any, nodes: list[Node], url: str, members: int,
                     args: argparse.Namespace) -> PhaseResult:
    """``idle_sends`` group_sends one at a time, ``idle_gap`` s apart: the previous send's
    deliveries are done (about a millisecond of node CPU) before the next call starts, so
    each call runs while the receiving nodes are idle. This is the call time "on an idle
    machine" when nothing outside the run is busy; ``cpu["others"]`` shows whether it was."""
    result = PhaseResult()
    before = cpu_sample(nodes, url)
    start = time.monotonic()
    for i in range(args.idle_sends):
        await asyncio.sleep(args.idle_gap)
        await send_one(layer, IDLE, i, result, GROUP, members)
    result.send_seconds = time.monotonic() - start
    result.received, result.dups, _, _ = await wait_drained(
        nodes, IDLE, result.expected, idle=args.idle, cap=args.drain_cap)
    result.elapsed = time.monotonic() - start
    after = cpu_sample(nodes, url)
    result.cpu = cores_used(before, after, result.elapsed)
    result.cpu_seconds = {k: after[k] - before[k] for k in before}
    return result


async def paced_phase(layer: Any, nodes: list[Node], url: str, members: int,
                      args: argparse.Namespace, pick: Pick | None = None) -> PhaseResult:
    """``rate`` sends/s for ``paced_seconds``; ``members`` is the deliveries one send makes."""
    result = PhaseResult()
    total = int(args.rate * args.paced_seconds)
    before = cpu_sample(nodes, url)
    start = time.monotonic()
    t0 = time.time()
    for i in range(total):
        delay = start + i / args.rate - time.monotonic()
        if delay > 0:
            await asyncio.sleep(delay)
        await send_one(layer, PACED, i, result, *(pick(i) if pick else (GROUP, members)))
    result.send_seconds = time.monotonic() - start
    result.received, result.dups, last, _ = await wait_drained(
        nodes, PACED, result.expected, idle=args.idle, cap=args.drain_cap)
    result.elapsed = max(last - t0, result.send_seconds)
    after = cpu_sample(nodes, url)
    result.cpu = cores_used(before, after, result.elapsed)
    result.cpu_seconds = {k: after[k] - before[k] for k in before}
    latencies: list[float] = []
    for node in nodes:
        latencies.extend(node.ask("latencies", PACED, timeout=30))
    latencies.sort()
    result.latencies_ms = {
        "p50": 1000 * percentile(latencies, 0.50),
        "p99": 1000 * percentile(latencies, 0.99),
        "max": 1000 * latencies[-1] if latencies else float("nan"),
    }
    return result


async def max_phase(layer: Any, nodes: list[Node], url: str, members: int,
                    args: argparse.Namespace, profilers: list[subprocess.Popen[bytes]],
                    pick: Pick | None = None) -> PhaseResult:
    result = PhaseResult()
    before = cpu_sample(nodes, url)
    start_profilers(args, nodes, profilers)
    t0 = time.time()
    start = time.monotonic()
    for i in range(args.max_count):
        if time.monotonic() - start > args.max_seconds:
            break
        await send_one(layer, MAX, i, result, *(pick(i) if pick else (GROUP, members)))
    result.send_seconds = time.monotonic() - start
    result.received, result.dups, last, _ = await wait_drained(
        nodes, MAX, result.expected, idle=args.idle, cap=args.drain_cap)
    result.elapsed = (last - t0) if last else result.send_seconds
    after = cpu_sample(nodes, url)
    result.cpu = cores_used(before, after, result.elapsed)
    result.cpu_seconds = {k: after[k] - before[k] for k in before}
    result.harness_us = sum(node.harness_us for node in nodes) / len(nodes)
    return result


def start_profilers(args: argparse.Namespace, nodes: list[Node],
                    profilers: list[subprocess.Popen[bytes]]) -> None:
    """py-spy on node 0 and the sender for the max-rate phase (processes this run started)."""
    if not args.profile:
        return
    py_spy = shutil.which("py-spy") or os.path.join(os.path.dirname(sys.executable), "py-spy")
    if not os.path.exists(py_spy):
        print("--profile: py-spy not found (pip install py-spy)", file=sys.stderr)
        return
    os.makedirs(args.profile, exist_ok=True)
    targets = {"node0": nodes[0].proc.pid, "sender": os.getpid()}
    for name, pid in targets.items():
        out = os.path.join(args.profile, f"{args.current}-{name}.txt")
        profilers.append(subprocess.Popen(
            [py_spy, "record", "--pid", str(pid), "--duration", str(int(args.max_seconds) + 1),
             "--rate", "250", "--format", "raw", "--nonblocking", "-o", out],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))


async def drive(spec: LayerSpec, url: str, prefix: str, nodes: list[Node],
                args: argparse.Namespace, out: LayerResult) -> None:
    members = args.nodes * args.channels
    layer = spec.make(url, prefix)
    profilers: list[subprocess.Popen[bytes]] = []
    try:
        await warm_up(layer, nodes, members)
        if args.idle_sends:
            out.idle = await idle_phase(layer, nodes, url, members, args)
        await asyncio.sleep(0.5)
        out.paced = await paced_phase(layer, nodes, url, members, args)
        await asyncio.sleep(0.5)
        out.max = await max_phase(layer, nodes, url, members, args, profilers)
    finally:
        for prof in profilers:
            try:
                prof.wait(30)
            except subprocess.TimeoutExpired:
                prof.kill()
                prof.wait(5)
        await close_layer(layer)


def run_layer(spec: LayerSpec, url: str, args: argparse.Namespace) -> LayerResult:
    out = LayerResult(spec.key, spec.label)
    reason = spec.available()
    if reason:
        out.skipped = reason
        return out
    url = spec.server(url)
    prefix = run_prefix(spec.key)
    args.current = spec.key
    nodes: list[Node] = []
    try:
        nodes = start_nodes(spec, url, prefix, args)
        asyncio.run(drive(spec, url, prefix, nodes, args, out))
        snaps = [node.ask("snapshot") for node in nodes]
        out.receive_errors = sum(s["errors"] for s in snaps)
        out.last_receive_error = next((s["last_error"] for s in snaps if s["last_error"]), "")
    except Exception as exc:
        out.skipped = f"failed: {type(exc).__name__}: {exc}"
    finally:
        stop_nodes(nodes)
        out.keys_left = clean_up(spec, url, prefix)
    return out


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--layers", default="core,pubsub,distrib",
                        help="comma-separated subset of: " + ", ".join(LAYERS))
    parser.add_argument("--redis-url", help="use this Redis instead of a private one")
    parser.add_argument("--cluster-url", help="also offer channels_distrib on this Redis "
                        "Cluster node as the layer 'cluster' (add it to --layers)")
    parser.add_argument("--cluster", action="store_true",
                        help="start a private 3-master Redis Cluster and add the layer "
                        "'cluster' (channels_distrib on it) to --layers")
    parser.add_argument("--extra-layer", action="append", default=[], metavar="KEY=PATH",
                        help="also offer this layer class as KEY for --layers (e.g. a "
                        "subclass under trial; its module must be importable)")
    parser.add_argument("--nodes", type=int, default=3)
    parser.add_argument("--channels", type=int, default=100, help="member channels per node")
    parser.add_argument("--rate", type=float, default=100.0, help="paced group_sends per second")
    parser.add_argument("--paced-seconds", type=float, default=5.0)
    parser.add_argument("--max-count", type=int, default=3000)
    parser.add_argument("--max-seconds", type=float, default=5.0)
    parser.add_argument("--idle-sends", type=int, default=40,
                        help="group_sends one at a time with the nodes idle, for the call "
                        "time on an idle machine (0: skip that phase)")
    parser.add_argument("--idle-gap", type=float, default=0.03,
                        help="seconds between those sends (the nodes finish well within it)")
    parser.add_argument("--idle", type=float, default=2.0,
                        help="a phase ends when no delivery arrived for this long")
    parser.add_argument("--drain-cap", type=float, default=15.0,
                        help="longest wait for deliveries after the last send")
    parser.add_argument("--rounds", type=int, default=1,
                        help="repeat the layers, interleaved; see summarise() for how rounds "
                        "are combined")
    parser.add_argument("--quiet-wait", type=float, default=0.0, metavar="SECONDS",
                        help="before each layer, wait up to this long for the machine to be "
                        "idle (under 0.3 busy cores), for steadier figures on a shared host")
    parser.add_argument("--json", help="also write the raw results to this file")
    parser.add_argument("--profile", help="py-spy node 0 and the sender during max rate, "
                        "raw stacks into this directory")
    args = parser.parse_args(argv)
    for extra in args.extra_layer:
        add_extra_layers(extra)
    if args.cluster_url:
        add_cluster_layer(args.cluster_url)
    keys = args.layers.split(",")
    if args.cluster and "cluster" not in keys:
        keys.append("cluster")
        args.layers = ",".join(keys)
    unknown = set(keys) - set(LAYERS) - ({"cluster"} if args.cluster else set())
    if unknown:
        parser.error(f"unknown layers: {', '.join(sorted(unknown))}")
    if len(set(keys)) != len(keys):
        parser.error("a layer is listed twice; use --rounds to repeat")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    started = time.monotonic()
    cluster = None
    if args.cluster:
        from tests.helpers_cluster import start_cluster

        cluster = start_cluster(3)
        add_cluster_layer(cluster.url)
    try:
        if args.redis_url:
            return run_all(args.redis_url, args, started)
        with private_redis() as url:
            return run_all(url, args, started)
    finally:
        if cluster is not None:
            cluster.stop()


def run_all(url: str, args: argparse.Namespace, started: float) -> int:
    machine = machine_description(url)
    keys = args.layers.split(",")
    rounds = run_rounds(url, args)
    results = [summarise(rounds[key]) for key in keys]
    text = report(results, machine, args)
    print(text)
    print(f"\n(run took {time.monotonic() - started:.0f} s)", file=sys.stderr)
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"machine": machine, "args": vars(args),
                       "rounds": {k: [asdict(r) for r in v] for k, v in rounds.items()}},
                      fh, indent=1)
    return 0 if all(not r.skipped for r in results) else 1


def run_rounds(url: str, args: argparse.Namespace) -> dict[str, list[LayerResult]]:
    """Every layer of ``--layers``, ``--rounds`` times, interleaved; one result per round."""
    keys = args.layers.split(",")
    rounds: dict[str, list[LayerResult]] = {key: [] for key in keys}
    for number in range(args.rounds):
        for key in keys:  # interleaved, so a burst of outside load hits every layer alike
            print(f"... round {number + 1}/{args.rounds}: {key}", file=sys.stderr, flush=True)
            if args.quiet_wait > 0:
                busy = wait_quiet(args.quiet_wait)
                print(f"    other load before start: {busy:.2f} cores", file=sys.stderr)
            result = run_layer(LAYERS[key], url, args)
            rounds[key].append(result)
            if result.paced and result.max:
                print(f"    {fmt_int(result.max.deliveries_per_s)} deliveries/s, p50/p99 "
                      f"{fmt_ms(result.paced.latencies_ms['p50'])}/"
                      f"{fmt_ms(result.paced.latencies_ms['p99'])} ms, lost "
                      f"{result.paced.lost_pct:.2f}%", file=sys.stderr, flush=True)
            elif result.skipped:
                print(f"    {result.skipped}", file=sys.stderr, flush=True)
    return rounds


if __name__ == "__main__":
    sys.exit(main())
