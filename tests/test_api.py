"""channels_distrib.api: the envelope, group naming, and sending from outside a consumer."""

from __future__ import annotations

import asyncio
import datetime
import json
from typing import Any

import pytest
from asgiref.sync import sync_to_async
from channels.exceptions import InvalidChannelLayerError
from django.test import RequestFactory

from channels_distrib import api
from tests.consumer_app import LobbyConsumer, ProbeConsumer, send_room_view, send_user_view
from tests.consumer_fixtures import connect_fixture, nodes_fixture  # noqa: F401  (fixtures)


def test_envelope_carries_the_json_text() -> None:
    message = {"type": "chat", "text": "ünïcode", "n": [1, 2]}
    envelope = api.make_envelope(message, exclude="specific.a!b")
    assert envelope == {
        "type": "distrib.message",
        "text": json.dumps(message),
        "exclude": "specific.a!b",
    }
    assert api.make_envelope(message)["exclude"] is None


@pytest.mark.parametrize("bad", [["list"], "str", None, 5])
def test_envelope_rejects_non_dicts(bad: Any) -> None:
    with pytest.raises(TypeError, match="must be a dict"):
        api.make_envelope(bad)


def test_envelope_rejects_what_json_cannot_encode() -> None:
    with pytest.raises(TypeError):
        api.make_envelope({"when": datetime.datetime.now()})
    with pytest.raises(TypeError):
        api.make_envelope({"raw": b"bytes"})
    circular: dict[str, Any] = {}
    circular["self"] = circular
    with pytest.raises(TypeError, match="JSON"):
        api.make_envelope(circular)


def test_user_group_names() -> None:
    assert api.user_group(42) == api.user_group("42") == "distrib.user.42"
    assert api.user_group("a-b_c.d") == "distrib.user.a-b_c.d"
    hashed = api.user_group("someone@example.com")
    assert hashed.startswith("distrib.user-h.") and len(hashed) < 100
    assert hashed != api.user_group("someone@example.org")
    assert len(api.user_group("x" * 500)) < 100
    for empty in (None, ""):
        with pytest.raises(ValueError):
            api.user_group(empty)


async def test_api_without_a_configured_alias_says_what_to_do() -> None:
    with pytest.raises(InvalidChannelLayerError, match="DistributedChannelLayer"):
        await api.send_to_room("room", {"type": "x"}, alias="missing")


async def test_send_to_room_user_client_and_broadcast(connect) -> None:
    a = await connect(ProbeConsumer, user="gina")
    b = await connect(LobbyConsumer)
    await b.expect("presence.state", group="lobby")
    b_id = (await b.request("whoami"))["client_id"]

    await api.send_to_room("lobby", {"type": "r"})
    assert await b.expect("r") == {"type": "r"}
    await api.send_to_room("lobby", {"type": "r2"}, exclude=b_id)
    await b.assert_none("r2", within=0.3)

    await api.send_to_user("gina", {"type": "u"})
    assert await a.expect("u") == {"type": "u"}
    await b.assert_none("u", within=0.1)

    await api.send_to_client(b_id, {"type": "c"})
    assert await b.expect("c") == {"type": "c"}

    await api.broadcast(ProbeConsumer, {"type": "all"})
    assert await a.expect("all") == {"type": "all"}
    await b.assert_none("all", within=0.3)  # LobbyConsumer has its own broadcast group
    await api.broadcast(LobbyConsumer, {"type": "all"})
    assert await b.expect("all") == {"type": "all"}

    await api.send_to_room("nobody-here", {"type": "x"})  # not an error
    await api.send_to_user("nobody", {"type": "x"})


async def test_sync_view_via_sync_to_async(connect) -> None:
    """A sync view under ASGI: async_to_sync runs the send on the server's own loop."""
    listener = await connect(LobbyConsumer, user="hugo")
    request = RequestFactory().get("/send-room/", {"room": "lobby", "text": "hi"})
    response = await sync_to_async(send_room_view)(request)
    assert json.loads(response.content) == {"sent": "lobby"}
    assert await listener.expect("notice") == {"type": "notice", "text": "hi"}
    request = RequestFactory().get("/send-user/", {"user": "hugo", "text": "you"})
    await sync_to_async(send_user_view)(request)
    assert await listener.expect("notice", text="you") == {"type": "notice", "text": "you"}


async def test_sync_view_in_a_thread_without_a_loop(connect) -> None:
    """async_to_sync in a plain thread: the layer is used from a second, short-lived loop."""
    listener = await connect(LobbyConsumer)
    request = RequestFactory().get("/send-room/", {"room": "lobby", "text": "thread"})
    response = await asyncio.to_thread(send_room_view, request)
    assert response.status_code == 200
    assert await listener.expect("notice") == {"type": "notice", "text": "thread"}
