"""Node processes, polling helpers and Redis instrumentation for the registry and node tests.

``NodeProcess`` runs ``tests/node_proc.py`` in its own OS process and collects the JSON lines it
prints; ``node_spawner`` starts them and kills exactly those pids when it exits.
``RoundTripProxy`` sits between a layer and Redis and counts request/response turns, and
``commandstats`` reads ``INFO commandstats`` so a test can see which commands a call issued.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

from benchmarks._common import read_json_lines

ROOT = Path(__file__).resolve().parent.parent

FAST = {"heartbeat_interval": 0.5, "node_timeout": 2.0}
"""The fast timing settings the contract promises to support."""


class NodeProcess:
    """One ``python -m tests.node_proc`` process; everything it prints is kept in ``events``."""

    def __init__(self, argv: list[str], broker: str | None = None) -> None:
        self.argv = argv
        self.events: list[dict[str, Any]] = []
        self._lock = threading.Lock()
        self._stderr = tempfile.TemporaryFile()  # noqa: SIM115  (closed in cleanup())
        env = {**os.environ, "PYTHONPATH": str(ROOT), "PYTHONUNBUFFERED": "1"}
        if broker:
            env["NODE_PROC_BROKER"] = broker  # tests/node_proc.py: CONFIG["broker"]
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "tests.node_proc", *argv],
            cwd=ROOT,
            env=env,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self._stderr,
        )
        self.pid = self.proc.pid
        self.stopped = False
        self.info: dict[str, Any] = {}
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        read_json_lines(self.proc.stdout, self.events, self._lock)

    # -- what it said ---------------------------------------------------------------------

    def snapshot(self) -> list[dict[str, Any]]:
        with self._lock:
            return list(self.events)

    def messages(self, channel: str | None = None) -> list[dict[str, Any]]:
        """Messages received so far (the message dicts), optionally for one channel."""
        return [
            e["message"]
            for e in self.snapshot()
            if e.get("event") == "message" and (channel is None or e["channel"] == channel)
        ]

    def stderr_text(self) -> str:
        self._stderr.seek(0)
        return self._stderr.read().decode(errors="replace")[-4000:]

    def describe(self) -> str:
        return f"node pid {self.pid} ({' '.join(self.argv)}); stderr:\n{self.stderr_text()}"

    async def wait_event(
        self, predicate: Callable[[dict[str, Any]], bool], timeout: float, start: int = 0
    ) -> dict[str, Any]:
        """The first event (from index ``start``) matching ``predicate``; fails after timeout."""
        deadline = time.monotonic() + timeout
        while True:
            for event in self.snapshot()[start:]:
                if predicate(event):
                    return event
            if self.proc.poll() is not None and not self._reader.is_alive():
                for event in self.snapshot()[start:]:
                    if predicate(event):
                        return event
                raise AssertionError(f"process exited ({self.proc.returncode}): {self.describe()}")
            if time.monotonic() > deadline:
                raise AssertionError(f"no matching event within {timeout} s: {self.describe()}")
            await asyncio.sleep(0.02)

    async def ready(self, timeout: float = 60.0) -> dict[str, Any]:
        """Wait for the ready line; an error line before it fails the test with its text."""
        event = await self.wait_event(lambda e: e.get("event") in ("ready", "error"), timeout)
        if event["event"] == "error":
            raise AssertionError(f"node failed: {event}: {self.describe()}")
        self.info = event
        return event

    @property
    def node_id(self) -> str:
        return str(self.info["node_id"])

    @property
    def channels(self) -> list[str]:
        return [*self.info["channels"], *self.info["idle"], *self.info["slow"]]

    async def command(self, timeout: float = 10.0, **command: Any) -> dict[str, Any]:
        """Send one stdin command and wait for its done/error line."""
        start = len(self.snapshot())
        assert self.proc.stdin is not None
        self.proc.stdin.write((json.dumps(command) + "\n").encode())
        self.proc.stdin.flush()
        return await self.wait_event(
            lambda e: (
                e.get("event") in ("done", "error")
                and e.get("cmd", e.get("where")) == command["cmd"]
            ),
            timeout,
            start,
        )

    # -- signals, by this pid only -------------------------------------------------------

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(10)

    def pause(self) -> None:
        os.kill(self.pid, signal.SIGSTOP)
        self.stopped = True

    def resume(self) -> None:
        os.kill(self.pid, signal.SIGCONT)
        self.stopped = False

    def cleanup(self) -> None:
        if self.proc.poll() is None:
            if self.stopped:
                self.resume()
            self.proc.kill()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                pass
        # The reader sees EOF once the process is gone; join it before closing stdout, since
        # closing a buffered pipe another thread is reading makes that thread raise.
        self._reader.join(5)
        for stream in (self.proc.stdin, self.proc.stdout):
            if stream is not None:
                try:
                    stream.close()
                except OSError:
                    pass
        self._stderr.close()


def node_argv(
    url: str,
    prefix: str,
    *,
    channels: int = 1,
    idle: int = 0,
    slow: int = 0,
    slow_delay: float | None = None,
    group: str | list[str] = (),
    presence: bool = False,
    meta: dict[str, Any] | None = None,
    sender: bool = False,
    quiet: bool = False,
    cluster: bool = False,
    **config: Any,
) -> list[str]:
    """Command-line arguments for ``tests.node_proc``; ``config`` keys are layer options."""
    argv = [
        "--url",
        url,
        "--prefix",
        prefix,
        "--channels",
        str(channels),
        "--idle",
        str(idle),
        "--slow",
        str(slow),
    ]
    if slow_delay is not None:
        argv += ["--slow-delay", str(slow_delay)]
    for name in [group] if isinstance(group, str) else group:
        argv += ["--group", name]
    if presence:
        argv.append("--presence")
    if meta is not None:
        argv += ["--meta", json.dumps(meta)]
    if sender:
        argv.append("--sender")
    if quiet:
        argv.append("--quiet")
    if cluster:
        argv.append("--cluster")  # url is a Redis Cluster startup node
    for key, value in config.items():
        argv += ["--" + key.replace("_", "-"), str(value)]
    return argv


@contextlib.asynccontextmanager
async def node_spawner(
    redis_url: str, prefix: str, broker: str | None = None
) -> AsyncIterator[Callable[..., NodeProcess]]:
    """Start node processes (``url`` defaults to ``redis_url``, the prefix to ``prefix``;
    with ``broker``, their messages go through RabbitMQ).

    Test modules wrap this in a ``spawn_node`` fixture that depends on ``make_layer``, so the
    processes are killed before that fixture's teardown flushes the prefix. Only the pids
    started here are signalled.
    """
    started: list[NodeProcess] = []

    def spawn(url: str | None = None, prefix_: str | None = None, **options: Any) -> NodeProcess:
        node = NodeProcess(node_argv(url or redis_url, prefix_ or prefix, **options), broker)
        started.append(node)
        return node

    try:
        yield spawn
    finally:
        for node in started:
            node.cleanup()


async def start_nodes(
    spawn: Callable[..., NodeProcess], count: int, **options: Any
) -> list[NodeProcess]:
    """Start ``count`` nodes with the same options in parallel and wait until all are ready."""
    nodes = [spawn(**options) for _ in range(count)]
    await asyncio.gather(*(node.ready() for node in nodes))
    return nodes


async def wait_until(
    probe: Callable[[], Awaitable[Any]],
    predicate: Callable[[Any], bool],
    timeout: float,
    interval: float = 0.02,
    what: str = "condition",
) -> tuple[Any, float]:
    """Poll ``probe`` until ``predicate(value)``; returns (value, seconds waited)."""
    start = time.monotonic()
    value: Any = None
    while True:
        # A probe that hangs fails the wait instead of the whole run.
        async with asyncio.timeout(max(1.0, timeout - (time.monotonic() - start) + 1.0)):
            value = await probe()
        if predicate(value):
            return value, time.monotonic() - start
        if time.monotonic() - start > timeout:
            raise AssertionError(f"{what} not reached within {timeout} s; last value: {value!r}")
        await asyncio.sleep(interval)


async def eventually(
    condition: Callable[[], bool], timeout: float, what: str = "condition"
) -> float:
    """Poll a plain predicate (e.g. over a node's output) until true; returns seconds waited."""
    start = time.monotonic()
    while not condition():
        if time.monotonic() - start > timeout:
            raise AssertionError(f"{what} not reached within {timeout} s")
        await asyncio.sleep(0.02)
    return time.monotonic() - start


async def settle(nodes: list[NodeProcess], quiet: float = 0.5, timeout: float = 10.0) -> None:
    """Wait until none of the nodes has printed anything for ``quiet`` seconds."""
    start = last_change = time.monotonic()
    counts = [len(node.snapshot()) for node in nodes]
    while time.monotonic() - last_change < quiet:
        if time.monotonic() - start > timeout:
            raise AssertionError(f"nodes still busy after {timeout} s")
        await asyncio.sleep(0.05)
        now = [len(node.snapshot()) for node in nodes]
        if now != counts:
            counts, last_change = now, time.monotonic()


def covered_at(node: NodeProcess, channel: str, key: str, expected: set[str]) -> float | None:
    """Wall time (``t``) of the message on which ``channel``'s presence diffs first named every
    channel in ``expected`` under ``key`` ("joins" or "leaves"); None if not yet."""
    seen: set[str] = set()
    for event in node.snapshot():
        if event.get("event") == "message" and event["channel"] == channel:
            message = event["message"]
            if message.get("type") == "presence.diff":
                seen.update(entry["channel"] for entry in message[key])
                if expected <= seen:
                    return float(event["t"])
    return None


async def receive_all(layer: Any, channel: str, quiet: float) -> list[dict[str, Any]]:
    """Receive until nothing arrives for ``quiet`` seconds (a cancelled receive is spec-safe)."""
    got: list[dict[str, Any]] = []
    while True:
        try:
            async with asyncio.timeout(quiet):
                got.append(await layer.receive(channel))
        except TimeoutError:
            return got


async def collect(
    layer: Any, channel: str, until: Callable[[list[dict[str, Any]]], bool], timeout: float
) -> list[dict[str, Any]]:
    """Receive into a list until ``until(list)`` holds; fails with what arrived on timeout."""
    got: list[dict[str, Any]] = []
    try:
        async with asyncio.timeout(timeout):
            while not until(got):
                got.append(await layer.receive(channel))
    except TimeoutError:
        raise AssertionError(
            f"gave up after {timeout} s on {channel}; received {got!r}"[:3000]
        ) from None
    return got


def presence_events(
    messages: list[dict[str, Any]], group: str | None = None
) -> list[dict[str, Any]]:
    return [
        m
        for m in messages
        if str(m.get("type", "")).startswith("presence.") and (group is None or m["group"] == group)
    ]


def leaves_of(messages: list[dict[str, Any]], group: str | None = None) -> list[str]:
    """Channels named in the leaves of every presence.diff, in arrival order, repeats kept."""
    return [
        entry["channel"]
        for m in presence_events(messages, group)
        if m["type"] == "presence.diff"
        for entry in m["leaves"]
    ]


def joins_of(messages: list[dict[str, Any]], group: str | None = None) -> list[str]:
    return [
        entry["channel"]
        for m in presence_events(messages, group)
        if m["type"] == "presence.diff"
        for entry in m["joins"]
    ]


def view_of(messages: list[dict[str, Any]], group: str | None = None) -> set[str]:
    """What a member believes the room holds: its last state, then every diff applied in order."""
    view: set[str] = set()
    for message in presence_events(messages, group):
        if message["type"] == "presence.state":
            view = {e["channel"] for e in message["members"]}
        else:
            view -= {e["channel"] for e in message["leaves"]}
            view |= {e["channel"] for e in message["joins"]}
    return view


# -- Redis instrumentation ---------------------------------------------------------------


async def commandstats(url: str) -> dict[str, int]:
    """Calls per command name from ``INFO commandstats`` (a fresh connection each time)."""
    import redis.asyncio as aioredis

    client = aioredis.from_url(url)
    try:
        info = await client.info("commandstats")
    finally:
        await client.aclose()
    return {key.removeprefix("cmdstat_"): int(value["calls"]) for key, value in info.items()}


def stats_delta(before: dict[str, int], after: dict[str, int]) -> dict[str, int]:
    """Commands issued between two snapshots, without the INFO/HELLO/CLIENT of the snapshots."""
    delta = {name: after[name] - before.get(name, 0) for name in after}
    for own in ("info", "hello", "client|setinfo", "client|setname", "select"):
        delta.pop(own, None)
    return {name: count for name, count in delta.items() if count}


class RoundTripProxy:
    """A loopback TCP proxy to Redis that counts round trips per connection.

    A round trip starts each time a client writes after having read a reply (or writes first on
    a fresh connection): a pipeline or a script call is one, a command per await is one each.
    ``cut()`` makes a partition: every connection is closed and new ones are closed on accept,
    until ``heal()``.
    """

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.cut_off = False
        self.round_trips = 0
        self.connections = 0
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._writers: list[asyncio.StreamWriter] = []
        self.port = 0

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    async def __aenter__(self) -> RoundTripProxy:
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._server is not None
        self._server.close()
        for writer in self._writers:
            writer.close()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self._server.wait_closed()

    def cut(self) -> None:
        self.cut_off = True
        for writer in self._writers:
            writer.close()
        self._writers = []

    def heal(self) -> None:
        self.cut_off = False

    async def _handle(self, client_r: asyncio.StreamReader, client_w: asyncio.StreamWriter) -> None:
        if self.cut_off:
            client_w.close()
            return
        self.connections += 1
        server_r, server_w = await asyncio.open_connection("127.0.0.1", self.target_port)
        self._writers += [client_w, server_w]
        state = {"replied": True}

        async def upstream() -> None:
            try:
                while data := await client_r.read(65536):
                    if state["replied"]:
                        self.round_trips += 1
                        state["replied"] = False
                    server_w.write(data)
                    await server_w.drain()
            except OSError:
                pass
            server_w.close()

        async def downstream() -> None:
            try:
                while data := await server_r.read(65536):
                    state["replied"] = True
                    client_w.write(data)
                    await client_w.drain()
            except OSError:
                pass
            client_w.close()

        for coro in (upstream(), downstream()):
            task = asyncio.ensure_future(coro)
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
        await asyncio.sleep(0)
