"""Tests-only consumers, middleware and views exercising DistributedConsumer.

Imported in-process by the communicator tests, and served by real daphne processes
through :mod:`tests.consumer_asgi`. The client protocol below maps one frame type to one
consumer method, so tests can drive every method from a WebSocket.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qs

from asgiref.sync import async_to_sync
from channels.generic.websocket import AsyncWebsocketConsumer
from django.http import HttpRequest, HttpResponse, JsonResponse
from django.urls import path

from channels_distrib import api
from channels_distrib.consumers import ClientError, DistributedConsumer, DistributedMixin


@dataclass
class QueryUser:
    """A stand-in for a Django user: authenticated, with a string pk."""

    pk: str
    is_authenticated: bool = True


class QueryUserMiddleware:
    """Sets ``scope["user"]`` from ``?user=<id>`` (tests only: no authentication at all)."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner

    async def __call__(self, scope: Any, receive: Any, send: Any) -> Any:
        query = parse_qs(scope.get("query_string", b"").decode())
        if "user" in query:
            scope = {**scope, "user": QueryUser(pk=query["user"][0])}
        return await self.inner(scope, receive, send)


async def shout(consumer: Any, content: dict[str, Any]) -> dict[str, Any] | None:
    """Inbound middleware: drops ``{"type": "secret"}`` and upper-cases ``text`` when ``shout``."""
    if content["type"] == "secret":
        return None
    if content.get("shout") and isinstance(content.get("text"), str):
        return {**content, "text": content["text"].upper()}
    return content


async def deny_banned(consumer: Any, content: dict[str, Any]) -> dict[str, Any] | None:
    """Inbound middleware raising a ClientError, which becomes an error frame."""
    if content.get("banned"):
        raise ClientError("forbidden", "banned content")
    return content


def _member(member: Any) -> dict[str, Any]:
    return {
        "channel": member.channel,
        "node_id": member.node_id,
        "meta": member.meta,
        "joined_at": member.joined_at,
    }


class ProbeConsumer(DistributedConsumer):
    """One frame type per consumer method; replies are ``{"type": "reply.<what>", ...}``."""

    inbound_middleware = (shout, deny_banned)

    async def can_join_room(self, room: str) -> bool:
        return not room.startswith("private")

    async def get_presence_meta(self) -> dict[str, Any]:
        meta = await super().get_presence_meta()
        query = parse_qs(self.scope.get("query_string", b"").decode())
        meta["name"] = query.get("name", ["anon"])[0]
        return meta

    async def disconnect(self, code: int) -> None:
        """With ``?report=<room>``: tell that room this connection's ``disconnect()`` ran."""
        query = parse_qs(self.scope.get("query_string", b"").decode())
        if "report" in query:
            await self.broadcast_to_room(
                query["report"][0], {"type": "disconnected", "client_id": self.client_id, "code": code}
            )

    async def handle_join(self, content: dict[str, Any]) -> None:
        await self.join_room(content.get("room"), content.get("meta"))  # type: ignore[arg-type]
        await self.send_json({"type": "reply.join", "room": content["room"]})

    async def handle_leave(self, content: dict[str, Any]) -> None:
        await self.leave_room(content["room"])
        await self.send_json({"type": "reply.leave", "room": content["room"]})

    async def handle_rooms(self, content: dict[str, Any]) -> None:
        await self.send_json({"type": "reply.rooms", "rooms": sorted(self.joined_rooms)})

    async def handle_whoami(self, content: dict[str, Any]) -> None:
        await self.send_json(
            {
                "type": "reply.whoami",
                "client_id": self.client_id,
                "node_id": self.channel_layer.node_id,
                "user_id": self.get_user_id(),
            }
        )

    async def handle_broadcast(self, content: dict[str, Any]) -> None:
        await self.broadcast(content["message"], exclude_self=bool(content.get("exclude_self")))
        await self.send_json({"type": "reply.broadcast"})

    async def handle_room_send(self, content: dict[str, Any]) -> None:
        await self.broadcast_to_room(
            content["room"], content["message"], exclude_self=bool(content.get("exclude_self"))
        )
        await self.send_json({"type": "reply.room_send"})

    async def handle_client_send(self, content: dict[str, Any]) -> None:
        await self.send_to_client(content["client_id"], content["message"])
        await self.send_json({"type": "reply.client_send"})

    async def handle_user_send(self, content: dict[str, Any]) -> None:
        await self.send_to_user(content["user_id"], content["message"])
        await self.send_json({"type": "reply.user_send"})

    async def handle_members(self, content: dict[str, Any]) -> None:
        members = await self.room_members(content["room"])
        await self.send_json({"type": "reply.members", "members": [_member(m) for m in members]})

    async def handle_size(self, content: dict[str, Any]) -> None:
        size = await self.room_size(content["room"])
        await self.send_json({"type": "reply.size", "size": size})

    async def handle_echo(self, content: dict[str, Any]) -> None:
        await self.send_json({**content, "type": "reply.echo"})

    async def handle_crash(self, content: dict[str, Any]) -> None:
        raise RuntimeError("crash requested by the test client")


class LobbyConsumer(ProbeConsumer):
    """Joins the class-level room ``lobby`` on connect."""

    rooms = ("lobby",)


class LimitedConsumer(ProbeConsumer):
    """A small bucket and a small frame limit."""

    rate_limit = (0.5, 3)
    max_message_size = 1024


class CappedConsumer(ProbeConsumer):
    """At most two connections per authenticated user, cluster-wide."""

    user_connection_limit = 2


class HistoryConsumer(ProbeConsumer):
    """Rooms keep their last 50 messages; ``hjoin`` joins with ``since``/``previous``.

    ``room_joined`` sends ``{"type": "joined", "room", "recovered"}`` before any replayed
    frame, so tests can check the order; ``reply.hjoin`` follows the replay.
    """

    history = 50
    history_ttl = 60.0

    async def room_joined(self, room: str, recovered: bool) -> None:
        await self.send_json({"type": "joined", "room": room, "recovered": recovered})

    async def handle_hjoin(self, content: dict[str, Any]) -> None:
        recovered = await self.join_room(
            content["room"], since=content.get("since"), previous_client_id=content.get("previous")
        )
        await self.send_json({"type": "reply.hjoin", "room": content["room"], "recovered": recovered})


class HistoryLobbyConsumer(HistoryConsumer):
    """Joins the class-level room ``hlobby`` on connect; it keeps history too."""

    rooms = ("hlobby",)


class PlainConsumer(DistributedMixin, AsyncWebsocketConsumer):  # type: ignore[misc]
    """The mixin on the non-JSON base consumer."""

    async def handle_echo(self, content: dict[str, Any]) -> None:
        await self.send_json({**content, "type": "reply.echo"})


def send_room_view(request: HttpRequest) -> HttpResponse:
    """A sync view publishing to a room with ``async_to_sync(api.send_to_room)``."""
    room = request.GET["room"]
    async_to_sync(api.send_to_room)(room, {"type": "notice", "text": request.GET.get("text", "")})
    return JsonResponse({"sent": room})


def send_user_view(request: HttpRequest) -> HttpResponse:
    """A sync view publishing to a user with ``async_to_sync(api.send_to_user)``."""
    user = request.GET["user"]
    async_to_sync(api.send_to_user)(user, {"type": "notice", "text": request.GET.get("text", "")})
    return JsonResponse({"sent": user})


def login_view(request: HttpRequest) -> HttpResponse:
    """Create (once) and log in the user ``?user=<username>``; the session cookie is the result."""
    from django.contrib.auth import login
    from django.contrib.auth.models import User

    user, _ = User.objects.get_or_create(username=request.GET["user"])
    login(request, user, backend="django.contrib.auth.backends.ModelBackend")
    return JsonResponse({"pk": user.pk})


urlpatterns = [
    path("login/", login_view),
    path("send-room/", send_room_view),
    path("send-user/", send_user_view),
]


def websocket_routes() -> Any:
    """The WebSocket URL router (built lazily: it needs configured settings)."""
    from channels.routing import URLRouter

    return URLRouter(
        [
            path("ws/test/", ProbeConsumer.as_asgi()),
            path("ws/lobby/", LobbyConsumer.as_asgi()),
            path("ws/limited/", LimitedConsumer.as_asgi()),
            path("ws/capped/", CappedConsumer.as_asgi()),
            path("ws/plain/", PlainConsumer.as_asgi()),
            path("ws/history/", HistoryConsumer.as_asgi()),
        ]
    )
