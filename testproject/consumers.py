"""The demo's WebSocket consumers: the chat protocol of DESIGN.md and the live dashboard.

``/ws/chat/`` protocol (existing plain-JavaScript clients depend on it, keep it as is):

- client ``{"type": "joinRoom", "room": "room1"}`` joins (a second one moves the
  connection); an optional ``"name"`` sets the display name first. The server
  answers ``{"type": "joined", "room", "name", "node", "client_id", "recovered"}`` and
  then the room's ``presence.state``; ``presence.diff`` frames follow as people come and
  go. Rooms keep their last 100 messages for 5 minutes: every ``message`` frame carries an
  ``"offset"``, and a client that reconnects (to any node) sends
  ``{"type": "joinRoom", "room", "since": <last offset it saw>, "previous": <its old
  client_id>}``; when ``joined`` says ``"recovered": true`` the messages it missed follow
  at once, in order, before live ones (its own earlier messages are not sent back).
- client ``{"type": "sendMessage", "message": "..."}``; every other member of the
  room, on any node, gets ``{"type": "message", "room", "from", "message"}``.
- client ``{"type": "leaveRoom"}`` leaves the current room (answer ``{"type": "left"}``).
- errors are ``{"type": "error", "code", "message"}`` frames and the connection stays
  open: ``invalid_json`` (message "Invalid message format"), ``invalid_message``,
  ``unknown_type``, ``invalid_room``, ``not_in_room`` (``sendMessage`` before ``joinRoom``),
  ``rate_limited`` (more than 20 frames in a burst, or 5 per second after it; ten of
  those within 10 s close the connection with 1008).

The display name (``from``) is the logged-in username, else the name the visitor chose
(``?name=`` on the WebSocket URL or ``"name"`` in ``joinRoom``), else ``guest-`` and
the end of the connection's channel name.
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
from typing import Any
from urllib.parse import parse_qs

from channels_distrib.consumers import DistributedConsumer
from testproject import rooms

logger = logging.getLogger(__name__)

ROOM_RE = re.compile(r"^[A-Za-z0-9_.-]{1,80}$")
MAX_NAME = 40
DASHBOARD_INTERVAL = 1.0


def clean_name(value: Any) -> str | None:
    """A display name the visitor chose, trimmed; None when unusable."""
    if not isinstance(value, str):
        return None
    value = " ".join(value.split())[:MAX_NAME]
    return value or None


class ChatConsumer(DistributedConsumer):
    """One chat connection: at most one room at a time.

    Inbound frames are rate limited per connection: a burst of 20, then 5 per second; a
    frame over the limit gets a ``rate_limited`` error, and 10 of those within 10 s close
    the connection with 1008. A signed-in user holds at most 5 connections over the whole
    cluster (anonymous ones are not counted); the next is closed with 4008.
    """

    rate_limit = (5.0, 20)
    # Rooms keep their last 100 messages (5 minutes): a reconnecting page gets what it missed.
    history = 100
    # A signed-in user keeps at most 5 tabs across all nodes; the 6th is closed with 4008.
    user_connection_limit = 5
    room: str | None = None
    chosen_name: str | None = None

    async def connect(self) -> None:
        query = parse_qs(self.scope.get("query_string", b"").decode("latin-1"))
        self.chosen_name = clean_name((query.get("name") or [None])[0])
        await super().connect()

    @property
    def display_name(self) -> str:
        """The logged-in username, else the chosen name, else a short client id."""
        user = self.scope.get("user")
        if user is not None and getattr(user, "is_authenticated", False):
            return str(user.get_username())
        if self.chosen_name:
            return self.chosen_name
        return "guest-" + self.channel_name.rsplit("!", 1)[-1][-6:]

    @property
    def node_id(self) -> str:
        return str(self.channel_layer.node_id)

    async def get_presence_meta(self) -> dict[str, Any]:
        meta = dict(await super().get_presence_meta())
        meta["name"] = self.display_name  # the default meta already has node_id
        return meta

    async def handle_joinRoom(self, content: dict[str, Any]) -> None:  # noqa: N802 (protocol name)
        room = content.get("room")
        if not isinstance(room, str) or not ROOM_RE.match(room):
            await self.send_error(
                "invalid_room", "A room name is 1-80 letters, digits, '-', '_' or '.'"
            )
            return
        name = clean_name(content.get("name"))
        renamed = name is not None and name != self.chosen_name
        if name is not None:
            self.chosen_name = name
        if self.room != room or renamed:
            if self.room is not None:
                await self.leave_room(self.room)
                self.room = None
            # "joined" is sent by room_joined, before the missed messages are replayed.
            await self.join_room(
                room, since=content.get("since"), previous_client_id=content.get("previous")
            )
            self.room = room
            await rooms.remember(room)
        else:
            await self._send_joined(room, recovered=False)

    async def room_joined(self, room: str, recovered: bool) -> None:
        await self._send_joined(room, recovered)

    async def _send_joined(self, room: str, recovered: bool) -> None:
        await self.send_json(
            {"type": "joined", "room": room, "name": self.display_name, "node": self.node_id,
             "client_id": self.client_id, "recovered": recovered}
        )

    async def handle_leaveRoom(self, content: dict[str, Any]) -> None:  # noqa: N802
        if self.room is not None:
            await self.leave_room(self.room)
            self.room = None
        await self.send_json({"type": "left"})

    async def handle_sendMessage(self, content: dict[str, Any]) -> None:  # noqa: N802
        if self.room is None:
            await self.send_error("not_in_room", "Join a room before sending messages")
            return
        text = content.get("message")
        if not isinstance(text, str):
            await self.send_error("invalid_message", "'message' must be a string")
            return
        await self.broadcast_to_room(
            self.room,
            {"type": "message", "room": self.room, "from": self.display_name, "message": text},
            exclude_self=True,
        )


class DashboardConsumer(DistributedConsumer):
    """Pushes a snapshot of the cluster (nodes, rooms, member counts) every second."""

    presence = False
    _ticker: asyncio.Task[None] | None = None

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        # Daphne cancels a consumer without running its disconnect handler; the
        # finally block makes sure the ticker never outlives its connection.
        try:
            await super().__call__(scope, receive, send)
        finally:
            await self._stop_ticker()

    async def connect(self) -> None:
        await super().connect()
        self._ticker = asyncio.create_task(self._tick_forever())

    async def disconnect(self, code: int) -> None:
        await self._stop_ticker()
        await super().disconnect(code)

    async def handle_refresh(self, content: dict[str, Any]) -> None:
        await self.send_json(await snapshot(self.channel_layer))

    async def _stop_ticker(self) -> None:
        task, self._ticker = self._ticker, None
        if task is None or task.done():
            return
        task.cancel()
        try:
            await task
        except asyncio.CancelledError:
            pass

    async def _tick_forever(self) -> None:
        while True:
            try:
                await self.send_json(await snapshot(self.channel_layer))
            except asyncio.CancelledError:
                raise
            except Exception:
                logger.exception("dashboard snapshot failed")
            await asyncio.sleep(DASHBOARD_INTERVAL)


async def snapshot(layer: Any) -> dict[str, Any]:
    """What the dashboard shows: live nodes and the indexed rooms that have members now."""
    now = time.time()
    nodes = sorted(await layer.nodes(), key=lambda n: n.node_id)
    room_rows: list[dict[str, Any]] = []
    in_use = []
    for room, last_used in await rooms.known_rooms():
        members = await layer.group_members(room)
        if not members:
            # Emptied rooms are not shown; the index drops them after ROOM_TTL.
            if now - last_used > rooms.ROOM_TTL:
                await rooms.forget(room)
            continue
        in_use.append(room)
        per_node: dict[str, int] = {}
        for member in members:
            key = member.node_id or "(queue)"
            per_node[key] = per_node.get(key, 0) + 1
        room_rows.append({"room": room, "members": len(members), "nodes": per_node})
    await rooms.seen_in_use(in_use, now)
    room_rows.sort(key=lambda row: (-row["members"], row["room"]))
    return {
        "type": "cluster",
        "now": now,
        "served_by": layer.node_id,
        "nodes": [
            {
                **n._asdict(),
                "uptime": max(0.0, now - n.started_at),
                "heartbeat_age": max(0.0, now - n.last_seen),
                "connections": n.channel_count,
            }
            for n in nodes
        ],
        "rooms": room_rows,
        # Each node's own counters (from its heartbeat); the page turns them into rates.
        "stats": [
            {
                "node_id": s.node_id,
                "at": s.at,
                "delivered": s.delivered,
                "dropped": sum(s.dropped.values()),
                "connections": s.connections,
                "prunes": s.prunes,
            }
            for s in await layer.node_stats()
        ],
    }
