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

from .transport import BLOCK_SECONDS, backoff

if TYPE_CHECKING:
    from .node import Node

logger = logging.getLogger(__name__)

#: One wait of the reader for a busy consumer's queue to drain (s).
PACE_STEP = 0.25
#: The longest the reader waits for one consumer before dropping for it instead (s); a
#: consumer that needed that long is not waited for again for PACE_COOLDOWN seconds, so
#: one slow consumer cannot slow down every other channel of the node.
PACE_LIMIT = 1.0
PACE_COOLDOWN = 10.0


class InboxReader:
    """Reads one node's inbox and delivers each entry to the node's local channels."""

    def __init__(self, node: Node) -> None:
        self.node = node
        self.last_id = b"0-0"
        self.dropped = 0
        self._last_drop_log = 0.0
        self.marked_full: set[str] = set()
        self._to_mark: set[str] = set()

    async def run(self) -> None:
        """Read forever from the last id seen; reconnect on any error.

        The cursor lives here, not in Redis, so a reconnect resumes exactly where reading
        stopped; entries written meanwhile are still in the stream (within its retention).
        """
        node = self.node
        inbox = node.keys.inbox(node.token)
        attempt = 0
        while not node.stopped:
            try:
                response = await node.transport.blocking.xread(
                    {inbox: self.last_id}, count=500, block=int(BLOCK_SECONDS * 1000)
                )
                attempt = 0
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                attempt += 1
                if attempt in (1, 10) or attempt % 100 == 0:
                    logger.warning(
                        "Inbox read for node %s failed (%s); reconnecting", node.node_id, exc
                    )
                await asyncio.sleep(backoff(attempt))
                continue
            streams: Any = response or []
            for _stream, entries in streams:
                for entry_id, fields in entries:
                    self.last_id = entry_id
                    try:
                        await self._dispatch(entry_id, fields)
                    except asyncio.CancelledError:
                        raise
                    except Exception:
                        logger.exception(
                            "Skipping inbox entry %r of node %s", entry_id, node.node_id
                        )
            if self._to_mark:
                await self._mark_full()

    async def _dispatch(self, entry_id: bytes, fields: dict[bytes, bytes]) -> None:
        """Deliver one inbox entry to its local channels (or apply a control entry)."""
        node = self.node
        if b"o" in fields:
            self._control(fields)
            return
        payload = fields.get(b"m")
        if payload is None:
            logger.warning("Skipping inbox entry %r without payload", entry_id)
            return
        sent_ms = int(entry_id.split(b"-", 1)[0])
        now = time.monotonic()
        expires = now + node.config.expiry - max(0.0, node.redis_now() - sent_ms / 1000.0)
        if b"c" in fields:
            await self._deliver(fields[b"c"].decode(), payload, expires)
            return
        group_field = fields.get(b"g") or fields.get(b"p")
        if group_field is None:
            logger.warning("Skipping inbox entry %r of unknown kind", entry_id)
            return
        members = node.groups.get(group_field.decode())
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
                local.put(payload, expires)  # the fast path: no await per member
            else:
                await self._deliver(channel, payload, expires)

    def _control(self, fields: dict[bytes, bytes]) -> None:
        """Another process added or removed one of this node's channels in a group."""
        group = fields[b"g"].decode()
        channel = fields[b"c"].decode()
        if fields[b"o"] == b"a":
            self.node.remember(group, channel, fields[b"r"], fields.get(b"p") == b"1")
        else:
            self.node.forget(group, channel)

    async def _deliver(self, name: str, payload: bytes, expires: float) -> None:
        node = self.node
        channel = node.channels.get(name)
        if channel is None:
            if not node.owns(name):
                self._count_drop(name, "not a channel of this node")
                return
            # Forgotten after being idle (or never created here): keep the message; if nobody
            # receives it, it expires and housekeeping forgets the channel again.
            channel = node.local_channel(name)
        # Pacing: a consumer that keeps receiving is worth waiting for; the messages wait
        # in Redis meanwhile. One that stopped receiving never holds the node back.
        started = time.monotonic()
        while channel.full and channel.receiving(now := time.monotonic()):
            if now < channel.no_pace_until:
                break
            if now - started >= PACE_LIMIT:
                channel.no_pace_until = now + PACE_COOLDOWN
                break
            await channel.wait_for_room(PACE_STEP)
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

    async def unmark_drained(self) -> None:
        """Withdraw the full marks of channels that have room again (or are gone)."""
        node = self.node
        drained = [
            name
            for name in self.marked_full
            if name not in node.channels or not node.channels[name].full
        ]
        if drained:
            self.marked_full.difference_update(drained)
            key = node.keys.full(node.token)
            await node.transport.run(lambda c: c.srem(key, *drained))
