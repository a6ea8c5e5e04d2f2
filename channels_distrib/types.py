"""Value types returned by the registry queries, and shared type aliases."""

from __future__ import annotations

from dataclasses import dataclass
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


#: The ``kind`` values of ``messages_sent``.
SENT_KINDS = ("direct", "group", "named")
#: The ``reason`` values of ``messages_dropped``.
DROP_REASONS = ("capacity", "expired", "corrupt", "no_channel", "trimmed")


@dataclass(frozen=True)
class NodeStats:
    """One live node's own figures, as its last heartbeat published them.

    Counters are totals since the node started (compute rates from two readings and their
    ``at``); ``at`` is seconds since the epoch (Redis time) when the node took the reading.
    """

    node_id: str
    hostname: str
    pid: int
    at: float
    sent: dict[str, int]
    group_sends: int
    delivered: int
    dropped: dict[str, int]
    connections: int
    channels: int
    nodes_alive: int
    prunes: int
    reconnects: int
    heartbeat_lag: float

    @classmethod
    def from_info(cls, token: str, info: dict[str, Any]) -> NodeStats | None:
        """From a node-info entry; None when it carries no figures (a node of an older version)."""
        raw = info.get("stats")
        if not isinstance(raw, dict):
            return None

        def counts(value: Any, names: tuple[str, ...]) -> dict[str, int]:
            given = value if isinstance(value, dict) else {}
            return {name: int(given.get(name, 0)) for name in names}

        return cls(
            node_id=str(info.get("node_id", token)),
            hostname=str(info.get("hostname", "")),
            pid=int(info.get("pid", 0)),
            at=float(raw.get("at", 0.0)),
            sent=counts(raw.get("sent"), SENT_KINDS),
            group_sends=int(raw.get("group_sends", 0)),
            delivered=int(raw.get("delivered", 0)),
            dropped=counts(raw.get("dropped"), DROP_REASONS),
            connections=int(raw.get("connections", 0)),
            channels=int(raw.get("channels", 0)),
            nodes_alive=int(raw.get("nodes_alive", 0)),
            prunes=int(raw.get("prunes", 0)),
            reconnects=int(raw.get("reconnects", 0)),
            heartbeat_lag=float(raw.get("heartbeat_lag", 0.0)),
        )
