"""The soak: churn and faults for minutes, then Redis must hold exactly what the consumers hold.

Run from the repository root::

    .venv/bin/python -m benchmarks.soak                 # 300 s of load, ~7 min in all
    .venv/bin/python -m benchmarks.soak --seconds 60    # the CI version, ~2.5 min
    .venv/bin/python -m benchmarks.soak --seconds 60 --cluster  # on a 3-master Redis Cluster
    .venv/bin/python -m benchmarks.soak --seconds 60 --cluster --replicas 1 --node-timeout 8

``--nodes`` node processes (``benchmarks/_soak_node.py``, default 3) each hold ``--consumers``
consumers and churn them (connect, join, leave, disconnect: ``--rate`` operations a second in
total) while this process sends group messages to the rooms and direct messages to live
channels. Every ``--cycle`` seconds (60) the faults come once each, in this order: a Redis
restart (kill, then an empty server on the same port; only with the soak's own server; with
``--cluster``, one master of the soak's own 3-master cluster, each in turn; with
``--replicas`` too, a failover: a master SIGKILLed until a replica has taken over, then
started again empty, as a replica), a
CLIENT KILL storm against every connection named ``distrib:<prefix>``, and one node SIGKILLed
and started again (never node 0, so one node lives through the whole run for the RSS figure;
last, so what the dead node leaves behind is still there for the checker).

Before the load (after a warm-up) and after it (load stopped, every node reset to the same
shape of consumers, 2 x ``expiry`` waited) the checker compares Redis, through the public
registry API, with what the live consumers hold, and reads keys and memory from Redis:

- 0 ghost members (listed by ``group_channels`` but held by no live consumer), 0 missing
  members, ``nodes()`` = the live node processes;
- 0 keys matching ``<prefix>:*`` without a TTL;
- key count after = key count before (same shape of consumers, so the same keys are owned);
  both are reported with the count before any node started;
- ``used_memory`` after within 5 % of before;
- RSS of node 0 grows at most 5 % from minute 2 (a third of the run when shorter) to the end;
- no consumer saw an exception and no node process died.

It prints a line per phase and a table, and exits 1 when a check fails. Observations of Redis
go through ``RedisObserver``, the one place a Redis Cluster run has to change (SCAN and INFO
per master); ``--redis-url`` may be given several times for that. With ``--redis-url`` the
soak cannot restart Redis and says so.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import random
import secrets
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from typing import Any

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)
os.environ.setdefault("DJANGO_SETTINGS_MODULE", "tests.settings")

from benchmarks._common import read_json_lines  # noqa: E402
from benchmarks._soak_node import ALL_GROUP, room_name  # noqa: E402


def log(text: str) -> None:
    print(f"[soak {time.strftime('%H:%M:%S')}] {text}", flush=True)


# ---------------------------------------------------------------- node processes


class NodeHandle:
    """One ``benchmarks._soak_node`` process; replies to commands are read by a thread."""

    def __init__(self, hosts: list[Any], prefix: str, *, consumers: int, rooms: int,
                 rate: float, record: bool = False, presence: bool = True,
                 timings: dict[str, float] | None = None, seed: int | None = None) -> None:
        argv = [sys.executable, "-m", "benchmarks._soak_node", "--hosts", json.dumps(hosts),
                "--prefix", prefix, "--consumers", str(consumers), "--rooms", str(rooms),
                "--rate", str(rate)]
        if record:
            argv.append("--record")
        if presence:
            argv.append("--presence")
        if seed is not None:
            argv += ["--seed", str(seed)]
        for name, value in (timings or {}).items():
            argv += ["--" + name.replace("_", "-"), str(value)]
        self.stderr_path = os.path.join(
            os.environ.get("TMPDIR", "/tmp"), f"soak-node-{secrets.token_hex(4)}.log"
        )
        self._stderr = open(self.stderr_path, "wb")  # noqa: SIM115 (closed in cleanup)
        env = {**os.environ, "PYTHONPATH": ROOT, "PYTHONUNBUFFERED": "1"}
        self.proc = subprocess.Popen(argv, cwd=ROOT, env=env, stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, stderr=self._stderr)
        self.pid = self.proc.pid
        self.events: list[dict[str, Any]] = []
        self.node_id = ""
        self._lock = threading.Lock()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        read_json_lines(self.proc.stdout, self.events, self._lock)

    def snapshot(self) -> list[dict[str, Any]]:
        with self._lock:
            return list(self.events)

    def consumer_errors(self) -> list[dict[str, Any]]:
        return [e for e in self.snapshot() if e.get("event") == "error"]

    def alive(self) -> bool:
        return self.proc.poll() is None

    def stderr_tail(self, chars: int = 3000) -> str:
        try:
            with open(self.stderr_path, "rb") as handle:
                return handle.read().decode(errors="replace")[-chars:]
        except OSError:
            return ""

    async def wait_event(self, predicate: Any, timeout: float, start: int = 0) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while True:
            for event in self.snapshot()[start:]:
                if predicate(event):
                    return event
            if not self.alive() and not self._reader.is_alive():
                raise RuntimeError(
                    f"node pid {self.pid} exited ({self.proc.returncode}): {self.stderr_tail()}"
                )
            if time.monotonic() > deadline:
                raise RuntimeError(f"node pid {self.pid}: no answer within {timeout} s")
            await asyncio.sleep(0.02)

    async def ready(self, timeout: float = 60.0) -> None:
        event = await self.wait_event(lambda e: e.get("event") in ("ready", "error"), timeout)
        if event["event"] != "ready":
            raise RuntimeError(f"node pid {self.pid} failed to start: {event}")
        self.node_id = str(event["node_id"])

    async def command(self, cmd: str, timeout: float = 60.0, **fields: Any) -> dict[str, Any]:
        start = len(self.snapshot())
        assert self.proc.stdin is not None
        self.proc.stdin.write((json.dumps({"cmd": cmd, **fields}) + "\n").encode())
        self.proc.stdin.flush()
        reply = await self.wait_event(
            lambda e: e.get("event") == "reply" and e.get("cmd") == cmd, timeout, start
        )
        if "error" in reply:
            raise RuntimeError(f"node pid {self.pid}: {cmd} failed: {reply['error']}")
        return reply

    def rss_kb(self) -> int:
        try:
            with open(f"/proc/{self.pid}/status") as handle:
                for line in handle:
                    if line.startswith("VmRSS:"):
                        return int(line.split()[1])
        except OSError:
            pass
        return 0

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(10)

    def cleanup(self) -> None:
        if self.proc.poll() is None:
            with contextlib.suppress(OSError):
                os.kill(self.pid, signal.SIGCONT)  # in case a test stopped it
            self.proc.kill()
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(10)
        self._reader.join(5)  # before closing stdout: closing a pipe being read makes it raise
        for stream in (self.proc.stdin, self.proc.stdout):
            if stream is not None:
                with contextlib.suppress(OSError):
                    stream.close()
        self._stderr.close()
        with contextlib.suppress(OSError):
            os.unlink(self.stderr_path)


# ---------------------------------------------------------------- what Redis holds


class RedisObserver:
    """Generic observations of the Redis behind the layer: keys of a prefix, TTLs, memory,
    and the layer's connections. Standalone Redis (one URL); a Cluster run repeats each
    observation on every master and adds them up."""

    def __init__(self, url: str) -> None:
        import redis.asyncio as aioredis

        self.url = url
        self.last_memory: dict[str, int] = {}  # INFO memory's numbers at the last used_memory()
        self.client = aioredis.Redis.from_url(url)

    async def aclose(self) -> None:
        await self.client.aclose()

    async def fresh(self) -> None:
        """Drop pooled connections (the server may have been restarted since the last use)."""
        await self.client.connection_pool.disconnect()

    async def keys(self, prefix: str) -> list[bytes]:
        await self.fresh()
        return [k async for k in self.client.scan_iter(match=f"{prefix}:*", count=1000)]

    async def ttls(self, prefix: str) -> dict[str, int]:
        """Every key of the prefix with its TTL in seconds (-1: none). Keys that expired
        between SCAN and TTL (-2) are left out."""
        keys = await self.keys(prefix)
        async with self.client.pipeline(transaction=False) as pipe:
            for key in keys:
                pipe.ttl(key)
            ttls = await pipe.execute()
        return {key.decode(errors="replace"): int(ttl)
                for key, ttl in zip(keys, ttls, strict=True) if ttl != -2}

    async def breakdown(self, prefix: str) -> tuple[dict[str, Any], dict[str, str]]:
        """Keys of the prefix by type: count, MEMORY USAGE bytes, and entries of streams and
        lists; plus connected clients. Explains a used_memory difference."""
        keys = await self.keys(prefix)
        async with self.client.pipeline(transaction=False) as pipe:
            for key in keys:
                pipe.type(key)
                pipe.memory_usage(key)
            answers = await pipe.execute()
        kinds: dict[str, list[int]] = {}
        types: dict[str, str] = {}
        lengths: list[Any] = []
        for key, kind, used in zip(keys, answers[::2], answers[1::2], strict=True):
            name = kind.decode() if isinstance(kind, bytes) else str(kind)
            entry = kinds.setdefault(name, [0, 0, 0])
            entry[0] += 1
            entry[1] += int(used or 0)
            lengths.append((name, key))
            types[key.decode(errors="replace")] = name
        async with self.client.pipeline(transaction=False) as pipe:
            for name, key in lengths:
                if name == "stream":
                    pipe.xlen(key)
                elif name == "list":
                    pipe.llen(key)
                else:
                    pipe.exists(key)
            counts = await pipe.execute()
        for (name, _key), count in zip(lengths, counts, strict=True):
            if name in ("stream", "list"):
                kinds[name][2] += int(count)
        clients = int((await self.client.info("clients"))["connected_clients"])
        return {"keys (count, bytes, entries)": kinds, "connected_clients": clients}, types

    async def used_memory(self) -> int:
        """``used_memory`` less the connections' buffers (``mem_clients_normal``) and the
        replication buffers: what Redis holds for the data and itself, not for however many
        clients are connected right now (the query buffers of ~190 connections swing by
        several percent between two reads)."""
        await self.fresh()
        info = await self.client.info("memory")
        self.last_memory = {k: v for k, v in info.items() if isinstance(v, int)}
        for key, value in (await self.client.memory_stats()).items():
            if isinstance(value, int):
                name = key.decode() if isinstance(key, bytes) else str(key)
                self.last_memory[f"mem_stats.{name}"] = value
        # Server state outside the keys that the memory figures include: the slow log keeps
        # up to slowlog-max-len commands with their arguments; pub/sub channels.
        self.last_memory["diag.slowlog_len"] = int(await self.client.slowlog_len())
        self.last_memory["diag.dbsize"] = int(await self.client.dbsize())
        self.last_memory["diag.connected_clients"] = int(
            (await self.client.info("clients"))["connected_clients"]
        )
        self.last_memory["diag.pubsub_channels"] = len(
            await self.client.execute_command("PUBSUB", "SHARDCHANNELS")
        ) + len(await self.client.pubsub_channels())
        # Replication buffers (backlog and replica output buffers) are bounded by the
        # server's config, not by the data; a master just elected starts a backlog.
        replication = int(info.get("mem_total_replication_buffers", 0)) or (
            int(info.get("mem_replication_backlog", 0)) + int(info.get("mem_clients_slaves", 0))
        )
        return int(info["used_memory"]) - int(info.get("mem_clients_normal", 0)) - replication

    async def kill_layer_clients(self, prefix: str) -> int:
        name = f"distrib:{prefix}"
        killed = 0
        await self.fresh()
        for entry in await self.client.client_list():
            if entry.get("name") == name:
                with contextlib.suppress(Exception):
                    killed += int(
                        await self.client.execute_command("CLIENT", "KILL", "ID", entry["id"])
                    )
        return killed


class ClusterObserver:
    """:class:`RedisObserver` over every master of a Redis Cluster: keys and TTLs gathered,
    counts, memory and connections added up (``per_master`` keeps each master's memory).

    Given replicas too, each observation asks which servers are masters right now (a
    failover swaps the roles) and counts those only: a replica holds a copy of its master's
    keys. Connections are killed on every server."""

    def __init__(self, urls: list[str]) -> None:
        self.all_parts = [RedisObserver(url) for url in urls]
        self.last_memory: dict[str, int] = {}
        self.per_master: dict[str, int] = {}
        self.per_master_detail: dict[str, dict[str, int]] = {}

    async def masters(self) -> list[RedisObserver]:
        """The servers that are masters now (one that does not answer is left out)."""
        found = []
        for part in self.all_parts:
            with contextlib.suppress(Exception):
                await part.fresh()
                if (await part.client.info("replication"))["role"] == "master":
                    found.append(part)
        return found

    async def masters_closed(self) -> set[int]:
        """The ports of the masters now; this observer is closed after."""
        try:
            return {int(part.url.rsplit(":", 1)[1]) for part in await self.masters()}
        finally:
            await self.aclose()

    async def aclose(self) -> None:
        for part in self.all_parts:
            await part.aclose()

    async def keys(self, prefix: str) -> list[bytes]:
        return [key for part in await self.masters() for key in await part.keys(prefix)]

    async def ttls(self, prefix: str) -> dict[str, int]:
        merged: dict[str, int] = {}
        for part in await self.masters():
            merged.update(await part.ttls(prefix))
        return merged

    async def breakdown(self, prefix: str) -> tuple[dict[str, Any], dict[str, str]]:
        kinds: dict[str, list[int]] = {}
        types: dict[str, str] = {}
        clients = 0
        for part in await self.masters():
            found, part_types = await part.breakdown(prefix)
            for kind, figures in found["keys (count, bytes, entries)"].items():
                entry = kinds.setdefault(kind, [0, 0, 0])
                for i in range(3):
                    entry[i] += figures[i]
            clients += found["connected_clients"]
            types.update(part_types)
        return {"keys (count, bytes, entries)": kinds, "connected_clients": clients}, types

    async def used_memory(self) -> int:
        total = 0
        self.last_memory = {}
        self.per_master = {}
        for part in await self.masters():
            used = await part.used_memory()
            self.per_master[part.url] = used
            self.per_master_detail[part.url] = dict(part.last_memory)
            total += used
            for key, value in part.last_memory.items():
                self.last_memory[key] = self.last_memory.get(key, 0) + value
        return total

    async def kill_layer_clients(self, prefix: str) -> int:
        killed = 0
        for part in self.all_parts:
            with contextlib.suppress(Exception):  # a server down for a failover
                killed += await part.kill_layer_clients(prefix)
        return killed


# ---------------------------------------------------------------- the checker


@dataclass
class Check:
    name: str
    ok: bool
    detail: str


@dataclass
class Integrity:
    ghosts: dict[str, list[str]] = field(default_factory=dict)
    missing: dict[str, list[str]] = field(default_factory=dict)
    live_nodes: set[str] = field(default_factory=set)
    listed_nodes: set[str] = field(default_factory=set)
    members: int = 0

    @property
    def ghost_count(self) -> int:
        return sum(len(v) for v in self.ghosts.values())

    @property
    def missing_count(self) -> int:
        return sum(len(v) for v in self.missing.values())


async def compare_registry(layer: Any, states: list[dict[str, Any]],
                           groups: list[str]) -> Integrity:
    """Redis (through the registry API) against what the live consumers hold."""
    held: dict[str, set[str]] = {group: set() for group in groups}
    for state in states:
        for channel, channel_groups in state["channels"].items():
            for group in channel_groups:
                held.setdefault(group, set()).add(channel)
    result = Integrity(live_nodes={s["node_id"] for s in states})
    result.listed_nodes = {info.node_id for info in await layer.nodes()}
    for group, expected in held.items():
        listed = await layer.group_channels(group)
        result.members += len(listed)
        if listed - expected:
            result.ghosts[group] = sorted(listed - expected)
        if expected - listed:
            result.missing[group] = sorted(expected - listed)
    return result


async def wait_exact(layer: Any, nodes: list[NodeHandle], groups: list[str],
                     timeout: float) -> tuple[Integrity, float]:
    """Poll until the registry is exact or ``timeout`` passes; returns the last comparison."""
    start = time.monotonic()
    while True:
        states = [await node.command("state") for node in nodes]
        found = await compare_registry(layer, states, groups)
        exact = (not found.ghosts and not found.missing
                 and found.live_nodes == found.listed_nodes)
        if exact or time.monotonic() - start > timeout:
            return found, time.monotonic() - start
        await asyncio.sleep(0.25)


# ---------------------------------------------------------------- the run


@dataclass
class Options:
    seconds: float = 300.0
    redis_urls: list[str] = field(default_factory=list)
    nodes: int = 3
    consumers: int = 60
    rooms: int = 8
    rate: float = 100.0
    send_rate: float = 40.0
    cycle: float = 60.0
    warmup: float = 10.0
    expiry: int = 5
    heartbeat_interval: float = 0.5
    node_timeout: float = 2.0
    retry_timeout: float = 2.0
    storm_seconds: float = 5.0
    tolerance: float = 0.05
    cluster: bool = False  # a Redis Cluster: our own 3 masters, or --redis-url is a node of one
    replicas: int = 0  # with cluster: replicas per master of our own cluster (faults: failovers)


@dataclass
class Snapshot:
    keys: int
    no_ttl: list[str]
    used_memory: int
    integrity: Integrity
    waited: float
    breakdown: dict[str, Any] = field(default_factory=dict)
    names: dict[str, int] = field(default_factory=dict)  # key -> TTL (s)
    kinds: dict[str, str] = field(default_factory=dict)  # key -> type


@dataclass
class SoakResult:
    checks: list[Check] = field(default_factory=list)
    figures: dict[str, Any] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return all(check.ok for check in self.checks)

    def table(self) -> str:
        lines = ["| check | result | detail |", "|---|---|---|"]
        lines += [f"| {c.name} | {'ok' if c.ok else 'FAIL'} | {c.detail} |" for c in self.checks]
        lines += ["", "| figure | value |", "|---|---|"]
        lines += [f"| {k} | {v} |" for k, v in self.figures.items()]
        return "\n".join(lines)


class Soak:
    def __init__(self, options: Options) -> None:
        self.o = options
        self.prefix = f"soak{secrets.token_hex(4)}"
        self.groups = [ALL_GROUP] + [room_name(i) for i in range(options.rooms)]
        self.nodes: list[NodeHandle] = []
        self.result = SoakResult()
        self.sent = {"group": 0, "direct": 0}
        self.send_errors: dict[str, int] = {}
        self.faults: dict[str, int] = {"node_kills": 0, "client_kills": 0, "redis_restarts": 0,
                                       "failovers": 0}
        self.failover_seconds: list[float] = []
        self.server: Any = None
        self.dead_errors: list[dict[str, Any]] = []
        self.rng = random.Random(8)

    @property
    def hosts(self) -> list[Any]:
        if self.o.cluster:
            url = self.o.redis_urls[0] if self.o.redis_urls else self.server.url
            return [{"address": url, "cluster": True}]
        return list(self.o.redis_urls) or [self.server.url]

    def observer(self) -> RedisObserver | ClusterObserver:
        """Observations of the Redis behind the layer; on a cluster, of each master."""
        if not self.o.cluster:
            return RedisObserver(self.hosts[0])
        if self.server is not None:
            return ClusterObserver([f"redis://127.0.0.1:{port}" for port in self.server.ports])
        return ClusterObserver(self.o.redis_urls)

    def timings(self) -> dict[str, float]:
        return {"heartbeat_interval": self.o.heartbeat_interval,
                "node_timeout": self.o.node_timeout, "expiry": self.o.expiry,
                "retry_timeout": self.o.retry_timeout}

    def spawn(self, index: int) -> NodeHandle:
        per_node = self.o.rate / self.o.nodes
        return NodeHandle(self.hosts, self.prefix, consumers=self.o.consumers,
                          rooms=self.o.rooms, rate=per_node, timings=self.timings(),
                          seed=index * 1000 + len(self.nodes))

    async def set_churn(self, rate: float) -> None:
        await asyncio.gather(*(n.command("churn", rate=rate) for n in self.nodes))

    # -- faults -------------------------------------------------------------------------

    async def kill_node(self, cycle: int) -> None:
        index = 1 + cycle % (self.o.nodes - 1) if self.o.nodes > 1 else 0
        victim = self.nodes[index]
        self.dead_errors += victim.consumer_errors()
        victim.kill()
        victim.cleanup()
        self.faults["node_kills"] += 1
        await asyncio.sleep(1.0)
        fresh = self.spawn(index)
        await fresh.ready()
        await fresh.command("churn", rate=self.o.rate / self.o.nodes)
        self.nodes[index] = fresh
        log(f"node {index} SIGKILLed (pid {victim.pid}) and restarted (pid {fresh.pid})")

    async def client_kill_storm(self, observer: RedisObserver | ClusterObserver) -> None:
        killed = 0
        end = time.monotonic() + self.o.storm_seconds
        while time.monotonic() < end:
            killed += await observer.kill_layer_clients(self.prefix)
            await asyncio.sleep(0.25)
        self.faults["client_kills"] += killed
        log(f"CLIENT KILL storm: {killed} connections killed in {self.o.storm_seconds:.0f} s")

    async def restart_redis(self, observer: RedisObserver | ClusterObserver) -> None:
        if self.server is None:
            log("Redis restart skipped: --redis-url given, the soak cannot restart it")
            return
        if self.o.cluster and self.o.replicas:
            await self.fail_over()
            return
        if self.o.cluster:
            await self.restart_master()
            return
        self.server.kill()
        await asyncio.sleep(1.0)
        await asyncio.to_thread(self.server.restart)
        self.faults["redis_restarts"] += 1
        log("Redis killed and restarted empty")

    async def restart_master(self) -> None:
        """One master of our cluster killed and started again empty (each in turn)."""
        from tests.helpers_cluster import wait_ok

        index = self.faults["redis_restarts"] % self.server.masters
        master = self.server.servers[index]
        master.kill()
        await asyncio.sleep(1.0)
        await asyncio.to_thread(master.restart)
        await asyncio.to_thread(wait_ok, master.port)
        self.faults["redis_restarts"] += 1
        log(f"cluster master {index} (port {master.port}) killed and restarted empty")

    async def fail_over(self) -> None:
        """A master of our cluster (with replicas) SIGKILLed: a replica takes over (with what
        it had replicated); once it has, and the cluster is ok again, the killed server
        starts again empty and rejoins as a replica. Masters are taken in turn by port."""
        from tests.helpers_cluster import wait_ok

        urls = {s.port: f"redis://127.0.0.1:{s.port}" for s in self.server.servers}
        ports = sorted(await ClusterObserver(list(urls.values())).masters_closed())
        port = ports[self.faults["failovers"] % len(ports)]
        victim = next(s for s in self.server.servers if s.port == port)
        killed = time.monotonic()
        victim.kill()
        others = [url for p, url in urls.items() if p != port]
        while len(await ClusterObserver(others).masters_closed()) < len(ports):
            if time.monotonic() - killed > 60:
                raise RuntimeError(f"no replica took over from port {port} within 60 s")
            await asyncio.sleep(0.2)
        await asyncio.to_thread(wait_ok, next(p for p in urls if p != port), 60.0)
        took = time.monotonic() - killed
        await asyncio.to_thread(victim.restart)
        self.faults["failovers"] += 1
        self.failover_seconds.append(round(took, 2))
        log(f"cluster master on port {port} SIGKILLed; a replica took over and the cluster "
            f"was ok again after {took:.1f} s; the killed server restarted empty (a replica now)")

    # -- load ---------------------------------------------------------------------------

    async def sender(self, layer: Any, stop: asyncio.Event) -> None:
        targets: list[str] = []
        refreshed = 0.0
        n = 0
        interval = 1.0 / self.o.send_rate
        while not stop.is_set():
            n += 1
            try:
                if time.monotonic() - refreshed > 2.0:
                    refreshed = time.monotonic()
                    targets = sorted(await layer.group_channels(ALL_GROUP))
                if n % 2 or not targets:
                    group = self.rng.choice(self.groups)
                    await layer.group_send(group, {"type": "soak.group", "id": n})
                    self.sent["group"] += 1
                else:
                    await layer.send(self.rng.choice(targets), {"type": "soak.direct", "id": n})
                    self.sent["direct"] += 1
            except Exception as exc:
                name = type(exc).__name__
                self.send_errors[name] = self.send_errors.get(name, 0) + 1
            await asyncio.sleep(interval)

    async def snapshot(self, layer: Any, observer: RedisObserver | ClusterObserver) -> Snapshot:
        """Load stopped: reset every node to the reference shape, wait 2 x expiry, observe."""
        await asyncio.gather(*(n.command("reset", timeout=120) for n in self.nodes))
        await asyncio.sleep(2 * self.o.expiry)
        integrity, waited = await wait_exact(layer, self.nodes, self.groups,
                                             timeout=4 * self.o.heartbeat_interval)
        names = await observer.ttls(self.prefix)
        keys = list(names)
        no_ttl = [k for k, ttl in names.items() if ttl == -1]
        breakdown, kinds = await observer.breakdown(self.prefix)
        return Snapshot(len(keys), no_ttl, await self.settled_memory(layer, observer), integrity,
                        waited, breakdown, names, kinds)

    async def settled_memory(self, layer: Any, observer: RedisObserver | ClusterObserver) -> int:
        """``used_memory`` (less client buffers) with the same connections as every reading:
        the pools' idle connections closed everywhere (the load leaves more pooled than the
        warm-up), then a wait for Redis's client cron to size the buffers of those left, which
        ``mem_clients_normal`` reflects only after it ran (measured on Redis 7.0: 100 new
        connections add 3.8 MB to used_memory and 0.23 MB to mem_clients_normal; 2 s later
        2.60 MB and 2.46 MB)."""
        from benchmarks._soak_node import release_idle_connections

        await asyncio.gather(*(n.command("release") for n in self.nodes))
        await release_idle_connections(layer)
        await asyncio.sleep(2.5)
        return await observer.used_memory()

    async def load(self, layer: Any, observer: RedisObserver | ClusterObserver) -> dict[str, int]:
        """The load phase with its fault schedule; returns node 0's RSS samples."""
        stop = asyncio.Event()
        sender = asyncio.create_task(self.sender(layer, stop))
        await self.set_churn(self.o.rate / self.o.nodes)
        start = time.monotonic()
        rss_at = min(120.0, self.o.seconds / 3)
        rss: dict[str, int] = {}
        cycle = 0
        try:
            while time.monotonic() - start < self.o.seconds:
                cycle_start = time.monotonic()
                length = min(self.o.cycle, self.o.seconds - (cycle_start - start))
                # Node kill last, so a dead node's leftovers are not wiped by the restart.
                schedule = [(0.2, "redis"), (0.45, "storm"), (0.7, "node")]
                for offset, fault in schedule:
                    await self.sleep_until(cycle_start + offset * length, start, rss_at, rss)
                    if fault == "node":
                        await self.kill_node(cycle)
                    elif fault == "storm":
                        await self.client_kill_storm(observer)
                    else:
                        await self.restart_redis(observer)
                await self.sleep_until(cycle_start + length, start, rss_at, rss)
                cycle += 1
                log(f"cycle {cycle} done: sent {self.sent}, send errors {self.send_errors}")
        finally:
            stop.set()
            await sender
        await self.set_churn(0)
        rss.setdefault("reference", self.nodes[0].rss_kb())
        rss["end"] = self.nodes[0].rss_kb()
        return rss

    async def sleep_until(self, when: float, start: float, rss_at: float,
                          rss: dict[str, int]) -> None:
        while (now := time.monotonic()) < when:
            if "reference" not in rss and now - start >= rss_at:
                rss["reference"] = self.nodes[0].rss_kb()
            await asyncio.sleep(min(0.5, when - now))

    # -- the whole thing ----------------------------------------------------------------

    async def run(self) -> SoakResult:
        from channels_distrib.layers import DistributedChannelLayer

        if not self.o.redis_urls:
            from tests.helpers_cluster import start_cluster
            from tests.redis_server import start_server

            # Redis 7 allocates a latency histogram the first time it sees each command
            # (~36 KB each, kept for good): that diagnostic memory would show up as a
            # used_memory "leak" of the layer. It is off on the soak's own server.
            quiet = ["--latency-tracking", "no"]
            self.server = (
                start_cluster(3, replicas=self.o.replicas, extra_args=quiet)
                if self.o.cluster
                else start_server(quiet)
            )
        observer = self.observer()
        layer = DistributedChannelLayer(hosts=self.hosts, prefix=self.prefix,
                                        retry_timeout=self.o.retry_timeout)
        try:
            empty_keys = len(await observer.keys(self.prefix))
            log(f"prefix {self.prefix}; {self.o.nodes} nodes x {self.o.consumers} consumers, "
                f"{self.o.rate:.0f} churn ops/s, {self.o.send_rate:.0f} sends/s, "
                f"{self.o.seconds:.0f} s of load")
            self.nodes = [self.spawn(i) for i in range(self.o.nodes)]
            await asyncio.gather(*(n.ready() for n in self.nodes))
            log(f"warm-up {self.o.warmup:.0f} s (churn and sends, no faults)")
            stop = asyncio.Event()
            sender = asyncio.create_task(self.sender(layer, stop))
            await self.set_churn(self.o.rate / self.o.nodes)
            await asyncio.sleep(self.o.warmup)
            stop.set()
            await sender
            await self.set_churn(0)
            before = await self.snapshot(layer, observer)
            memory_before = dict(observer.last_memory)
            per_master_before = dict(getattr(observer, "per_master", {}))
            detail_before = dict(getattr(observer, "per_master_detail", {}))
            log(f"baseline: {before.keys} keys, used_memory {before.used_memory}, "
                f"{before.integrity.members} members, ghosts {before.integrity.ghost_count}, "
                f"missing {before.integrity.missing_count}")
            rss = await self.load(layer, observer)
            log("load stopped; resetting nodes and waiting 2 x expiry")
            after = await self.snapshot(layer, observer)
            if after.integrity.ghosts:
                await self.describe_ghosts(layer, after.integrity)
            log(f"after: {after.keys} keys, used_memory {after.used_memory}, "
                f"{after.integrity.members} members, ghosts {after.integrity.ghost_count}, "
                f"missing {after.integrity.missing_count}")
            moved = {k: v - memory_before.get(k, 0) for k, v in observer.last_memory.items()
                     if k.startswith(("used_memory", "mem_", "diag.")) and (k.startswith("diag.") or abs(v - memory_before.get(k, 0)) > 4096)}
            log(f"INFO memory fields that moved by more than 4 KiB: {moved}")
            for url, now in getattr(observer, "per_master_detail", {}).items():
                was = detail_before.get(url, {})
                log(f"  {url}: " + str({k: v - was.get(k, 0) for k, v in now.items()
                                        if abs(v - was.get(k, 0)) > 2048}))
            stats = [await n.command("stats") for n in self.nodes]
            self.evaluate(empty_keys, before, after, rss, stats)
            if isinstance(observer, ClusterObserver):
                self.result.figures["used_memory per master before"] = per_master_before
                self.result.figures["used_memory per master after"] = dict(observer.per_master)
            await asyncio.gather(*(n.command("close") for n in self.nodes))
            await asyncio.sleep(2 * self.o.heartbeat_interval)
            self.result.figures["keys after every node closed"] = len(
                await observer.keys(self.prefix))
        finally:
            for node in self.nodes:
                node.cleanup()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(layer.flush(), 10)
            with contextlib.suppress(Exception):
                await asyncio.wait_for(layer.close(), 10)
            await observer.aclose()
            if self.server is not None:
                self.server.stop()
        return self.result

    async def describe_ghosts(self, layer: Any, found: Integrity) -> None:
        """Figures for a failed ghost check: whose the ghosts are (a live node process's,
        or a node's no live process has) and whether they are still there 10 s later."""
        from channels_distrib.registry import token_of

        states = [await node.command("state") for node in self.nodes]
        live = {token_of(ch) for state in states for ch in state["channels"]}
        ghosts = {ch for channels in found.ghosts.values() for ch in channels}
        self.result.figures["ghosts of live node processes"] = sorted(
            ch for ch in ghosts if token_of(ch) in live)
        await asyncio.sleep(10.0)
        later = await compare_registry(layer, states, self.groups)
        self.result.figures["ghosts 10 s later"] = later.ghost_count

    def evaluate(self, empty_keys: int, before: Snapshot, after: Snapshot,
                 rss: dict[str, int], stats: list[dict[str, Any]]) -> None:
        checks = self.result.checks
        tol = self.o.tolerance
        for label, snap in (("before", before), ("after", after)):
            found = snap.integrity
            checks.append(Check(f"ghost members {label}", found.ghost_count == 0,
                                f"{found.ghost_count} {_sample(found.ghosts)}"))
            checks.append(Check(f"missing members {label}", found.missing_count == 0,
                                f"{found.missing_count} {_sample(found.missing)}"))
            checks.append(Check(f"nodes() = live nodes {label}",
                                found.live_nodes == found.listed_nodes,
                                f"listed {len(found.listed_nodes)}, live {len(found.live_nodes)}"
                                f", extra {sorted(found.listed_nodes - found.live_nodes)[:3]}"
                                f", missing {sorted(found.live_nodes - found.listed_nodes)[:3]}"))
            checks.append(Check(f"keys without TTL {label}", not snap.no_ttl,
                                f"{len(snap.no_ttl)} {snap.no_ttl[:5]}"))
        checks.append(Check("key count after = before", after.keys == before.keys,
                            f"empty prefix {empty_keys}, before {before.keys}, after {after.keys}"))
        ratio = after.used_memory / before.used_memory - 1 if before.used_memory else 0.0
        checks.append(Check(f"used_memory (no client or replication buffers) within {tol:.0%}", abs(ratio) <= tol,
                            f"before {before.used_memory}, after {after.used_memory} "
                            f"({ratio:+.1%})"))
        growth = rss["end"] / rss["reference"] - 1 if rss.get("reference") else 0.0
        checks.append(Check(f"node 0 RSS growth <= {tol:.0%}", growth <= tol,
                            f"{rss.get('reference')} kB -> {rss['end']} kB ({growth:+.1%})"))
        errors = self.dead_errors + [e for n in self.nodes for e in n.consumer_errors()]
        checks.append(Check("consumer errors", not errors, f"{len(errors)} {errors[:3]}"))
        dead = [n.pid for n in self.nodes if not n.alive()]
        checks.append(Check("node processes alive", not dead, f"dead pids {dead}"))
        figures = self.result.figures
        figures["load seconds"] = self.o.seconds
        figures["sent (group / direct)"] = f"{self.sent['group']} / {self.sent['direct']}"
        figures["send errors"] = self.send_errors or "none"
        figures["faults"] = self.faults
        if self.failover_seconds:
            figures["cluster ok again after each failover (s)"] = self.failover_seconds
        figures["received by live nodes"] = sum(s["received"] for s in stats)
        ops: dict[str, int] = {}
        op_errors: dict[str, int] = {}
        for s in stats:
            for k, v in s["ops"].items():
                ops[k] = ops.get(k, 0) + v
            for k, v in s["op_errors"].items():
                op_errors[k] = op_errors.get(k, 0) + v
        figures["churn ops (live nodes)"] = ops
        figures["op failures (live nodes)"] = op_errors or "none"
        figures["members checked after"] = after.integrity.members
        figures["registry exact after (s)"] = f"{after.waited:.2f}"
        kinds_before = before.breakdown.get("keys (count, bytes, entries)", {})
        kinds_after = after.breakdown.get("keys (count, bytes, entries)", {})
        grown = {kind for kind, v in kinds_after.items() if v[0] > kinds_before.get(kind, [0])[0]}
        extra = sorted(k for k in after.names if after.kinds.get(k) in grown)
        figures["keys of the types that grew (TTL s)"] = (
            {k: after.names[k] for k in extra[:8]} or "none")
        figures["Redis before"] = json.dumps(before.breakdown)
        figures["Redis after"] = json.dumps(after.breakdown)


def _sample(found: dict[str, list[str]]) -> str:
    return json.dumps({g: v[:2] for g, v in list(found.items())[:3]}) if found else ""


def parse_args(argv: list[str] | None = None) -> Options:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.soak", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    defaults = Options()
    parser.add_argument("--seconds", type=float, default=defaults.seconds)
    parser.add_argument("--redis-url", action="append", default=[],
                        help="use this Redis (repeat for a host list) instead of our own server")
    parser.add_argument("--nodes", type=int, default=defaults.nodes)
    parser.add_argument("--consumers", type=int, default=defaults.consumers,
                        help="consumers per node")
    parser.add_argument("--rooms", type=int, default=defaults.rooms)
    parser.add_argument("--rate", type=float, default=defaults.rate,
                        help="churn operations per second, all nodes together")
    parser.add_argument("--send-rate", type=float, default=defaults.send_rate)
    parser.add_argument("--cycle", type=float, default=defaults.cycle)
    parser.add_argument("--warmup", type=float, default=defaults.warmup)
    parser.add_argument("--expiry", type=int, default=defaults.expiry)
    parser.add_argument("--heartbeat-interval", type=float, default=defaults.heartbeat_interval)
    parser.add_argument("--node-timeout", type=float, default=defaults.node_timeout)
    parser.add_argument("--retry-timeout", type=float, default=defaults.retry_timeout)
    parser.add_argument("--replicas", type=int, default=defaults.replicas,
                        help="with --cluster: replicas per master; the Redis fault is then a "
                        "failover (a master SIGKILLed, a replica takes over)")
    parser.add_argument("--cluster", action="store_true",
                        help="run on a 3-master Redis Cluster of our own (or --redis-url is a "
                        "cluster node; then give every master's URL, the first is the layer's)")
    args = parser.parse_args(argv)
    return Options(seconds=args.seconds, redis_urls=args.redis_url, nodes=args.nodes,
                   consumers=args.consumers, rooms=args.rooms, rate=args.rate,
                   send_rate=args.send_rate, cycle=args.cycle, warmup=args.warmup,
                   expiry=args.expiry, heartbeat_interval=args.heartbeat_interval,
                   node_timeout=args.node_timeout, retry_timeout=args.retry_timeout,
                   cluster=args.cluster, replicas=args.replicas)


def main(argv: list[str] | None = None) -> int:
    options = parse_args(argv)
    result = asyncio.run(Soak(options).run())
    print(result.table(), flush=True)
    print("soak: " + ("PASS" if result.ok else "FAIL"), flush=True)
    return 0 if result.ok else 1


if __name__ == "__main__":
    sys.exit(main())
