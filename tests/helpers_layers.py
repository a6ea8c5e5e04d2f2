"""Helpers for the channel-layer tests: raw Redis access, receive with timeouts, a
round-trip-counting TCP proxy, and a subprocess runner for tests/layer_proc.py.

Nothing here stands in for Redis: raw access is used only to observe (CLIENT LIST, INFO, SCAN)
or to inject what a foreign/corrupt writer could put into the layer's own keys.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import subprocess
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlparse

import redis.asyncio as aioredis

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# ---------------------------------------------------------------- receiving helpers


async def recv(layer: Any, channel: str, timeout: float = 5.0) -> dict[str, Any]:
    """layer.receive(channel), failing the test (TimeoutError) instead of hanging."""
    async with asyncio.timeout(timeout):
        return await layer.receive(channel)  # type: ignore[no-any-return]


async def recv_n(layer: Any, channel: str, n: int, timeout: float = 10.0) -> list[dict[str, Any]]:
    """Receive exactly n messages from one channel within timeout (total)."""
    got: list[dict[str, Any]] = []
    async with asyncio.timeout(timeout):
        while len(got) < n:
            got.append(await layer.receive(channel))
    return got


async def nothing_arrives(layer: Any, channel: str, wait: float = 0.3) -> bool:
    """True when no message arrives on channel within `wait` seconds.

    Relies on receive() being cancellation-safe (contract); a message that does arrive is
    returned to the caller's assertion via the raised AssertionError text.
    """
    try:
        msg = await asyncio.wait_for(layer.receive(channel), wait)
    except asyncio.TimeoutError:
        return True
    raise AssertionError(f"expected nothing on {channel!r}, got {msg!r}")


def msg(n: int, **extra: Any) -> dict[str, Any]:
    return {"type": "test.message", "n": n, **extra}


# ---------------------------------------------------------------- raw Redis access


@contextlib.asynccontextmanager
async def raw_redis(url: str) -> AsyncIterator[aioredis.Redis]:
    """A plain redis.asyncio client for observing the server; closed on exit."""
    client = aioredis.Redis.from_url(url)
    try:
        yield client
    finally:
        await client.aclose()


def client_name(prefix: str) -> str:
    """The CLIENT SETNAME the layer's connections use (contract of this test brief)."""
    return f"distrib:{prefix}"


async def layer_clients(client: aioredis.Redis, prefix: str) -> list[dict[str, Any]]:
    """CLIENT LIST entries of the layer connections of exactly this prefix."""
    entries = await client.client_list()
    return [e for e in entries if e.get("name") == client_name(prefix)]


async def kill_layer_clients(client: aioredis.Redis, prefix: str) -> int:
    """CLIENT KILL ID for every connection named distrib:<prefix>; never touches others."""
    killed = 0
    for entry in await layer_clients(client, prefix):
        try:
            killed += int(await client.execute_command("CLIENT", "KILL", "ID", entry["id"]))
        except aioredis.ResponseError:
            pass  # already gone
    return killed


async def prefix_keys(client: aioredis.Redis, prefix: str) -> list[bytes]:
    """Every key whose name contains this (unique, random) prefix string. SCAN, not KEYS."""
    return [k async for k in client.scan_iter(match=f"*{prefix}*", count=1000)]


async def key_values(client: aioredis.Redis, key: bytes) -> list[bytes]:
    """All raw byte values stored under a key, whatever its type."""
    kind = (await client.type(key)).decode()
    out: list[bytes] = []
    if kind == "list":
        out = list(await client.lrange(key, 0, -1))
    elif kind == "stream":
        for _id, fields in await client.xrange(key):
            for k, v in fields.items():
                out += [k, v]
    elif kind == "hash":
        for k, v in (await client.hgetall(key)).items():
            out += [k, v]
    elif kind == "string":
        value = await client.get(key)
        out = [value] if value is not None else []
    elif kind == "zset":
        out = list(await client.zrange(key, 0, -1))
    elif kind == "set":
        out = list(await client.smembers(key))
    return out


async def own_prefix_keys(client: aioredis.Redis, prefix: str) -> dict[bytes, tuple[str, int]]:
    """{key: (type, PTTL ms)} for every key matching ``<prefix>:*`` (SCAN, not KEYS).

    Judges keys generically (type and TTL), never by their names, so it holds whatever the
    layout under the prefix is. PTTL is -1 for a key without a TTL.
    """
    out: dict[bytes, tuple[str, int]] = {}
    async for key in client.scan_iter(match=f"{prefix}:*", count=1000):
        kind = (await client.type(key)).decode()
        if kind == "none":
            continue  # expired or deleted between SCAN and TYPE
        out[key] = (kind, int(await client.pttl(key)))
    return out


async def commandstats(client: aioredis.Redis) -> dict[str, int]:
    """INFO commandstats as {command: calls} (lower-case names, subcommands as a|b)."""
    raw = await client.execute_command("INFO", "commandstats")
    if isinstance(raw, bytes):
        raw = raw.decode()
    stats: dict[str, int] = {}
    if isinstance(raw, dict):  # redis-py parses INFO into a dict
        for key, value in raw.items():
            name = key[len("cmdstat_"):] if key.startswith("cmdstat_") else key
            stats[name] = int(value["calls"]) if isinstance(value, dict) else 0
        return stats
    for line in raw.splitlines():
        if line.startswith("cmdstat_"):
            name, _, rest = line[len("cmdstat_"):].partition(":")
            fields = dict(kv.split("=", 1) for kv in rest.split(","))
            stats[name] = int(fields["calls"])
    return stats


def stats_delta(before: dict[str, int], after: dict[str, int]) -> dict[str, int]:
    return {k: after.get(k, 0) - before.get(k, 0) for k in set(after) | set(before)
            if after.get(k, 0) != before.get(k, 0)}


def url_host_port(url: str) -> tuple[str, int]:
    parsed = urlparse(url)
    return parsed.hostname or "127.0.0.1", parsed.port or 6379


# ---------------------------------------------------------------- round-trip proxy


@dataclass
class _ProxyConn:
    turns: int = 0  # client->server bursts that follow a server->client burst (or start)
    last: str = "s2c"
    mute: bool = False  # replies from the server are swallowed
    armed: bool = False  # a reply matched cut_after_reply_with
    dropped: bool = False  # cut(): whatever this connection still holds is never forwarded


@dataclass
class RoundTripProxy:
    """A loopback TCP proxy in front of Redis that counts request/response round trips.

    A round trip is counted each time the client starts sending after the server last
    sent (or at the start of a connection); pipelined commands written together count once.
    """

    target_host: str
    target_port: int
    conns: list[_ProxyConn] = field(default_factory=list)
    _server: asyncio.base_events.Server | None = None
    _tasks: set[asyncio.Task[Any]] = field(default_factory=set)
    _writers: list[asyncio.StreamWriter] = field(default_factory=list)
    port: int = 0
    refusing: bool = False  # while True, new connections are closed at once (a partition)
    sever_next_request: bool = False  # one-shot: forward the next request, then drop the reply
    severed: int = 0
    stall_next_request: bool = False  # one-shot: forward the next request, never its reply
    stalled: int = 0
    # one-shot: after a reply containing these bytes reaches the client, that connection's next
    # request is not forwarded; the proxy cuts every connection instead (see cut()).
    cut_after_reply_with: bytes | None = None
    cut_fired: int = 0
    # seconds every client->server burst waits before it is forwarded (a slow link)
    delay: float = 0.0
    sent: list[bytes] = field(default_factory=list)  # every client->server burst, in order
    # one-shot: forward the next request containing these bytes, then swallow every reply on
    # that connection (the command ran; its caller never hears back)
    mute_reply_to: bytes | None = None
    muted: int = 0

    async def start(self) -> RoundTripProxy:
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def turns(self) -> int:
        return sum(c.turns for c in self.conns)

    def count_sent(self, token: bytes, since: int = 0) -> int:
        """Occurrences of ``token`` (e.g. b"EVALSHA") in what clients sent, from burst ``since``."""
        return sum(data.count(token) for data in self.sent[since:])

    async def _handle(self, creader: asyncio.StreamReader, cwriter: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        conn = _ProxyConn()
        self.conns.append(conn)
        self._writers.append(cwriter)
        if self.refusing:
            cwriter.close()
            self._tasks.discard(task)
            return
        try:
            sreader, swriter = await asyncio.open_connection(self.target_host, self.target_port)
        except OSError:
            cwriter.close()
            return
        self._writers.append(swriter)

        async def pump(src: asyncio.StreamReader, dst: asyncio.StreamWriter, way: str) -> None:
            try:
                while data := await src.read(65536):
                    if way == "c2s" and conn.armed:
                        conn.armed = False
                        self.cut_fired += 1
                        self.cut()
                        return
                    if way == "s2c" and self.cut_after_reply_with and self.cut_after_reply_with in data:
                        self.cut_after_reply_with = None
                        conn.armed = True
                    if way == "c2s":
                        self.sent.append(data)
                    if way == "c2s" and conn.last == "s2c":
                        conn.turns += 1
                    conn.last = way
                    if way == "s2c" and conn.mute:
                        continue
                    if way == "c2s" and self.sever_next_request:
                        # Mute before the request leaves: its reply must never reach the client.
                        conn.mute = True
                    if way == "c2s" and self.delay:
                        await asyncio.sleep(self.delay)
                        if conn.dropped:
                            return  # cut while held back: it never reaches Redis
                    dst.write(data)
                    await dst.drain()
                    if way == "c2s" and self.mute_reply_to and self.mute_reply_to in data:
                        self.mute_reply_to = None
                        self.muted += 1
                        conn.mute = True
                    if way == "c2s" and self.stall_next_request:
                        self.stall_next_request = False
                        self.stalled += 1
                        conn.mute = True
                    if way == "c2s" and self.sever_next_request:
                        # The request reached Redis; its reply never reaches the client.
                        self.sever_next_request = False
                        self.severed += 1
                        await asyncio.sleep(0.1)
                        cwriter.close()
                        swriter.close()
                        return
            except (ConnectionError, OSError):
                pass
            finally:
                dst.close()

        try:
            await asyncio.gather(pump(creader, swriter, "c2s"), pump(sreader, cwriter, "s2c"))
        finally:
            self._tasks.discard(task)

    def cut(self) -> None:
        """Drop every proxied connection and refuse new ones until heal()."""
        self.refusing = True
        for conn in self.conns:
            conn.dropped = True
        for w in self._writers:
            w.close()

    def heal(self) -> None:
        self.refusing = False

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
        for w in self._writers:
            w.close()
        for t in list(self._tasks):
            t.cancel()
        for t in list(self._tasks):
            with contextlib.suppress(BaseException):
                await t
        if self._server is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._server.wait_closed(), 2)


# ---------------------------------------------------------------- layers outside the fixture


@contextlib.asynccontextmanager
async def own_layer(**config: Any) -> AsyncIterator[Any]:
    """A layer this test closes itself (flush first unless flush=False is passed)."""
    from channels_distrib.layers import DistributedChannelLayer

    do_flush = config.pop("_flush", True)
    layer = DistributedChannelLayer(**config)
    try:
        yield layer
    except BaseException:
        # Clean up without letting a cleanup error (Redis is down, say) hide the real failure.
        if do_flush:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(layer.flush(), 10)
        with contextlib.suppress(Exception):
            await asyncio.wait_for(layer.close(), 10)
        raise
    try:
        if do_flush:
            await asyncio.wait_for(layer.flush(), 10)
    finally:
        await asyncio.wait_for(layer.close(), 10)


async def eventually(check: Callable[[], Awaitable[bool]], timeout: float = 5.0,
                     interval: float = 0.05) -> bool:
    """Poll an async predicate until it is true or timeout passes."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        if await check():
            return True
        if loop.time() > deadline:
            return False
        await asyncio.sleep(interval)


# ---------------------------------------------------------------- subprocess helper


def proc_env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    env.setdefault("DJANGO_SETTINGS_MODULE", "tests.settings")
    env.pop("PYTHONOPTIMIZE", None)
    return env


def run_proc_sync(args: list[str], optimize: bool = False, timeout: float = 40) -> dict[str, Any]:
    """Run tests/layer_proc.py to completion; returns its last stdout line as JSON."""
    script = os.path.join(ROOT, "tests", "layer_proc.py")
    cmd = [sys.executable, *(["-O"] if optimize else []), script, *args]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=ROOT,
                            env=proc_env())
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(5)
        raise
    lines = [ln for ln in out.decode().splitlines() if ln.strip()]
    if proc.returncode != 0 or not lines:
        raise AssertionError(
            f"layer_proc failed rc={proc.returncode}\nstdout={out!r}\nstderr={err.decode()}"
        )
    return json.loads(lines[-1])  # type: ignore[no-any-return]


class ProcReceiver:
    """tests/layer_proc.py `receive` mode in a child process, read asynchronously."""

    def __init__(
        self,
        redis_url: str,
        prefix: str,
        channel: str,
        broker: str | None = None,
        capacity: int | None = None,
    ) -> None:
        self.args = ["receive", redis_url, prefix, channel]
        self.env = proc_env()
        if broker:
            self.env["LAYER_PROC_BROKER"] = broker  # tests/layer_proc.py: CONFIG["broker"]
        if capacity is not None:
            self.env["LAYER_PROC_CAPACITY"] = str(capacity)
        self.proc: asyncio.subprocess.Process | None = None
        self.received: list[int] = []
        self.ready = asyncio.Event()
        self.stderr = b""
        self._reader: asyncio.Task[None] | None = None

    async def start(self) -> None:
        self.proc = await asyncio.create_subprocess_exec(
            sys.executable, os.path.join(ROOT, "tests", "layer_proc.py"), *self.args,
            stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE, cwd=ROOT, env=self.env,
        )
        self._reader = asyncio.create_task(self._read())

    async def _read(self) -> None:
        assert self.proc is not None and self.proc.stdout is not None
        while line := await self.proc.stdout.readline():
            text = line.decode().strip()
            if text == "READY":
                self.ready.set()
            elif text.startswith("GOT "):
                self.received.append(int(text[4:]))

    async def stop(self) -> int | None:
        """Ask the child to stop (closing its stdin), then wait; SIGKILL by pid if it lingers."""
        if self.proc is None:
            return None
        if self.proc.stdin is not None and not self.proc.stdin.is_closing():
            self.proc.stdin.close()
        try:
            await asyncio.wait_for(self.proc.wait(), 10)
        except asyncio.TimeoutError:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.proc.pid, signal.SIGKILL)
            await self.proc.wait()
        if self._reader is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._reader, 5)
        if self.proc.stderr is not None:
            self.stderr = await self.proc.stderr.read()
        return self.proc.returncode
