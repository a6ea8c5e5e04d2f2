"""Room history (channels_distrib.history): offsets, epochs, bounds and replay, on real Redis.

Layer and api level first, then consumers through the communicator helpers (two in-process
nodes), including a join while the room receives 500 messages a second.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Callable
from typing import Any

import pytest
from channels.exceptions import MessageTooLarge

from channels_distrib import api
from channels_distrib.history import parse_offset, text_with_offset
from tests.consumer_app import HistoryConsumer, HistoryLobbyConsumer, ProbeConsumer
from tests.consumer_fixtures import connect_fixture, nodes_fixture  # noqa: F401  (fixtures)
from tests.helpers_faults import FaultProxy
from tests.helpers_layers import eventually, nothing_arrives, raw_redis, recv, url_host_port

ROOM = "hroom"

#: The layer-level tests run over Redis and over RabbitMQ (conftest.message_path); the
#: consumer tests marked with ``over`` below too.
BOTH_MESSAGE_PATHS = True


@pytest.fixture(params=["redis", "broker"])
def over(request: pytest.FixtureRequest, nodes: Callable[..., Any]) -> str:
    """Installs the consumer tests' layers on the Redis message path or on RabbitMQ."""
    if request.param == "broker":
        nodes(broker=request.getfixturevalue("broker_url"))
    else:
        nodes()
    return str(request.param)


async def _member(layer: Any, room: str = ROOM) -> str:
    channel: str = await layer.new_channel()
    await layer.group_add(room, channel)
    return channel


async def _history_keys(redis_url: str, prefix: str) -> list[bytes]:
    async with raw_redis(redis_url) as client:
        keys = [key async for key in client.scan_iter(match=f"{prefix}:*", count=1000)]
    return sorted(key for key in keys if key.endswith((b"}:h", b"}:hc")))


def _n(messages: list[dict[str, Any]] | list[Any]) -> list[int]:
    return [m["n"] for m in messages]


# ---------------------------------------------------------------- offsets and text


def test_text_with_offset_adds_one_top_level_key() -> None:
    assert json.loads(text_with_offset('{"a": 1}', "o1")) == {"a": 1, "offset": "o1"}
    assert json.loads(text_with_offset("{}", "o1")) == {"offset": "o1"}
    assert json.loads(text_with_offset('{"a": {"b": 2}} ', "x")) == {"a": {"b": 2}, "offset": "x"}


@pytest.mark.parametrize(
    "bad", [None, 5, b"ab", "", "nope", "abcdef01:12-3:4", "ABCDEF01:1-0", "abcdef01:1-0" + "0" * 80]
)
def test_parse_offset_refuses_what_is_not_an_offset(bad: Any) -> None:
    assert parse_offset(bad) is None


# ---------------------------------------------------------------- layer level


async def test_a_room_without_history_costs_nothing_and_carries_no_offset(
    make_layer: Callable[..., Any], redis_url: str, prefix: str
) -> None:
    layer = make_layer()
    channel = await _member(layer)
    assert await layer.room_send(ROOM, {"type": "m", "n": 1}) is None
    assert "offset" not in await recv(layer, channel)
    assert await _history_keys(redis_url, prefix) == []
    read = await layer.room_history(ROOM)
    assert read.known and read.entries == []
    assert await layer.room_history_info(ROOM) is None


async def test_room_sends_are_numbered_kept_and_delivered_with_their_offset(
    make_layer: Callable[..., Any],
) -> None:
    sender, receiver = make_layer(), make_layer()  # two nodes: the offset crosses the inbox
    channel = await _member(receiver)
    await sender.history_configure(ROOM, count=10)
    offsets = [await sender.room_send(ROOM, {"type": "m", "n": i}) for i in range(5)]
    assert all(isinstance(o, str) for o in offsets)
    assert offsets == sorted(offsets) and len(set(offsets)) == 5  # grows within the room
    got = [await recv(receiver, channel) for _ in range(5)]
    assert [m["offset"] for m in got] == offsets and _n(got) == list(range(5))
    read = await receiver.room_history(ROOM)
    assert [e.offset for e in read.entries] == offsets and read.last == offsets[-1]
    after = await receiver.room_history(ROOM, since=offsets[1], limit=0)
    assert after.known and [e.offset for e in after.entries] == offsets[2:]
    at_end = await receiver.room_history(ROOM, since=offsets[-1])
    assert at_end.known and at_end.entries == []


@pytest.mark.redis_internals
async def test_offsets_survive_a_backlog_that_waits_in_redis(
    make_layer: Callable[..., Any],
) -> None:
    """Past capacity a consumer's messages wait in the inbox stream and are fetched back
    later: they still carry their offsets, in order."""
    sender, receiver = make_layer(), make_layer(capacity=2)
    channel = await _member(receiver)
    await sender.history_configure(ROOM, count=50)
    offsets = [await sender.room_send(ROOM, {"type": "m", "n": i}) for i in range(12)]
    await asyncio.sleep(0.3)  # all read by the node: 2 queued, 10 deferred
    got = [await recv(receiver, channel) for _ in range(12)]
    assert [m["offset"] for m in got] == offsets and _n(got) == list(range(12))


@pytest.mark.parametrize("read", ["room_history", "room_history_info"])
async def test_a_history_read_whose_connection_closes_once_written_is_sent_again(
    make_layer: Callable[..., Any], redis_url: str, read: str
) -> None:
    """A read in flight when its connection closes (a Redis restart, a CLIENT KILL, or
    redis-py closing all of a cluster client's connections) is sent again, not raised:
    running it twice changes nothing."""
    host, port = url_host_port(redis_url)
    sender = make_layer()  # the fixture's flush goes through this one
    await _member(sender)
    await sender.history_configure(ROOM, count=10)
    offset = await sender.room_send(ROOM, {"type": "m", "n": 1})
    proxy = await FaultProxy(port).start()
    reader = make_layer(hosts=[redis_url.replace(f"{host}:{port}", f"127.0.0.1:{proxy.port}")])
    try:
        await reader.room_history(ROOM)  # a pooled connection through the proxy
        proxy.stall()
        call = asyncio.ensure_future(getattr(reader, read)(ROOM))
        await asyncio.sleep(0.3)  # written to the proxy, held there
        proxy.cut()  # the reader sees "Connection closed by server"
        proxy.heal()
        proxy.unstall()
        result = await asyncio.wait_for(call, 5)
        await reader.close()
    finally:
        await proxy.stop()
    if read == "room_history":
        assert [e.offset for e in result.entries] == [offset]
    else:
        assert result is not None and result.entries == 1


async def test_plain_group_send_to_a_history_room_is_never_stored(
    make_layer: Callable[..., Any],
) -> None:
    layer = make_layer()
    channel = await _member(layer)
    await layer.history_configure(ROOM, count=10)
    await layer.group_send(ROOM, {"type": "m", "n": 1})
    assert "offset" not in await recv(layer, channel)
    assert (await layer.room_history(ROOM)).entries == []


async def test_history_is_bounded_by_count_bytes_and_age(
    make_layer: Callable[..., Any],
) -> None:
    layer = make_layer()
    await layer.history_configure("by-count", count=3)
    offsets = [await layer.room_send("by-count", {"type": "m", "n": i}) for i in range(6)]
    read = await layer.room_history("by-count")
    assert [e.offset for e in read.entries] == offsets[3:]
    # The oldest kept one still continues; one before it does not (older than the history).
    assert (await layer.room_history("by-count", since=offsets[2])).known
    assert not (await layer.room_history("by-count", since=offsets[1])).known

    await layer.history_configure("by-bytes", count=100, max_bytes=2000)
    for i in range(10):
        await layer.room_send("by-bytes", {"type": "m", "n": i, "pad": "x" * 500})
    info = await layer.room_history_info("by-bytes")
    assert info is not None and info.payload_bytes <= 2000 and 1 <= info.entries < 10
    assert info.memory_bytes > info.payload_bytes
    assert _n([layer.serializer.loads(e.payload) for e in (await layer.room_history("by-bytes")).entries])[-1] == 9

    await layer.history_configure("by-age", count=100, ttl=0.3)
    old = await layer.room_send("by-age", {"type": "m", "n": 0})
    await asyncio.sleep(0.5)
    read = await layer.room_history("by-age")
    assert read.known and read.entries == []  # expired
    assert not (await layer.room_history("by-age", since=None)).entries
    # The expired message was after nothing the caller had: from before it, unknown.
    epoch = old.split(":")[0]
    assert not (await layer.room_history("by-age", since=f"{epoch}:1-000000")).known
    assert (await layer.room_history("by-age", since=old)).known  # it saw the newest


async def test_settings_only_grow_the_larger_wins(make_layer: Callable[..., Any]) -> None:
    layer = make_layer()
    epoch = await layer.history_configure(ROOM, count=5, ttl=10)
    assert await layer.history_configure(ROOM, count=2, ttl=100) == epoch
    info = await layer.room_history_info(ROOM)
    assert info is not None and (info.max_entries, info.ttl) == (5, 100.0)


async def test_a_lost_history_or_another_rooms_offset_is_refused(
    make_layer: Callable[..., Any], redis_url: str, prefix: str
) -> None:
    layer = make_layer()
    await layer.history_configure(ROOM, count=10)
    await layer.history_configure("other", count=10)
    first = await layer.room_send(ROOM, {"type": "m", "n": 1})
    await layer.room_send(ROOM, {"type": "m", "n": 2})
    assert not (await layer.room_history("other", since=first)).known
    # Redis loses the room's history (a restart without persistence would): new epoch.
    async with raw_redis(redis_url) as client:
        await client.delete(*await _history_keys(redis_url, prefix))
    await layer.history_configure(ROOM, count=10)
    await layer.room_send(ROOM, {"type": "m", "n": 3})
    read = await layer.room_history(ROOM, since=first)
    assert not read.known and read.entries == []


async def test_a_node_writes_its_rooms_history_settings_again_after_redis_lost_them(
    make_layer: Callable[..., Any], redis_url: str, prefix: str, message_path: str
) -> None:
    """Redis restarted empty: once the node has re-registered its members, the room keeps
    history again (a new epoch), without waiting for another history connection to join."""
    layer = make_layer(heartbeat_interval=0.2, node_timeout=1.0)
    channel = await _member(layer)
    await layer.history_configure(ROOM, count=10)
    first = await layer.room_send(ROOM, {"type": "m", "n": 1})
    assert first is not None and (await recv(layer, channel))["offset"] == first
    async with raw_redis(redis_url) as client:  # every key of the prefix gone, as on a restart
        keys = [key async for key in client.scan_iter(match=f"{prefix}:*", count=1000)]
        await client.delete(*keys)
    # Sent before the node noticed: Redis knows no member and no history of the room.
    assert await layer.room_send(ROOM, {"type": "m", "n": 2}) is None

    async def member_back() -> bool:
        return channel in await layer.group_channels(ROOM)

    async def kept_again() -> bool:
        info = await layer.room_history_info(ROOM)
        return info is not None and info.max_entries >= 10

    assert await eventually(member_back, timeout=3), "the node did not re-register its member"
    assert await eventually(kept_again, timeout=3), "the room's history settings were not restored"
    third = await layer.room_send(ROOM, {"type": "m", "n": 3})
    assert third is not None and parse_offset(third) is not None
    assert parse_offset(third)[0] != parse_offset(first)[0]  # a new epoch: old offsets refused
    assert not (await layer.room_history(ROOM, since=first)).known
    if message_path == "broker":  # RabbitMQ kept the node's bindings: n=2 still arrived
        assert (await recv(layer, channel))["n"] == 2
    got = await recv(layer, channel)
    assert got["n"] == 3 and got["offset"] == third


async def test_bad_since_is_unknown_without_error_and_logs_at_debug_only(
    make_layer: Callable[..., Any], caplog: pytest.LogCaptureFixture
) -> None:
    layer = make_layer()
    await layer.history_configure(ROOM, count=10)
    offset = await layer.room_send(ROOM, {"type": "m", "n": 1})
    epoch = offset.split(":")[0]
    caplog.set_level(logging.DEBUG, logger="channels_distrib")
    future = f"{epoch}:{int(time.time() * 1000) + 10**6}-000000"
    for bad in ("garbage", 17, ["x"], "a" * 10_000, future, f"{epoch}:1-0:2", f"{epoch}x:1-0"):
        read = await layer.room_history(ROOM, since=bad)
        assert not read.known and read.entries == [], bad
    assert [r for r in caplog.records if r.levelno > logging.DEBUG] == []
    assert any("since" in r.getMessage() or "continue" in r.getMessage() for r in caplog.records)


async def test_offset_key_and_oversized_sends_are_refused_and_nothing_is_stored(
    make_layer: Callable[..., Any],
) -> None:
    layer = make_layer(max_message_size=1024 * 1024)
    channel = await _member(layer)
    await layer.history_configure(ROOM, count=10, max_bytes=8 * 1024 * 1024)
    with pytest.raises(ValueError, match="offset"):
        await layer.room_send(ROOM, {"type": "m", "offset": "mine"})
    with pytest.raises(ValueError, match="offset"):
        await api.send_room_envelope(layer, ROOM, {"type": "m", "offset": 1}, None)
    with pytest.raises(MessageTooLarge):
        await layer.room_send(ROOM, {"type": "m", "blob": "x" * (1024 * 1024 + 10)})
    assert (await layer.room_history(ROOM)).entries == []
    assert await nothing_arrives(layer, channel, 0.2)


async def test_exclude_is_kept_and_api_room_history_returns_client_frames(
    nodes: Callable[..., Any],
) -> None:
    manager = nodes()
    layer = manager["default"]
    await layer.history_configure(ROOM, count=10)
    first = await api.send_to_room(ROOM, {"type": "notice", "n": 1}, exclude="specific.a!b")
    second = await api.send_to_room(ROOM, {"type": "notice", "n": 2})
    read = await layer.room_history(ROOM)
    assert [e.exclude for e in read.entries] == ["specific.a!b", None]
    assert await api.room_history(ROOM) == [
        {"type": "notice", "n": 1, "offset": first},
        {"type": "notice", "n": 2, "offset": second},
    ]
    assert await api.room_history(ROOM, since=first) == [
        {"type": "notice", "n": 2, "offset": second}
    ]
    assert await api.room_history(ROOM, since="nonsense") is None
    assert await api.room_history(ROOM, limit=1) == [{"type": "notice", "n": 2, "offset": second}]


# ---------------------------------------------------------------- consumers


class FloodConsumer(HistoryConsumer):
    """Keeps enough history for a rejoin in the middle of a 500 msg/s stream, and is slow
    between writing the membership and reading the history (as over a slow network), so
    about 50 messages arrive both live and in the replay: each must reach the client once."""

    history = 2000

    async def _join(self, room: str, meta: Any) -> None:
        await super()._join(room, meta)
        await asyncio.sleep(0.1)


async def _sender_loop(client: Any, room: str, count: int, rate: float) -> None:
    """broadcast_to_room ``count`` times at ``rate`` per second (paced by wall clock)."""
    start = time.monotonic()
    for i in range(count):
        delay = start + i / rate - time.monotonic()
        if delay > 0:
            await asyncio.sleep(delay)
        await client.send_json(
            {"type": "room_send", "room": room, "message": {"type": "chat", "n": i}}
        )


async def _frames(client: Any, kind: str, until: Callable[[list[dict[str, Any]]], bool],
                  timeout: float = 15.0) -> list[dict[str, Any]]:
    got: list[dict[str, Any]] = []
    deadline = time.monotonic() + timeout
    while not until(got):
        remaining = deadline - time.monotonic()
        assert remaining > 0, f"only {len(got)} {kind} frames: {got[-3:]}"
        got.append(await client.expect(kind, timeout=remaining))
    return got


async def test_frames_of_a_history_room_carry_offsets_other_frames_do_not(
    connect: Callable[..., Any],
) -> None:
    alice = await connect(HistoryConsumer)
    bob = await connect(ProbeConsumer)
    await alice.request("hjoin", room=ROOM)
    await bob.request("join", room=ROOM)
    await bob.request("room_send", room=ROOM, message={"type": "chat", "n": 1})
    frame = await alice.expect("chat")
    assert parse_offset(frame["offset"]) is not None
    # Every member receives it with the same offset, whatever its own class keeps.
    assert (await bob.expect("chat"))["offset"] == frame["offset"]
    # Presence and direct frames are unchanged; the sender gets ValueError for "offset".
    whoami = await alice.request("whoami")
    await bob.request("client_send", client_id=whoami["client_id"], message={"type": "direct"})
    assert "offset" not in await alice.expect("direct")
    assert all("offset" not in f for f in alice.backlog if f["type"].startswith("presence"))


async def test_rejoin_with_since_replays_what_was_missed_then_live(
    connect: Callable[..., Any], over: str
) -> None:
    alice = await connect(HistoryConsumer)
    bob = await connect(HistoryConsumer)
    await alice.request("hjoin", room=ROOM)
    await bob.request("hjoin", room=ROOM)
    await bob.request("room_send", room=ROOM, message={"type": "chat", "n": 0})
    last_seen = (await alice.expect("chat", n=0))["offset"]
    alice_id = (await alice.request("whoami"))["client_id"]
    await alice.close()
    for i in range(1, 4):
        await bob.request("room_send", room=ROOM, message={"type": "chat", "n": i})
    alice2 = await connect(HistoryConsumer)
    await alice2.send_json({"type": "hjoin", "room": ROOM, "since": last_seen, "previous": alice_id})
    # The first frame is "joined" (recovered), then the replay in order, then live ones.
    joined = await alice2.expect("joined", room=ROOM)
    assert joined["recovered"] is True
    assert alice2.backlog == [] or all(f["type"] != "chat" for f in alice2.backlog)
    reply = await alice2.expect("reply.hjoin")
    assert reply["recovered"] is True
    await bob.request("room_send", room=ROOM, message={"type": "chat", "n": 4})
    got = await _frames(alice2, "chat", lambda g: len(g) >= 4)
    assert _n(got) == [1, 2, 3, 4]
    await alice2.assert_none("chat", within=0.3)


async def test_the_previous_connections_own_exclude_self_messages_are_skipped(
    connect: Callable[..., Any],
) -> None:
    alice = await connect(HistoryConsumer)
    bob = await connect(HistoryConsumer)
    await alice.request("hjoin", room=ROOM)
    await bob.request("hjoin", room=ROOM)
    await bob.request("room_send", room=ROOM, message={"type": "chat", "n": 0})
    since = (await alice.expect("chat", n=0))["offset"]
    alice_id = (await alice.request("whoami"))["client_id"]
    await alice.request(
        "room_send", room=ROOM, message={"type": "chat", "n": 1}, exclude_self=True
    )
    await bob.request("room_send", room=ROOM, message={"type": "chat", "n": 2})
    await alice.close()
    again = await connect(HistoryConsumer)
    reply = await again.request("hjoin", room=ROOM, since=since, previous=alice_id)
    assert reply["recovered"] is True
    assert _n([f for f in again.backlog if f["type"] == "chat"]) == [2]
    # Without "previous", the same since replays both.
    third = await connect(HistoryConsumer)
    await third.request("hjoin", room=ROOM, since=since)
    assert _n([f for f in third.backlog if f["type"] == "chat"]) == [1, 2]


@pytest.mark.parametrize("since", ["garbage", 12, "deadbeef:1-000000", None])
async def test_join_with_an_unknown_since_replays_nothing_and_says_so(
    connect: Callable[..., Any], since: Any
) -> None:
    bob = await connect(HistoryConsumer)
    await bob.request("hjoin", room=ROOM)
    await bob.request("room_send", room=ROOM, message={"type": "chat", "n": 0})
    alice = await connect(HistoryConsumer)
    reply = await alice.request("hjoin", room=ROOM, since=since)
    assert reply["recovered"] is False
    assert (await alice.expect("joined"))["recovered"] is False
    await alice.assert_none("chat", within=0.3)
    await bob.request("room_send", room=ROOM, message={"type": "chat", "n": 1})
    assert (await alice.expect("chat"))["n"] == 1  # live still works


async def test_replay_does_not_count_against_capacity(connect: Callable[..., Any],
                                                      nodes: Callable[..., Any]) -> None:
    nodes(capacity=5)
    bob = await connect(HistoryConsumer)
    await bob.request("hjoin", room=ROOM)
    alice = await connect(HistoryConsumer)
    await alice.request("hjoin", room=ROOM)
    await bob.request("room_send", room=ROOM, message={"type": "chat", "n": -1})
    since = (await alice.expect("chat", n=-1))["offset"]
    await alice.close()
    for i in range(30):  # six times the capacity
        await bob.request("room_send", room=ROOM, message={"type": "chat", "n": i})
    again = await connect(HistoryConsumer)
    assert (await again.request("hjoin", room=ROOM, since=since))["recovered"] is True
    assert _n([f for f in again.backlog if f["type"] == "chat"]) == list(range(30))


async def test_join_while_the_room_receives_500_messages_a_second_has_no_gap_or_duplicate(
    connect: Callable[..., Any], over: str
) -> None:
    """A rejoin with since in the middle of a 500 msg/s stream: replay + live is exact."""
    total = 1500  # three seconds at 500/s
    sender = await connect(FloodConsumer)
    watcher = await connect(FloodConsumer)
    await sender.request("hjoin", room=ROOM)
    await watcher.request("hjoin", room=ROOM)
    flood = asyncio.create_task(_sender_loop(sender, ROOM, total, 500.0))
    first = await _frames(watcher, "chat", lambda g: len(g) >= 200)
    await watcher.close()  # drops mid-stream ...
    since = first[-1]["offset"]
    await asyncio.sleep(0.2)  # ... misses about 100 ...
    rejoin = await connect(FloodConsumer)
    reply = await rejoin.request("hjoin", room=ROOM, since=since, timeout=10)
    assert reply["recovered"] is True
    assert not flood.done()  # the join happened while messages flowed
    rest = await _frames(rejoin, "chat", lambda g: bool(g) and g[-1]["n"] == total - 1)
    await flood
    numbers = _n(first) + _n(rest)
    assert numbers == list(range(total)), (len(numbers), len(set(numbers)))
    offsets = [f["offset"] for f in first + rest]
    assert offsets == sorted(offsets)
    await rejoin.assert_none("chat", within=0.3)


async def test_class_level_rooms_of_a_history_class_keep_history(
    connect: Callable[..., Any], nodes: Callable[..., Any]
) -> None:
    alice = await connect(HistoryLobbyConsumer)
    await alice.request("room_send", room="hlobby", message={"type": "chat", "n": 1})
    frame = await alice.expect("chat")
    assert parse_offset(frame["offset"]) is not None
    assert await api.room_history("hlobby") == [{"type": "chat", "n": 1, "offset": frame["offset"]}]


@pytest.mark.parametrize(
    ("attribute", "value"),
    [("history", -1), ("history", 2.5), ("history", True), ("history_ttl", 0),
     ("history_ttl", "300"), ("history_max_bytes", 0)],
)
def test_bad_history_settings_fail_when_the_class_is_defined(attribute: str, value: Any) -> None:
    from django.core.exceptions import ImproperlyConfigured

    with pytest.raises(ImproperlyConfigured, match=attribute):
        type("Bad", (HistoryConsumer,), {attribute: value})
