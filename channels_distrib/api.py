"""Send JSON to WebSocket clients from anywhere: views, signals, tasks, management commands.

Every helper here is a coroutine. From synchronous code (a Django view, a Celery
task) wrap it with ``asgiref.sync.async_to_sync``::

    from asgiref.sync import async_to_sync
    from channels_distrib import api

    def publish(request):
        async_to_sync(api.send_to_room)("lobby", {"type": "notice", "text": "hi"})
        ...

A ``message`` is a JSON-serialisable dict. It reaches each target WebSocket that is a
:class:`~channels_distrib.consumers.DistributedMixin` connection as exactly that JSON
object, whichever node the connection lives on. Delivery is the layer's: at most once,
to connections still receiving.

The envelope on the channel layer is (documented so other senders can build it)::

    {"type": "distrib.message", "text": "<the JSON text>", "exclude": "<channel>" | None}

The JSON is encoded once by the sender, so a group of any size costs one encode, and
what the client receives is byte for byte what the sender encoded. ``exclude`` names
one channel (connection) that drops the message instead of forwarding it. In a room with
history (:mod:`channels_distrib.history`) the receiving node adds ``"offset": "<offset>"``
to the envelope, and the connection adds that key to the JSON object it forwards.

:func:`disconnect_user` and :func:`disconnect_client` send a control message instead,
which the connection handles by closing its WebSocket with ``code``::

    {"type": "distrib.disconnect", "code": 4000}
"""

from __future__ import annotations

import hashlib
import json
import re
from typing import TYPE_CHECKING, Any, TypeGuard

from channels import DEFAULT_CHANNEL_LAYER
from channels.exceptions import InvalidChannelLayerError
from channels.layers import get_channel_layer

from channels_distrib.history import OFFSET_KEY, check_room_message
from channels_distrib.types import Message

if TYPE_CHECKING:
    from channels_distrib.consumers import DistributedMixin

__all__ = [
    "DEFAULT_CLOSE_CODE",
    "DISCONNECT_TYPE",
    "ENVELOPE_TYPE",
    "RESERVED_PREFIX",
    "broadcast",
    "disconnect_client",
    "disconnect_user",
    "is_close_code",
    "make_disconnect",
    "make_envelope",
    "room_history",
    "send_to_client",
    "send_to_room",
    "send_to_user",
    "user_group",
]

ENVELOPE_TYPE = "distrib.message"
"""Channel-layer message type that carries JSON for a WebSocket (handler ``distrib_message``)."""

DISCONNECT_TYPE = "distrib.disconnect"
"""Channel-layer message type that closes a connection (handler ``distrib_disconnect``)."""

DEFAULT_CLOSE_CODE = 4000
"""The close code :func:`disconnect_user` and :func:`disconnect_client` use by default."""

RESERVED_PREFIX = "distrib."
"""Group names starting with this belong to the library (user and broadcast groups)."""

GROUP_NAME = re.compile(r"^[a-zA-Z\d\-_.]+$")
# channels' limit is "length < 100"; leave room for the prefix and a hash.
_MAX_GROUP_NAME = 99


def make_envelope(message: Message, *, exclude: str | None = None) -> Message:
    """Wrap a JSON-serialisable dict in the channel-layer envelope consumers forward.

    Raises ``TypeError`` if ``message`` is not a dict or cannot be encoded as JSON, so a
    bad message fails at the sender instead of at every receiving connection.
    """
    if not isinstance(message, dict):
        raise TypeError(f"message must be a dict, not {type(message).__name__}")
    try:
        text = json.dumps(message)
    except ValueError as exc:  # circular reference, NaN with allow_nan=False...
        raise TypeError(f"message is not JSON-serialisable: {exc}") from exc
    return {"type": ENVELOPE_TYPE, "text": text, "exclude": exclude}


def is_close_code(code: object) -> TypeGuard[int]:
    """Whether a server may close a WebSocket with ``code``.

    1000-1003, 1007-1014 (RFC 6455 section 7.4.1; the mixin lets daphne send them) and
    the application range 3000-4999. 1004-1006 and 1015 are never sent in a close frame.
    """
    if not isinstance(code, int) or isinstance(code, bool):
        return False
    return 1000 <= code <= 1003 or 1007 <= code <= 1014 or 3000 <= code <= 4999


def make_disconnect(code: int = DEFAULT_CLOSE_CODE) -> Message:
    """The control message that makes a connection close its WebSocket with ``code``.

    Raises ``ValueError`` for a code a server cannot send (see :func:`is_close_code`).
    """
    if not is_close_code(code):
        raise ValueError(f"code must be 1000-1003, 1007-1014 or 3000-4999 (an int), not {code!r}")
    return {"type": DISCONNECT_TYPE, "code": code}


def _safe_group(kind: str, key: str) -> str:
    """``distrib.<kind>.<key>`` when that is a valid group name, else a hashed form."""
    name = f"{RESERVED_PREFIX}{kind}.{key}"
    if len(name) <= _MAX_GROUP_NAME and GROUP_NAME.match(name):
        return name
    digest = hashlib.sha256(key.encode("utf-8")).hexdigest()[:40]
    return f"{RESERVED_PREFIX}{kind}-h.{digest}"


def user_group(user_id: object) -> str:
    """The group every connection of ``user_id`` joins (ids are compared as ``str``).

    Ids that are not valid group-name characters (an e-mail address, say) are hashed,
    so any id works.
    """
    if user_id is None or user_id == "":
        raise ValueError("user_id must not be empty")
    return _safe_group("user", str(user_id))


def broadcast_group_for(qualified_name: str) -> str:
    """The broadcast group name for a consumer class given as ``module.QualName``."""
    return _safe_group("bc", qualified_name)


def _layer(alias: str) -> Any:
    layer = get_channel_layer(alias)
    if layer is None:
        raise InvalidChannelLayerError(
            f"CHANNEL_LAYERS has no {alias!r} entry; channels_distrib.api needs a "
            "channels_distrib.layers.DistributedChannelLayer there."
        )
    return layer


async def send_to_room(
    room: str,
    message: Message,
    *,
    exclude: str | None = None,
    alias: str = DEFAULT_CHANNEL_LAYER,
) -> str | None:
    """Send ``message`` to every connection in ``room``, on every node.

    ``exclude`` is a client id (channel name) that should not receive it. An empty or
    unknown room is not an error. In a room with history the message is kept and every
    frame carries an ``"offset"``; returns it (None in a room without history). Raises
    ``TypeError`` for a non-dict or non-JSON message or an invalid room name, and
    ``ValueError`` when the message already has an ``"offset"`` key.
    """
    return await send_room_envelope(_layer(alias), room, message, exclude)


async def send_room_envelope(
    layer: Any, room: str, message: Message, exclude: str | None
) -> str | None:
    """A room send through the layer's ``room_send`` (history), or ``group_send`` for a
    layer without the ``history`` extension."""
    check_room_message(message)
    envelope = make_envelope(message, exclude=exclude)
    if "history" in (getattr(layer, "extensions", None) or ()):
        offset: str | None = await layer.room_send(room, envelope, exclude=exclude)
        return offset
    await layer.group_send(room, envelope)
    return None


async def room_history(
    room: str,
    since: str | None = None,
    limit: int = 100,
    *,
    alias: str = DEFAULT_CHANNEL_LAYER,
) -> list[Message] | None:
    """The room's kept messages after offset ``since`` (its newest when None), oldest first.

    Each is the message as clients received it (a dict with its ``"offset"``), at most
    ``limit``. Returns None when ``since`` cannot be continued (unknown, malformed,
    another room's, from a lost history, or older than what is kept); an empty list when
    nothing came after it (or the room keeps no history).
    """
    layer = _layer(alias)
    read = await layer.room_history(room, since=since, limit=limit)
    if not read.known:
        return None
    messages: list[Message] = []
    for entry in read.entries:
        message = layer.serializer.loads(entry.payload)
        if message.get("type") == ENVELOPE_TYPE and isinstance(message.get("text"), str):
            message = json.loads(message["text"])
        messages.append({**message, OFFSET_KEY: entry.offset})
    return messages


async def send_to_user(
    user_id: object,
    message: Message,
    *,
    alias: str = DEFAULT_CHANNEL_LAYER,
) -> None:
    """Send ``message`` to every connection of the authenticated user ``user_id``, on every node.

    ``user_id`` is the user's primary key (compared as ``str``). A user with no open
    connection is not an error.
    """
    await _layer(alias).group_send(user_group(user_id), make_envelope(message))


async def send_to_client(
    client_id: str,
    message: Message,
    *,
    alias: str = DEFAULT_CHANNEL_LAYER,
) -> None:
    """Send ``message`` to the one connection whose ``client_id`` (channel name) is given.

    May raise ``channels.exceptions.ChannelFull`` when the layer knows that connection's
    queue is full; a closed connection's message is dropped silently.
    """
    await _layer(alias).send(client_id, make_envelope(message))


async def broadcast(
    consumer_class: type[DistributedMixin],
    message: Message,
    *,
    alias: str | None = None,
) -> None:
    """Send ``message`` to every connection of ``consumer_class``, on every node.

    ``alias`` defaults to the class's ``channel_layer_alias``.
    """
    layer_alias = alias or getattr(consumer_class, "channel_layer_alias", DEFAULT_CHANNEL_LAYER)
    await _layer(layer_alias).group_send(
        consumer_class.get_broadcast_group(), make_envelope(message)
    )


async def disconnect_user(
    user_id: object,
    code: int = DEFAULT_CLOSE_CODE,
    *,
    alias: str = DEFAULT_CHANNEL_LAYER,
) -> None:
    """Close every connection of the authenticated user ``user_id``, on every node, with ``code``.

    Each connection leaves its rooms and groups as it closes (its ``disconnect`` runs as
    for any close). A user with no open connection is not an error. Delivery is the
    layer's: a connection whose queue is full at that moment misses the request. Raises
    ``ValueError`` for an empty ``user_id`` or a code a server cannot send.
    """
    message = make_disconnect(code)
    await _layer(alias).group_send(user_group(user_id), message)


async def disconnect_client(
    client_id: str,
    code: int = DEFAULT_CLOSE_CODE,
    *,
    alias: str = DEFAULT_CHANNEL_LAYER,
) -> None:
    """Close the one connection whose ``client_id`` (channel name) is given, with ``code``.

    A connection that is already closed is not an error. Raises ``ValueError`` when
    ``client_id`` is not a connection's id (``specific.<token>!<id>``) or for a code a
    server cannot send; may raise ``channels.exceptions.ChannelFull`` when the layer
    knows that connection's queue is full.
    """
    message = make_disconnect(code)
    if not isinstance(client_id, str) or "!" not in client_id:
        raise ValueError(f"client_id must be a connection's channel name, not {client_id!r}")
    await _layer(alias).send(client_id, message)
