"""End-to-end benchmark: ASGI server nodes, real WebSocket clients, one layer at a time.

Per layer, server (``--servers``: daphne, uvicorn) and stage (``--stages``, ``CLIENTSxRATE``,
default ``150x20,300x60``): ``--nodes`` server processes (3) serve ``benchmarks.e2e_app`` (a
plain Channels consumer: ``/ws/<room>`` joins the group ``<room>``); CLIENTS WebSocket
clients (``websockets``) in one client process connect round-robin over the nodes and
``--rooms`` rooms (5), so every room has members on every node. This process then
``group_send``s RATE messages per second per room for ``--seconds`` (5) through the layer,
each carrying its send time; the clients measure latency to the WebSocket frame and count
loss (expected = sends x clients in the room).

    python -m benchmarks.bench_e2e
    python -m benchmarks.bench_e2e --servers uvicorn --stages 300x60
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing as mp
import os
import subprocess
import sys
import time
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from typing import Any

if not __package__:  # run as a script: make `benchmarks` importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks._common import (
    LAYERS,
    ROOT,
    LayerSpec,
    add_cluster_layer,
    free_port,
    machine_description,
    ping_tcp,
    private_redis,
    proc_cpu_seconds,
    run_prefix,
)
from benchmarks._nodes import clean_up, close_layer

SERVERS = ("daphne", "uvicorn")


@dataclass
class E2EResult:
    label: str
    key: str = ""
    server: str = "daphne"
    clients: int = 0
    rate: float = 0.0
    sent: int = 0
    expected: int = 0
    received: int = 0
    p50_ms: float = float("nan")
    p99_ms: float = float("nan")
    connect_failures: int = 0
    daphne_cpu: float = 0.0  # CPU seconds all server nodes (daphne or uvicorn) used while sending
    client_cpu: float = 0.0
    notes: list[str] = field(default_factory=list)

    @property
    def lost_pct(self) -> float:
        return 100.0 * max(0, self.expected - self.received) / self.expected if self.expected else 0.0


# -- client process ------------------------------------------------------------------------


async def client(url: str, room: str, stats: dict[str, Any], ready: asyncio.Event) -> None:
    from websockets.asyncio.client import connect

    try:
        async with connect(url, max_queue=None, ping_interval=None) as ws:
            if await asyncio.wait_for(ws.recv(), 20) != "ready":
                raise RuntimeError("no ready frame")
            stats["connected"] += 1
            if stats["connected"] == stats["clients"]:
                ready.set()
            async for frame in ws:  # until the task is cancelled at the end of the run
                now = time.time()
                data = json.loads(frame)
                if data["phase"] == "run":
                    stats["received"] += 1
                    stats["latencies"].append(now - data["t"])
                else:
                    stats["warm"][room] = stats["warm"].get(room, 0) + 1
    except Exception as exc:  # counted, reported; the run goes on without this client
        stats["failures"] += 1
        stats["error"] = f"{type(exc).__name__}: {exc}"
        if stats["connected"] + stats["failures"] == stats["clients"]:
            ready.set()


async def clients_main(urls: list[tuple[str, str]], conn: Connection) -> None:
    stats: dict[str, Any] = {"clients": len(urls), "connected": 0, "failures": 0,
                             "received": 0, "latencies": [], "warm": {}, "error": ""}
    ready, stop = asyncio.Event(), asyncio.Event()
    tasks = []
    for url, room in urls:
        tasks.append(asyncio.create_task(client(url, room, stats, ready)))
        await asyncio.sleep(0.002)  # a gentle connect ramp
    try:
        await asyncio.wait_for(ready.wait(), max(60.0, len(urls) / 50))
    except asyncio.TimeoutError:
        pass
    conn.send({"connected": stats["connected"], "failures": stats["failures"],
               "error": stats["error"]})
    loop = asyncio.get_running_loop()

    def on_command() -> None:
        command = conn.recv()
        if command == "stats":
            conn.send({k: v for k, v in stats.items() if k != "latencies"})
        elif command == "latencies":
            conn.send(stats["latencies"])
        elif command == "stop":
            stop.set()

    loop.add_reader(conn.fileno(), on_command)
    await stop.wait()
    loop.remove_reader(conn.fileno())
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)


def clients_process(urls: list[tuple[str, str]], conn: Connection) -> None:
    asyncio.run(clients_main(urls, conn))


# -- orchestration -------------------------------------------------------------------------


def server_command(server: str, port: int) -> list[str]:
    """The command line serving ``benchmarks.e2e_app`` with ``server`` on ``port``."""
    app = "benchmarks.e2e_app:application"
    if server == "daphne":
        return [sys.executable, "-m", "daphne", "-b", "127.0.0.1", "-p", str(port), app]
    if server == "uvicorn":  # the bare consumer speaks no lifespan protocol
        return [sys.executable, "-m", "uvicorn", app, "--host", "127.0.0.1", "--port",
                str(port), "--lifespan", "off", "--log-level", "warning", "--no-access-log"]
    raise ValueError(f"unknown server {server!r}; one of {', '.join(SERVERS)}")


def start_servers(spec: LayerSpec, url: str, prefix: str, count: int,
                  server: str = "daphne") -> list[tuple[int, subprocess.Popen[bytes]]]:
    """``count`` server processes on free ports, every one serving the layer ``spec``."""
    env = dict(os.environ, BENCH_BACKEND=spec.path, BENCH_REDIS=url, BENCH_PREFIX=prefix,
               BENCH_REDIS_CLUSTER="1" if spec.cluster else "",
               BENCH_CONFIG=json.dumps(dict(spec.config)), PYTHONPATH=ROOT)
    nodes = []
    for _ in range(count):
        port = free_port()
        proc = subprocess.Popen(server_command(server, port), cwd=ROOT, env=env,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        nodes.append((port, proc))
    deadline = time.monotonic() + 30
    for port, proc in nodes:
        while not ping_tcp("127.0.0.1", port):
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"{server} on port {port} did not start")
            time.sleep(0.1)
    return nodes


def start_clients(urls: list[tuple[str, str]]) -> tuple[mp.Process, Connection, dict[str, Any]]:
    """The client process with every WebSocket connected; returns it, its pipe and hello."""
    ctx = mp.get_context("spawn")
    parent, child = ctx.Pipe()
    proc = ctx.Process(target=clients_process, args=(urls, child), daemon=True)
    proc.start()
    child.close()
    if not parent.poll(max(90.0, len(urls) / 40)):
        raise TimeoutError(f"{len(urls)} clients did not connect in time")
    return proc, parent, parent.recv()


def stop_clients(proc: mp.Process | None, conn: Connection | None) -> None:
    if conn is not None:
        try:
            conn.send("stop")
        except OSError:
            pass
    if proc is not None:
        proc.join(30)
        if proc.is_alive():
            proc.terminate()
            proc.join(5)


def client_urls(ports: list[int], clients: int, rooms: int) -> tuple[list[tuple[str, str]], dict[str, int]]:
    """Client k joins room k % rooms on node k % nodes: every room has members on every node."""
    urls, per_room = [], {f"room{r}": 0 for r in range(rooms)}
    for k in range(clients):
        room = f"room{k % rooms}"
        per_room[room] += 1
        urls.append((f"ws://127.0.0.1:{ports[k % len(ports)]}/ws/{room}", room))
    return urls, per_room


def stop_process(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)


async def drive(spec: LayerSpec, url: str, prefix: str, conn: Connection, per_room: dict[str, int],
                args: argparse.Namespace, out: E2EResult, pids: list[int], client_pid: int) -> None:
    layer = spec.make(url, prefix)
    rooms = sorted(per_room)
    try:
        # Warm-up: every client must see one message from its room.
        for room in rooms:
            await layer.group_send(room, {"type": "room.message",
                                          "text": json.dumps({"phase": "warm", "t": 0})})
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            conn.send("stats")
            warm = conn.recv()["warm"]
            if all(warm.get(room, 0) >= per_room[room] for room in rooms):
                break
            await asyncio.sleep(0.1)
        else:
            out.notes.append(f"warm-up incomplete: {warm}")
        total = int(args.rate * args.seconds)
        daphne_before = sum(proc_cpu_seconds(pid) for pid in pids)
        client_before = proc_cpu_seconds(client_pid)
        start = time.monotonic()
        for i in range(total):
            delay = start + i / args.rate - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
            for room in rooms:
                text = json.dumps({"phase": "run", "t": time.time(), "i": i})
                try:
                    await layer.group_send(room, {"type": "room.message", "text": text})
                    out.sent += 1
                    out.expected += per_room[room]
                except Exception as exc:
                    out.notes.append(f"send failed: {exc!r}")
        seen, progress = -1, time.monotonic()
        while time.monotonic() - progress < 2 and time.monotonic() - start < args.seconds + 20:
            conn.send("stats")
            got = conn.recv()["received"]
            if got >= out.expected:
                break
            if got != seen:
                seen, progress = got, time.monotonic()
            await asyncio.sleep(0.2)
        out.daphne_cpu = sum(proc_cpu_seconds(pid) for pid in pids) - daphne_before
        out.client_cpu = proc_cpu_seconds(client_pid) - client_before
    finally:
        await close_layer(layer)


def run_layer(spec: LayerSpec, url: str, args: argparse.Namespace, server: str = "daphne",
              clients: int = 150, rate: float = 20.0) -> E2EResult:
    """One layer, server and stage: a fresh set of servers and clients, stopped at the end."""
    out = E2EResult(spec.label, spec.key, server, clients, rate)
    reason = spec.available()
    if reason:
        out.notes.append(f"skipped: {reason}")
        return out
    url = spec.server(url)
    prefix = run_prefix(spec.key)
    daphnes: list[tuple[int, subprocess.Popen[bytes]]] = []
    proc = None
    parent = None
    args = argparse.Namespace(**{**vars(args), "rate": rate})
    try:
        daphnes = start_servers(spec, url, prefix, args.nodes, server)
        urls, per_room = client_urls([port for port, _ in daphnes], clients, args.rooms)
        proc, parent, hello = start_clients(urls)
        out.connect_failures = hello["failures"]
        if hello["failures"]:
            out.notes.append(f"{hello['failures']} clients failed: {hello['error']}")
        asyncio.run(drive(spec, url, prefix, parent, per_room, args, out,
                          [d.pid for _port, d in daphnes], proc.pid or 0))
        parent.send("stats")
        out.received = parent.recv()["received"]
        parent.send("latencies")
        latencies = sorted(parent.recv())
        if latencies:
            out.p50_ms = 1000 * latencies[len(latencies) // 2]
            out.p99_ms = 1000 * latencies[min(len(latencies) - 1, int(0.99 * len(latencies)))]
    except Exception as exc:
        out.notes.append(f"failed: {type(exc).__name__}: {exc}")
    finally:
        stop_clients(proc, parent)
        for _port, daphne in daphnes:
            stop_process(daphne)
        clean_up(spec, url, prefix)
    return out


def report(results: list[E2EResult], machine: str, args: argparse.Namespace) -> str:
    lines = [
        f"Machine: {machine}",
        f"Scenario: {args.nodes} server nodes, WebSocket clients in {args.rooms} rooms, "
        f"msg/s per room for {args.seconds:g} s per stage.",
        "",
        *report_rows(results),
    ]
    return "\n".join(lines)


def report_rows(results: list[E2EResult]) -> list[str]:
    lines = [
        "| layer | server | clients | msg/s per room | p50 / p99 (ms) | lost "
        "| delivered / expected | server CPU µs / frame | client CPU µs / frame | notes |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        per = 1e6 / r.received if r.received else 0.0
        lines.append(f"| {r.label} | {r.server} | {r.clients} | {r.rate:g} "
                     f"| {r.p50_ms:,.1f} / {r.p99_ms:,.1f} | {r.lost_pct:.2f}% "
                     f"| {r.received:,} / {r.expected:,} | {r.daphne_cpu * per:,.0f} "
                     f"| {r.client_cpu * per:,.0f} | {'; '.join(r.notes)} |")
    return lines


def parse_stages(text: str) -> list[tuple[int, float]]:
    """``"150x20,300x60"`` -> [(150, 20.0), (300, 60.0)]: clients x msg/s per room."""
    stages = []
    for item in filter(None, text.split(",")):
        clients, sep, rate = item.partition("x")
        if not sep:
            raise ValueError(f"stage {item!r} is not CLIENTSxRATE, e.g. 150x20")
        stages.append((int(clients), float(rate)))
    return stages


def run_all(url: str, keys: list[str], args: argparse.Namespace) -> list[E2EResult]:
    """Every stage, server and layer (layers innermost, so they alternate)."""
    results = []
    for clients, rate in parse_stages(args.stages):
        for server in args.servers.split(","):
            for key in keys:
                print(f"... end to end: {key} under {server}, {clients} clients at {rate:g} "
                      "msg/s per room", file=sys.stderr, flush=True)
                r = run_layer(LAYERS[key], url, args, server, clients, rate)
                print(f"    p50/p99 {r.p50_ms:,.1f}/{r.p99_ms:,.1f} ms, lost {r.lost_pct:.2f}%"
                      + (f" ({'; '.join(r.notes)})" if r.notes else ""),
                      file=sys.stderr, flush=True)
                results.append(r)
    return results


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--servers", default="daphne,uvicorn",
                        help="comma-separated: " + ", ".join(SERVERS))
    parser.add_argument("--stages", default="150x20,300x60",
                        help="comma-separated CLIENTSxRATE (msg/s per room) stages")
    parser.add_argument("--rooms", type=int, default=5)
    parser.add_argument("--seconds", type=float, default=5.0, help="seconds of sending per stage")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="ASGI server + WebSocket end-to-end benchmark")
    parser.add_argument("--layers", default="core,pubsub,distrib")
    parser.add_argument("--redis-url")
    parser.add_argument("--cluster-url", help="also offer the layer 'cluster' on this node")
    parser.add_argument("--nodes", type=int, default=3)
    add_arguments(parser)
    args = parser.parse_args(argv)
    if args.cluster_url:
        add_cluster_layer(args.cluster_url)
    parse_stages(args.stages)

    def run(url: str) -> int:
        results = run_all(url, args.layers.split(","), args)
        print(report(results, machine_description(url), args))
        return 0 if all(not r.notes for r in results) else 1

    if args.redis_url:
        return run(args.redis_url)
    with private_redis() as url:
        return run(url)


if __name__ == "__main__":
    sys.exit(main())
