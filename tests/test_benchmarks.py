"""The benchmark suite's harness does not rot: ``python -m benchmarks --size smoke`` as a real
run (node processes, a private redis-server, the report and the chart), at sizes that take
seconds. These check that every message was counted and every file written, never a timing:
benchmarks are not timed tests.

The layer-level scenario runs in the default selection (~6 s); every scenario together
(servers, WebSocket clients, presence workers: ~30 s) is marked slow.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_suite(out: Path, *options: str, timeout: float = 100) -> dict[str, Any]:
    """Run the suite as a user would, from the checkout; its JSON results."""
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks", "--size", "smoke", "--layers", "distrib",
         "--out", str(out), *options],
        cwd=ROOT, capture_output=True, text=True, timeout=timeout,
        env={**os.environ, "PYTHONPATH": ROOT},
    )
    assert proc.returncode == 0, f"suite failed:\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"
    for name in ("results.json", "results.md", "chart.png"):
        assert (out / name).stat().st_size > 0, name
    assert (out / "chart.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # The report on stdout is the one written to results.md, with the progress on stderr.
    assert proc.stdout.strip() == (out / "results.md").read_text().strip()
    assert "..." in proc.stderr
    data: dict[str, Any] = json.loads((out / "results.json").read_text())
    return data


def all_delivered(phase: dict[str, Any]) -> None:
    assert phase["sent"] > 0 and phase["send_errors"] == 0
    assert phase["received"] == phase["expected"] > 0
    assert phase["dups"] == 0


@pytest.mark.timeout(120)
def test_layers_scenario_counts_every_delivery(tmp_path: Path) -> None:
    data = run_suite(tmp_path, "--scenarios", "layers")
    (result,) = data["results"]["layers"]["rounds"]["distrib"]
    assert not result["skipped"]
    for phase in (result["paced"], result["max"]):
        all_delivered(phase)
        assert phase["expected"] == phase["sent"] * 10  # 1 node x 10 members
    assert result["paced"]["latencies_ms"]["p99"] is not None
    assert result["keys_left"] <= 1  # the flush epoch key, by design
    table = (tmp_path / "results.md").read_text()
    assert "| channels_distrib `DistributedChannelLayer` |" in table
    assert "0.00% / 0.00%" in table  # the loss column of the fan-out table


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_every_scenario_runs(tmp_path: Path) -> None:
    data = run_suite(tmp_path, timeout=220)
    results = data["results"]
    assert set(results) == {"layers", "memory", "big", "rooms", "e2e", "connections", "presence"}
    (big,) = results["big"]["results"]
    assert not big["skipped"] and big["received"] == big["expected"] == 2 * 100
    assert len(big["last_ms"]) == 2
    (rooms,) = results["rooms"]["results"]
    assert not rooms["skipped"]
    all_delivered(rooms["paced"])
    all_delivered(rooms["max"])
    (memory,) = results["memory"]
    assert not memory["skipped"] and memory["used_delta"] > 0
    (e2e,) = results["e2e"]["results"]
    assert not e2e["notes"] and e2e["received"] == e2e["expected"] > 0
    (conn,) = results["connections"]["results"]
    assert not conn["notes"] and conn["connected"] == 20
    assert conn["received"] == conn["expected"] == 20 and len(conn["reach_ms"]) == 1
    (fill,) = results["presence"]
    assert fill["n"] == 40 and fill["messages"] > 0


def test_report_is_written_between_the_markers_and_nowhere_else(tmp_path: Path) -> None:
    from benchmarks._report import END, START, write_into

    doc = tmp_path / "README.md"
    doc.write_text(f"# Title\n\nbefore\n{START}\nold table\n{END}\nafter\n")
    write_into(str(doc), "| new | table |")
    write_into(str(doc), "| newer | table |")  # again: the block is replaced, not appended
    assert doc.read_text() == f"# Title\n\nbefore\n{START}\n| newer | table |\n{END}\nafter\n"
    for readme in ("README.md", "benchmarks/README.md"):  # both results sections exist
        text = Path(ROOT, readme).read_text()
        assert text.count(START) == text.count(END) == 1, readme
    doc.write_text("no markers\n")
    with pytest.raises(SystemExit, match="no .* block"):
        write_into(str(doc), "x")


@pytest.mark.cluster
@pytest.mark.timeout(120)
def test_cluster_column_runs_on_the_cluster_and_leaves_no_key(tmp_path: Path, redis_cluster: Any) -> None:
    from redis.cluster import RedisCluster

    data = run_suite(tmp_path, "--scenarios", "layers,big", "--layers", "distrib",
                     "--cluster-url", redis_cluster.url)
    rounds = data["results"]["layers"]["rounds"]
    assert set(rounds) == {"distrib", "cluster"}  # --cluster-url adds the column
    (result,) = rounds["cluster"]
    assert not result["skipped"]
    for phase in (result["paced"], result["max"]):
        all_delivered(phase)
    big = {r["key"]: r for r in data["results"]["big"]["results"]}
    assert big["cluster"]["received"] == big["cluster"]["expected"] == 200
    client = RedisCluster.from_url(redis_cluster.url)
    try:  # the run's keys were spread over the masters; none is left on any of them
        assert list(client.scan_iter(match="bench-cluster-*", count=1000)) == []
    finally:
        client.close()


@pytest.mark.timeout(60)
def test_a_failing_column_keeps_the_others_and_no_password_is_printed(tmp_path: Path) -> None:
    from benchmarks._common import free_port

    url = f"redis://bench:topsecret@127.0.0.1:{free_port()}/"  # nothing listens there
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks", "--size", "smoke", "--scenarios", "memory",
         "--layers", "distrib", "--cluster-url", url, "--out", str(tmp_path)],
        cwd=ROOT, capture_output=True, text=True, timeout=50,
        env={**os.environ, "PYTHONPATH": ROOT},
    )
    assert proc.returncode == 1, proc.stderr[-3000:]  # the run says it is incomplete
    rows = {r["key"]: r for r in json.loads((tmp_path / "results.json").read_text())
            ["results"]["memory"]}
    assert not rows["distrib"]["skipped"] and rows["distrib"]["used_delta"] > 0
    assert rows["cluster"]["skipped"].startswith("failed:")
    assert "bench:***@" in proc.stdout  # the command line, masked
    for text in (proc.stdout, proc.stderr, (tmp_path / "results.json").read_text(),
                 (tmp_path / "results.md").read_text()):
        assert "topsecret" not in text


@pytest.mark.timeout(120)
def test_history_benchmark_counts_one_round_trip_per_room_send(redis_url: str) -> None:
    """``python -m benchmarks.bench_history`` at a small size: it runs, every room send is
    one round trip with history and without, and the history's memory is reported."""
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks.bench_history", "--redis-url", redis_url,
         "--nodes", "2", "--members", "4", "--sends", "40", "--rounds", "1", "--keep", "20"],
        cwd=ROOT, capture_output=True, text=True, timeout=100,
        env={**os.environ, "PYTHONPATH": ROOT},
    )
    assert proc.returncode == 0, f"failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    rows = [line.split("|")[1:-1] for line in proc.stdout.splitlines()
            if line.startswith("| ") and not line.startswith("| room")]
    trips = {name.strip(): float(value) for name, value, _usec in rows}
    assert set(trips) == {"plain", "history"}, proc.stdout
    assert trips == {"plain": 1.0, "history": 1.0}, proc.stdout
    assert "history kept 20 entries" in proc.stdout, proc.stdout


@pytest.mark.timeout(120)
def test_inbox_read_benchmark_compares_xread_and_arm_inbox(redis_url: str) -> None:
    """``python -m benchmarks.bench_inbox_read`` at a small size: a row per batch size, each
    with client and Redis figures for both reads, and the going-idle line."""
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks.bench_inbox_read", "--redis-url", redis_url,
         "--entries", "600", "--rounds", "1", "--idle-reads", "20"],
        cwd=ROOT, capture_output=True, text=True, timeout=100,
        env={**os.environ, "PYTHONPATH": ROOT},
    )
    assert proc.returncode == 0, f"failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    rows = [line.split("|")[1:-1] for line in proc.stdout.splitlines()
            if line.startswith("| ") and line.split("|")[1].strip().isdigit()]
    assert [int(row[0]) for row in rows] == [1, 10, 100, 500], proc.stdout
    for row in rows:
        for cell in row[1:]:
            client, server = (float(x) for x in cell.split("/"))
            assert client > 0 and server > 0, proc.stdout
    assert "going idle" in proc.stdout and "ARM_INBOX" in proc.stdout, proc.stdout
