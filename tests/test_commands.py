"""``manage.py distrib_status`` and ``distrib_prune`` against a real Redis."""

from __future__ import annotations

import asyncio
import io
import json
import os
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import redis
from django.core.management import CommandError, call_command
from django.test import override_settings

from tests.helpers_servers import without_slow_step_reports
from tests.redis_server import free_port

ROOT = Path(__file__).resolve().parent.parent
BACKEND = "channels_distrib.layers.DistributedChannelLayer"


def layers_setting(redis_url: str, prefix: str, **extra: Any) -> dict[str, Any]:
    return {"default": {"BACKEND": BACKEND,
                        "CONFIG": {"hosts": [redis_url], "prefix": prefix, **extra}}}


async def run_command(name: str, *args: str, layers: dict[str, Any]) -> str:
    """Run a command in a worker thread (it uses async_to_sync) under ``layers``."""
    out = io.StringIO()

    def call() -> None:
        call_command(name, *args, stdout=out)

    with override_settings(CHANNEL_LAYERS=layers):
        await asyncio.to_thread(call)
    return out.getvalue()


async def _known_state(make_layer: Callable[..., Any]) -> tuple[Any, Any, str, str, list[Any]]:
    a = make_layer(node_id="cmd-a")
    b = make_layer(node_id="cmd-b")
    ch_a = await a.new_channel()
    ch_b = await b.new_channel()
    await a.group_add("room1", ch_a, meta={"name": "ann"}, presence=True)
    await b.group_add("room1", ch_b, meta={"name": "ben"}, presence=True)
    await b.group_add("solo", ch_b)
    # Keep a receive pending on each channel, as a connected consumer would.
    receivers = [asyncio.create_task(a.receive(ch_a)), asyncio.create_task(b.receive(ch_b))]
    await asyncio.sleep(0.3)
    return a, b, ch_a, ch_b, receivers


async def _stop(tasks: list[Any]) -> None:
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)


async def test_status_json_on_a_known_state(
    make_layer: Callable[..., Any], redis_url: str, prefix: str
) -> None:
    a, b, ch_a, ch_b, receivers = await _known_state(make_layer)
    try:
        out = await run_command("distrib_status", "--json", "--group", "room1",
                                layers=layers_setting(redis_url, prefix))
    finally:
        await _stop(receivers)
    status = json.loads(out)
    nodes = {n["node_id"]: n for n in status["nodes"]}
    assert set(nodes) == {"cmd-a", "cmd-b"}
    assert nodes["cmd-a"]["pid"] == os.getpid()
    assert nodes["cmd-a"]["hostname"] == socket.gethostname()
    assert nodes["cmd-a"]["started_at"] <= nodes["cmd-a"]["last_seen"] <= time.time() + 5
    assert status["groups"] == {"room1": 2, "solo": 1}
    assert status["group"] == "room1"
    members = {m["channel"]: m for m in status["members"]}
    assert set(members) == {ch_a, ch_b}
    assert members[ch_a]["node_id"] == "cmd-a"
    assert members[ch_a]["meta"] == {"name": "ann"}
    assert members[ch_b]["node_id"] == "cmd-b"
    assert members[ch_b]["meta"] == {"name": "ben"}


async def test_status_text_on_a_known_state(
    make_layer: Callable[..., Any], redis_url: str, prefix: str
) -> None:
    a, b, ch_a, ch_b, receivers = await _known_state(make_layer)
    try:
        out = await run_command("distrib_status", "--group", "solo",
                                layers=layers_setting(redis_url, prefix))
    finally:
        await _stop(receivers)
    lines = out.splitlines()
    assert lines[0] == "Nodes: 2 live"
    assert lines[1].split() == ["NODE", "HOST", "PID", "UPTIME", "LAST", "SEEN", "CHANNELS"]
    assert [line.split()[0] for line in lines[2:4]] == ["cmd-a", "cmd-b"]
    assert lines[4] == "Groups: 2"
    assert [line.split() for line in lines[5:8]] == [["GROUP", "SIZE"], ["room1", "2"],
                                                    ["solo", "1"]]
    assert lines[8] == "Members of solo: 1"
    row = lines[10].split()
    assert row[:2] == [ch_b, "cmd-b"]
    assert row[-1] == "-"  # no meta


async def test_status_of_an_empty_prefix(redis_url: str, prefix: str) -> None:
    out = await run_command("distrib_status", "--group", "nobody",
                            layers=layers_setting(redis_url, prefix))
    assert out.splitlines() == ["Nodes: 0 live", "Groups: 0", "Members of nobody: 0"]


async def test_status_refuses_another_backend() -> None:
    layers = {"default": {"BACKEND": "channels.layers.InMemoryChannelLayer"}}
    with pytest.raises(CommandError, match="need channels_distrib.layers.DistributedChannelLayer"):
        await run_command("distrib_status", layers=layers)


@pytest.mark.parametrize("command", ["distrib_status", "distrib_prune"])
def test_unreachable_redis_is_one_line_and_nonzero(command: str, tmp_path: Path) -> None:
    port = free_port()  # nothing listens there
    started = time.monotonic()
    result = subprocess.run(
        [sys.executable, "testproject/manage.py", command],
        cwd=ROOT, capture_output=True, text=True, timeout=45,
        env={**_clean_env(), "REDIS_URL": f"redis://127.0.0.1:{port}/0",
             "DEMO_DATABASE": str(tmp_path / "db.sqlite3")},
    )
    assert result.returncode != 0
    assert result.stdout == ""
    assert "Traceback" not in result.stderr
    lines = without_slow_step_reports(result.stderr).strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith(f"CommandError: Cannot reach Redis at redis://127.0.0.1:{port}/0")
    assert time.monotonic() - started < 30


def _clean_env() -> dict[str, str]:
    env = dict(os.environ)
    env.pop("DJANGO_SETTINGS_MODULE", None)
    env.pop("PYTHONWARNINGS", None)
    return env


async def test_prune_removes_a_sigkilled_node(redis_url: str, prefix: str) -> None:
    timing = {"heartbeat_interval": 0.3, "node_timeout": 1.0}
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "tests.node_proc", "--url", redis_url, "--prefix", prefix,
        "--group", "doomed-room", "--presence", "--node-id", "cmd-dead",
        "--heartbeat-interval", "0.3", "--node-timeout", "1.0",
        cwd=ROOT, stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
    )
    try:
        assert proc.stdout is not None
        ready = json.loads(await asyncio.wait_for(proc.stdout.readline(), 20))
        assert ready["event"] == "ready", ready
        layers = layers_setting(redis_url, prefix, **timing)
        status = json.loads(await run_command("distrib_status", "--json", layers=layers))
        assert [n["node_id"] for n in status["nodes"]] == ["cmd-dead"]
        proc.kill()
        await proc.wait()
        await asyncio.sleep(1.5)  # past node_timeout, and no live node prunes on its own
        out = await run_command("distrib_prune", layers=layers)
        assert out.strip() == "Pruned 1 dead node: cmd-dead"
        status = json.loads(await run_command("distrib_status", "--json", "--group",
                                              "doomed-room", layers=layers))
        assert status["nodes"] == [] and status["members"] == []
        assert (await run_command("distrib_prune", layers=layers)).strip() == \
            "No dead nodes to prune."
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
        _flush(redis_url, prefix)


def _flush(redis_url: str, prefix: str) -> None:
    client = redis.Redis.from_url(redis_url)
    try:
        keys = list(client.scan_iter(match=f"{prefix}*", count=500))
        if keys:
            client.delete(*keys)
    finally:
        client.close()
