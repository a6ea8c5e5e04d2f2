"""Metrics (the ``metrics`` extra) and ``node_stats()``: counters move as messages flow.

Real Redis throughout; node processes where figures cross processes (``node_stats``,
pruning); two real daphne nodes of the demo for ``/metrics``; a subprocess that hides
``prometheus_client`` for the "nothing imported without the extra" check.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import textwrap
import time
import urllib.request
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
import redis
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.registry import CollectorRegistry

from channels_distrib import metrics
from channels_distrib.stats import figures
from tests.helpers_layers import ROOT, eventually, own_layer, proc_env, recv, url_host_port
from tests.helpers_nodes import RoundTripProxy, node_spawner
from tests.test_testproject import Node, chat, start_node

pytestmark = pytest.mark.timeout(60)


@pytest.fixture
async def spawn_node(redis_url, prefix, make_layer):
    """Node processes on the test's prefix; killed (by pid) before make_layer's flush."""
    async with node_spawner(redis_url, prefix) as spawn:
        yield spawn


def scrape(*layers: Any) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """The exposition text of a registry holding only a collector of ``layers``, parsed back."""
    registry = CollectorRegistry()
    registry.register(metrics.LayerCollector(lambda: list(layers)))

    return parse(generate_latest(registry).decode())


def parse(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name.startswith("channels_distrib_"):
                samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return samples


def value(samples: dict[Any, float], name: str, **labels: str) -> float:
    return samples[(name, tuple(sorted(labels.items())))]


async def test_counters_move_as_messages_flow(make_layer: Any) -> None:
    layer = make_layer(capacity=5)
    other = make_layer()  # a second process's view: sends over Redis, not in memory
    mine = await layer.new_channel()
    before = scrape(layer, other)
    assert value(before, "channels_distrib_messages_sent_total", kind="direct") == 0

    await layer.send(mine, {"type": "m", "n": 1})  # in memory
    await other.send(mine, {"type": "m", "n": 2})  # through the node's inbox
    await other.send("work.queue", {"type": "m", "n": 3})
    await layer.group_add("room", mine)
    await layer.group_add("room", "work.queue")
    await other.group_send("room", {"type": "m", "n": 4})
    got = [(await recv(layer, mine))["n"] for _ in range(3)]
    assert got == [1, 2, 4]
    assert [(await recv(layer, "work.queue"))["n"] for _ in range(2)] == [3, 4]

    after = scrape(layer, other)
    sent = "channels_distrib_messages_sent_total"
    assert value(after, sent, kind="direct") == 2
    assert value(after, sent, kind="named") == 1
    assert value(after, sent, kind="group") == 2  # one node inbox entry, one queue item
    assert value(after, "channels_distrib_group_sends_total") == 1
    assert value(after, "channels_distrib_messages_delivered_total") == 5
    assert value(after, "channels_distrib_messages_dropped_total", reason="capacity") == 0
    # Only the receiving layer is a node: its view of the cluster is itself.
    assert value(after, "channels_distrib_nodes_alive") == 1
    assert layer.counters.delivered == 5 and other.counters.delivered == 0


async def test_drops_are_counted_by_reason(make_layer: Any, redis_url: str) -> None:
    layer = make_layer(channel_capacity={"slow.*": 1}, expiry=1)
    # capacity: a group_send to a full normal channel drops that copy.
    await layer.group_add("full", "slow.queue")
    await layer.group_send("full", {"type": "m"})
    await layer.group_send("full", {"type": "m"})
    # corrupt: a payload nobody can decode is skipped by receive().
    client = redis.Redis.from_url(redis_url)
    try:
        stamp = int((time.time() + 30) * 1000)
        client.rpush(layer.keys.queue("bad.queue"), f"{stamp}:".encode() + b"\xc1garbage")
        await layer.send("bad.queue", {"type": "ok"})
    finally:
        client.close()
    assert (await recv(layer, "bad.queue"))["type"] == "ok"
    # expired: a message left unread past expiry.
    mine = await layer.new_channel()
    await layer.send(mine, {"type": "late"})
    await asyncio.sleep(1.2)
    await layer.send(mine, {"type": "fresh"})
    assert (await recv(layer, mine))["type"] == "fresh"

    samples = scrape(layer)
    dropped = "channels_distrib_messages_dropped_total"
    assert value(samples, dropped, reason="capacity") == 1
    assert value(samples, dropped, reason="corrupt") == 1
    assert value(samples, dropped, reason="expired") == 1


async def test_node_stats_across_two_node_processes(make_layer: Any, spawn_node: Any) -> None:
    options = {"heartbeat_interval": 0.5, "node_timeout": 3}
    a, b = spawn_node(channels=3, group="room", **options), spawn_node(channels=2, group="room", **options)
    await asyncio.gather(a.ready(), b.ready())
    sender = make_layer()  # not a node: it only sends
    for n in range(5):
        await sender.group_send("room", {"type": "m", "n": n})
    await sender.send(a.channels[0], {"type": "m", "n": 99})
    assert sender.counters.group_sends == 5
    assert sender.counters.sent_group == 10  # one inbox entry per node per send
    assert sender.counters.sent_direct == 1

    want = {a.node_id: 5 * 3 + 1, b.node_id: 5 * 2}

    async def published() -> bool:
        stats = await sender.node_stats()
        return {s.node_id: s.delivered for s in stats} == want and all(
            s.nodes_alive == 2 and s.channels >= 2 for s in stats
        )

    assert await eventually(published, timeout=10), await sender.node_stats()
    stats = {s.node_id: s for s in await sender.node_stats()}
    assert stats[a.node_id].pid == a.pid and stats[b.node_id].pid == b.pid
    assert stats[a.node_id].sent == {"direct": 0, "group": 0, "named": 0}
    assert stats[a.node_id].dropped["capacity"] == 0
    assert abs(stats[a.node_id].at - time.time()) < 5
    # NodeInfo keeps its fields: node_stats() is the call that carries the figures.
    assert sorted(n.node_id for n in await sender.nodes()) == sorted(want)
    assert len((await sender.nodes())[0]) == 6


async def test_node_stats_is_one_round_trip(make_layer: Any, redis_url: str, prefix: str) -> None:
    node = make_layer()
    await node.new_channel()
    _host, port = url_host_port(redis_url)
    async with (
        RoundTripProxy(port) as proxy,
        own_layer(hosts=[proxy.url], prefix=prefix, _flush=False) as reader,
    ):
        assert [s.node_id for s in await reader.node_stats()] == [node.node_id]  # warm-up
        before = proxy.round_trips
        for _ in range(5):
            assert len(await reader.node_stats()) == 1
        assert proxy.round_trips - before == 5


async def test_prunes_and_nodes_alive(make_layer: Any, spawn_node: Any) -> None:
    options = {"heartbeat_interval": 0.3, "node_timeout": 1.2}
    layer = make_layer(**options)
    await layer.new_channel()
    doomed = spawn_node(channels=1, **options)
    await doomed.ready()

    async def alive(count: int) -> bool:
        return bool(layer._node.nodes_alive == count)

    async def pruned() -> bool:
        return bool(layer.counters.prunes == 1)

    assert await eventually(lambda: alive(2), timeout=5)
    assert value(scrape(layer), "channels_distrib_nodes_alive") == 2
    doomed.kill()
    assert await eventually(lambda: alive(1), timeout=8)
    assert await eventually(pruned, timeout=5)
    assert value(scrape(layer), "channels_distrib_prunes_total") == 1


async def test_reconnects_counted_when_redis_drops_us(own_redis: Any, prefix: str) -> None:
    async with own_layer(hosts=[own_redis.url], prefix=prefix) as layer:
        mine = await layer.new_channel()
        await layer.send(mine, {"type": "m"})
        await recv(layer, mine)
        assert layer.counters.reconnects == 0
        await asyncio.sleep(0.3)  # the inbox reader is blocked in XREAD now
        client = redis.Redis.from_url(own_redis.url)  # a private server: nobody else is on it
        try:
            assert client.client_kill_filter(_type="normal", skipme=True) >= 1
        finally:
            client.close()

        async def reconnected() -> bool:
            return bool(layer.counters.reconnects >= 1)

        assert await eventually(reconnected, timeout=8)
        # Reconnected: messages flow again.
        async with own_layer(hosts=[own_redis.url], prefix=prefix, _flush=False) as other:
            await other.send(mine, {"type": "after"})
        assert (await recv(layer, mine, timeout=8))["type"] == "after"
        assert value(scrape(layer), "channels_distrib_reconnects_total") >= 1


async def test_heartbeat_lag_grows_while_the_loop_is_blocked(make_layer: Any) -> None:
    layer = make_layer(heartbeat_interval=0.5, node_timeout=5)
    await layer.new_channel()
    await asyncio.sleep(0.7)  # a beat or two on time
    assert figures(layer)["heartbeat_lag"] < 0.4
    time.sleep(1.6)  # nothing on this loop runs: the heartbeat falls behind
    lag = value(scrape(layer), "channels_distrib_heartbeat_lag_seconds")
    assert 0.9 < lag < 2.5, lag
    await asyncio.sleep(1.0)  # the loop runs again and so do the beats
    assert figures(layer)["heartbeat_lag"] < 0.4


def test_nothing_is_imported_without_prometheus_client(redis_url: str) -> None:
    """With prometheus_client hidden, Django starts, the layer works, metrics says what to do."""
    prefix = f"t{uuid.uuid4().hex[:10]}"
    script = textwrap.dedent(
        f"""
        import asyncio, json, sys

        # As if it were not installed: find_spec() says None, an import raises ImportError.
        sys.modules["prometheus_client"] = None

        import django
        django.setup()
        from channels_distrib.layers import DistributedChannelLayer

        async def main():
            layer = DistributedChannelLayer(hosts=[{redis_url!r}], prefix={prefix!r})
            mine = await layer.new_channel()
            await layer.group_add("g", mine)
            await layer.group_send("g", {{"type": "m"}})
            got = await asyncio.wait_for(layer.receive(mine), 5)
            stats = await asyncio.wait_for(layer.node_stats(), 5)
            await layer.flush()
            await layer.close()
            return got["type"], layer.counters.delivered, len(stats)

        kind, delivered, nstats = asyncio.run(main())
        loaded = sorted(m for m, mod in sys.modules.items()
                        if m.startswith("prometheus_client") and mod is not None)
        try:
            import channels_distrib.metrics
            error = ""
        except ImportError as exc:
            error = str(exc)
        print(json.dumps({{"kind": kind, "delivered": delivered, "nstats": nstats,
                           "loaded": loaded, "error": error}}))
        """
    )
    out = subprocess.run([sys.executable, "-c", script], cwd=ROOT, env=proc_env(),
                         capture_output=True, text=True, timeout=40)
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["loaded"] == []
    assert (result["kind"], result["delivered"], result["nstats"]) == ("m", 1, 1)
    assert "pip install 'channels-distrib[metrics]'" in result["error"]


# -- the demo under daphne ------------------------------------------------------------


@pytest.fixture(scope="module")
def demo(redis_url: str) -> Iterator[tuple[Node, Node]]:
    prefix = f"mx{uuid.uuid4().hex[:8]}"
    a = start_node(redis_url, prefix, "node-a")
    try:
        b = start_node(redis_url, prefix, "node-b")
    except BaseException:
        a.stop()
        raise
    try:
        yield a, b
    finally:
        b.stop()
        a.stop()
        client = redis.Redis.from_url(redis_url)
        try:
            keys = list(client.scan_iter(match=f"{prefix}*", count=500))
            if keys:
                client.delete(*keys)
        finally:
            client.close()


def get_metrics(node: Node) -> tuple[str, dict[Any, float]]:
    with urllib.request.urlopen(f"{node.http_url}/metrics", timeout=5) as resp:
        assert resp.status == 200
        text = resp.read().decode()
        return resp.headers["Content-Type"], parse(text)


async def test_every_demo_node_serves_metrics_that_follow_the_chat(
    demo: tuple[Node, Node],
) -> None:
    a, b = demo
    _type, before_a = await asyncio.to_thread(get_metrics, a)
    _type, before_b = await asyncio.to_thread(get_metrics, b)
    async with chat(a, "alice") as alice, chat(b, "bob") as bob:
        await alice.join("metrics-room")
        await bob.join("metrics-room")
        for n in range(3):
            await alice.send({"type": "sendMessage", "message": f"hi {n}"})
            await bob.next("message")
        content_type, after_a = await asyncio.to_thread(get_metrics, a)
        _type, after_b = await asyncio.to_thread(get_metrics, b)
        assert content_type.startswith("text/plain")
        assert value(after_a, "channels_distrib_connections") == 1
        assert value(after_b, "channels_distrib_connections") == 1

        def grew(after: dict[Any, float], before: dict[Any, float], name: str, **labels: str) -> float:
            return value(after, name, **labels) - value(before, name, **labels)

        # Alice's node counts a send once its script's reply is in, which may come after
        # bob already has the message: the last one may show at the next scrape.
        deadline = time.monotonic() + 5
        while grew(after_a, before_a, "channels_distrib_group_sends_total") < 3:
            assert time.monotonic() < deadline, after_a
            await asyncio.sleep(0.05)
            _type, after_a = await asyncio.to_thread(get_metrics, a)
        # Bob's node delivered alice's three messages (and presence frames) to him.
        assert grew(after_b, before_b, "channels_distrib_messages_delivered_total") >= 3
    # Each node sees both at its next heartbeat (every 2 s in the demo).
    await until(a, "channels_distrib_nodes_alive", 2)
    await until(b, "channels_distrib_nodes_alive", 2)
    # Disconnected: the gauge follows (the consumers' clean-up runs on close).
    await until(a, "channels_distrib_connections", 0)
    await until(b, "channels_distrib_connections", 0)


async def until(node: Node, name: str, wanted: float, timeout: float = 6.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        seen = value((await asyncio.to_thread(get_metrics, node))[1], name)
        if seen == wanted:
            return
        assert time.monotonic() < deadline, f"{name} on {node.node_id} is {seen}, not {wanted}"
        await asyncio.sleep(0.1)
