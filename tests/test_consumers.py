"""DistributedConsumer through channels' WebsocketCommunicator against a real Redis.

Two nodes in one process: the channel-layer aliases ``default`` and ``other`` are two
layer instances on the test's prefix, and ``OtherNodeProbe`` is ``ProbeConsumer`` on
``other`` (same broadcast group).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from channels.exceptions import InvalidChannelLayerError
from channels.layers import channel_layers
from channels.testing import WebsocketCommunicator
from django.test import override_settings

from channels_distrib import api
from channels_distrib.consumers import DistributedConsumer, TokenBucket
from tests.consumer_app import (
    LimitedConsumer,
    LobbyConsumer,
    PlainConsumer,
    ProbeConsumer,
    QueryUserMiddleware,
)
from tests.consumer_clients import CommClient
from tests.consumer_fixtures import connect_fixture, nodes_fixture  # noqa: F401  (fixtures)


class OtherNodeProbe(ProbeConsumer):
    """ProbeConsumer on the second node (alias ``other``), sharing ProbeConsumer's broadcasts."""

    channel_layer_alias = "other"
    broadcast_group = ProbeConsumer.get_broadcast_group()


class QuietRooms(ProbeConsumer):
    presence = False


class CrashConsumer(ProbeConsumer):
    rooms = ("crashroom",)

    async def handle_crash(self, content: dict[str, Any]) -> None:
        raise RuntimeError("handler failed")


async def whoami(client: CommClient) -> dict[str, Any]:
    return await client.request("whoami")


# -- connect / disconnect -------------------------------------------------------------


async def test_connect_registers_broadcast_group_with_meta(connect, nodes) -> None:
    client = await connect()
    me = await whoami(client)
    layer = nodes()["default"]
    members = await layer.group_members(ProbeConsumer.get_broadcast_group())
    assert [m.channel for m in members] == [me["client_id"]]
    meta = members[0].meta
    assert meta["node_id"] == layer.node_id == members[0].node_id
    assert isinstance(meta["connected_at"], float)
    assert "user_id" not in meta
    assert me["user_id"] is None


async def test_authenticated_user_joins_user_group(connect, nodes) -> None:
    client = await connect(user="alice")
    me = await whoami(client)
    layer = nodes()["default"]
    assert await layer.group_channels(api.user_group("alice")) == {me["client_id"]}
    members = await layer.group_members(ProbeConsumer.get_broadcast_group())
    assert members[0].meta["user_id"] == "alice"
    groups = await layer.channel_groups(me["client_id"])
    assert groups == {ProbeConsumer.get_broadcast_group(), api.user_group("alice")}


async def test_disconnect_leaves_every_group(connect, nodes) -> None:
    client = await connect(LobbyConsumer, user="bob")
    await client.request("join", room="kitchen")
    me = await whoami(client)
    layer = nodes()["default"]
    assert await layer.channel_groups(me["client_id"]) == {
        LobbyConsumer.get_broadcast_group(),
        api.user_group("bob"),
        "lobby",
        "kitchen",
    }
    await client.close()
    assert await layer.channel_groups(me["client_id"]) == set()
    for group in ("lobby", "kitchen", api.user_group("bob"), LobbyConsumer.get_broadcast_group()):
        assert await layer.group_size(group) == 0


async def test_crashing_consumer_still_leaves_every_group(connect, nodes) -> None:
    client = await connect(CrashConsumer, user="carol")
    me = await whoami(client)
    layer = nodes()["default"]
    assert "crashroom" in await layer.channel_groups(me["client_id"])
    await client.send_json({"type": "crash"})
    with pytest.raises(RuntimeError, match="handler failed"):
        await client.comm.wait(timeout=10)
    client.closed = True
    assert await layer.channel_groups(me["client_id"]) == set()
    assert await layer.group_size("crashroom") == 0


async def test_class_level_rooms_joined_on_connect(connect) -> None:
    client = await connect(LobbyConsumer, name="ann")
    state = await client.expect("presence.state", group="lobby")
    me = await whoami(client)
    assert [m["channel"] for m in state["members"]] == [me["client_id"]]
    assert state["members"][0]["meta"]["name"] == "ann"
    assert (await client.request("rooms"))["rooms"] == ["lobby"]


async def test_layer_without_registry_is_refused(nodes) -> None:  # nodes: DB unblocked
    memory = {"default": {"BACKEND": "channels.layers.InMemoryChannelLayer"}}
    with override_settings(CHANNEL_LAYERS=memory):
        comm = WebsocketCommunicator(ProbeConsumer.as_asgi(), "/ws/")
        await comm.send_input({"type": "websocket.connect"})
        with pytest.raises(InvalidChannelLayerError, match="registry, presence"):
            await comm.wait(timeout=5)


async def test_denied_connect_registers_nothing(connect, nodes) -> None:
    class Denied(ProbeConsumer):
        rooms = ("deniedroom",)

        async def connect(self) -> None:
            await self.close()

    nodes()
    comm = WebsocketCommunicator(Denied.as_asgi(), "/ws/")
    connected, code = await comm.connect(timeout=5)
    assert not connected
    layer = channel_layers["default"]
    assert await layer.group_size(Denied.get_broadcast_group()) == 0
    assert await layer.group_size("deniedroom") == 0
    await comm.disconnect(timeout=5)


# -- rooms and presence ---------------------------------------------------------------


async def test_rooms_presence_state_and_diffs_across_nodes(connect) -> None:
    a = await connect(ProbeConsumer, name="a")
    b = await connect(OtherNodeProbe, name="b")
    a_id, b_id = (await whoami(a))["client_id"], (await whoami(b))["client_id"]

    await a.request("join", room="r1")
    state = await a.expect("presence.state", group="r1")
    assert [m["channel"] for m in state["members"]] == [a_id]

    await b.request("join", room="r1")
    state = await b.expect("presence.state", group="r1")
    assert {m["channel"] for m in state["members"]} == {a_id, b_id}
    diff = await a.expect("presence.diff", group="r1")
    assert [j["channel"] for j in diff["joins"]] == [b_id] and diff["leaves"] == []
    assert diff["joins"][0]["meta"]["name"] == "b"
    assert len({m["node_id"] for m in state["members"]}) == 2

    await b.request("leave", room="r1")
    diff = await a.expect("presence.diff", group="r1")
    assert diff["joins"] == [] and [x["channel"] for x in diff["leaves"]] == [b_id]
    assert (await b.request("rooms"))["rooms"] == []
    await b.assert_none("presence.diff", within=0.3)

    await b.request("join", room="r1")
    await a.expect("presence.diff", group="r1")
    await b.close()
    diff = await a.expect("presence.diff", group="r1")
    assert [x["channel"] for x in diff["leaves"]] == [b_id]


async def test_join_twice_is_a_no_op_and_leave_unknown_room_is_fine(connect) -> None:
    a = await connect()
    await a.request("join", room="r2")
    await a.expect("presence.state", group="r2")
    await a.request("join", room="r2")
    await a.assert_none("presence.state", within=0.3)
    assert (await a.request("size", room="r2"))["size"] == 1
    await a.request("leave", room="never-joined")
    assert (await a.request("rooms"))["rooms"] == ["r2"]


async def test_presence_false_rooms_send_no_presence(connect) -> None:
    a = await connect(QuietRooms)
    b = await connect(QuietRooms)
    await a.request("join", room="quiet")
    await b.request("join", room="quiet")
    await a.assert_none("presence.diff", within=0.3)
    await b.assert_none("presence.state", within=0.1)
    assert (await a.request("size", room="quiet"))["size"] == 2


async def test_room_members_and_size_across_nodes(connect, nodes) -> None:
    a = await connect(ProbeConsumer, user="u1", name="a")
    b = await connect(OtherNodeProbe, name="b")
    for client in (a, b):
        await client.request("join", room="members")
    reply = await a.request("members", room="members")
    by_name = {m["meta"]["name"]: m for m in reply["members"]}
    assert set(by_name) == {"a", "b"}
    layers = nodes()
    assert by_name["a"]["node_id"] == layers["default"].node_id
    assert by_name["b"]["node_id"] == layers["other"].node_id
    assert by_name["a"]["meta"]["user_id"] == "u1" and "user_id" not in by_name["b"]["meta"]
    assert all(isinstance(m["joined_at"], float) for m in reply["members"])
    assert (await b.request("size", room="members"))["size"] == 2
    assert (await b.request("size", room="empty-room"))["size"] == 0


async def test_join_room_with_explicit_meta(connect, nodes) -> None:
    a = await connect()
    await a.request("join", room="meta-room", meta={"role": "admin"})
    members = await nodes()["default"].group_members("meta-room")
    assert members[0].meta == {"role": "admin"}


# -- sending --------------------------------------------------------------------------

PAYLOAD = {"type": "chat", "text": "héllo ☃", "n": [1, 2.5, None, True], "nested": {"k": "v"}}


async def test_broadcast_reaches_every_connection_on_every_node(connect) -> None:
    a = await connect(ProbeConsumer)
    b = await connect(OtherNodeProbe)
    other_class = await connect(LobbyConsumer)
    await a.request("broadcast", message=PAYLOAD)
    assert await a.expect("chat") == PAYLOAD
    assert await b.expect("chat") == PAYLOAD
    await other_class.assert_none("chat", within=0.3)


async def test_broadcast_exclude_self(connect) -> None:
    a = await connect(ProbeConsumer)
    b = await connect(OtherNodeProbe)
    await a.request("broadcast", message={"type": "ping", "i": 1}, exclude_self=True)
    assert await b.expect("ping") == {"type": "ping", "i": 1}
    await a.assert_none("ping", within=0.3)


async def test_message_text_arrives_unchanged(connect) -> None:
    a = await connect()
    await a.request("join", room="raw")
    await a.expect("presence.state")
    await api.send_to_room("raw", PAYLOAD)
    output = await a.comm.receive_output(5)
    assert output == {"type": "websocket.send", "text": json.dumps(PAYLOAD)}


async def test_broadcast_to_room_exclude_self_excludes_only_this_tab(connect) -> None:
    tab1 = await connect(ProbeConsumer, user="dora")
    tab2 = await connect(OtherNodeProbe, user="dora")
    outsider = await connect()
    for tab in (tab1, tab2):
        await tab.request("join", room="tabs")
    await tab1.request("room.send", room="tabs", message={"type": "m", "v": 1}, exclude_self=True)
    assert await tab2.expect("m") == {"type": "m", "v": 1}
    await tab1.assert_none("m", within=0.3)
    await outsider.assert_none("m", within=0.1)
    await tab1.request("room-send", room="tabs", message={"type": "m", "v": 2})
    assert await tab1.expect("m") == {"type": "m", "v": 2}
    assert await tab2.expect("m") == {"type": "m", "v": 2}


async def test_send_to_client_across_nodes(connect) -> None:
    a = await connect(ProbeConsumer)
    b = await connect(OtherNodeProbe)
    b_id = (await whoami(b))["client_id"]
    await a.request("client.send", client_id=b_id, message={"type": "direct", "x": "y"})
    assert await b.expect("direct") == {"type": "direct", "x": "y"}
    await a.assert_none("direct", within=0.2)


async def test_send_to_client_rejects_non_connection_ids(connect) -> None:
    a = await connect()
    for bad in ("worker-queue", "bad name!x", 5):
        await a.send_json({"type": "client.send", "client_id": bad, "message": {"type": "x"}})
        await a.expect_error("invalid_message")
    assert (await a.request("rooms"))["rooms"] == []


async def test_send_to_user_reaches_all_their_connections(connect) -> None:
    u_a = await connect(ProbeConsumer, user="erin")
    u_b = await connect(OtherNodeProbe, user="erin")
    other = await connect(ProbeConsumer, user="frank")
    anon = await connect()
    await anon.request("user.send", user_id="erin", message={"type": "dm", "t": 1})
    assert await u_a.expect("dm") == {"type": "dm", "t": 1}
    assert await u_b.expect("dm") == {"type": "dm", "t": 1}
    await other.assert_none("dm", within=0.3)
    await anon.assert_none("dm", within=0.1)


async def test_plain_websocket_base_consumer(connect) -> None:
    client = await connect(PlainConsumer)
    assert (await client.request("echo", x=1))["x"] == 1
    await client.send_text("{nope")
    await client.expect_error("invalid_json")


# -- inbound errors and middleware ------------------------------------------------------


async def test_error_codes_keep_the_connection_open(connect) -> None:
    a = await connect()
    cases: list[tuple[str | bytes, str]] = [
        ("not json", "invalid_json"),
        ("", "invalid_json"),
        ("[1, 2]", "invalid_message"),
        ('"str"', "invalid_message"),
        ("{}", "invalid_message"),
        ('{"type": 5}', "invalid_message"),
        (b"\x00\x01", "unsupported_frame"),
        ('{"type": "nope"}', "unknown_type"),
        ('{"type": "no such!"}', "unknown_type"),
        ('{"type": "join", "room": "private-1"}', "forbidden"),
        ('{"type": "join", "room": "bad room"}', "invalid_room"),
        ('{"type": "join", "room": "distrib.user.alice"}', "invalid_room"),
        ('{"type": "join", "room": 7}', "invalid_room"),
        ('{"type": "join", "room": ""}', "invalid_room"),
        ('{"type": "join", "room": "' + "x" * 100 + '"}', "invalid_room"),
        ('{"type": "members", "room": "distrib.user.x"}', "invalid_room"),
    ]
    for frame, code in cases:
        if isinstance(frame, bytes):
            await a.send_bytes(frame)
        else:
            await a.send_text(frame)
        error = await a.expect_error(code)
        if code == "invalid_json":
            assert error["message"] == "Invalid message format"
    assert (await a.request("rooms"))["rooms"] == []
    assert a.backlog == [] or all(f["type"] != "error" for f in a.backlog)


async def test_deeply_nested_json_is_invalid_json_not_a_crash(connect) -> None:
    a = await connect()
    await a.send_text("[" * 20_000 + "]" * 20_000)
    await a.expect_error("invalid_json")
    assert (await a.request("echo"))["type"] == "reply.echo"


async def test_inbound_middleware_can_rewrite_drop_and_reject(connect) -> None:
    a = await connect()
    assert (await a.request("echo", text="quiet"))["text"] == "quiet"
    assert (await a.request("echo", text="loud", shout=True))["text"] == "LOUD"
    await a.send_json({"type": "secret"})
    await a.assert_none("error", within=0.3)
    await a.send_json({"type": "echo", "banned": True})
    await a.expect_error("forbidden")
    await a.assert_none("reply.echo", within=0.2)


# -- limits ---------------------------------------------------------------------------


async def test_rate_limit_errors_then_closes_1008(connect) -> None:
    a = await connect(LimitedConsumer)
    for i in range(3):  # the burst
        assert (await a.request("echo", i=i))["i"] == i
    await a.send_json({"type": "echo", "i": 3})
    await a.expect_error("rate_limited")
    for _ in range(8):
        await a.send_json({"type": "echo"})
    await a.send_json({"type": "echo"})  # the tenth rejection
    assert await a.expect_close() == 1008
    errors = [f for f in a.backlog if f.get("code") == "rate_limited"]
    assert len(errors) >= 8


async def test_max_message_size_closes_1009(connect) -> None:
    a = await connect(LimitedConsumer)
    # About 920 bytes in UTF-8 fits; 340 characters are over 1024 bytes but under 1024 chars.
    fits = json.dumps({"type": "echo", "t": "€" * 300}, ensure_ascii=False)
    assert len(fits.encode()) <= 1024
    await a.send_text(fits)
    await a.expect("reply.echo")
    await a.send_text(json.dumps({"type": "echo", "t": "€" * 340}, ensure_ascii=False))
    assert await a.expect_close() == 1009


async def test_binary_frame_over_limit_closes_1009(connect) -> None:
    a = await connect(LimitedConsumer)
    await a.send_bytes(b"x" * 2000)
    assert await a.expect_close() == 1009


async def test_connection_limit_accepts_then_closes_1013(nodes, connect) -> None:
    nodes(connection_limit=2)
    layer = channel_layers["default"]
    group = ProbeConsumer.get_broadcast_group()
    first = await connect()
    second = await connect()
    # `connect` only checks the accept, which a 1013 close also has: each one must be served.
    for client in (first, second):
        assert (await client.request("whoami"))["node_id"] == layer.node_id
    comm = WebsocketCommunicator(ProbeConsumer.as_asgi(), "/ws/")
    connected, _ = await comm.connect(timeout=5)
    assert connected  # accepted, so a browser sees the close code
    assert await comm.receive_output(5) == {"type": "websocket.close", "code": 1013}
    assert await layer.group_size(group) == 2
    await comm.disconnect(timeout=5)
    # The other node's limit is its own.
    other = await connect(OtherNodeProbe)
    assert (await other.request("whoami"))["node_id"] == channel_layers["other"].node_id
    assert await layer.group_size(group) == 3
    await first.close()
    last = await connect()  # a slot is free again
    assert (await last.request("whoami"))["node_id"] == layer.node_id
    await second.request("whoami")
    await other.request("whoami")
    assert await layer.group_size(group) == 3


def test_token_bucket_refills() -> None:
    now = [0.0]
    bucket = TokenBucket(2.0, 2, clock=lambda: now[0])
    assert bucket.take() and bucket.take() and not bucket.take()
    now[0] = 0.5
    assert bucket.take() and not bucket.take()
    now[0] = 10.0
    assert bucket.take() and bucket.take() and not bucket.take()


def test_broadcast_group_names() -> None:
    class Local(DistributedConsumer):
        pass

    assert ProbeConsumer.get_broadcast_group() == "distrib.bc.tests.consumer_app.ProbeConsumer"
    assert LobbyConsumer.get_broadcast_group() != ProbeConsumer.get_broadcast_group()
    name = Local.get_broadcast_group()  # "<locals>" is not a valid group-name character
    assert name.startswith("distrib.bc-h.") and len(name) < 100
    assert OtherNodeProbe.get_broadcast_group() == ProbeConsumer.get_broadcast_group()


def readme_chat_consumer() -> type[Any]:
    """The first Python block of README.md's "## Consumer" section, executed as is."""
    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    section = readme.split("\n## Consumer\n", 1)[1]
    code = section.split("```python\n", 1)[1].split("```", 1)[0]
    assert len(code.strip().splitlines()) < 30
    namespace: dict[str, Any] = {}
    exec(compile(code, "README.md", "exec"), namespace)
    chat: type[Any] = namespace["ChatConsumer"]
    return chat


async def test_readme_chat_consumer_works(connect) -> None:
    chat = readme_chat_consumer()
    chat.broadcast_group = "readme-chat"
    alice = await connect(chat, user="alice")
    bob = await connect(chat, user="bob")
    await alice.send_json({"type": "sendMessage", "message": "too early"})
    await alice.expect_error("not_in_room")
    await alice.send_json({"type": "joinRoom", "room": "lobby"})
    await alice.expect_error("forbidden")
    for client in (alice, bob):
        await client.send_json({"type": "joinRoom", "room": "chat-1"})
        await client.expect("presence.state", group="chat-1")
    await alice.send_json({"type": "sendMessage", "message": "hi"})
    assert await bob.expect("message") == {
        "type": "message",
        "room": "chat-1",
        "from": "QueryUser(pk='alice', is_authenticated=True)",
        "message": "hi",
    }
    await alice.assert_none("message", within=0.3)
    await alice.send_json({"type": "joinRoom", "room": "chat-2"})  # moves rooms
    diff = await bob.expect("presence.diff", group="chat-1")
    assert len(diff["leaves"]) == 1
    await bob.send_json({"type": "sendMessage", "message": "anyone?"})
    await alice.assert_none("message", within=0.3)
    await alice.send_text("not json")
    assert (await alice.expect_error("invalid_json"))["message"] == "Invalid message format"


async def test_error_messages_do_not_echo_huge_client_input(connect) -> None:
    a = await connect()
    await a.send_json({"type": "x" * 5000})
    assert len((await a.expect_error("unknown_type"))["message"]) < 200
    await a.send_json({"type": "join", "room": "!" * 5000})
    assert len((await a.expect_error("invalid_room"))["message"]) < 300


async def test_allow_anonymous_false_refuses_the_handshake(connect, nodes) -> None:
    class MembersOnly(ProbeConsumer):
        allow_anonymous = False

    nodes()
    comm = WebsocketCommunicator(QueryUserMiddleware(MembersOnly.as_asgi()), "/ws/")
    connected, _ = await comm.connect(timeout=5)
    assert not connected
    await comm.disconnect(timeout=5)
    member = await connect(MembersOnly, user="kim")
    assert (await whoami(member))["user_id"] == "kim"
    layer = channel_layers["default"]
    assert await layer.group_size(MembersOnly.get_broadcast_group()) == 1


async def test_envelopes_skip_channels_db_connection_check(connect, monkeypatch) -> None:
    """distrib.message is forwarded without channels' per-message close_old_connections hop."""
    import channels.consumer

    calls: list[str] = []

    async def counting() -> None:
        calls.append("close_old_connections")

    monkeypatch.setattr(channels.consumer, "aclose_old_connections", counting)
    a = await connect()
    await a.request("join", room="fast")
    await a.expect("presence.state", group="fast")
    before = len(calls)
    for i in range(5):
        await api.send_to_room("fast", {"type": "f", "i": i})
    for i in range(5):
        assert await a.expect("f", i=i) == {"type": "f", "i": i}
    assert len(calls) == before
    await a.request("echo")  # other messages still go through channels' dispatch
    assert len(calls) > before


async def test_presence_skips_channels_db_connection_check(connect, monkeypatch) -> None:
    """presence.state and presence.diff reach the client without the per-message hop."""
    import channels.consumer

    calls: list[str] = []

    async def counting() -> None:
        calls.append("close_old_connections")

    monkeypatch.setattr(channels.consumer, "aclose_old_connections", counting)
    a = await connect(name="a")
    b = await connect(OtherNodeProbe, name="b")
    await a.request("join", room="hopless")
    await a.expect("presence.state", group="hopless")
    before = len(calls)
    for _ in range(3):
        await b.request("join", room="hopless")  # each request is one hop, on b
        await b.expect("presence.state", group="hopless")
        await a.expect("presence.diff", group="hopless")
        await b.request("leave", room="hopless")
        await a.expect("presence.diff", group="hopless")
    # Only b's six requests went through channels' dispatch; a's 6 diffs, b's 3 states did not.
    assert len(calls) - before == 6


class CustomPresence(ProbeConsumer):
    """Overrides both presence handlers: the client sees its own frames instead."""

    async def presence_state(self, message: dict[str, Any]) -> None:
        await self.send_json({"type": "my.state", "count": len(message["members"])})

    async def presence_diff(self, message: dict[str, Any]) -> None:
        joins = [j["channel"] for j in message["joins"]]
        await self.send_json({"type": "my.diff", "joins": joins})


class CustomEncoding(ProbeConsumer):
    """Overrides encode_json only: every outbound frame carries a marker."""

    @classmethod
    async def encode_json(cls, content: Any) -> str:
        return json.dumps({**content, "encoded_by": "CustomEncoding"})


async def test_presence_overrides_still_take_effect(connect) -> None:
    a = await connect(CustomPresence, name="a")
    b = await connect(OtherNodeProbe, name="b")
    b_id = (await whoami(b))["client_id"]
    await a.request("join", room="custom")
    assert await a.expect("my.state") == {"type": "my.state", "count": 1}
    await b.request("join", room="custom")
    assert await a.expect("my.diff") == {"type": "my.diff", "joins": [b_id]}
    await a.assert_none("presence.diff", within=0.3)


async def test_a_presence_diff_is_encoded_once_per_node(connect) -> None:
    from channels_distrib.encoded import PRESENCE_TEXTS

    members = [await connect(name=f"m{i}") for i in range(3)]  # one node ("default")
    for member in members:
        await member.request("join", room="once")
        await member.expect("presence.state", group="once")
    for member in members:  # settle: the earlier joins' diffs arrive and are set aside
        await member.assert_none("no.such.frame", within=0.3)
        member.backlog.clear()
    joiner = await connect(OtherNodeProbe, name="joiner")
    joiner_id = (await whoami(joiner))["client_id"]
    before = PRESENCE_TEXTS.encoded
    await joiner.request("join", room="once")
    frames = [await member.expect("presence.diff", group="once") for member in members]
    assert all([j["channel"] for j in f["joins"]] == [joiner_id] for f in frames)
    assert frames[0] == frames[1] == frames[2]
    assert PRESENCE_TEXTS.encoded - before == 1, "one JSON text for the node's three members"


def test_only_classes_that_change_nothing_share_the_text() -> None:
    from channels_distrib.consumers import DistributedMixin
    from channels_distrib.encoded import passes_presence_through

    assert ProbeConsumer._presence_passthrough
    assert passes_presence_through(PlainConsumer, DistributedMixin)
    assert not CustomPresence._presence_passthrough
    assert not CustomEncoding._presence_passthrough

    class OwnSendJson(ProbeConsumer):
        async def send_json(self, content: Any, close: bool | int = False) -> None:
            await super().send_json(content, close)

    assert not OwnSendJson._presence_passthrough


async def test_presence_goes_through_an_overridden_encode_json(connect) -> None:
    a = await connect(CustomEncoding, name="a")
    b = await connect(OtherNodeProbe, name="b")
    await a.request("join", room="encoded")
    state = await a.expect("presence.state", group="encoded")
    assert state["encoded_by"] == "CustomEncoding"
    await b.request("join", room="encoded")
    diff = await a.expect("presence.diff", group="encoded")
    assert diff["encoded_by"] == "CustomEncoding"


@pytest.mark.parametrize(
    ("attributes", "match"),
    [
        ({"rate_limit": (0, 5)}, "rate > 0"),
        ({"rate_limit": (5.0, 0)}, "burst >= 1"),
        ({"rate_limit": 5}, r"\(rate, burst\)"),
        ({"rooms": "lobby"}, "not a string"),
        ({"rooms": ["bad room"]}, "bad room"),
        ({"rooms": ["distrib.user.1"]}, "reserved"),
    ],
)
def test_bad_class_attributes_fail_when_the_class_is_defined(
    attributes: dict[str, Any], match: str
) -> None:
    from django.core.exceptions import ImproperlyConfigured

    with pytest.raises(ImproperlyConfigured, match=match):
        type("Bad", (DistributedConsumer,), attributes)


def test_mixin_order_and_sync_consumers_are_checked() -> None:
    from channels.generic.websocket import (
        AsyncJsonWebsocketConsumer,
        AsyncWebsocketConsumer,
        WebsocketConsumer,
    )
    from django.core.exceptions import ImproperlyConfigured

    from channels_distrib.consumers import DistributedMixin

    type("Fine", (DistributedMixin, AsyncWebsocketConsumer), {})
    with pytest.raises(ImproperlyConfigured, match="before the Channels consumer"):
        type("Reversed", (AsyncJsonWebsocketConsumer, DistributedMixin), {})
    with pytest.raises(ImproperlyConfigured, match="sync consumers are not supported"):
        type("Sync", (DistributedMixin, WebsocketConsumer), {})


class UserLimited(ProbeConsumer):
    user_rate_limit = (0.2, 4)


class UserLimitedOther(UserLimited):
    channel_layer_alias = "other"


async def test_user_rate_limit_is_shared_across_nodes(nodes, connect) -> None:
    nodes()
    tab1 = await connect(UserLimited, user="zoe")
    tab2 = await connect(UserLimitedOther, user="zoe")
    other_user = await connect(UserLimited, user="yan")
    anon = await connect(UserLimited)
    for tab in (tab1, tab2, tab1, tab2):  # zoe's burst of 4, spent on two nodes
        assert (await tab.request("echo"))["type"] == "reply.echo"
    await tab2.send_json({"type": "echo"})
    await tab2.expect_error("rate_limited")
    await tab1.send_json({"type": "echo"})
    await tab1.expect_error("rate_limited")
    for _ in range(6):  # other users and anonymous connections have their own budget
        assert (await anon.request("echo"))["type"] == "reply.echo"
    for _ in range(4):
        assert (await other_user.request("echo"))["type"] == "reply.echo"


async def test_user_rate_limit_needs_the_ratelimit_extension(nodes) -> None:
    nodes(backend="tests.ratelimit_layer.NoRateLimitLayer")
    comm = WebsocketCommunicator(QueryUserMiddleware(UserLimited.as_asgi()), "/ws/?user=zoe")
    await comm.send_input({"type": "websocket.connect"})
    with pytest.raises(InvalidChannelLayerError, match="ratelimit"):
        await comm.wait(timeout=5)
