"""A node: one process's identity, its local channels, and its three tasks.

A process becomes a node the first time it creates a process-local channel. The node's own
memory is the truth for its channels; :mod:`channels_distrib.membership` owns their
memberships and keeps Redis in step (re-registering everything after pruning or data loss).
The tasks' work lives in :mod:`channels_distrib.inbox` (reading),
:mod:`channels_distrib.heartbeat` (staying listed, on its own timer) and
:mod:`channels_distrib.housekeeping` (pruning, expiry, retries); the node starts, cancels
and awaits them.
"""

from __future__ import annotations

import asyncio
import logging
import os
import secrets
import socket
import time
from collections.abc import Callable
from typing import Any

from .config import LayerConfig
from .heartbeat import Heartbeat
from .history import KeptRooms
from .housekeeping import Housekeeper
from .inbox import InboxReader
from .keys import Keys
from .local import LocalChannel
from .membership import Memberships
from .presence import Presence
from .registry import Registry, token_of
from .tasks import cancel_and_wait
from .transport import Transport

logger = logging.getLogger(__name__)


def default_node_id(token: str) -> str:
    """``<short hostname>-<pid>-<token>``: readable, and unique even when pids are reused."""
    short_host = socket.gethostname().split(".")[0][:24] or "node"
    return f"{short_host}-{os.getpid()}-{token}"


def new_token() -> str:
    """A short random node token (10 hex characters, 40 bits): keeps channel names well under
    100 characters. The first heartbeat refuses a token Redis already knows."""
    return secrets.token_hex(5)


class Node:
    """Owns this process's tasks (inbox, heartbeat, housekeeping, refill, presence diffs:
    start, cancel, await) and local state."""

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
        self.memberships = Memberships(self)
        self.presence = Presence(self)
        self.history_rooms = KeptRooms()  # settings to write again after data loss
        self.flush_epoch = b""
        self.clock_offset = 0.0  # Redis time minus local time, seconds
        self.nodes_alive = 0  # live nodes at the last heartbeat, this node included
        # The layer's figures (channels_distrib.stats), published with each heartbeat.
        self.figures: Callable[[], dict[str, Any]] | None = None
        self.inbox = InboxReader(self)
        self.housekeeper = Housekeeper(self)
        self.heartbeat = Heartbeat(self)
        # With ``broker``: the node's RabbitMQ queue, whose bindings follow the memberships.
        self.broker_queue: Any = None
        if config.broker is not None:
            from .broker import NodeQueue  # imported only when the option is set

            self.broker_queue = NodeQueue(self, config.broker)
            self.memberships.listener = self.broker_queue.groups_changed
        self._tasks: list[asyncio.Task[None]] = []
        self.stopped = False

    # -- lifecycle ------------------------------------------------------------------------

    async def start(self) -> None:
        """Register (refusing a node id another live process holds) and start the tasks."""
        if self.broker_queue is not None:
            await self.broker_queue.start()  # its queue exists before any channel does
        try:
            await self.heartbeat.beat(first=True)
        except BaseException:
            if self.broker_queue is not None:
                await self.broker_queue.stop()
            raise
        self._tasks = [
            self.loop.create_task(self.inbox.run(), name=f"channels_distrib.inbox.{self.token}"),
            self.loop.create_task(
                self.heartbeat.run(), name=f"channels_distrib.heartbeat.{self.token}"
            ),
            self.loop.create_task(
                self.housekeeper.run(), name=f"channels_distrib.housekeeping.{self.token}"
            ),
            self.loop.create_task(
                self.inbox.run_refill(), name=f"channels_distrib.refill.{self.token}"
            ),
            self.loop.create_task(
                self.presence.run(), name=f"channels_distrib.presence.{self.token}"
            ),
        ]
        if self.broker_queue is not None:
            self._tasks.append(
                self.loop.create_task(
                    self.broker_queue.run(), name=f"channels_distrib.broker.{self.token}"
                )
            )
        self._install_twisted_trigger()
        logger.info("Node %s registered (token %s)", self.node_id, self.token)

    async def stop(self, *, deregister: bool = True) -> None:
        """Cancel and await the tasks; with ``deregister``, remove this node and its memberships now."""
        if self.stopped:
            return
        self.stopped = True
        await cancel_and_wait(self._tasks)
        self._tasks = []
        if self.broker_queue is not None:
            await self.broker_queue.stop()  # unused now: the deregistration deletes it
        if deregister:
            try:
                # Leaves still waiting for their window: the deregistration below announces
                # only the memberships Redis still has.
                await self.presence.flush_due(everything=True)
            except Exception:
                logger.warning("Node %s could not send its last presence diffs", self.node_id)
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
        channel = LocalChannel(name, self.config.capacity_for(name), creator=asyncio.current_task())
        channel.on_room = self.inbox.want_refill
        self.channels[name] = channel
        return name

    def local_channel(self, name: str) -> LocalChannel:
        """One of this node's channels, for receive(); a name with this node's token that it
        does not hold (buried as dead, or dropped by a flush) is taken up again."""
        channel = self.channels.get(name)
        if channel is None:
            channel = self.channels[name] = LocalChannel(name, self.config.capacity_for(name))
            channel.on_room = self.inbox.want_refill
        return channel

    def on_flush(self, epoch: bytes) -> None:
        """A flush: hold no membership and no queued message (channels stay usable)."""
        self.flush_epoch = epoch
        self.memberships.clear()
        self.presence.clear()
        for channel in self.channels.values():
            channel.clear()

    def redis_now(self) -> float:
        return time.time() + self.clock_offset

    @property
    def dropped(self) -> int:
        """Messages this node dropped (full queue of a consumer that stopped receiving)."""
        return self.inbox.dropped

    def owns(self, channel: str) -> bool:
        return token_of(channel) == self.token


__all__ = ["Node", "default_node_id", "new_token"]
