"""Fault injection with real processes on loopback (issue 8): Redis restarted empty, CLIENT KILL
storms, a node's link cut, stalled and slowed, a Sentinel failover, a half-open WebSocket.

Each test runs 3 node processes (``benchmarks/_soak_node.py``, 5 recording consumers each, in
``soak-all`` and one of two presence rooms) against a Redis the test owns, while the test
process sends group and direct messages and records what every send returned. Afterwards the
tally compares what each consumer received with what was sent: nothing twice, nothing where it
was not sent, and every pair the contract promises delivered. The figures are printed (run with
``-s`` to see them). Marker ``faults``: not in the default run; ``.ci/run`` runs it.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import os
import socket
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import pytest

from benchmarks.soak import NodeHandle, RedisObserver
from channels_distrib.layers import DistributedChannelLayer
from tests.helpers_faults import (
    FAULT_TIMINGS,
    GROUPS,
    FaultProxy,
    Stream,
    consumer_errors,
    held_members,
    presence_leaves,
    received,
    registry_exact,
    sentinel_available,
    sentinel_master_port,
    start_cluster,
    start_sentinel_group,
    states,
    tally,
    wait_registry_exact,
)
from tests.redis_server import RedisProcess, ping, start_server

pytestmark = [pytest.mark.faults, pytest.mark.timeout(150)]

HEARTBEAT = FAULT_TIMINGS["heartbeat_interval"]
NODE_TIMEOUT = FAULT_TIMINGS["node_timeout"]
RETRY_TIMEOUT = FAULT_TIMINGS["retry_timeout"]
#: CLIENT KILL storm length: the issue asks for 30 s; the default run uses 15 s to keep the
#: faults step within its budget (FAULTS_STORM_SECONDS=30 for the full length).
STORM_SECONDS = float(os.environ.get("FAULTS_STORM_SECONDS", "15"))
#: Slack for polling the registry from this process (3 node round trips + 3 Redis reads).
POLL_SLACK = 0.3


def report(name: str, **figures: Any) -> None:
    print(f"\nFAULTS {name}: " + json.dumps(figures, default=str), flush=True)


@contextlib.asynccontextmanager
async def observer_layer(hosts: list[Any], prefix: str) -> AsyncIterator[Any]:
    """The test's own layer (a sender, never a node), closed within bounded time."""
    layer = DistributedChannelLayer(hosts=hosts, prefix=prefix, retry_timeout=RETRY_TIMEOUT)
    try:
        yield layer
    finally:
        with contextlib.suppress(Exception):
            await asyncio.wait_for(layer.close(), 10)


def cleanup(nodes: list[NodeHandle]) -> None:
    for node in nodes:
        node.cleanup()


async def start_stream(layer: Any, nodes: list[NodeHandle], rate: float = 40.0
                       ) -> tuple[Stream, asyncio.Event, asyncio.Task[None]]:
    stream = Stream(layer, held_members(await states(nodes)), rate=rate)
    stop = asyncio.Event()
    return stream, stop, asyncio.create_task(stream.run(stop))


# ---------------------------------------------------------------- a. Redis restarted empty


@dataclass
class RestartRun:
    stream: Stream
    got: dict[str, list[int]]
    errors: list[dict[str, Any]]
    killed_at: float
    exact_at: float
    exact_after: float  # seconds from Redis answering PING again to the registry being exact


async def restart_scenario() -> RestartRun:
    server = start_server()
    prefix = f"f{uuid.uuid4().hex[:10]}"
    nodes: list[NodeHandle] = []
    try:
        nodes = await start_cluster([server.url], prefix)
        async with observer_layer([server.url], prefix) as layer:
            await wait_registry_exact(layer, nodes, 5)
            stream, stop, task = await start_stream(layer, nodes)
            await asyncio.sleep(2.0)
            server.kill()
            killed_at = time.monotonic()
            await asyncio.sleep(RETRY_TIMEOUT + 2.5)  # long enough for sends to give up
            await asyncio.to_thread(server.restart)  # returns once PING answers
            exact_after = await wait_registry_exact(layer, nodes, 10)
            exact_at = time.monotonic()
            await asyncio.sleep(3.0)
            stop.set()
            await task
            got = await received(nodes)
            errors = await consumer_errors(nodes)
    finally:
        cleanup(nodes)
        server.stop()
    return RestartRun(stream, got, errors, killed_at, exact_at, exact_after)


@pytest.fixture(scope="module")
def restart_run() -> RestartRun:
    """One run with Redis SIGKILLed mid-stream and restarted empty, shared by two tests."""
    return asyncio.run(restart_scenario())


def test_redis_restarted_empty_while_streaming(restart_run: RestartRun) -> None:
    run = restart_run
    failed = [r for r in run.stream.sent if r.error]
    # Accepted well before the kill (already read by then) or after the registry is back.
    result = tally(run.stream.sent, run.got, lambda r, ch: r.ok and (
        r.ended < run.killed_at - 1.0 or r.started > run.exact_at))
    report("redis restart", registry_exact_after_s=round(run.exact_after, 3),
           sends=len(run.stream.sent), failed_sends=dict(run.stream.errors()),
           failed_waits=[round(r.waited, 2) for r in failed], tally=result.line())
    assert not run.errors, run.errors
    assert failed, "no send raised while Redis was down: the test did not test that"
    # A send already written when Redis died (or written before its client saw the close, a
    # few ms later) may have run: it raises a connection error and is not retried (at most
    # once). Every send made while Redis is down waits retry_timeout, then RedisUnavailable.
    in_flight = [r for r in failed if r.started <= run.killed_at + 0.05]
    later = [r for r in failed if r not in in_flight]
    assert later, "no send was made while Redis was down"
    assert {r.error for r in later} == {"RedisUnavailable"}, run.stream.errors()
    assert {r.error for r in in_flight} <= {"RedisUnavailable", "ConnectionError"}, in_flight
    for r in later:
        assert RETRY_TIMEOUT - 0.05 <= r.waited <= RETRY_TIMEOUT + 1.5, r
    assert not result.duplicates and not result.strays, result
    assert result.expected > 100 and not result.missing, result.missing[:10]


def test_registry_exact_within_one_heartbeat_of_redis_answering(restart_run: RestartRun) -> None:
    assert restart_run.exact_after <= HEARTBEAT + POLL_SLACK, (
        f"registry exact {restart_run.exact_after:.2f} s after Redis answered; promised "
        f"within one heartbeat ({HEARTBEAT} s)"
    )


# ---------------------------------------------------------------- b. CLIENT KILL storm


async def test_client_kill_storm_loses_and_duplicates_nothing(
    own_redis: RedisProcess, prefix: str
) -> None:
    nodes = await start_cluster([own_redis.url], prefix)
    observer = RedisObserver(own_redis.url)
    listings: list[int] = []
    killed = 0
    try:
        async with observer_layer([own_redis.url], prefix) as layer:
            await wait_registry_exact(layer, nodes, 5)
            stream, stop, task = await start_stream(layer, nodes)
            end = time.monotonic() + STORM_SECONDS
            while time.monotonic() < end:
                killed += await observer.kill_layer_clients(prefix)
                tick = time.monotonic() + 1.0
                while time.monotonic() < tick:
                    with contextlib.suppress(Exception):  # the probe's own link is killed too
                        listings.append(len(await layer.nodes()))
                    await asyncio.sleep(0.1)
            stop.set()
            await task
            exact_after = await wait_registry_exact(layer, nodes, 5)
            got = await received(nodes)
            errors = await consumer_errors(nodes)
            leaves = await presence_leaves(nodes)
    finally:
        await observer.aclose()
        cleanup(nodes)
    result = tally(stream.sent, got, lambda r, ch: r.ok)
    report("client kill storm", seconds=STORM_SECONDS, connections_killed=killed,
           sends=len(stream.sent), failed_sends=dict(stream.errors()),
           nodes_listings=len(listings), short_listings=sum(n != 3 for n in listings),
           presence_leaves=leaves, registry_exact_after_s=round(exact_after, 3),
           tally=result.line())
    assert killed >= STORM_SECONDS * 3, "the storm killed fewer connections than it should"
    assert not errors, errors
    assert listings and all(n == 3 for n in listings), "a live node was pruned during the storm"
    assert leaves == 0, "presence leaves were announced: a live node was pruned"
    assert not result.duplicates and not result.strays, result
    assert result.expected > 100 and not result.missing, result.missing[:10]


# ---------------------------------------------------------------- c. one node's link misbehaves


@dataclass
class CutRun:
    """What happened when node 0's link was cut for longer than node_timeout, then healed."""

    stream: Stream
    got: dict[str, list[int]]
    errors: list[dict[str, Any]]
    cut_channels: set[str]
    cut_at: float
    back_at: float
    unlisted_after: float
    pruned_after: float
    back_after: float
    members_left: dict[str, set[str]]

    def must_after_return(self, r: Any, channel: str) -> bool:
        """Other nodes' channels get every accepted send; the cut node's once it is back."""
        return r.ok and (channel not in self.cut_channels or r.started > self.back_at)

    def must_before_pruning(self, r: Any, channel: str) -> bool:
        """Sent to the cut node before it could have been pruned (its last beat was at most
        one interval before the cut), with margin: the contract delivers those on return."""
        return (r.ok and channel in self.cut_channels
                and r.ended < self.cut_at + NODE_TIMEOUT - HEARTBEAT - 0.5)


async def cut_scenario() -> CutRun:
    server = start_server()
    prefix = f"f{uuid.uuid4().hex[:10]}"
    proxy = await FaultProxy(server.port).start()
    nodes: list[NodeHandle] = []
    try:
        nodes = await start_cluster([server.url], prefix, first_hosts=[proxy.url])
        async with observer_layer([server.url], prefix) as layer:
            await wait_registry_exact(layer, nodes, 5)
            cut_node = nodes[0].node_id
            cut_channels = set((await nodes[0].command("state"))["channels"])
            stream, stop, task = await start_stream(layer, nodes)
            await asyncio.sleep(2.0)
            proxy.cut()
            cut_at = time.monotonic()
            limit = NODE_TIMEOUT + 3 * HEARTBEAT + 2
            while cut_node in {n.node_id for n in await layer.nodes()}:
                assert time.monotonic() - cut_at < limit, "cut-off node still listed"
                await asyncio.sleep(0.05)
            unlisted_after = time.monotonic() - cut_at
            while await layer.group_channels("soak-all") & cut_channels:
                assert time.monotonic() - cut_at < limit, "cut-off node's members not pruned"
                await asyncio.sleep(0.05)
            pruned_after = time.monotonic() - cut_at
            members_left = {g: await layer.group_channels(g) & cut_channels for g in GROUPS}
            await asyncio.sleep(1.0)
            proxy.heal()
            back_after = await wait_registry_exact(layer, nodes, 10)
            back_at = time.monotonic()
            await asyncio.sleep(3.0)
            stop.set()
            await task
            got = await received(nodes)
            errors = await consumer_errors(nodes)
    finally:
        cleanup(nodes)
        await proxy.stop()
        server.stop()
    return CutRun(stream, got, errors, cut_channels, cut_at, back_at, unlisted_after,
                  pruned_after, back_after, members_left)


@pytest.fixture(scope="module")
def cut_run() -> CutRun:
    """One cut-off run shared by the tests below (each checks one promise)."""
    return asyncio.run(cut_scenario())


def test_node_cut_off_past_node_timeout_is_pruned_then_fully_back(cut_run: CutRun) -> None:
    run = cut_run
    result = tally(run.stream.sent, run.got, run.must_after_return)
    back_only = tally(run.stream.sent, {c: run.got.get(c, []) for c in run.cut_channels},
                      lambda r, ch: run.must_after_return(r, ch) and ch in run.cut_channels)
    report("proxy cut", unlisted_after_s=round(run.unlisted_after, 2),
           pruned_after_s=round(run.pruned_after, 2), back_after_heal_s=round(run.back_after, 2),
           sends=len(run.stream.sent), failed_sends=dict(run.stream.errors()),
           tally=result.line(), cut_node_after_return=back_only.line())
    assert not run.errors, run.errors
    assert not any(run.members_left.values()), f"pruned node's members listed: {run.members_left}"
    # README: from the last beat to its members gone is at most node_timeout + heartbeat.
    assert run.pruned_after <= NODE_TIMEOUT + HEARTBEAT + POLL_SLACK, run.pruned_after
    assert run.back_after <= HEARTBEAT + 1.0 + POLL_SLACK, run.back_after  # reconnect + a beat
    assert not result.duplicates and not result.strays, result
    assert back_only.expected > 20 and not result.missing, result.missing[:10]


def test_node_cut_off_gets_what_was_sent_before_its_pruning(cut_run: CutRun) -> None:
    run = cut_run
    result = tally(run.stream.sent, run.got, run.must_before_pruning)
    by_id = {r.id: r for r in run.stream.sent}
    lost_at = sorted({round(by_id[i].started - run.cut_at, 2) for i, _ in result.missing})
    report("proxy cut, sent before pruning", tally=result.line(),
           missing_sent_s_after_cut=lost_at[:10] + (["..."] if len(lost_at) > 10 else []))
    assert result.expected > 20 and not result.missing, result.line()


async def test_node_link_stalled_and_slowed_costs_nothing(
    own_redis: RedisProcess, prefix: str
) -> None:
    proxy = await FaultProxy(own_redis.port).start()
    nodes = await start_cluster([own_redis.url], prefix, first_hosts=[proxy.url])
    stall = NODE_TIMEOUT - HEARTBEAT - 0.5  # 1 s: shorter than node_timeout with margin
    listings: list[bool] = []
    try:
        async with observer_layer([own_redis.url], prefix) as layer:
            await wait_registry_exact(layer, nodes, 5)
            stream, stop, task = await start_stream(layer, nodes)

            async def watch(seconds: float) -> None:
                end = time.monotonic() + seconds
                while time.monotonic() < end:
                    listings.append(await registry_exact(layer, nodes))
                    await asyncio.sleep(0.1)

            await watch(1.5)
            proxy.stall()
            await watch(stall)
            proxy.unstall()
            await watch(1.5)
            proxy.delay = 0.05  # 50 ms more on every chunk, both ways
            await watch(3.0)
            proxy.delay = 0.0
            await watch(1.5)
            stop.set()
            await task
            got = await received(nodes)
            errors = await consumer_errors(nodes)
            leaves = await presence_leaves(nodes)
    finally:
        cleanup(nodes)
        await proxy.stop()
    result = tally(stream.sent, got, lambda r, ch: r.ok)
    report("proxy stall and delay", stall_s=stall, sends=len(stream.sent),
           failed_sends=dict(stream.errors()), checks=len(listings),
           inexact_checks=listings.count(False), presence_leaves=leaves, tally=result.line())
    assert not errors, errors
    assert leaves == 0, "the stalled node was pruned (presence leaves announced)"
    assert listings and all(listings), "membership or node listing changed during stall/delay"
    assert not stream.errors(), stream.errors()
    assert not result.duplicates and not result.strays, result
    assert result.expected > 100 and not result.missing, result.missing[:10]


# ---------------------------------------------------------------- d. Sentinel failover


@dataclass
class FailoverRun:
    stream: Stream
    got: dict[str, list[int]]
    errors: list[dict[str, Any]]
    failover_after: float
    exact_after: float
    exact_at: float
    killed_at: float


async def failover_scenario() -> FailoverRun:
    group = await asyncio.to_thread(start_sentinel_group)
    prefix = f"f{uuid.uuid4().hex[:10]}"
    nodes: list[NodeHandle] = []
    try:
        # node_timeout outlasts the failover (about 2.3 s with down-after 1 s): a failover
        # slower than node_timeout prunes the nodes (documented: what is sent to a pruned node
        # after its pruning does not reach it).
        timings = {**FAULT_TIMINGS, "node_timeout": 6.0}
        nodes = await start_cluster(group.hosts, prefix, timings=timings)
        async with observer_layer(group.hosts, prefix) as layer:
            await wait_registry_exact(layer, nodes, 5)
            stream, stop, task = await start_stream(layer, nodes)
            await asyncio.sleep(2.0)
            old_port = group.master.port
            group.master.kill()
            killed_at = time.monotonic()
            while await asyncio.to_thread(sentinel_master_port, group) == old_port:
                assert time.monotonic() - killed_at < 30, "sentinels did not fail over"
                await asyncio.sleep(0.1)
            failover_after = time.monotonic() - killed_at
            exact_after = await wait_registry_exact(layer, nodes, 15)
            exact_at = time.monotonic()
            await asyncio.sleep(3.0)
            stop.set()
            await task
            got = await received(nodes)
            errors = await consumer_errors(nodes)
    finally:
        cleanup(nodes)
        await asyncio.to_thread(group.stop)
    return FailoverRun(stream, got, errors, failover_after, exact_after, exact_at, killed_at)


@pytest.fixture(scope="module")
def failover_run() -> FailoverRun:
    """One Sentinel failover run (master SIGKILLed mid-stream) shared by the tests below."""
    if not sentinel_available():
        pytest.skip("needs redis-server (sentinel mode)")
    return asyncio.run(failover_scenario())


def test_sentinel_failover_layer_follows_new_master(failover_run: FailoverRun) -> None:
    run = failover_run
    result = tally(run.stream.sent, run.got, lambda r, ch: r.ok and r.started > run.exact_at)
    accepted = tally(run.stream.sent, run.got, lambda r, ch: r.ok)
    by_id = {r.id: r for r in run.stream.sent}
    lost = sorted({(round(by_id[i].started - run.killed_at, 2), by_id[i].kind)
                   for i, _ in accepted.missing})
    report("sentinel failover", failover_after_s=round(run.failover_after, 2),
           registry_exact_after_failover_s=round(run.exact_after, 2),
           sends=len(run.stream.sent), failed_sends=dict(run.stream.errors()),
           tally_after_failover=result.line(),
           tally_all_accepted=accepted.line(), lost_sent_s_after_kill=lost[:12])
    assert not run.errors, run.errors
    assert not result.duplicates and not result.strays, result
    assert result.expected > 50 and not result.missing, result.missing[:10]


def test_sentinel_failover_delivers_what_the_new_master_accepted(
    failover_run: FailoverRun,
) -> None:
    run = failover_run
    failover_at = run.killed_at + run.failover_after
    result = tally(run.stream.sent, run.got, lambda r, ch: r.ok and r.started > failover_at)
    report("sentinel failover, accepted by the new master", tally=result.line())
    assert result.expected > 50 and not result.missing, result.line()


def test_sentinel_failover_sends_wait_then_raise_redis_unavailable(
    failover_run: FailoverRun,
) -> None:
    errors = run_errors = failover_run.stream.errors()
    report("sentinel failover sends", failed_sends=dict(run_errors),
           samples=failover_run.stream.error_samples())
    assert set(errors) <= {"RedisUnavailable"}, failover_run.stream.error_samples()
    for r in failover_run.stream.sent:
        if r.error:
            assert r.waited >= RETRY_TIMEOUT - 0.05, r


# ---------------------------------------------------------------- e. half-open WebSocket

PING_INTERVAL = 2
PING_TIMEOUT = 2
#: daphne checks its connections' ping deadlines every 2 s (Server.timeout_checker).
DAPHNE_CHECK_PERIOD = 2


class HalfOpenClient:
    """A raw TCP WebSocket client that handshakes, sends frames, then never reads again (so it
    never answers daphne's pings) and never closes: a vanished laptop."""

    def __init__(self, port: int, path: str) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=5)
        key = base64.b64encode(os.urandom(16)).decode()
        self.sock.sendall(
            f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nUpgrade: websocket\r\n"
            f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\n"
            f"Sec-WebSocket-Version: 13\r\nOrigin: http://127.0.0.1:{port}\r\n\r\n".encode()
        )
        head = b""
        while b"\r\n\r\n" not in head:
            chunk = self.sock.recv(4096)
            if not chunk:
                raise AssertionError(f"handshake refused: {head!r}")
            head += chunk
        assert head.startswith(b"HTTP/1.1 101"), head

    def send_json(self, content: dict[str, Any]) -> None:
        payload = json.dumps(content).encode()
        assert len(payload) < 126
        mask = os.urandom(4)
        masked = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
        self.sock.sendall(bytes([0x81, 0x80 | len(payload)]) + mask + masked)

    def closed_by_server(self, timeout: float) -> bool:
        """Read whatever is buffered; True once the server has closed the TCP connection."""
        self.sock.settimeout(timeout)
        try:
            while self.sock.recv(65536):
                pass
        except TimeoutError:
            return False
        except OSError:
            return True
        return True

    def close(self) -> None:
        self.sock.close()


async def test_half_open_websocket_closed_and_memberships_gone(
    own_redis: RedisProcess, prefix: str
) -> None:
    from tests.consumer_clients import WsClient
    from tests.helpers_daphne import start_daphne

    env = {"DISTRIB_REDIS_URL": own_redis.url, "DISTRIB_PREFIX": prefix,
           "DISTRIB_LAYER_CONFIG": json.dumps({"heartbeat_interval": HEARTBEAT,
                                               "node_timeout": NODE_TIMEOUT})}
    node = await asyncio.to_thread(
        start_daphne, "tests.consumer_asgi:application", env,
        extra_args=["--ping-interval", str(PING_INTERVAL), "--ping-timeout", str(PING_TIMEOUT)],
    )
    room = "halfopen"
    half: HalfOpenClient | None = None
    watcher: WsClient | None = None
    try:
        async with observer_layer([own_redis.url], prefix) as layer:
            watcher = await WsClient.connect(f"{node.url}/ws/test/")
            await watcher.request("join", room=room)
            half = HalfOpenClient(node.port, "/ws/test/")
            half.send_json({"type": "join", "room": room})
            deadline = time.monotonic() + 5
            while len(await layer.group_channels(room)) < 2:
                assert time.monotonic() < deadline, "half-open client never joined"
                await asyncio.sleep(0.05)
            joined = await layer.group_channels(room)
            silent_at = time.monotonic()  # from here on it never reads nor answers a ping
            documented = PING_INTERVAL + PING_TIMEOUT + DAPHNE_CHECK_PERIOD
            while len(await layer.group_channels(room)) > 1:
                assert time.monotonic() - silent_at < documented + 10, "membership never went"
                await asyncio.sleep(0.05)
            gone_after = time.monotonic() - silent_at
            remaining = await layer.group_channels(room)
            leave = await watcher.expect("presence.diff", timeout=5)
            while not leave["leaves"]:  # the first diff may still be the join
                leave = await watcher.expect("presence.diff", timeout=5)
            closed = await asyncio.to_thread(half.closed_by_server, 5)
            # The watcher answers pings: still connected and still a member.
            reply = await watcher.request("rooms")
    finally:
        if half is not None:
            half.close()
        if watcher is not None:
            with contextlib.suppress(Exception):
                await watcher.close()
        await asyncio.to_thread(node.terminate)
    report("half-open websocket", ping_interval=PING_INTERVAL, ping_timeout=PING_TIMEOUT,
           membership_gone_after_s=round(gone_after, 2), bound_s=documented)
    assert closed, "daphne never closed the half-open connection"
    assert len(remaining) == 1 and remaining < joined, (joined, remaining)
    assert [e["channel"] for e in leave["leaves"]] == sorted(joined - remaining), leave
    assert reply["rooms"] == [room]
    assert gone_after <= documented + 1.5, (
        f"memberships gone {gone_after:.1f} s after the client went silent; the bound is "
        f"ping interval + ping timeout + daphne's 2 s check period = {documented} s"
    )
    assert ping("127.0.0.1", own_redis.port)
