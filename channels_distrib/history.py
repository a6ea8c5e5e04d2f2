"""Room history: offsets, epochs and replay, so a client that reconnects misses nothing.

A room keeps history once a connection of a consumer class with ``history > 0`` joins it
(:meth:`RoomHistory.configure`, the larger setting wins). From then on every room send
(``broadcast_to_room``, ``api.send_to_room``, the layer's ``room_send``) is appended to the
room's history stream and numbered inside the same script that fans it out (ROOM_SEND in
:mod:`channels_distrib.scripts`), so every node and every recovering client sees one order
per room. Plain ``group_send`` messages are never stored.

An offset is ``"<epoch>:<ms>-<seq>"``. The epoch is drawn when the room's history settings
are created: a history lost with its settings (Redis restart without persistence, a flush,
a room idle for longer than ``group_expiry``) gets a new epoch, so an old offset is refused
rather than replayed across a gap. The offset travels with each inbox entry and the
receiving node adds it to the message as a top-level ``"offset"`` key
(:func:`payload_with_offset`); the consumer puts it into the JSON its client receives
(:func:`text_with_offset`).

On Redis Cluster the history keys share the room's hash tag (``{g.<room>}``), so the
history write and the read of the room's nodes stay in one slot.
"""

from __future__ import annotations

import json
import logging
import re
import secrets
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from .keys import Keys
from .serializers import Serializer
from .transport import Transport
from .types import Message

if TYPE_CHECKING:
    from .consumers import DistributedMixin

logger = logging.getLogger(__name__)

#: Longest ``since`` looked at; anything longer is unknown (an offset is about 30 characters).
MAX_OFFSET_LENGTH = 64
_OFFSET = re.compile(r"^([0-9a-f]{8}):([0-9]{1,16})-([0-9]{1,10})$")
#: The message key the offset travels in (a room message must not have it already).
OFFSET_KEY = "offset"


@dataclass(frozen=True)
class HistoryEntry:
    """One kept message: its offset, its encoded payload and the channel it excluded."""

    offset: str
    payload: bytes
    exclude: str | None


@dataclass(frozen=True)
class HistoryRead:
    """What a history read found.

    ``known`` is False when the offset asked for cannot be continued (unknown, malformed,
    another room's, a lost epoch, or older than what is kept); ``entries`` is then empty.
    ``last`` is the room's newest offset at the read (None when it has none yet).
    """

    known: bool
    entries: list[HistoryEntry]
    last: str | None = None


@dataclass(frozen=True)
class HistoryInfo:
    """How much one room's history holds now, and its settings."""

    entries: int
    payload_bytes: int
    memory_bytes: int
    max_entries: int
    ttl: float
    max_bytes: int
    epoch: str


def parse_offset(offset: object) -> tuple[str, str] | None:
    """``(epoch, stream id)`` of a well-formed offset; None for anything else (no error)."""
    if not isinstance(offset, str) or len(offset) > MAX_OFFSET_LENGTH:
        return None
    match = _OFFSET.match(offset)
    if match is None:
        return None
    return match.group(1), f"{int(match.group(2))}-{int(match.group(3))}"


def offset_position(offset: str) -> tuple[str, int, int] | None:
    """``(epoch, ms, seq)`` of an offset, for ordering offsets of one epoch."""
    match = _OFFSET.match(offset) if len(offset) <= MAX_OFFSET_LENGTH else None
    if match is None:
        return None
    return match.group(1), int(match.group(2)), int(match.group(3))


def check_room_message(message: Any) -> None:
    """A room message must not carry an ``"offset"`` key: the room's history sets it."""
    if isinstance(message, dict) and OFFSET_KEY in message:
        raise ValueError(
            'a room message must not have an "offset" key: rooms with history add it'
        )


def payload_with_offset(serializer: Serializer, payload: bytes, offset: bytes | str) -> bytes:
    """The payload re-encoded with ``"offset"`` added (once per node, not per member)."""
    message = serializer.loads(payload)
    message[OFFSET_KEY] = offset.decode() if isinstance(offset, bytes) else offset
    return serializer.dumps(message)


def text_with_offset(text: str, offset: str) -> str:
    """A JSON object's text with a top-level ``"offset"`` key added, without re-parsing it."""
    body = text.rstrip()
    if not body.endswith("}"):
        return text  # not an object (an envelope another sender built): left as it is
    head = body[:-1].rstrip()
    separator = "" if head.endswith("{") else ", "
    return f"{head}{separator}{json.dumps(OFFSET_KEY)}: {json.dumps(offset)}}}"


class RoomHistory:
    """The layer's part of room history: settings, sends and reads, one round trip each."""

    def __init__(self, keys: Keys, serializer: Serializer, group_expiry_ms: int) -> None:
        self.keys = keys
        self.serializer = serializer
        self.group_expiry_ms = group_expiry_ms

    def keys_of(self, room: str) -> list[str]:
        """KEYS of the history scripts: the room's stream and its settings hash."""
        return [self.keys.history(room), self.keys.history_config(room)]

    async def configure(
        self, t: Transport, room: str, count: int, ttl: float, max_bytes: int
    ) -> str:
        """Make ``room`` keep at least this much history; returns the room's epoch."""
        args = [count, int(ttl * 1000), max_bytes, secrets.token_hex(4), self.group_expiry_ms]
        epoch = await t.script("history_configure", [self.keys.history_config(room)], args)
        return epoch.decode() if isinstance(epoch, bytes) else str(epoch)

    async def append(self, t: Transport, room: str, payload: bytes, exclude: str) -> str | None:
        """Keep one room message (the broker path's history step); its offset, or None when
        the room keeps no history."""
        args = [payload, exclude, self.group_expiry_ms]
        offset = await t.script("history_append", self.keys_of(room), args)
        return _text(offset) if offset else None

    async def read(
        self, t: Transport, room: str, since: object, limit: int
    ) -> HistoryRead:
        """Entries after ``since`` (all of them when ``limit`` is 0), or the newest ``limit``
        when ``since`` is None. A ``since`` that cannot be continued gives ``known=False``."""
        if since is None:
            epoch, stream_id = "", ""
        else:
            parsed = parse_offset(since)
            if parsed is None:
                logger.debug("history of %s: since %.80r is not an offset", room, since)
                return HistoryRead(False, [])
            epoch, stream_id = parsed
        reply = await t.script(
            "history_read", self.keys_of(room), [epoch, stream_id, limit], idempotent=True
        )
        if int(reply[0]) != 1:
            if since is not None:
                logger.debug("history of %s cannot continue from %s", room, since)
            return HistoryRead(since is None, [])
        _ok, _epoch, last, flat = reply
        entries = [
            HistoryEntry(_text(flat[i]), bytes(flat[i + 1]), _text(flat[i + 2]) or None)
            for i in range(0, len(flat), 3)
        ]
        return HistoryRead(True, entries, _text(last) if last else None)

    async def info(self, t: Transport, room: str) -> HistoryInfo | None:
        """Entries, payload bytes and Redis memory of a room's history; None without one."""
        reply = await t.script("history_info", self.keys_of(room), [], idempotent=True)
        if not reply:
            return None
        entries, size, memory, count, ttl_ms, max_bytes, epoch = reply
        return HistoryInfo(
            int(entries), int(size), int(memory), int(count), int(ttl_ms) / 1000.0,
            int(max_bytes), _text(epoch),
        )


class KeptRooms:
    """The history settings of the rooms this node's connections joined, so the node can
    write them again when Redis lost them (a restart without persistence): without that, a
    room would keep no history, and send no offsets, until a history connection joins again.

    Owned by the node; entries for rooms where the node no longer has members are dropped at
    each restore and each reconciliation, so it holds at most the node's rooms.
    """

    def __init__(self) -> None:
        self.settings: dict[str, tuple[int, float, int]] = {}
        self.history: RoomHistory | None = None  # set by the layer that made the node

    def keep(self, room: str, count: int, ttl: float, max_bytes: int) -> None:
        old = self.settings.get(room, (0, 0.0, 0))
        self.settings[room] = (max(old[0], count), max(old[1], ttl), max(old[2], max_bytes))

    def forget_unless(self, joined: Callable[[str], bool]) -> None:
        """Drop the rooms where ``joined`` says the node has no member any more."""
        for room in [room for room in self.settings if not joined(room)]:
            del self.settings[room]

    async def restore(self, t: Transport, joined: Callable[[str], bool]) -> int:
        """Write the settings of every room the node still has members in (a new epoch where
        the history was lost, so older offsets are refused); returns how many."""
        self.forget_unless(joined)
        if self.history is None:
            return 0
        for room, (count, ttl, max_bytes) in list(self.settings.items()):
            await self.history.configure(t, room, count, ttl, max_bytes)
        return len(self.settings)


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


# -- the consumer's part ------------------------------------------------------------------


def replayed_already(floors: dict[str, tuple[int, int]], offset: str) -> bool:
    """Whether a live frame's offset was already replayed by a join (then it is dropped).

    ``floors`` maps a room history's epoch to the newest position a replay covered (one
    entry per room joined with ``since``). It is kept for the connection's life: over the
    broker, frames of concurrent senders may arrive out of offset order.
    """
    position = offset_position(offset)
    if position is None:
        return False
    epoch, ms, seq = position
    floor = floors.get(epoch)
    return floor is not None and (ms, seq) <= floor


async def replay(
    consumer: DistributedMixin, room: str, read: HistoryRead, previous: str | None
) -> int:
    """Send a join's replayed frames to the client, in order; returns how many were sent.

    The frames go straight to the WebSocket, not through the channel layer, so they do not
    count against ``capacity``. Live frames that the replay covered are dropped later by
    :func:`replayed_already`, so between the two there is no gap and no duplicate.
    """
    if read.last is not None:
        position = offset_position(read.last)
        if position is not None:
            consumer._history_floors[position[0]] = position[1:]
    serializer = consumer.channel_layer.serializer
    sent = 0
    for entry in read.entries:
        if previous is not None and entry.exclude == previous:
            continue  # the previous connection's own exclude_self message
        try:
            message = serializer.loads(entry.payload)
        except ValueError:
            logger.warning("history of %s: skipping an undecodable entry %s", room, entry.offset)
            continue
        await _replay_one(consumer, message, entry.offset)
        sent += 1
    return sent


async def _replay_one(consumer: DistributedMixin, message: Message, offset: str) -> None:
    from .api import ENVELOPE_TYPE

    if message.get("type") == ENVELOPE_TYPE and isinstance(message.get("text"), str):
        await consumer.send(text_data=text_with_offset(message["text"], offset))
    else:
        await consumer.dispatch({**message, OFFSET_KEY: offset})


__all__ = [
    "HistoryEntry",
    "HistoryInfo",
    "HistoryRead",
    "RoomHistory",
    "check_room_message",
    "parse_offset",
    "payload_with_offset",
    "text_with_offset",
]
