"""A node's heartbeat: stay listed, prune the dead, heal after pruning or data loss, expire.

Each beat is one script (HEARTBEAT) that refreshes this node and reports what changed:
whether this node was still listed (if not: pruned while alive, or Redis lost its data),
whether a flush happened, and which nodes are past ``node_timeout``.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import TYPE_CHECKING, Any

import msgpack
from django.core.exceptions import ImproperlyConfigured

from .registry import presence_entry
from .transport import backoff

if TYPE_CHECKING:
    from .node import Node

logger = logging.getLogger(__name__)

#: Memberships re-registered per script call.
REREGISTER_BATCH = 200


class Heartbeat:
    """The periodic work of one node; its task is owned by the node."""

    def __init__(self, node: Node) -> None:
        self.node = node

    async def run(self) -> None:
        node = self.node
        attempt = 0
        while not node.stopped:
            await asyncio.sleep(
                node.config.heartbeat_interval if attempt == 0 else backoff(attempt, 1.0)
            )
            try:
                await self.beat()
                await self.housekeeping()
                attempt = 0
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                attempt += 1
                logger.warning("Heartbeat of node %s failed: %s", node.node_id, exc)

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
            }
        )
        return info

    async def beat(self, first: bool = False) -> None:
        """One heartbeat: stay listed, notice pruning / data loss / flush, prune dead nodes."""
        node = self.node
        keys = [
            node.keys.nodes,
            node.keys.node_info,
            node.keys.node_ids,
            node.keys.token_ids,
            node.keys.tombstone(node.token),
            node.keys.flush,
            node.keys.inbox(node.token),
        ]
        args = [
            node.token,
            node.node_id,
            self._info(),
            int(node.config.node_timeout * 1000),
            "1" if first else "0",
            node.registry.inbox_ttl_ms,
        ]
        result = await node.transport.script("heartbeat", keys, args)
        if int(result[0]) == -1:
            raise ImproperlyConfigured(
                f"channels_distrib: node_id {node.node_id!r} is taken by another live process; "
                "give each process its own node_id (or leave node_id unset to generate one)"
            )
        existed, pruned, now_ms = int(result[0]), int(result[1]), int(result[2])
        flush, dead = result[3], result[4]
        node.clock_offset = now_ms / 1000.0 - time.time()
        if first:
            node.flush_epoch = flush
        elif flush and flush != node.flush_epoch:
            logger.info("Node %s saw a flush; dropping its local state", node.node_id)
            node.flush_epoch = flush
            node.drop_state()
        elif not existed:
            node.flush_epoch = flush
            reason = "was pruned while alive" if pruned else "found Redis without it (data loss)"
            logger.warning("Node %s %s; re-registering its memberships", node.node_id, reason)
            await self.reregister(announce=bool(pruned))
        for token in dead:
            token = token.decode() if isinstance(token, bytes) else token
            if token != node.token and await node.registry.prune_token(node.transport, token):
                logger.info("Node %s pruned dead node token %s", node.node_id, token)

    async def reregister(self, *, announce: bool) -> None:
        """Write every membership the node holds back to Redis (joins announced if ``announce``)."""
        node = self.node
        items: list[Any] = []
        for group, members in node.groups.items():
            for channel, membership in members.items():
                items.extend(
                    [group, channel, membership.record, "1" if membership.presence else "0"]
                )
        step = REREGISTER_BATCH * 4
        for start in range(0, len(items), step):
            args = [
                node.keys.prefix,
                node.token,
                int(node.config.group_expiry * 1000),
                *items[start : start + step],
            ]
            added = await node.transport.script("reregister", [], args)
            if announce and added:
                joins: dict[str, list[dict[str, Any]]] = {}
                for i in range(0, len(added), 3):
                    group = added[i].decode()
                    joins.setdefault(group, []).append(
                        presence_entry(added[i + 1].decode(), added[i + 2])
                    )
                for group, entries in joins.items():
                    await node.registry.send_presence(node.transport, group, entries, [])

    async def housekeeping(self) -> None:
        """Enforce group_expiry and the idle-channel rule for the node's own channels."""
        node = self.node
        now = time.monotonic()
        expired: list[tuple[str, str]] = []
        for group, members in node.groups.items():
            for channel, membership in members.items():
                if now - membership.joined > node.config.group_expiry:
                    expired.append((group, channel))
        for name, local in list(node.channels.items()):
            idle = local.pending == 0 and now - local.last_active > node.config.expiry
            if not idle:
                continue
            local.purge_expired(now)
            groups = node.channel_groups.get(name, set())
            if local.expired and groups:
                # Its consumer stopped receiving while its messages expired: it is gone.
                expired.extend((group, name) for group in groups)
                del node.channels[name]
            elif not groups and not local.items:
                del node.channels[name]
        for group, channel in expired:
            await node.discard(group, channel)
        await node.inbox.unmark_drained()
