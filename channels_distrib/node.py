"""A node: one process's identity, inbox reader, heartbeat, pruning and self-healing.

A process becomes a node the first time it creates a process-local channel. The node's own
memory (its channels and their memberships) is the truth for its channels: whenever Redis
has lost them (this node was pruned during a pause, Redis restarted empty, a failover) the
next heartbeat writes them back.
"""

from __future__ import annotations

import asyncio
import logging
import os
import secrets
import socket
import time
from dataclasses import dataclass
from typing import Any

import msgpack
from django.core.exceptions import ImproperlyConfigured

from .config import LayerConfig
from .keys import Keys
from .local import LocalChannel
from .registry import INBOX_MAXLEN, Registry, presence_entry, token_of
from .transport import BLOCK_SECONDS, Transport, backoff

logger = logging.getLogger(__name__)

#: One wait of the inbox reader for a busy consumer's queue to drain (s).
PACE_STEP = 0.25
#: The longest the reader waits for one consumer before dropping for it instead (s); a
#: consumer that needed that long is not waited for again for PACE_COOLDOWN seconds, so
#: one slow consumer cannot slow down every other channel of the node.
PACE_LIMIT = 1.0
PACE_COOLDOWN = 10.0
#: Memberships re-registered per script call.
REREGISTER_BATCH = 200


@dataclass
class Membership:
    """One of this node's channels in one group, as the node remembers it."""

    record: bytes
    presence: bool
    joined: float  # time.monotonic() at join, for group_expiry


async def cancel_and_wait(tasks: list[asyncio.Task[None]]) -> None:
    """Cancel tasks and wait until they are done, cancelling again if one swallowed it.

    redis-py turns a cancellation that races its own read timeout into a TimeoutError, which
    a reconnecting loop would treat as a network error; so cancel until the task is done
    (the loops also check ``stopped`` after each Redis call).
    """
    pending = [task for task in tasks if not task.done()]
    while pending:
        for task in pending:
            task.cancel()
        _done, still = await asyncio.wait(pending, timeout=0.5)
        pending = list(still)
    for task in tasks:
        if not task.cancelled() and task.exception() is not None:
            logger.error("Task %s ended with an error", task.get_name(), exc_info=task.exception())


def default_node_id(token: str) -> str:
    """``<short hostname>-<pid>-<token>``: readable, and unique even when pids are reused."""
    short_host = socket.gethostname().split(".")[0][:24] or "node"
    return f"{short_host}-{os.getpid()}-{token}"


def new_token() -> str:
    """A short random node token (8 base32 characters): keeps channel names well under 100."""
    return secrets.token_hex(5)[:8]


class Node:
    """Owns this process's inbox reader and heartbeat tasks (start, cancel, await) and local state."""

    def __init__(
        self,
        config: LayerConfig,
        keys: Keys,
        registry: Registry,
        transport: Transport,
        *,
        token: str,
        node_id: str,
    ) -> None:
        self.config = config
        self.keys = keys
        self.registry = registry
        self.transport = transport
        self.token = token
        self.node_id = node_id
        self.hostname = socket.gethostname()
        self.pid = os.getpid()
        self.started_at = time.time()
        self.loop = asyncio.get_running_loop()
        self.channels: dict[str, LocalChannel] = {}
        self.groups: dict[str, dict[str, Membership]] = {}
        self.channel_groups: dict[str, set[str]] = {}
        self.flush_epoch = b""
        self.clock_offset = 0.0  # Redis time minus local time, seconds
        self.dropped = 0
        self._last_drop_log = 0.0
        self._marked_full: set[str] = set()
        self._to_mark: set[str] = set()
        self._tasks: list[asyncio.Task[None]] = []
        self._last_id = b"0-0"
        self.stopped = False

    # -- lifecycle ------------------------------------------------------------------------

    async def start(self) -> None:
        """Register (refusing a node id another live process holds) and start the tasks."""
        await self._beat(first=True)
        self._tasks = [
            self.loop.create_task(self._read_loop(), name=f"channels_distrib.inbox.{self.token}"),
            self.loop.create_task(
                self._heartbeat_loop(), name=f"channels_distrib.heartbeat.{self.token}"
            ),
        ]
        self._install_twisted_trigger()
        logger.info("Node %s registered (token %s)", self.node_id, self.token)

    async def stop(self, *, deregister: bool = True) -> None:
        """Cancel and await the tasks; with ``deregister``, remove this node and its memberships now."""
        if self.stopped:
            return
        self.stopped = True
        await cancel_and_wait(self._tasks)
        self._tasks = []
        if deregister:
            try:
                await self.registry.prune_token(self.transport, self.token, own=True)
                logger.info("Node %s deregistered", self.node_id)
            except Exception:
                logger.warning(
                    "Node %s could not deregister; it will be pruned", self.node_id, exc_info=True
                )

    def _install_twisted_trigger(self) -> None:
        """Under daphne, deregister before the reactor stops (daphne runs no consumer cleanup)."""
        import sys

        if "twisted.internet.reactor" not in sys.modules:
            return  # never import the reactor ourselves: that would install one
        reactor: Any = sys.modules["twisted.internet.reactor"]
        if not getattr(reactor, "running", False):
            return
        try:
            from twisted.internet.defer import Deferred
        except ImportError:
            return

        def before_shutdown() -> Any:
            if self.stopped:
                return None
            return Deferred.fromFuture(asyncio.ensure_future(self.stop(), loop=self.loop))

        reactor.addSystemEventTrigger("before", "shutdown", before_shutdown)

    # -- local channels and memberships ---------------------------------------------------

    def new_channel(self, prefix: str) -> str:
        name = f"{prefix}.{self.token}!{secrets.token_hex(6)}"
        self.channels[name] = LocalChannel(name, self.config.capacity_for(name))
        return name

    def local_channel(self, name: str) -> LocalChannel:
        channel = self.channels.get(name)
        if channel is None:
            # Received before new_channel() on this node (for example after a flush); adopt it.
            channel = self.channels[name] = LocalChannel(name, self.config.capacity_for(name))
        return channel

    def remember(self, group: str, channel: str, record: bytes, presence: bool) -> None:
        # A repeated group_add renews the membership (group_expiry counts from it), as in
        # channels_redis.
        self.groups.setdefault(group, {})[channel] = Membership(record, presence, time.monotonic())
        self.channel_groups.setdefault(channel, set()).add(group)

    def forget(self, group: str, channel: str) -> None:
        members = self.groups.get(group)
        if members is not None:
            members.pop(channel, None)
            if not members:
                del self.groups[group]
        groups = self.channel_groups.get(channel)
        if groups is not None:
            groups.discard(group)
            if not groups:
                del self.channel_groups[channel]

    def drop_state(self) -> None:
        """After a flush: forget every membership and queued message (channels stay usable)."""
        self.groups.clear()
        self.channel_groups.clear()
        for channel in self.channels.values():
            channel.clear()

    def redis_now(self) -> float:
        return time.time() + self.clock_offset

    # -- inbox ----------------------------------------------------------------------------

    async def _read_loop(self) -> None:
        """Read the inbox stream from the last id seen, forever; reconnect on any error.

        The cursor lives here, not in Redis, so a reconnect resumes exactly where reading
        stopped; entries written meanwhile are still in the stream (within its retention).
        """
        inbox = self.keys.inbox(self.token)
        attempt = 0
        while not self.stopped:
            try:
                response = await self.transport.blocking.xread(
                    {inbox: self._last_id}, count=500, block=int(BLOCK_SECONDS * 1000)
                )
                attempt = 0
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                attempt += 1
                if attempt in (1, 10) or attempt % 100 == 0:
                    logger.warning(
                        "Inbox read for node %s failed (%s); reconnecting", self.node_id, exc
                    )
                await asyncio.sleep(backoff(attempt))
                continue
            streams: Any = response or []
            for _stream, entries in streams:
                for entry_id, fields in entries:
                    self._last_id = entry_id
                    try:
                        await self._dispatch(entry_id, fields)
                    except asyncio.CancelledError:
                        raise
                    except Exception:
                        logger.exception(
                            "Skipping inbox entry %r of node %s", entry_id, self.node_id
                        )
            if self._to_mark:
                await self._mark_full()

    async def _dispatch(self, entry_id: bytes, fields: dict[bytes, bytes]) -> None:
        """Deliver one inbox entry to its local channels (or apply a control entry)."""
        if b"o" in fields:
            self._control(fields)
            return
        payload = fields.get(b"m")
        if payload is None:
            logger.warning("Skipping inbox entry %r without payload", entry_id)
            return
        sent_ms = int(entry_id.split(b"-", 1)[0])
        now = time.monotonic()
        expires = now + self.config.expiry - max(0.0, self.redis_now() - sent_ms / 1000.0)
        if b"c" in fields:
            await self._deliver(fields[b"c"].decode(), payload, expires)
            return
        group_field = fields.get(b"g") or fields.get(b"p")
        if group_field is None:
            logger.warning("Skipping inbox entry %r of unknown kind", entry_id)
            return
        members = self.groups.get(group_field.decode())
        if not members:
            return
        exclude = fields.get(b"x", b"").decode()
        presence_only = b"p" in fields
        channels = self.channels
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
            self.remember(group, channel, fields[b"r"], fields.get(b"p") == b"1")
        else:
            self.forget(group, channel)

    async def _deliver(self, name: str, payload: bytes, expires: float) -> None:
        channel = self.channels.get(name)
        if channel is None:
            if not self.owns(name):
                self._count_drop(name, "not a channel of this node")
                return
            # Forgotten after being idle (or never created here): keep the message; if nobody
            # receives it, it expires and housekeeping forgets the channel again.
            channel = self.local_channel(name)
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
            if name not in self._marked_full:
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
                self.node_id,
                channel,
                reason,
                self.dropped,
            )

    async def _mark_full(self) -> None:
        """Tell senders (through Redis) which channels are dropping, so send() raises ChannelFull."""
        names, self._to_mark = list(self._to_mark), set()
        key = self.keys.full(self.token)
        try:
            await self.transport.run(lambda c: c.sadd(key, *names))
            await self.transport.run(lambda c: c.pexpire(key, int(self.config.expiry * 1000)))
            self._marked_full.update(names)
        except asyncio.CancelledError:
            raise
        except Exception:
            logger.warning("Could not mark full channels of node %s", self.node_id, exc_info=True)

    # -- heartbeat, pruning, self-healing --------------------------------------------------

    async def _heartbeat_loop(self) -> None:
        attempt = 0
        while not self.stopped:
            await asyncio.sleep(
                self.config.heartbeat_interval if attempt == 0 else backoff(attempt, 1.0)
            )
            try:
                await self._beat()
                await self._housekeeping()
                attempt = 0
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                attempt += 1
                logger.warning("Heartbeat of node %s failed: %s", self.node_id, exc)

    def _info(self) -> bytes:
        now = time.monotonic()
        count = sum(1 for channel in self.channels.values() if channel.receiving(now))
        info: bytes = msgpack.packb(
            {
                "node_id": self.node_id,
                "hostname": self.hostname,
                "pid": self.pid,
                "started_at": self.started_at,
                "channel_count": count,
            }
        )
        return info

    async def _beat(self, first: bool = False) -> None:
        """One heartbeat: stay listed, notice pruning / data loss / flush, prune dead nodes."""
        keys = [
            self.keys.nodes,
            self.keys.node_info,
            self.keys.node_ids,
            self.keys.token_ids,
            self.keys.tombstone(self.token),
            self.keys.flush,
            self.keys.inbox(self.token),
        ]
        args = [
            self.token,
            self.node_id,
            self._info(),
            int(self.config.node_timeout * 1000),
            "1" if first else "0",
            self.registry.inbox_ttl_ms,
        ]
        result = await self.transport.script("heartbeat", keys, args)
        if int(result[0]) == -1:
            raise ImproperlyConfigured(
                f"channels_distrib: node_id {self.node_id!r} is taken by another live process; "
                "give each process its own node_id (or leave node_id unset to generate one)"
            )
        existed, pruned, now_ms, flush, dead = (
            int(result[0]),
            int(result[1]),
            int(result[2]),
            result[3],
            result[4],
        )
        self.clock_offset = now_ms / 1000.0 - time.time()
        if first:
            self.flush_epoch = flush
        elif flush and flush != self.flush_epoch:
            logger.info("Node %s saw a flush; dropping its local state", self.node_id)
            self.flush_epoch = flush
            self.drop_state()
        elif not existed:
            self.flush_epoch = flush
            reason = "was pruned while alive" if pruned else "found Redis without it (data loss)"
            logger.warning("Node %s %s; re-registering its memberships", self.node_id, reason)
            await self.reregister(announce=bool(pruned))
        for token in dead:
            token = token.decode() if isinstance(token, bytes) else token
            if token != self.token and await self.registry.prune_token(self.transport, token):
                logger.info("Node %s pruned dead node token %s", self.node_id, token)

    async def reregister(self, *, announce: bool) -> None:
        """Write every membership this node holds back to Redis (joins announced if ``announce``)."""
        items: list[Any] = []
        for group, members in self.groups.items():
            for channel, membership in members.items():
                items.extend(
                    [group, channel, membership.record, "1" if membership.presence else "0"]
                )
        step = REREGISTER_BATCH * 4
        for start in range(0, len(items), step):
            args = [
                self.keys.prefix,
                self.token,
                int(self.config.group_expiry * 1000),
                *items[start : start + step],
            ]
            added = await self.transport.script("reregister", [], args)
            if announce and added:
                joins: dict[str, list[dict[str, Any]]] = {}
                for i in range(0, len(added), 3):
                    group = added[i].decode()
                    joins.setdefault(group, []).append(
                        presence_entry(added[i + 1].decode(), added[i + 2])
                    )
                for group, entries in joins.items():
                    await self.registry.send_presence(self.transport, group, entries, [])

    async def _housekeeping(self) -> None:
        """Enforce group_expiry and the idle-channel rule for this node's own channels."""
        now = time.monotonic()
        expired: list[tuple[str, str]] = []
        for group, members in self.groups.items():
            for channel, membership in members.items():
                if now - membership.joined > self.config.group_expiry:
                    expired.append((group, channel))
        for name, local in list(self.channels.items()):
            idle = local.pending == 0 and now - local.last_active > self.config.expiry
            if not idle:
                continue
            local.purge_expired(now)
            groups = self.channel_groups.get(name, set())
            if local.expired and groups:
                # Its consumer stopped receiving while its messages expired: it is gone.
                expired.extend((group, name) for group in groups)
                del self.channels[name]
            elif not groups and not local.items:
                del self.channels[name]
        for group, channel in expired:
            await self.discard(group, channel)
        if self._marked_full:
            drained = [
                n for n in self._marked_full if n not in self.channels or not self.channels[n].full
            ]
            if drained:
                self._marked_full.difference_update(drained)
                key = self.keys.full(self.token)
                await self.transport.run(lambda c: c.srem(key, *drained))

    async def discard(self, group: str, channel: str) -> None:
        """Leave a group for one of this node's channels, announcing a presence leave."""
        self.forget(group, channel)
        record = await self.registry.discard(self.transport, group, channel, notify=False)
        if record is not None:
            await self.registry.send_presence(
                self.transport, group, [], [presence_entry(channel, record)]
            )

    def owns(self, channel: str) -> bool:
        return token_of(channel) == self.token


__all__ = ["INBOX_MAXLEN", "Membership", "Node"]
