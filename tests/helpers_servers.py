"""Start the same ASGI app under daphne, uvicorn or hypercorn; stop exactly the pid we started.

``start_server("uvicorn", "tests.consumer_asgi:application", env)`` returns the same record
as :func:`tests.helpers_daphne.start_daphne` (port, process, log; ``terminate()`` sends
SIGTERM), so tests can be parametrised over the server.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import tempfile
import time

from tests.helpers_daphne import REPO_ROOT, START_TIMEOUT, DaphneProcess, start_daphne
from tests.redis_server import free_port

#: asyncio's debug-mode report of a slow step (tox runs with PYTHONDEVMODE=1), alone on a
#: line or after a logging prefix: "Executing <Task ...> took 0.125 seconds".
_SLOW_STEP = re.compile(r"^.*Executing <.*> took \d+(\.\d+)? seconds$")


def without_slow_step_reports(text: str) -> str:
    """``text`` without asyncio debug mode's slow-step reports: they name whatever code was
    running when a loaded machine paused the process, so they say nothing about output."""
    return "\n".join(line for line in text.splitlines() if not _SLOW_STEP.match(line))

SERVERS = ("daphne", "uvicorn", "hypercorn")


def _command(server: str, app: str, port: int, extra: list[str]) -> list[str]:
    if server == "uvicorn":
        return [sys.executable, "-m", "uvicorn", "--host", "127.0.0.1", "--port", str(port),
                "--lifespan", "on", "--no-access-log", *extra, app]
    if server == "hypercorn":
        return [sys.executable, "-m", "hypercorn", "--bind", f"127.0.0.1:{port}", *extra, app]
    raise ValueError(f"unknown server {server!r}")


def start_server(server: str, app: str, env: dict[str, str] | None = None,
                 timeout: float = START_TIMEOUT, extra_args: list[str] | None = None,
                 ) -> DaphneProcess:
    """Start ``app`` under ``server`` on a free loopback port; return once it accepts TCP.

    ``extra_args`` go to the server's command line before the app.
    """
    if server == "daphne":
        return start_daphne(app, env, timeout=timeout, extra_args=extra_args)
    port = free_port()
    argv = _command(server, app, port, list(extra_args or []))
    return start_command(argv, port, app, env, timeout=timeout)


def start_command(argv: list[str], port: int, app: str, env: dict[str, str] | None = None,
                  timeout: float = START_TIMEOUT) -> DaphneProcess:
    """Run ``argv`` (a server serving ``app`` on 127.0.0.1:``port``) from the repository
    root; return once the port accepts TCP. Raises ``RuntimeError`` with the log tail if it
    exits or is not ready within ``timeout``."""
    name = os.path.basename(argv[2] if argv[1:2] == ["-m"] else argv[0])
    fd, log_path = tempfile.mkstemp(prefix=f"{name}-", suffix=".log")
    child_env = {**os.environ, **(env or {}), "PYTHONUNBUFFERED": "1"}
    with os.fdopen(fd, "wb") as log:
        proc = subprocess.Popen(argv, cwd=REPO_ROOT, env=child_env,
                                stdout=log, stderr=subprocess.STDOUT)
    node = DaphneProcess(port=port, proc=proc, log_path=log_path, app=app, env=dict(env or {}))
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and node.alive():
        if _accepts(port):
            return node
        time.sleep(0.05)
    tail = node.log_tail()
    node.kill()
    node.terminate()
    raise RuntimeError(f"{' '.join(argv)} did not start:\n{tail}")


def _accepts(port: int) -> bool:
    import socket

    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.2):
            return True
    except OSError:
        return False
