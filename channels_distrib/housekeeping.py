"""A node's housekeeping, woken by each heartbeat and run in a task of its own.

One pass: prune the dead nodes the beat reported (one script each), bury this node's dead
channels, expire memberships past ``group_expiry``, write what the membership owner holds
dirty (retried removals, re-registration, all in batches), renew full-marks, and now and then
reconcile Redis's index of this node's channels with memory. A slow pass delays the next
pass, never the heartbeat.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import TYPE_CHECKING, Any

from .tasks import cancellable

if TYPE_CHECKING:
    from .node import Node

logger = logging.getLogger(__name__)

#: Reconcile Redis with memory every this many passes (about every 10 s by default).
RECONCILE_EVERY = 5


class Housekeeper:
    """The housekeeping of one node; its task is owned by the node."""

    def __init__(self, node: Node) -> None:
        self.node = node
        self._wake = asyncio.Event()
        self._dead: set[str] = set()
        self._announce = False
        self._restore_history = False
        self._resync_at: float | None = None  # when presence states go out again (reregister)
        self._passes = 0

    def wake(self, dead: list[str]) -> None:
        """Called by each beat: run a pass, pruning ``dead`` tokens among other things."""
        self._dead.update(token for token in dead if token != self.node.token)
        self._wake.set()

    def reregister(self, *, announce: bool) -> None:
        """The next syncs re-add what the node holds; ``announce`` its presence joins (the
        node had been pruned, so their leaves were announced)."""
        self._announce = self._announce or announce
        self._restore_history = True
        # Presence states go out again once every live node has had a beat (and the pass
        # after it) to write its memberships again: every node beats within one interval of
        # this node noticing the loss, so 1.5 intervals is the second pass from now.
        self._resync_at = time.monotonic() + 1.5 * self.node.config.heartbeat_interval

    async def run(self) -> None:
        node = self.node
        while not node.stopped:
            await self._wake.wait()
            self._wake.clear()
            try:
                await cancellable(self.run_pass)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                # No backoff of its own: the next pass comes with the next successful beat,
                # which the heartbeat's own retries bring as soon as Redis answers again.
                logger.warning("Housekeeping of node %s failed: %s", node.node_id, exc)

    async def run_pass(self) -> None:
        node = self.node
        await self._prune()
        now = time.monotonic()
        self._bury_dead_channels(now)
        node.memberships.expire(now, node.config.group_expiry)
        if not await node.memberships.sync(announce=self._announce):
            self._announce = False
        if self._restore_history:  # after the sync: the rooms' members are back first
            await node.history_rooms.restore(node.transport, self._joined)
            self._restore_history = False
        if self._resync_at is not None and now >= self._resync_at:
            await node.presence.resync()
            self._resync_at = None
        await node.inbox.refresh_marks()
        self._passes += 1
        if self._passes % RECONCILE_EVERY == 0:
            await self.reconcile()
            if node.transport.cluster:
                await self._cluster_checks()

    async def _cluster_checks(self) -> None:
        """On a cluster: purge the memberships of nodes gone without trace, and drop from
        this node's per-master directories the groups it left."""
        node = self.node

        def held() -> set[str]:
            return {g for groups in node.memberships.by_channel.values() for g in groups}

        await node.registry.cluster.purge_orphans(node.transport, held(), node.token)
        await node.registry.cluster.tidy_notes(node.transport, node.token, held)

    def _joined(self, group: str) -> bool:
        return bool(self.node.memberships.members(group))

    async def _prune(self) -> None:
        node = self.node
        for token in sorted(self._dead):
            if await node.registry.prune_token(node.transport, token):
                logger.info("Node %s pruned dead node token %s", node.node_id, token)
            self._dead.discard(token)

    def _bury_dead_channels(self, now: float) -> None:
        """Drop expired messages everywhere; a channel whose consumer is gone leaves its
        groups (the sync that follows writes it and announces the leaves)."""
        node = self.node
        grace = 2 * node.config.heartbeat_interval
        for name, local in list(node.channels.items()):
            local.purge_expired(now)
            if local.dead(now, grace):
                node.memberships.bury(name)
                del node.channels[name]
                node.registry.counters.expired_gone += local.expired
        for name in [name for name in node.memberships.by_channel if name not in node.channels]:
            node.memberships.bury(name)  # adopted for a channel that is gone meanwhile

    async def reconcile(self) -> int:
        """Compare Redis's index of this node's channels with memory; write what differs.

        The snapshot is taken with the inbox's newest entry id, and used only once the reader
        has read that far: memberships other processes added before the snapshot have been
        applied by then, so none of them is taken for a ghost.
        """
        node = self.node
        index_key = node.keys.node_channels(node.token)
        inbox_key = node.keys.inbox(node.token)

        async def snapshot(client: Any) -> Any:
            async with client.pipeline(transaction=True) as pipe:
                pipe.hgetall(index_key)
                pipe.xrevrange(inbox_key, count=1)
                return await pipe.execute()

        node.memberships.start_reconcile()  # what changes from here on is not judged
        index, newest = await node.transport.read(snapshot)
        if newest and not node.inbox.has_read(newest[0][0]):
            node.memberships.reconcile_abandoned()
            return 0  # the reader is behind: next time
        stored = {
            (k.decode() if isinstance(k, bytes) else k): set(
                (v.decode() if isinstance(v, bytes) else v).split()
            )
            for k, v in index.items()
        }
        differ = node.memberships.reconcile(stored)
        node.history_rooms.forget_unless(self._joined)
        if differ:
            logger.warning(
                "Node %s found %d membership(s) out of step with Redis; repairing",
                node.node_id,
                differ,
            )
            await node.memberships.sync()
        return differ
