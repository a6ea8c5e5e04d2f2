"""A real Redis Cluster for the tests: 3 masters (optionally a replica each) on loopback ports.

Each server is a :class:`~tests.redis_server.RedisProcess` started with ``--cluster-enabled
yes`` in a temporary directory of its own (its nodes.conf lives there, so a server killed and
restarted keeps its slots but comes back empty: nothing is persisted). ``redis-cli --cluster
create`` joins them. The cluster bus listens on port + 10000, so every port is below 55536
and both it and its bus port are free when chosen. Servers are stopped by their own pid.
"""

from __future__ import annotations

import random
import shutil
import socket
import subprocess
import tempfile
import time
from dataclasses import dataclass, field

from tests.redis_server import RedisProcess, _spawn, server_binary

#: Where cluster ports are picked: bus = port + 10000 stays a valid, free port too, and both
#: lie below the kernel's ephemeral range (32768 up), where an outgoing connection could take
#: them before the server binds.
PORT_RANGE = (10000, 22000)


def _free(port: int) -> bool:
    with socket.socket() as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def cluster_ports(count: int) -> list[int]:
    """``count`` ports whose own and bus (port + 10000) ports are free right now."""
    ports: list[int] = []
    while len(ports) < count:
        port = random.randrange(*PORT_RANGE)
        if port not in ports and _free(port) and _free(port + 10000):
            ports.append(port)
    return ports


def cluster_support() -> str | None:
    """None when redis-server can run a cluster here; else why not (the skip reason)."""
    binary = server_binary()
    if binary is None:
        return "no redis-server found"
    if shutil.which("redis-cli") is None and shutil.which("valkey-cli") is None:
        return "no redis-cli found (needed for --cluster create)"
    port = cluster_ports(1)[0]
    workdir = tempfile.mkdtemp(prefix="distrib-cluster-probe-")
    try:
        server = RedisProcess(port, _spawn(port, workdir, ["--cluster-enabled", "yes"]), workdir)
    except RuntimeError as exc:
        shutil.rmtree(workdir, ignore_errors=True)
        return f"{binary} does not start with --cluster-enabled yes ({exc})"
    try:
        if "cluster_enabled:1" not in _cli("-p", str(port), "info", "cluster"):
            return f"{binary} ignores --cluster-enabled (no cluster support)"
    finally:
        server.stop()
    return None


@dataclass
class Cluster:
    """A running cluster: ``servers[i]`` listens on ``ports[i]``; masters come first."""

    servers: list[RedisProcess]
    masters: int
    extra: list[str] = field(default_factory=list)

    @property
    def ports(self) -> list[int]:
        return [server.port for server in self.servers]

    @property
    def url(self) -> str:
        """A startup node's URL (any node will do)."""
        return f"redis://127.0.0.1:{self.servers[0].port}"

    def host(self, **options: object) -> dict[str, object]:
        """The layer's host entry for this cluster."""
        return {"address": self.url, "cluster": True, **options}

    def restart_empty(self, index: int) -> None:
        """SIGKILL one server and start it again on its port: same slots, no data."""
        server = self.servers[index]
        server.kill()
        server.restart()
        wait_ok(server.port)

    def stop(self) -> None:
        for server in self.servers:
            server.stop()


def _cli(*args: str) -> str:
    cli = shutil.which("redis-cli") or shutil.which("valkey-cli") or "redis-cli"
    done = subprocess.run([cli, *args], capture_output=True, text=True, timeout=60)
    if done.returncode != 0:
        raise RuntimeError(f"{cli} {' '.join(args)} failed: {done.stdout} {done.stderr}")
    return done.stdout


def _info(port: int) -> dict[str, str]:
    text = _cli("-p", str(port), "cluster", "info")
    return dict(line.split(":", 1) for line in text.split() if ":" in line)


def wait_ok(port: int, timeout: float = 30.0) -> None:
    """Wait until the node at ``port`` reports cluster_state:ok."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if _info(port).get("cluster_state") == "ok":
                return
        except RuntimeError:
            pass
        time.sleep(0.1)
    raise RuntimeError(f"cluster node {port} did not reach cluster_state:ok in {timeout} s")


def _wait_replicas(servers: list[RedisProcess], count: int, timeout: float = 30.0) -> None:
    """Wait until ``count`` replicas are linked to their masters (cluster_state:ok comes
    before the replicas have even been told whom to follow)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        linked = sum(
            "master_link_status:up" in _cli("-p", str(s.port), "info", "replication")
            for s in servers
        )
        if linked >= count:
            return
        time.sleep(0.1)
    raise RuntimeError(f"fewer than {count} replicas linked within {timeout} s")


def start_cluster(
    masters: int = 3, replicas: int = 0, extra_args: list[str] | None = None
) -> Cluster:
    """Start ``masters`` masters (each with ``replicas`` replicas) and join them;
    ``extra_args`` go to every redis-server."""
    count = masters * (1 + replicas)
    extra = ["--cluster-enabled", "yes", "--cluster-config-file", "nodes.conf",
             "--cluster-node-timeout", "2000", *(extra_args or [])]
    servers: list[RedisProcess] = []
    try:
        while len(servers) < count:
            port = cluster_ports(1)[0]
            workdir = tempfile.mkdtemp(prefix="distrib-cluster-")
            try:
                servers.append(RedisProcess(port, _spawn(port, workdir, extra), workdir, extra))
            except RuntimeError:  # the port (or its bus port) was taken meanwhile: another
                shutil.rmtree(workdir, ignore_errors=True)
                if len(servers) + 1 > 3 * count:
                    raise
        _cli("--cluster", "create", *(f"127.0.0.1:{s.port}" for s in servers),
             "--cluster-replicas", str(replicas), "--cluster-yes")
        for server in servers:
            wait_ok(server.port)
        if replicas:
            _wait_replicas(servers, masters * replicas)
    except BaseException:
        for server in servers:
            server.stop()
        raise
    return Cluster(servers, masters, extra)
