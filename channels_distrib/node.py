"""A node: one process's identity, its local channels and memberships, and its two tasks.

A process becomes a node the first time it creates a process-local channel. The node's own
memory (its channels and their memberships) is the truth for its channels: whenever Redis
has lost them (this node was pruned during a pause, Redis restarted empty, a failover) the
next heartbeat writes them back. The tasks' work lives in :mod:`channels_distrib.inbox`
and :mod:`channels_distrib.heartbeat`; the node starts, cancels and awaits them.
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

from .config import LayerConfig
from .heartbeat import Heartbeat
from .inbox import InboxReader
from .keys import Keys
from .local import LocalChannel
from .registry import Registry, presence_entry, token_of
from .tasks import cancel_and_wait
from .transport import Transport

logger = logging.getLogger(__name__)


@dataclass
class Membership:
    """One of this node's channels in one group, as the node remembers it."""

    record: bytes
    presence: bool
    joined: float  # time.monotonic() at join, for group_expiry


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
        self.inbox = InboxReader(self)
        self.heartbeat = Heartbeat(self)
        self._tasks: list[asyncio.Task[None]] = []
        self.stopped = False

    # -- lifecycle ------------------------------------------------------------------------

    async def start(self) -> None:
        """Register (refusing a node id another live process holds) and start the tasks."""
        await self.heartbeat.beat(first=True)
        self._tasks = [
            self.loop.create_task(self.inbox.run(), name=f"channels_distrib.inbox.{self.token}"),
            self.loop.create_task(
                self.heartbeat.run(), name=f"channels_distrib.heartbeat.{self.token}"
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

    @property
    def dropped(self) -> int:
        """Messages this node dropped (full queue of a consumer that stopped receiving)."""
        return self.inbox.dropped

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


__all__ = ["Membership", "Node", "cancel_and_wait", "default_node_id", "new_token"]
