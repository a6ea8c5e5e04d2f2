"""Plain-integer counters of one layer, and the figures read from them.

The hot paths only ever do ``counter += 1`` on a :class:`Counters` attribute (or nothing):
every other figure (expired messages, drops by reason, connections, heartbeat age) is read
from state the layer keeps anyway, when somebody asks. Two readers ask: the heartbeat, which
publishes :func:`figures` into its node-info entry every beat (for
:meth:`~channels_distrib.layers.DistributedChannelLayer.node_stats`), and the Prometheus
collector of :mod:`channels_distrib.metrics` at scrape time. This module imports nothing
beyond the standard library.
"""

from __future__ import annotations

import sys
import time
from typing import TYPE_CHECKING, Any

from .types import DROP_REASONS

if TYPE_CHECKING:
    from .layers import DistributedChannelLayer



class Counters:
    """Monotonic counts of one layer (one process, usually), bumped where the work happens."""

    __slots__ = (
        "sent_direct",
        "sent_named",
        "sent_group",
        "group_sends",
        "delivered",
        "group_dropped",
        "corrupt",
        "prunes",
        "reconnects",
        "expired_gone",
    )

    def __init__(self) -> None:
        self.sent_direct = 0  # send() to a process-local channel
        self.sent_named = 0  # send() to a normal channel (a shared Redis list)
        self.sent_group = 0  # copies group_send() wrote: one per node inbox, one per queue
        self.group_sends = 0  # group_send() calls
        self.delivered = 0  # messages receive() returned
        self.group_dropped = 0  # group_send() copies refused by a full normal channel
        self.corrupt = 0  # payloads receive() could not decode
        self.prunes = 0  # dead nodes this process pruned
        self.reconnects = 0  # times a connection to Redis was lost or could not be opened
        self.expired_gone = 0  # expired messages of local channels no longer held


def _snapshot(items: Any) -> list[Any]:
    """A list of a dict view another thread may change (a metrics scrape runs in a thread)."""
    for _ in range(10):
        try:
            return list(items)
        except RuntimeError:  # changed size during iteration
            continue
    return []


def connections(layer: DistributedChannelLayer) -> int:
    """DistributedConsumer connections open on this layer (0 if no consumer module is loaded)."""
    consumers = sys.modules.get("channels_distrib.consumers")
    if consumers is None:
        return 0
    return int(consumers._open_connections.get(layer, 0))


def figures(layer: DistributedChannelLayer) -> dict[str, Any]:
    """Every figure of one layer now, as plain data (msgpack- and JSON-ready)."""
    c = layer.counters
    node = layer._node
    dropped = dict.fromkeys(DROP_REASONS, 0)
    dropped["capacity"] = c.group_dropped
    dropped["corrupt"] = c.corrupt
    expired = c.expired_gone
    for state in _snapshot(layer._loops.values()):
        for queue in _snapshot(state.queues.values()):
            expired += queue.buffer.expired
    channels = 0
    nodes_alive = 0
    lag = 0.0
    if node is not None and not node.stopped:
        inbox = node.inbox
        for reason, count in _snapshot(inbox.dropped_by.items()):
            dropped[reason] = dropped.get(reason, 0) + count
        dropped["corrupt"] += inbox.skipped
        local = _snapshot(node.channels.values())
        channels = len(local)
        expired += sum(channel.expired for channel in local)
        nodes_alive = node.nodes_alive
        if node.heartbeat.last_beat:
            late = time.monotonic() - node.heartbeat.last_beat - node.config.heartbeat_interval
            lag = max(0.0, late)
    dropped["expired"] = expired
    return {
        "at": time.time() + (node.clock_offset if node is not None else 0.0),
        "sent": {"direct": c.sent_direct, "group": c.sent_group, "named": c.sent_named},
        "group_sends": c.group_sends,
        "delivered": c.delivered,
        "dropped": dropped,
        "connections": connections(layer),
        "channels": channels,
        "nodes_alive": nodes_alive,
        "prunes": c.prunes,
        "reconnects": c.reconnects,
        "heartbeat_lag": lag,
    }


__all__ = ["Counters", "figures"]
