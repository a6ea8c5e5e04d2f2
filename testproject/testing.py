"""Run real daphne nodes of the demo project from tests: start on a free port, stop by pid.

Used by tests/test_testproject.py and tests/test_browser.py. Only the standard library,
so importing it never configures Django in the test process.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass
class Node:
    """One daphne process serving testproject.asgi:application."""

    node_id: str
    port: int
    proc: subprocess.Popen[bytes]
    log_path: Path
    _closed: bool = field(default=False, repr=False)

    @property
    def pid(self) -> int:
        return self.proc.pid

    @property
    def http_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def ws_url(self) -> str:
        return f"ws://127.0.0.1:{self.port}"

    @property
    def origin(self) -> str:
        return self.http_url

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def wait_ready(self, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.node_id} exited with {self.proc.returncode}:\n"
                                   f"{self.log()[-3000:]}")
            try:
                with urllib.request.urlopen(f"{self.http_url}/healthz/", timeout=1) as resp:
                    if resp.status == 200:
                        return
            except OSError:
                pass
            time.sleep(0.1)
        self.kill()
        raise RuntimeError(f"{self.node_id} not ready in {timeout} s:\n{self.log()[-3000:]}")

    def kill(self) -> None:
        """SIGKILL: no cleanup runs, as when a machine dies."""
        if self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGKILL)
        self.proc.wait(10)

    def stop(self, timeout: float = 10.0) -> None:
        """SIGTERM and wait (daphne shuts down cleanly), SIGKILL if it does not exit."""
        if self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                os.kill(self.proc.pid, signal.SIGKILL)
                self.proc.wait(10)
        else:
            self.proc.wait()


def start_node(redis_url: str, prefix: str, node_id: str, *, log_dir: str | None = None,
               extra_env: dict[str, str] | None = None, ready_timeout: float = 30.0) -> Node:
    """Start daphne with the demo project on a free port and wait until it answers HTTP."""
    port = free_port()
    log_dir = log_dir or tempfile.mkdtemp(prefix="distrib-node-")
    log_path = Path(log_dir) / f"{node_id}.log"
    env = dict(
        os.environ,
        DJANGO_SETTINGS_MODULE="testproject.settings",
        REDIS_URL=redis_url,
        DISTRIB_PREFIX=prefix,
        DISTRIB_NODE_ID=node_id,
        PYTHONUNBUFFERED="1",
        **(extra_env or {}),
    )
    env.pop("PYTHONWARNINGS", None)
    with open(log_path, "ab") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "daphne", "-b", "127.0.0.1", "-p", str(port),
             "testproject.asgi:application"],
            cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
        )
    node = Node(node_id=node_id, port=port, proc=proc, log_path=log_path)
    node.wait_ready(ready_timeout)
    return node
