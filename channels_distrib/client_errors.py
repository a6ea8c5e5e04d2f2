"""The errors a client sees as error frames, and the room-name rule behind ``invalid_room``.

Raised by the consumer (and by applications' ``handle_<type>`` methods or inbound middleware);
:class:`~channels_distrib.consumers.DistributedMixin` answers each with
``{"type": "error", "code": ..., "message": ...}`` and keeps the connection open.
"""

from __future__ import annotations

from channels_distrib import api
from channels_distrib.exceptions import DistribError

__all__ = ["ClientError", "InvalidRoom", "RoomForbidden", "clip", "room_problem"]


def clip(value: object, limit: int = 100) -> str:
    """``repr(value)`` cut to ``limit`` characters, for echoing client input in error frames."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


class ClientError(DistribError):
    """Raise from a ``handle_<type>`` method (or inbound middleware) to answer with an error frame.

    The client receives ``{"type": "error", "code": code, "message": message}`` and the
    connection stays open.
    """

    def __init__(self, code: str, message: str) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message


class RoomForbidden(ClientError):
    """``join_room`` was refused by ``can_join_room`` (error code ``forbidden``)."""

    def __init__(self, room: str) -> None:
        super().__init__("forbidden", f"Not allowed to join room {room!r}")
        self.room = room


class InvalidRoom(ClientError):
    """A room name that is not a valid group name, or is reserved (code ``invalid_room``)."""

    def __init__(self, room: object, reason: str) -> None:
        super().__init__("invalid_room", f"Invalid room {clip(room)}: {reason}")
        self.room = room


def room_problem(room: object) -> str | None:
    """Why ``room`` cannot be a room name, or None when it can."""
    if not isinstance(room, str) or not room:
        return "must be a non-empty string"
    if len(room) >= 100 or not api.GROUP_NAME.match(room):
        return "use fewer than 100 ASCII letters, digits, hyphens, underscores or periods"
    if room.startswith(api.RESERVED_PREFIX):
        return f"names starting with {api.RESERVED_PREFIX!r} are reserved"
    return None
