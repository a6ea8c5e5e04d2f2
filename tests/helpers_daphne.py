"""Start real daphne processes for multi-node tests, and stop exactly the pids we started.

Usage::

    node = start_daphne("tests.consumer_app:application", {"DISTRIB_PREFIX": prefix})
    try:
        ...  # ws://127.0.0.1:{node.port}/...
    finally:
        node.terminate()

The child inherits this process's environment plus ``env``, runs from the repository
root (so ``tests.*`` modules import) with ``sys.executable -m daphne``, and its output
goes to a log file whose tail is included in errors (``node.log_tail()``); the log is
deleted when the node stops unless ``DAPHNE_KEEP_LOGS`` is set (its path is
``node.log_path``, under the temp directory as ``daphne-*.log``).
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from tests.redis_server import free_port

REPO_ROOT = Path(__file__).resolve().parent.parent
START_TIMEOUT = 30.0
STOP_TIMEOUT = 10.0


@dataclass
class DaphneProcess:
    """A daphne we started; every method acts on ``pid`` only."""

    port: int
    proc: subprocess.Popen[bytes]
    log_path: str
    app: str
    env: dict[str, str] = field(default_factory=dict)

    @property
    def pid(self) -> int:
        return self.proc.pid

    @property
    def url(self) -> str:
        """``ws://127.0.0.1:<port>``; append the path."""
        return f"ws://127.0.0.1:{self.port}"

    @property
    def http_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def alive(self) -> bool:
        return self.proc.poll() is None

    def terminate(self) -> None:
        """SIGTERM (daphne shuts down cleanly), SIGKILL after 10 s; then remove the log."""
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(STOP_TIMEOUT)
        self._remove_log()

    def kill(self) -> None:
        """SIGKILL: the node dies without cleaning up (for node-death tests)."""
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(STOP_TIMEOUT)

    def pause(self) -> None:
        """SIGSTOP the process (resume with :meth:`resume`)."""
        os.kill(self.pid, signal.SIGSTOP)

    def resume(self) -> None:
        os.kill(self.pid, signal.SIGCONT)

    def log_tail(self, chars: int = 4000) -> str:
        try:
            return Path(self.log_path).read_text(errors="replace")[-chars:]
        except OSError:
            return ""

    def _remove_log(self) -> None:
        if os.environ.get("DAPHNE_KEEP_LOGS"):
            return
        try:
            os.unlink(self.log_path)
        except OSError:
            pass


def _accepts(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.2):
            return True
    except OSError:
        return False


def _spawn(app: str, env: dict[str, str], port: int, extra_args: list[str]) -> DaphneProcess:
    fd, log_path = tempfile.mkstemp(prefix="daphne-", suffix=".log")
    child_env = {**os.environ, **env}
    child_env.setdefault("PYTHONUNBUFFERED", "1")
    args = [sys.executable, "-m", "daphne", "-b", "127.0.0.1", "-p", str(port), *extra_args, app]
    with os.fdopen(fd, "wb") as log:
        proc = subprocess.Popen(
            args, cwd=REPO_ROOT, env=child_env, stdout=log, stderr=subprocess.STDOUT
        )
    return DaphneProcess(port=port, proc=proc, log_path=log_path, app=app, env=dict(env))


def _wait_ready(node: DaphneProcess, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if node.proc.poll() is not None:
            return False
        if _accepts(node.port):
            return True
        time.sleep(0.05)
    return False


def start_daphne(
    app: str,
    env: dict[str, str] | None = None,
    port: int | None = None,
    *,
    extra_args: list[str] | None = None,
    timeout: float = START_TIMEOUT,
) -> DaphneProcess:
    """Start ``daphne <app>`` on 127.0.0.1 and return once it accepts TCP connections.

    ``port`` None picks a free one (retried on a lost race for the port). Raises
    ``RuntimeError`` with the log tail if daphne exits or is not ready within ``timeout``.
    """
    attempts = 1 if port is not None else 3
    last = ""
    for _ in range(attempts):
        node = _spawn(app, dict(env or {}), port or free_port(), list(extra_args or []))
        if _wait_ready(node, timeout):
            return node
        last = node.log_tail()
        node.kill()
        node._remove_log()
        if "Address already in use" not in last:
            break
    raise RuntimeError(f"daphne {app} did not start:\n{last}")
