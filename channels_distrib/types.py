"""Value types returned by the registry queries, and shared type aliases."""

from __future__ import annotations

from typing import Any, NamedTuple

Message = dict[str, Any]
"""A channel-layer message: a dict with a string ``type``."""

Meta = dict[str, Any]
"""Application metadata kept with a membership (up to ``max_meta_size`` encoded)."""


class Member(NamedTuple):
    """One channel's membership of a group, as ``group_members`` reports it.

    ``node_id`` is None for normal (shared-queue) channels; ``meta`` is None when
    none was given; ``joined_at`` is seconds since the epoch, from Redis server time.
    """

    channel: str
    node_id: str | None
    meta: Meta | None
    joined_at: float


class NodeInfo(NamedTuple):
    """A live node, as ``nodes()`` reports it. Times are seconds since the epoch (Redis time)."""

    node_id: str
    hostname: str
    pid: int
    started_at: float
    last_seen: float
    channel_count: int
