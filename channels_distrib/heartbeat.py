"""A node's heartbeat: stay listed, on a timer of its own.

Each beat is one script (HEARTBEAT) that refreshes this node and reports what changed:
whether the node was still listed (if not: pruned while alive, or Redis lost its data),
whether a flush happened, and which nodes are past their deadline. The beat applies what
is memory-only at once (a flush, marking memberships for re-registration) and hands the rest
to housekeeping, which runs in its own task: however long pruning or a re-registration takes,
the next beat starts on time, so a busy node is never pruned for being busy.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import TYPE_CHECKING, Any

import msgpack
from django.core.exceptions import ImproperlyConfigured

from .registry import INBOX_MAXLEN
from .tasks import cancellable
from .transport import backoff

if TYPE_CHECKING:
    from .node import Node

logger = logging.getLogger(__name__)


class TokenTaken(Exception):
    """The random node token is already known to Redis (a 40-bit collision): pick another."""


class Heartbeat:
    """The periodic beat of one node; its task is owned by the node."""

    def __init__(self, node: Node) -> None:
        self.node = node
        self.last_beat = 0.0  # time.monotonic() of the last beat Redis confirmed

    async def run(self) -> None:
        """Beat every ``heartbeat_interval`` from a fixed schedule (no drift), backing off
        while Redis fails. Cancellation ends the loop at once (see :func:`cancellable`)."""
        node = self.node
        interval = node.config.heartbeat_interval
        due = time.monotonic() + interval
        attempt = 0
        while not node.stopped:
            await asyncio.sleep(max(0.0, due - time.monotonic()))
            try:
                await cancellable(self.beat)
                attempt = 0
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                attempt += 1
                logger.warning("Heartbeat of node %s failed: %s", node.node_id, exc)
            now = time.monotonic()
            # While Redis fails, retry sooner than the interval (one short script): the node
            # re-registers as soon as Redis answers again.
            retry = backoff(attempt, min(1.0, interval))
            due = max(due + interval, now) if attempt == 0 else now + retry

    def _info(self) -> bytes:
        node = self.node
        now = time.monotonic()
        count = sum(1 for channel in node.channels.values() if channel.receiving(now))
        info: bytes = msgpack.packb(
            {
                "node_id": node.node_id,
                "hostname": node.hostname,
                "pid": node.pid,
                "started_at": node.started_at,
                "channel_count": count,
                "node_timeout": node.config.node_timeout,
                # For node_stats() (never read into NodeInfo, whose fields stay as they are).
                "stats": node.figures() if node.figures is not None else None,
            }
        )
        return info

    async def beat(self, first: bool = False) -> None:
        """One heartbeat: stay listed, notice pruning / data loss / flush, find dead nodes."""
        node = self.node
        if node.transport.cluster:
            timeout_ms = int(node.config.node_timeout * 1000)
            result = await node.registry.cluster.beat(
                node.transport, node.token, node.node_id, self._info(), timeout_ms, first
            )
        else:
            result = await self._beat_standalone(first)
        self._apply(result, first)

    async def _beat_standalone(self, first: bool) -> list[Any]:
        """HEARTBEAT, the one script of a beat on a standalone server or Sentinel master."""
        node = self.node
        keys = [
            *node.keys.table_keys(),
            node.keys.tombstone(node.token),
            node.keys.flush,
            node.keys.inbox(node.token),
            node.keys.full(node.token),
            node.keys.node_channels(node.token),
            *node.keys.foreign_node_keys(),
        ]
        args = [
            node.token,
            node.node_id,
            self._info(),
            int(node.config.node_timeout * 1000),
            "1" if first else "0",
            node.registry.node_ttl_ms,
            node.registry.table_ttl_ms,
            INBOX_MAXLEN,
            node.registry.retention_ms,
        ]
        return list(await node.transport.script("heartbeat", keys, args))

    def _apply(self, result: list[Any], first: bool) -> None:
        """Act on a beat's reply: refusals, the clock, a flush, pruning or data loss."""
        node = self.node
        self._refused(int(result[0]), result)
        now = time.monotonic()
        # After a gap in this node's own beats (Redis, or on a cluster the node table's
        # master, was away: a restart, a failover), the other nodes missed their beats for
        # the same reason: their deadlines passing says nothing yet. Prune from the next
        # beat on, once they have had an interval to beat again.
        cut_off = bool(self.last_beat) and now - self.last_beat > 2 * node.config.heartbeat_interval
        self.last_beat = now
        existed, pruned, now_ms = int(result[0]), int(result[1]), int(result[2])
        flush, dead, newest = result[3], result[4], result[5]
        if len(result) > 6:
            node.nodes_alive = int(result[6])
        node.clock_offset = now_ms / 1000.0 - time.time()
        if first:
            node.flush_epoch = flush
        elif flush and flush != node.flush_epoch:
            logger.info("Node %s saw a flush; dropping its local state", node.node_id)
            node.on_flush(flush)
        elif not existed:
            node.flush_epoch = flush
            reason = "was pruned while alive" if pruned else "found Redis without it (data loss)"
            logger.warning("Node %s %s; re-registering its memberships", node.node_id, reason)
            node.inbox.restart_if_ahead(newest)
            node.memberships.mark_all_dirty()
            node.presence.reset()
            node.housekeeper.reregister(announce=bool(pruned))
        if cut_off and dead:
            logger.info("Node %s beats again after a gap; judging dead nodes next beat", node.node_id)
            dead = []
        node.housekeeper.wake([t.decode() if isinstance(t, bytes) else t for t in dead])

    def _refused(self, code: int, result: list[object]) -> None:
        node = self.node
        if code == -1:
            raise ImproperlyConfigured(
                f"channels_distrib: node_id {node.node_id!r} is taken by another live process; "
                "give each process its own node_id (or leave node_id unset to generate one)"
            )
        if code == -2:
            raise TokenTaken(node.token)
        if code == -3:
            key = result[1].decode() if isinstance(result[1], bytes) else result[1]
            raise ImproperlyConfigured(
                f"channels_distrib: live nodes of another key layout use prefix "
                f"{node.keys.prefix!r} (found {key!s}); stop all nodes before upgrading "
                "channels_distrib, or give the new ones another prefix"
            )
