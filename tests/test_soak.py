"""The 60 s soak (``python -m benchmarks.soak --seconds 60``) as a test: marker ``soak``, not in
the default run; ``.ci/run`` runs it. The soak prints its table; this test shows it on failure."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

pytestmark = [pytest.mark.timeout(360)]


@pytest.mark.soak
def test_soak_60_seconds() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks.soak", "--seconds", "60"],
        cwd=ROOT, capture_output=True, text=True, timeout=330,
        env={**os.environ, "PYTHONPATH": ROOT},
    )
    print(proc.stdout)
    assert proc.returncode == 0, f"soak failed:\n{proc.stdout[-6000:]}\n{proc.stderr[-3000:]}"


@pytest.mark.cluster
def test_soak_60_seconds_on_a_redis_cluster() -> None:
    """The same soak on a 3-master Redis Cluster of its own (a master restarted empty each
    cycle instead of the one server); marker ``cluster``, so ``.ci/run``'s cluster step runs it."""
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks.soak", "--seconds", "60", "--cluster"],
        cwd=ROOT, capture_output=True, text=True, timeout=330,
        env={**os.environ, "PYTHONPATH": ROOT},
    )
    print(proc.stdout)
    assert proc.returncode == 0, f"soak failed:\n{proc.stdout[-6000:]}\n{proc.stderr[-3000:]}"
