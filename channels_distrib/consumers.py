"""The consumer base class: rooms, broadcasts, users and presence for every connection.

``DistributedMixin`` goes in front of Channels' ``AsyncWebsocketConsumer`` or
``AsyncJsonWebsocketConsumer``; ``DistributedConsumer`` is the mixin plus the JSON
consumer, the class applications subclass::

    class ChatConsumer(DistributedConsumer):
        async def handle_join(self, content):
            await self.join_room(content["room"])

        async def handle_say(self, content):
            await self.broadcast_to_room(content["room"], {"type": "said", "text": content["text"]})

Every call here goes through the channel layer's public API (``group_add`` with
``meta``/``presence``, ``group_send``, ``group_members``...), so it works the same for
connections on any node. Outbound messages travel in the envelope described in
:mod:`channels_distrib.api`.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
import weakref
from collections import deque
from collections.abc import Awaitable, Callable, Coroutine, Sequence
from typing import TYPE_CHECKING, Any, ClassVar

from channels.consumer import AsyncConsumer, SyncConsumer
from channels.exceptions import InvalidChannelLayerError, StopConsumer
from channels.generic.websocket import AsyncJsonWebsocketConsumer
from channels.layers import BaseChannelLayer
from django.core.exceptions import ImproperlyConfigured

from channels_distrib import api
from channels_distrib import history as room_history
from channels_distrib.client_errors import (
    ClientError,
    InvalidRoom,
    RoomForbidden,
    clip,
    room_problem,
)
from channels_distrib.close_codes import allow_server_close_codes
from channels_distrib.encoded import PRESENCE_TEXTS, passes_presence_through
from channels_distrib.limits import TokenBucket
from channels_distrib.types import Member, Message, Meta

if TYPE_CHECKING:
    from channels.generic.websocket import AsyncWebsocketConsumer as _ConsumerBase
else:
    _ConsumerBase = object

__all__ = [
    "ClientError",
    "DistributedConsumer",
    "DistributedMixin",
    "InboundMiddleware",
    "InvalidRoom",
    "RoomForbidden",
    "TokenBucket",
]

logger = logging.getLogger(__name__)

REQUIRED_EXTENSIONS = ("groups", "registry", "presence")
CLOSE_POLICY_VIOLATION = 1008
CLOSE_MESSAGE_TOO_BIG = 1009
CLOSE_SERVICE_RESTART = 1012
CLOSE_TRY_AGAIN_LATER = 1013
CLOSE_USER_LIMIT = 4008
# Seconds between joining the user group and counting it: join times are stamped in whole
# ms, so 1 ms after the join's reply no later join can share its stamp (0.5 ms margin).
USER_LIMIT_SETTLE = 0.0015
# Bounds the best-effort group cleanup when a consumer fails or is cancelled.
CLEANUP_TIMEOUT = 5.0
# Bounds the close frame a consumer cancelled with its WebSocket open sends (server shutdown).
SHUTDOWN_CLOSE_TIMEOUT = 1.0

InboundMiddleware = Callable[["DistributedMixin", Message], Awaitable["Message | None"]]
"""``async def middleware(consumer, content) -> content | None``: rewrite, pass, or drop (None)."""

# Open connections per layer (one layer object = one node) in this process.
_open_connections: weakref.WeakKeyDictionary[Any, int] = weakref.WeakKeyDictionary()
# Consumers whose WebSocket accept() opened and that have not closed or seen a disconnect:
# a server stopping now leaves their clients connected.
_open_sockets: weakref.WeakSet[DistributedMixin] = weakref.WeakSet()


def _check_bases(cls: type) -> None:
    """The mixin must come before Channels' consumer classes, and only async ones work."""
    if issubclass(cls, SyncConsumer):
        raise ImproperlyConfigured(
            f"{cls.__qualname__}: DistributedMixin needs an async consumer "
            "(AsyncWebsocketConsumer or AsyncJsonWebsocketConsumer); sync consumers are not supported"
        )
    mro = cls.__mro__
    if AsyncConsumer in mro and mro.index(AsyncConsumer) < mro.index(DistributedMixin):
        raise ImproperlyConfigured(
            f"{cls.__qualname__}: list DistributedMixin before the Channels consumer class, "
            f"e.g. class {cls.__name__}(DistributedMixin, AsyncJsonWebsocketConsumer)"
        )


def _is_client_id(value: object) -> bool:
    """A process-local channel name (``specific.<token>!<id>``), as ``client_id`` gives."""
    return (
        isinstance(value, str)
        and "!" in value
        and len(value) < BaseChannelLayer.MAX_NAME_LENGTH
        and BaseChannelLayer.channel_name_regex.match(value) is not None
    )


def _check_history(cls: type[DistributedMixin]) -> None:
    for name, minimum in (("history", 0), ("history_max_bytes", 1)):
        value = getattr(cls, name)
        if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
            raise ImproperlyConfigured(
                f"{cls.__qualname__}.{name} must be an int >= {minimum}, not {value!r}"
            )
    ttl = cls.history_ttl
    if isinstance(ttl, bool) or not isinstance(ttl, (int, float)) or ttl <= 0:
        raise ImproperlyConfigured(
            f"{cls.__qualname__}.history_ttl must be a positive number of seconds, not {ttl!r}"
        )


async def _run_all(coros: Sequence[Coroutine[Any, Any, Any]]) -> list[BaseException]:
    """Run coroutines concurrently, wait for all, and return the exceptions they raised."""
    results = await asyncio.gather(*coros, return_exceptions=True)
    return [r for r in results if isinstance(r, BaseException)]


class DistributedMixin(_ConsumerBase):  # type: ignore[misc]  # channels ships no type hints
    """Cluster-wide rooms, broadcasts, users and presence for an async WebSocket consumer.

    Class attributes (all optional):

    :param rooms: rooms every connection joins right after connecting (no
        ``can_join_room`` check: they are the developer's own choice).
    :param presence: rooms are presence memberships (members receive
        ``presence.state``/``presence.diff``); default True.
    :param broadcast_group: group name for :meth:`broadcast`; default derived from the
        class's module and qualified name, so each class has its own. Set the same name
        on several classes to share it (subclasses inherit an explicit name).
    :param inbound_middleware: a sequence of :data:`InboundMiddleware` run in order on
        every valid inbound message before dispatch.
    :param rate_limit: ``(rate, burst)``: per-connection token bucket for inbound frames,
        None (default) for no limit. A frame without a token gets a ``rate_limited``
        error; ``rate_limit_max_rejections`` (10) of those within ``rate_limit_window``
        (10 s) close the connection with 1008.
    :param user_rate_limit: ``(rate, burst)``: one token bucket per authenticated user,
        shared by all their connections on every node and kept in Redis; None (default)
        for none. Needs a layer with the ``ratelimit`` extension (``take_tokens``) and
        costs one Redis round trip per inbound frame of an authenticated user. Rejections
        count toward the same 1008 rule as ``rate_limit``.
    :param allow_anonymous: when False, connections without an authenticated
        ``scope["user"]`` are refused at the handshake (HTTP 403); default True.
    :param max_message_size: largest inbound frame in bytes (default 64 KiB, None for
        no limit, but daphne's own 1 MiB limit still applies); larger frames close the
        connection with 1009.
    :param user_connection_limit: most connections one authenticated user may hold,
        cluster-wide; None (default) for no limit. The user's group is counted at
        connect, so connections of every ``DistributedMixin`` class count. A connection
        over the limit is accepted, then closed with 4008 (the subclass's ``connect``
        and ``disconnect`` never run); of simultaneous connects the newest are refused.
        Costs an authenticated connect about 2 ms (a 1.5 ms wait and one Redis round
        trip); two more round trips when over.
    :param history: how many recent messages each room joined by a connection of this
        class keeps (default 0: none); room sends are then numbered, their frames carry
        an ``"offset"``, and ``join_room(room, since=offset)`` replays what was missed.
    :param history_ttl: how long a room keeps a message, seconds (default 300).
    :param history_max_bytes: most encoded bytes a room's history keeps (default 1 MiB).
    """

    rooms: ClassVar[Sequence[str]] = ()
    presence: ClassVar[bool] = True
    broadcast_group: ClassVar[str | None] = None
    inbound_middleware: ClassVar[Sequence[InboundMiddleware]] = ()
    rate_limit: ClassVar[tuple[float, int] | None] = None
    rate_limit_max_rejections: ClassVar[int] = 10
    rate_limit_window: ClassVar[float] = 10.0
    user_rate_limit: ClassVar[tuple[float, int] | None] = None
    max_message_size: ClassVar[int | None] = 64 * 1024
    allow_anonymous: ClassVar[bool] = True
    user_connection_limit: ClassVar[int | None] = None
    #: No override of how presence diffs are sent (set per class; see encoded.py).
    _presence_passthrough: ClassVar[bool] = False
    history: ClassVar[int] = 0
    history_ttl: ClassVar[float] = 300.0
    history_max_bytes: ClassVar[int] = 1024 * 1024

    if TYPE_CHECKING:
        channel_layer: Any
        channel_name: str
        scope: dict[str, Any]

    def __init_subclass__(cls, **kwargs: Any) -> None:
        """Check the class attributes when the class is defined, not at the first connect."""
        super().__init_subclass__(**kwargs)
        _check_bases(cls)
        cls._presence_passthrough = passes_presence_through(cls, DistributedMixin)
        for attribute in ("rate_limit", "user_rate_limit"):
            value = getattr(cls, attribute)
            if value is None:
                continue
            try:
                rate, burst = value
            except (TypeError, ValueError):
                raise ImproperlyConfigured(
                    f"{cls.__qualname__}.{attribute} must be (rate, burst), e.g. (5.0, 10)"
                ) from None
            TokenBucket(rate, burst)  # raises ImproperlyConfigured for bad values
        limit = cls.user_connection_limit
        if limit is not None and (
            not isinstance(limit, int) or isinstance(limit, bool) or limit < 1
        ):
            raise ImproperlyConfigured(
                f"{cls.__qualname__}.user_connection_limit must be a positive int or None, "
                f"not {limit!r}"
            )
        _check_history(cls)
        if isinstance(cls.rooms, str):
            raise ImproperlyConfigured(f"{cls.__qualname__}.rooms must be a list, not a string")
        for room in cls.rooms:
            problem = room_problem(room)
            if problem is not None:
                raise ImproperlyConfigured(f"{cls.__qualname__}.rooms: {room!r}: {problem}")

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._rooms: set[str] = set()
        # Rooms a group_add was started for: a cancelled or failed join may still have
        # reached Redis, so cleanup discards these too (discarding a non-member is a no-op).
        self._attempted_rooms: set[str] = set()
        self._own_groups: list[str] = []
        self._counted_layer: Any = None
        self._registered = False
        self._closing = False
        # Refused at connect (anonymous, or over the connection limit): nothing registered,
        # and the subclass's connect()/disconnect() never run.
        self._refused = False
        self._connected_at = 0.0
        self._bucket: TokenBucket | None = None
        self._user_bucket_key: str | None = None
        self._rejections: deque[float] = deque(maxlen=max(1, self.rate_limit_max_rejections))
        # Room history epoch -> newest (ms, seq) a join's replay sent (history.replayed_already).
        self._history_floors: dict[str, tuple[int, int]] = {}

    # -- identity --------------------------------------------------------------------

    @property
    def client_id(self) -> str:
        """This connection's id: its channel name, usable with :meth:`send_to_client`."""
        return self.channel_name

    @property
    def joined_rooms(self) -> frozenset[str]:
        """The rooms this connection is in now (not the broadcast or user group)."""
        return frozenset(self._rooms)

    @classmethod
    def get_broadcast_group(cls) -> str:
        """The group :meth:`broadcast` uses: ``broadcast_group``, else derived from the class."""
        if cls.broadcast_group:
            return cls.broadcast_group
        return api.broadcast_group_for(f"{cls.__module__}.{cls.__qualname__}")

    def get_user_id(self) -> str | None:
        """The authenticated user's id (``str(scope["user"].pk)``), None when anonymous."""
        user = self.scope.get("user")
        if user is None or not getattr(user, "is_authenticated", False):
            return None
        pk = getattr(user, "pk", None)
        return None if pk is None else str(pk)

    # -- hooks -----------------------------------------------------------------------

    async def can_join_room(self, room: str) -> bool:
        """Whether this connection may join ``room`` via :meth:`join_room`; default True."""
        return True

    async def get_presence_meta(self) -> Meta:
        """The meta kept with this connection's room memberships (JSON-serialisable dict).

        Default: ``node_id``, ``connected_at`` and, when authenticated, ``user_id``.
        """
        return self._client_meta()

    def _client_meta(self) -> Meta:
        meta: Meta = {"node_id": self.channel_layer.node_id, "connected_at": self._connected_at}
        user_id = self.get_user_id()
        if user_id is not None:
            meta["user_id"] = user_id
        return meta

    # -- connection lifecycle ----------------------------------------------------------

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        try:
            await super().__call__(scope, receive, send)
        except asyncio.CancelledError:
            await self._close_for_shutdown()
            raise
        finally:
            # Runs on clean exit, on a crashed handler and on cancellation (daphne
            # cancels consumers at shutdown without sending websocket.disconnect). If
            # cancelled again while cleaning up, the rest is left to the layer: its node
            # removes its memberships on clean shutdown or is pruned.
            _open_sockets.discard(self)  # ended: the server closes what is still open
            await self._cleanup(timeout=CLEANUP_TIMEOUT)

    async def _close_for_shutdown(self) -> None:
        """Cancelled with the WebSocket open: close it with 1012 (Service Restart).

        Daphne cancels every consumer at shutdown and hypercorn those still open after its
        graceful timeout; neither closes the WebSocket, so the client would lose the TCP
        connection without a close frame (1006, as after a crash). uvicorn sends 1012 itself
        and then a ``websocket.disconnect``, so this does nothing there. Best effort: a
        server already past sending anything only gets the attempt. Cancelled again while
        sending, the CancelledError propagates and the cleanup still runs.
        """
        if self not in _open_sockets:
            return
        self._closing = True
        try:
            await asyncio.wait_for(self.close(CLOSE_SERVICE_RESTART), SHUTDOWN_CLOSE_TIMEOUT)
        except Exception as exc:  # the server may have dropped the connection already
            logger.debug("closing %s on shutdown failed: %r", self.channel_name, exc)
        else:
            logger.debug("closed %s with 1012: server stopping", self.channel_name)

    async def websocket_connect(self, message: Message) -> None:
        """Check the layer, ``allow_anonymous`` and the connection limits, then connect."""
        layer = self._require_distributed_layer()
        allow_server_close_codes()
        if not self.allow_anonymous and self.get_user_id() is None:
            self._refused = True
            await self.close()  # before accept: the handshake fails with HTTP 403
            return
        limit = getattr(layer, "connection_limit", None)
        if limit is not None and _open_connections.get(layer, 0) >= limit:
            # Accept first: browsers only see a close code after the handshake succeeded.
            self._refused = True
            logger.info("connection limit %s reached on node %s", limit, layer.node_id)
            await super().accept()
            await self.close(CLOSE_TRY_AGAIN_LATER)
            return
        _open_connections[layer] = _open_connections.get(layer, 0) + 1
        self._counted_layer = layer
        self._connected_at = time.time()
        if not await self._claim_user_slot():
            logger.info(
                "closing %s: user_connection_limit %s reached",
                self.channel_name,
                self.user_connection_limit,
            )
            await self._cleanup()  # leaves the user group again and frees the node slot
            self._refused = self._closing = True
            await super().accept()
            await self.close(CLOSE_USER_LIMIT)
            return
        if self.rate_limit is not None:
            self._bucket = TokenBucket(*self.rate_limit)
        self._user_bucket_key = self._user_rate_limit_key(layer)
        await super().websocket_connect(message)

    async def accept(self, subprotocol: str | None = None, headers: Any = None) -> None:
        """Register this connection cluster-wide, then accept the WebSocket.

        Registration comes first so that once the client sees the handshake succeed,
        broadcasts, user messages and the class-level ``rooms`` reach it.
        """
        if not self._registered and not self._refused:
            self._registered = True
            await self._register()
        await super().accept(subprotocol, headers)
        _open_sockets.add(self)

    async def close(self, code: int | bool | None = None, reason: str | None = None) -> None:
        """Close the WebSocket from the server end (Channels' ``close``)."""
        _open_sockets.discard(self)
        if reason:
            await super().close(code, reason)
        else:  # channels 4.0 takes no reason
            await super().close(code)

    async def websocket_disconnect(self, message: Message) -> None:
        """Leave every group, then run Channels' disconnect (which calls ``disconnect``)."""
        _open_sockets.discard(self)
        if self._refused:
            raise StopConsumer()
        await self._cleanup()
        await super().websocket_disconnect(message)

    async def _claim_user_slot(self) -> bool:
        """Join the user's group, then count it: False when this connection is over the limit.

        Joining before counting makes simultaneous connects on different nodes see each
        other. Members rank by join time (Redis server time, in ms), then channel name,
        the order ``group_members`` gives; a connection whose rank is ``limit`` or more
        is over. Counting waits until Redis time has passed this join's millisecond, so
        every member that can rank before this one is visible by then: of racing
        connects exactly the oldest ``limit`` are kept, whichever node counts first.
        Members on a dead node count until it is pruned.
        """
        limit = self.user_connection_limit
        user_id = self.get_user_id()
        if limit is None or user_id is None:
            return True
        layer = self.channel_layer
        group = api.user_group(user_id)
        self._own_groups.append(group)  # before the add: a cancelled add may have landed
        await layer.group_add(group, self.channel_name, meta=self._client_meta())
        # The join was stamped before its reply came back; once this much has passed, no
        # later join can get the same stamp.
        await asyncio.sleep(USER_LIMIT_SETTLE)
        if await layer.group_size(group) <= limit:
            return True
        channels = [member.channel for member in await layer.group_members(group)]
        rank = channels.index(self.channel_name) if self.channel_name in channels else len(channels)
        return rank < limit

    async def _register(self) -> None:
        layer = self.channel_layer
        meta = self._client_meta()
        groups = [self.get_broadcast_group()]
        user_id = self.get_user_id()
        if user_id is not None:
            groups.append(api.user_group(user_id))
        # The user group may be joined already (_claim_user_slot); joining again would
        # restamp its join time, which ranks it among the user's connections.
        groups = [group for group in groups if group not in self._own_groups]
        self._own_groups.extend(groups)
        errors = await _run_all(
            [layer.group_add(group, self.channel_name, meta=meta) for group in groups]
        )
        if errors:
            raise errors[0]
        for room in self.rooms:  # validated when the class was defined
            await self._join(room, None)

    async def _cleanup(self, timeout: float | None = None) -> None:
        """Leave all groups and release the connection slot; idempotent, never raises."""
        groups = [*self._own_groups, *sorted(self._rooms | self._attempted_rooms)]
        self._own_groups = []
        self._rooms.clear()
        self._attempted_rooms.clear()
        if self._counted_layer is not None:
            count = _open_connections.get(self._counted_layer, 1) - 1
            _open_connections[self._counted_layer] = max(0, count)
            self._counted_layer = None
        if not groups:
            return
        layer = self.channel_layer
        discards = [layer.group_discard(group, self.channel_name) for group in groups]
        try:
            errors = await asyncio.wait_for(_run_all(discards), timeout)
        except asyncio.TimeoutError as exc:
            logger.warning(
                "leaving %d groups for %s failed: %r", len(groups), self.channel_name, exc
            )
            return
        for error in errors:
            logger.warning("leaving a group for %s failed: %r", self.channel_name, error)

    def _user_rate_limit_key(self, layer: Any) -> str | None:
        if self.user_rate_limit is None:
            return None
        if "ratelimit" not in (getattr(layer, "extensions", None) or ()):
            raise InvalidChannelLayerError(
                f"{type(self).__name__}.user_rate_limit needs a channel layer with the "
                "'ratelimit' extension (an async take_tokens(key, rate, burst) method)."
            )
        user_id = self.get_user_id()
        return None if user_id is None else api.user_group(user_id)

    def _require_distributed_layer(self) -> Any:
        layer = getattr(self, "channel_layer", None)
        extensions = getattr(layer, "extensions", None) or ()
        missing = [ext for ext in REQUIRED_EXTENSIONS if ext not in extensions]
        if layer is None or missing:
            raise InvalidChannelLayerError(
                f"{type(self).__name__} needs a channel layer with the {', '.join(missing)} "
                f"extension(s); set CHANNEL_LAYERS[{self.channel_layer_alias!r}]['BACKEND'] to "
                "'channels_distrib.layers.DistributedChannelLayer'."
            )
        return layer

    async def _close_with(self, code: int) -> None:
        self._closing = True
        await self.close(code)
        await self._cleanup()

    # -- rooms -----------------------------------------------------------------------

    def _validate_room(self, room: object) -> None:
        problem = room_problem(room)
        if problem is not None:
            raise InvalidRoom(room, problem)

    async def join_room(
        self,
        room: str,
        meta: Meta | None = None,
        *,
        since: str | None = None,
        previous_client_id: str | None = None,
    ) -> bool:
        """Join ``room`` (a group of the same name), cluster-wide.

        ``meta`` defaults to :meth:`get_presence_meta`. Raises :class:`InvalidRoom` or
        :class:`RoomForbidden` (``can_join_room`` said no); both become error frames when
        raised inside a ``handle_<type>`` method. Does nothing if already in the room.

        With ``since`` (an ``"offset"`` this client saw), every room frame after it still in
        the room's history is sent to the client first, in order, once (skipping those
        ``previous_client_id`` sent with ``exclude_self``), then live frames, with no gap or
        duplicate between them; returns True. Returns False, replaying nothing, when
        ``since`` cannot be continued (unknown, malformed, another room's, from a lost
        history, older than what is kept), when none was given, or when already in the room.
        :meth:`room_joined` runs between the join and the replay.
        """
        self._validate_room(room)
        if room in self._rooms:
            return False
        if not await self.can_join_room(room):
            raise RoomForbidden(room)
        layer = self.channel_layer
        await self._join(room, meta)
        read = None
        if since is not None:
            # Read after the membership is written: whatever the read misses arrives live.
            read = await layer.room_history(room, since=since, limit=0)
        recovered = read is not None and read.known
        await self.room_joined(room, recovered)
        if read is not None and recovered:
            previous = previous_client_id if _is_client_id(previous_client_id) else None
            await room_history.replay(self, room, read, previous)
        return recovered

    async def room_joined(self, room: str, recovered: bool) -> None:
        """Called by :meth:`join_room` once joined, before any replayed frame; default nothing.

        Override to tell the client (``recovered`` says whether the replay that follows
        holds everything it missed).
        """

    async def _join(self, room: str, meta: Meta | None) -> None:
        if meta is None:
            meta = await self.get_presence_meta()
        if self.history > 0:
            # Before the membership: every room send that reaches it is kept too.
            await self.channel_layer.history_configure(
                room, count=self.history, ttl=self.history_ttl, max_bytes=self.history_max_bytes
            )
        self._attempted_rooms.add(room)
        await self.channel_layer.group_add(
            room, self.channel_name, meta=meta, presence=self.presence
        )
        self._rooms.add(room)

    async def leave_room(self, room: str) -> None:
        """Leave ``room``; does nothing if this connection is not in it (does not error)."""
        if room not in self._rooms and room not in self._attempted_rooms:
            return
        await self.channel_layer.group_discard(room, self.channel_name)
        self._rooms.discard(room)
        self._attempted_rooms.discard(room)

    async def room_members(self, room: str) -> list[Member]:
        """Every member of ``room`` on every node, with node id, meta and join time."""
        self._validate_room(room)
        members: list[Member] = await self.channel_layer.group_members(room)
        return members

    async def room_size(self, room: str) -> int:
        """How many connections are in ``room``, all nodes."""
        self._validate_room(room)
        return int(await self.channel_layer.group_size(room))

    # -- sending -----------------------------------------------------------------------

    async def broadcast(self, message: Message, *, exclude_self: bool = False) -> None:
        """Send ``message`` to every connection of this consumer class, on every node."""
        exclude = self.channel_name if exclude_self else None
        envelope = api.make_envelope(message, exclude=exclude)
        await self.channel_layer.group_send(self.get_broadcast_group(), envelope)

    async def broadcast_to_room(
        self, room: str, message: Message, *, exclude_self: bool = False
    ) -> None:
        """Send ``message`` to every connection in ``room``, on every node.

        ``exclude_self`` skips exactly this connection (the same user's other
        connections still receive it). Joining the room is not required.
        """
        self._validate_room(room)
        exclude = self.channel_name if exclude_self else None
        await api.send_room_envelope(self.channel_layer, room, message, exclude)

    async def send_to_client(self, client_id: str, message: Message) -> None:
        """Send ``message`` to the connection whose :attr:`client_id` is given, on any node.

        Raises :class:`ClientError` (``invalid_message``) when ``client_id`` is not a
        connection's id, so client-supplied ids cannot reach worker queues.
        """
        if not _is_client_id(client_id):
            raise ClientError("invalid_message", f"Invalid client id {clip(client_id)}")
        await self.channel_layer.send(client_id, api.make_envelope(message))

    async def send_to_user(self, user_id: object, message: Message) -> None:
        """Send ``message`` to every connection of the user ``user_id``, on every node."""
        await self.channel_layer.group_send(api.user_group(user_id), api.make_envelope(message))

    async def send_json(self, content: Any, close: bool | int = False) -> None:
        """Encode ``content`` with :meth:`encode_json` and send it as a text frame."""
        await self.send(text_data=await self.encode_json(content), close=close)

    async def send_error(self, code: str, message: str) -> None:
        """Send an error frame ``{"type": "error", "code": ..., "message": ...}``."""
        await self.send_json({"type": "error", "code": code, "message": message})

    @classmethod
    async def encode_json(cls, content: Any) -> str:
        """Encode outbound JSON (as Channels' JSON consumer does); override to customise."""
        return json.dumps(content)

    @classmethod
    async def decode_json(cls, text_data: str) -> Any:
        """Decode an inbound text frame; a ``ValueError`` becomes an ``invalid_json`` error."""
        return json.loads(text_data)

    # -- channel-layer handlers --------------------------------------------------------

    async def dispatch(self, message: Message) -> None:
        """Route a message to its handler; the library's envelopes take a fast path.

        Channels' ``dispatch`` runs ``close_old_connections`` in a worker thread before
        every handler, one thread hop per delivered message, all through a single
        thread. Forwarding an envelope's text touches no database, so ``distrib.message``
        goes straight to :meth:`distrib_message`, and presence messages straight to
        :meth:`presence_state` / :meth:`presence_diff` (looked up on the instance, so a
        subclass's override still runs, without the hop); everything else is dispatched
        by Channels.
        """
        kind = message.get("type")
        if kind == api.ENVELOPE_TYPE:
            await self.distrib_message(message)
        elif kind == "presence.diff":
            if self._presence_passthrough:
                await self._forward_diff(message)  # what presence_diff does, text shared
            else:
                await self.presence_diff(message)
        elif kind == "presence.state":
            await self.presence_state(message)
        elif kind == api.DISCONNECT_TYPE:
            await self.distrib_disconnect(message)
        else:
            await super().dispatch(message)

    async def distrib_message(self, message: Message) -> None:
        """Forward an envelope's JSON to the client unless this connection is excluded."""
        # Not registered: the user group was joined at connect but the subclass's
        # connect() has not accepted (yet), and daphne refuses sends before accept.
        if self._closing or not self._registered or message.get("exclude") == self.channel_name:
            return
        text = message.get("text")
        if not isinstance(text, str):
            logger.warning(
                "dropping malformed %s envelope for %s", api.ENVELOPE_TYPE, self.channel_name
            )
            return
        offset = message.get(room_history.OFFSET_KEY)
        if isinstance(offset, str):  # a room with history: the frame carries its offset
            if self._history_floors and room_history.replayed_already(self._history_floors, offset):
                return
            text = room_history.text_with_offset(text, offset)
        await self.send(text_data=text)

    async def distrib_disconnect(self, message: Message) -> None:
        """Close the WebSocket with the message's ``code`` and leave every group.

        Sent by :func:`api.disconnect_user` and :func:`api.disconnect_client`; a code a
        server cannot send is replaced by ``api.DEFAULT_CLOSE_CODE`` (4000).
        """
        if self._closing:
            return
        code = message.get("code")
        if not api.is_close_code(code):
            logger.warning(
                "%s for %s has an invalid close code %r; closing with %d",
                api.DISCONNECT_TYPE,
                self.channel_name,
                code,
                api.DEFAULT_CLOSE_CODE,
            )
            code = api.DEFAULT_CLOSE_CODE
        logger.info("closing %s with %s: disconnect requested", self.channel_name, code)
        await self._close_with(code)

    async def presence_state(self, message: Message) -> None:
        """Forward a joined room's ``presence.state`` to the client as JSON; override to change."""
        if not self._closing and message.get("group") in self._rooms:
            await self.send_json(message)

    async def presence_diff(self, message: Message) -> None:
        """Forward a joined room's ``presence.diff`` to the client as JSON; override to change."""
        if not self._closing and message.get("group") in self._rooms:
            await self.send_json(message)

    async def _forward_diff(self, message: Message) -> None:
        """:meth:`presence_diff` for classes that override none of its steps: the JSON
        text is made once per node for every member the diff reached (encoded.py)."""
        if not self._closing and message.get("group") in self._rooms:
            lookup = getattr(self.channel_layer, "received_payload", None)
            payload = lookup(self.channel_name, message) if lookup is not None else None
            await self.send(text_data=PRESENCE_TEXTS.text(payload, message))

    # -- inbound frames ----------------------------------------------------------------

    async def websocket_receive(self, message: Message) -> None:
        """Apply the size and rate limits to a frame, then pass it to :meth:`receive`."""
        if self._closing:
            return
        text, data = message.get("text"), message.get("bytes")
        if self._too_large(text, data):
            logger.info("closing %s: frame over max_message_size", self.channel_name)
            await self._close_with(CLOSE_MESSAGE_TOO_BIG)
            return
        if not await self._take_token():
            await self.send_error("rate_limited", "Too many messages; slow down")
            if self._too_many_rejections():
                logger.info("closing %s: rate limit exceeded", self.channel_name)
                await self._close_with(CLOSE_POLICY_VIOLATION)
            return
        await self.receive(text_data=text, bytes_data=data)

    async def _take_token(self) -> bool:
        """One token from this connection's bucket, then from the user's bucket in Redis."""
        if self._bucket is not None and not self._bucket.take():
            return False
        if self._user_bucket_key is None or self.user_rate_limit is None:
            return True
        rate, burst = self.user_rate_limit
        return bool(await self.channel_layer.take_tokens(self._user_bucket_key, rate, burst))

    def _too_large(self, text: str | None, data: bytes | None) -> bool:
        limit = self.max_message_size
        if limit is None:
            return False
        if data is not None:
            return len(data) > limit
        if text is None or len(text) * 4 <= limit:  # UTF-8 is at most 4 bytes a character
            return False
        return len(text) > limit or len(text.encode("utf-8")) > limit

    def _too_many_rejections(self) -> bool:
        now = time.monotonic()
        self._rejections.append(now)
        full = len(self._rejections) >= self.rate_limit_max_rejections
        return full and now - self._rejections[0] <= self.rate_limit_window

    async def receive(
        self, text_data: str | None = None, bytes_data: bytes | None = None, **kwargs: Any
    ) -> None:
        """Parse a frame as JSON and pass it to :meth:`receive_json`; errors become frames."""
        if text_data is None:
            await self.send_error("unsupported_frame", "Binary frames are not supported")
            return
        try:
            content = await self.decode_json(text_data)
        except (ValueError, RecursionError):  # bad JSON, or nesting deeper than json allows
            await self.send_error("invalid_json", "Invalid message format")
            return
        await self.receive_json(content, **kwargs)

    async def receive_json(self, content: Any, **kwargs: Any) -> None:
        """Check the message shape, run the inbound middleware and dispatch on ``type``."""
        if not isinstance(content, dict) or not isinstance(content.get("type"), str):
            await self.send_error("invalid_message", "Expected a JSON object with a string 'type'")
            return
        try:
            await self.dispatch_inbound(content)
        except ClientError as exc:
            await self.send_error(exc.code, exc.message)

    async def dispatch_inbound(self, content: Message) -> None:
        """Run ``inbound_middleware`` in order, then await ``handle_<type>(content)``.

        A middleware returning None drops the message. ``.`` and ``-`` in the type
        become ``_``; a type with no handler gets an ``unknown_type`` error frame.
        """
        for middleware in self.inbound_middleware:
            result = await middleware(self, content)
            if result is None:
                return
            content = result
        handler = self._inbound_handler(content.get("type"))
        if handler is None:
            raise ClientError("unknown_type", f"Unknown message type {clip(content.get('type'))}")
        await handler(content)

    def _inbound_handler(self, kind: object) -> Callable[[Message], Awaitable[Any]] | None:
        if not isinstance(kind, str):
            return None
        name = "handle_" + kind.replace(".", "_").replace("-", "_")
        if not name.isidentifier():
            return None
        handler = getattr(self, name, None)
        return handler if callable(handler) else None


class DistributedConsumer(DistributedMixin, AsyncJsonWebsocketConsumer):  # type: ignore[misc]  # untyped base
    """``DistributedMixin`` + Channels' ``AsyncJsonWebsocketConsumer``: subclass this."""
