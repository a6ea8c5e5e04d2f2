"""A node's inbox reader: one stream per node, read from the last id seen, fanned out locally.

Direct messages name their channel; group messages name their group and the node delivers
them to its own members of it (read from its memory); control entries tell the node about
memberships of its channels that other processes added or removed.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import TYPE_CHECKING, Any

from redis.asyncio import Redis

from .tasks import cancellable
from .transport import BLOCK_SECONDS, backoff

if TYPE_CHECKING:
    from .node import Node

logger = logging.getLogger(__name__)

def stream_id(entry_id: bytes | str) -> tuple[int, int]:
    """A stream entry id as a comparable (ms, seq) pair."""
    text = entry_id.decode() if isinstance(entry_id, bytes) else entry_id
    ms, _, seq = text.partition("-")
    return int(ms), int(seq or 0)


class InboxReader:
    """Reads one node's inbox and delivers each entry to the node's local channels."""

    def __init__(self, node: Node) -> None:
        self.node = node
        self.last_id = b"0-0"
        self.dropped = 0
        self._last_drop_log = 0.0
        self.marked_full: set[str] = set()
        self._to_mark: set[str] = set()
        self._attempt = 0
        self.skipped = 0
        self._last_skip_log = 0.0

    async def run(self) -> None:
        """Read forever from the last id seen; reconnect on any error.

        The cursor lives here, not in Redis, so a reconnect resumes exactly where reading
        stopped; entries written meanwhile are still in the stream (within its retention).
        The reader has a connection of its own, so a cancelled read that redis-py will not
        let go of can be ended by closing that connection (see :func:`cancellable`).
        """
        node = self.node
        conn: Redis = Redis(
            connection_pool=node.transport.blocking.connection_pool, single_connection_client=True
        )
        try:
            while not node.stopped:
                await self._read_once(conn)
        finally:
            await conn.aclose()

    async def _read_once(self, conn: Redis) -> None:
        node = self.node
        inbox = node.keys.inbox(node.token)

        async def cut() -> None:
            if conn.connection is not None:
                await conn.connection.disconnect()

        try:
            cursor: Any = {inbox: self.last_id}
            response = await cancellable(
                lambda: conn.xread(cursor, count=500, block=int(BLOCK_SECONDS * 1000)),
                on_stuck=cut,
            )
            self._attempt = 0
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            self._attempt += 1
            if self._attempt in (1, 10) or self._attempt % 100 == 0:
                logger.warning(
                    "Inbox read for node %s failed (%s); reconnecting", node.node_id, exc
                )
            await asyncio.sleep(backoff(self._attempt))
            return
        streams: Any = response or []
        for _stream, entries in streams:
            for entry_id, fields in entries:
                self.last_id = entry_id
                try:
                    self._dispatch(entry_id, fields)
                except Exception:
                    self._log_skip(entry_id)
        if self._to_mark:
            await self._mark_full()

    def _log_skip(self, entry_id: bytes) -> None:
        """Log a skipped entry, at most once a second (a flood of corrupt entries is one line)."""
        self.skipped += 1
        now = time.monotonic()
        if now - self._last_skip_log >= 1.0:
            self._last_skip_log = now
            logger.error(
                "Skipping inbox entry %r of node %s (%d skipped so far)",
                entry_id,
                self.node.node_id,
                self.skipped,
                exc_info=True,
            )

    def has_read(self, entry_id: bytes | str) -> bool:
        """Whether the reader has passed the entry ``entry_id``."""
        return stream_id(self.last_id) >= stream_id(entry_id)

    def restart_if_ahead(self, newest: bytes | str) -> None:
        """After Redis lost the inbox: if the cursor is ahead of every entry now in it (the
        new server's clock is behind the old one's), read the new stream from its start.
        None of its entries can have been read yet: all lie below the cursor."""
        if stream_id(self.last_id) > stream_id(newest):
            logger.warning("Node %s restarts its inbox cursor", self.node.node_id)
            self.last_id = b"0-0"

    def _dispatch(self, entry_id: bytes, fields: dict[bytes, bytes]) -> None:
        """Deliver one inbox entry to its local channels (or apply a control entry).

        Never waits: a consumer whose queue is full (its budget, ``capacity`` messages) has
        the message dropped and counted, so one slow consumer never holds back the node's
        other channels (no head-of-line blocking).
        """
        node = self.node
        if b"o" in fields:
            self._control(fields)
            return
        payload = fields.get(b"m")
        if payload is None:
            raise ValueError("inbox entry without payload")
        sent_ms = int(entry_id.split(b"-", 1)[0])
        now = time.monotonic()
        expires = now + node.config.expiry - max(0.0, node.redis_now() - sent_ms / 1000.0)
        if b"c" in fields:
            self._deliver(fields[b"c"].decode(), payload, expires)
            return
        group_field = fields.get(b"g") or fields.get(b"p")
        if group_field is None:
            raise ValueError("inbox entry of unknown kind")
        members = node.memberships.members(group_field.decode())
        if not members:
            return
        exclude = fields.get(b"x", b"").decode()
        presence_only = b"p" in fields
        channels = node.channels
        for channel, membership in list(members.items()):
            if channel == exclude or (presence_only and not membership.presence):
                continue
            local = channels.get(channel)
            if local is not None and len(local.items) < local.capacity:
                local.put(payload, expires)  # the fast path
            else:
                self._deliver(channel, payload, expires)

    def _control(self, fields: dict[bytes, bytes]) -> None:
        """Another process added or removed one of this node's channels in a group."""
        op = fields[b"o"]
        if op == b"n":
            return  # the heartbeat's marker that created the inbox
        group = fields[b"g"].decode()
        channel = fields[b"c"].decode()
        memberships = self.node.memberships
        if op == b"a":
            memberships.adopt(group, channel, fields[b"r"], fields.get(b"p") == b"1")
        else:
            memberships.forget_remote(group, channel)

    def _deliver(self, name: str, payload: bytes, expires: float) -> None:
        node = self.node
        channel = node.channels.get(name)
        if channel is None:
            # Not a live channel of this node (never issued here, or its consumer is gone).
            self._count_drop(name, "no such channel on this node")
            return
        if channel.full:
            channel.purge_expired(time.monotonic())
        if channel.full:
            self._count_drop(name, "capacity")
            if name not in self.marked_full:
                self._to_mark.add(name)
            return
        channel.put(payload, expires)

    def _count_drop(self, channel: str, reason: str) -> None:
        self.dropped += 1
        now = time.monotonic()
        if now - self._last_drop_log >= 1.0:
            self._last_drop_log = now
            logger.warning(
                "Node %s dropped a message for %s (%s); %d dropped so far",
                self.node.node_id,
                channel,
                reason,
                self.dropped,
            )

    async def _mark_full(self) -> None:
        """Tell senders (through Redis) which channels are dropping, so send() raises ChannelFull."""
        node = self.node
        names, self._to_mark = list(self._to_mark), set()
        key = node.keys.full(node.token)
        try:
            await node.transport.run(lambda c: c.sadd(key, *names))
            await node.transport.run(lambda c: c.pexpire(key, int(node.config.expiry * 1000)))
            self.marked_full.update(names)
        except asyncio.CancelledError:
            raise
        except Exception:
            logger.warning("Could not mark full channels of node %s", node.node_id, exc_info=True)

    async def refresh_marks(self) -> None:
        """Withdraw the full marks of channels that have room again (or are gone), and renew
        those still full, so a mark never lapses while its channel is still dropping."""
        node = self.node
        drained = [
            name
            for name in self.marked_full
            if name not in node.channels or not node.channels[name].full
        ]
        self.marked_full.difference_update(drained)
        still = list(self.marked_full)
        if not drained and not still:
            return
        key = node.keys.full(node.token)
        ttl = int(node.config.expiry * 1000)

        async def write(client: Any) -> None:
            async with client.pipeline(transaction=False) as pipe:
                if drained:
                    pipe.srem(key, *drained)
                if still:
                    pipe.sadd(key, *still)
                    pipe.pexpire(key, ttl)
                await pipe.execute()

        await node.transport.run(write)
