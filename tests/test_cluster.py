"""Redis Cluster: host config, kind mismatches, and the layer's contract on a real cluster."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest
from django.core.exceptions import ImproperlyConfigured

from channels_distrib.config import decode_host
from channels_distrib.layers import DistributedChannelLayer

# ------------------------------------------------------------------ config (offline)


def test_cluster_host_entry_is_decoded() -> None:
    host = decode_host({"address": "rediss://:secret@10.0.0.1:7000", "cluster": True})
    assert host.cluster and host.url == "rediss://:secret@10.0.0.1:7000"
    assert "secret" not in host.address
    assert not decode_host({"address": "redis://10.0.0.1:7000", "cluster": False}).cluster


@pytest.mark.parametrize(
    ("entry", "says"),
    [
        ({"address": "unix:///tmp/r.sock", "cluster": True}, "redis:// or rediss://"),
        ({"address": "redis://10.0.0.1:7000/3", "cluster": True}, "only database 0"),
        ({"address": "redis://10.0.0.1:7000", "cluster": "yes"}, "True or False"),
        ({"host": "10.0.0.1", "port": 7000, "cluster": True}, "needs an 'address'"),
        ({"sentinels": [("h", 26379)], "master_name": "m", "cluster": True}, "needs no Sentinel"),
        ({"address": "redis://h:7000", "cluster": True, "max_connections": 5}, "max_connections"),
    ],
)
def test_bad_cluster_entries_say_what_to_write(entry: dict[str, Any], says: str) -> None:
    with pytest.raises(ImproperlyConfigured, match=says) as info:
        decode_host(entry)
    if "max_connections" not in says and "True or False" not in says:
        assert "'cluster': True}" in str(info.value)  # the entry to write instead


# ------------------------------------------------------------------ on a real cluster


@pytest.fixture
async def make_cluster_layer(
    redis_cluster: Any, prefix: str
) -> AsyncIterator[Callable[..., DistributedChannelLayer]]:
    """Layers on the test's own prefix on the session's cluster; flushed and closed after."""
    made: list[DistributedChannelLayer] = []

    def factory(**config: Any) -> DistributedChannelLayer:
        config.setdefault("hosts", [redis_cluster.host()])
        config.setdefault("prefix", prefix)
        layer = DistributedChannelLayer(**config)
        made.append(layer)
        return layer

    yield factory
    if made:
        await made[0].flush()
    for layer in made:
        await layer.close()


@pytest.mark.cluster
async def test_a_standalone_entry_for_a_cluster_node_fails_on_the_first_command(
    redis_cluster: Any, prefix: str
) -> None:
    layer = DistributedChannelLayer(hosts=[redis_cluster.url], prefix=prefix)
    try:
        with pytest.raises(ImproperlyConfigured, match="is a Redis Cluster node") as info:
            await layer.send("plain", {"type": "x"})
        assert "'cluster': True}" in str(info.value)
    finally:
        await layer.close()


@pytest.mark.cluster
async def test_a_cluster_entry_for_a_standalone_server_fails_on_the_first_command(
    redis_url: str, prefix: str
) -> None:
    layer = DistributedChannelLayer(
        hosts=[{"address": redis_url.rsplit("/", 1)[0], "cluster": True}], prefix=prefix
    )
    try:
        with pytest.raises(ImproperlyConfigured, match="is not a Redis Cluster node") as info:
            await layer.send("plain", {"type": "x"})
        assert "drop 'cluster'" in str(info.value)
    finally:
        await layer.close()


@pytest.mark.cluster
async def test_named_channels_on_a_cluster(make_cluster_layer: Any) -> None:
    sender, receiver = make_cluster_layer(), make_cluster_layer()
    for i in range(20):
        name = f"named.{uuid.uuid4().hex[:6]}"
        await sender.send(name, {"type": "m", "i": i})
        assert (await receiver.receive(name))["i"] == i


@pytest.mark.cluster
async def test_process_local_channels_groups_and_queries_on_a_cluster(
    make_cluster_layer: Any,
) -> None:
    a, b = make_cluster_layer(), make_cluster_layer()
    ca, cb = await a.new_channel(), await b.new_channel()
    await a.send(cb, {"type": "direct"})
    assert (await b.receive(cb))["type"] == "direct"
    named = f"named.{uuid.uuid4().hex[:6]}"
    for group in ("g1", "g2"):
        await a.group_add(group, ca, meta={"n": "a"})
        await b.group_add(group, cb)
        await a.group_add(group, named)
    await b.group_send("g1", {"type": "hello"})
    assert (await a.receive(ca))["type"] == "hello"
    assert (await b.receive(cb))["type"] == "hello"
    assert (await a.receive(named))["type"] == "hello"
    assert await a.group_size("g1") == 3
    assert await b.group_channels("g2") == {ca, cb, named}
    members = {m.channel: m for m in await a.group_members("g1")}
    assert members[ca].meta == {"n": "a"} and members[ca].node_id == a.node_id
    assert await b.channel_groups(ca) == {"g1", "g2"}
    assert await b.channel_groups(named) == {"g1", "g2"}
    assert {n.node_id for n in await a.nodes()} == {a.node_id, b.node_id}
    assert await a.node_channels(b.node_id) == {cb}
    await a.group_discard("g1", cb)
    assert await a.group_channels("g1") == {ca, named}
    assert await b.channel_groups(cb) == {"g2"}
