"""The layer's side of the broker on one event loop: publishing, named queues, flush.

Every publish waits for the broker's confirm. A nack (a named queue at ``x-max-length``
with ``x-overflow: reject-publish``) is reported to the caller; a connection that breaks
before the confirm raises :class:`~channels_distrib.exceptions.BrokerUnavailable` and the
message is never published again (it may have been queued: at most once, never twice).
Only a publish that provably reached no queue (the exchange was missing, the broker closed
the channel with 404) is repeated, after declaring the exchange.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import secrets
from collections.abc import Awaitable, Callable
from typing import Any

import aiormq
from aiormq.abc import AbstractChannel
from pamqp.commands import Basic

from ..config import LayerConfig
from ..exceptions import BrokerUnavailable
from . import names
from .connection import CONNECT_ERRORS, BrokerConnection
from .receiver import NamedReceiver

logger = logging.getLogger(__name__)

#: Records names this prefix declared (in Redis, for flush()); the layer provides it.
Remember = Callable[[str], Awaitable[None]]


class BrokerClient:
    """Publishes direct, group and named-channel messages; owns the named receivers."""

    def __init__(self, config: LayerConfig, remember: Remember, *, node_token: str) -> None:
        if config.broker is None:
            raise ValueError("BrokerClient needs CONFIG['broker'] (an amqp:// URL)")
        self.config = config
        self.prefix = config.prefix
        self.conn = BrokerConnection(
            config.broker, retry_timeout=config.retry_timeout, name=f"distrib:{config.prefix}"
        )
        self.exchange = names.exchange(config.prefix)
        self.expiration = str(max(1, int(config.expiry * 1000)))
        self.remember = remember
        self.receivers: dict[str, NamedReceiver] = {}
        self._ids = itertools.count()
        self._id_prefix = f"{node_token}.{secrets.token_hex(3)}."
        self._capacity_warned: set[str] = set()
        self._declaring: dict[str, asyncio.Future[None]] = {}

    # -- publishing -----------------------------------------------------------------------

    def _properties(self, headers: dict[str, Any] | None) -> Basic.Properties:
        return Basic.Properties(
            delivery_mode=1,
            expiration=self.expiration,
            headers=headers,
            message_id=f"{self._id_prefix}{next(self._ids)}",
        )

    async def _publish(
        self, exchange: str, routing_key: str, body: bytes, headers: dict[str, Any] | None
    ) -> bool:
        """Publish and wait for the confirm: True when acked, False when nacked."""
        for _ in range(2):
            channel = await self.conn.channel()  # BrokerUnavailable after retry_timeout
            if exchange and exchange not in self.conn.declared:
                await self._declare_exchange(channel)
            try:
                await channel.basic_publish(
                    body,
                    exchange=exchange,
                    routing_key=routing_key,
                    properties=self._properties(headers),
                )
                return True
            except aiormq.exceptions.DeliveryError:
                return False  # nacked: a queue refused it (reject-publish), nothing was queued
            except aiormq.exceptions.ChannelNotFoundEntity:
                # The exchange was deleted (a flush): the broker routed the message nowhere
                # and closed the channel, so publishing again cannot duplicate it.
                self.conn.forget(channel)
                self.conn.declared.discard(exchange)
                continue
            except asyncio.CancelledError:
                raise
            except CONNECT_ERRORS + (aiormq.exceptions.AMQPError,) as exc:
                # Written, but the confirm was lost with the connection: never publish again.
                self.conn.forget(channel)
                raise BrokerUnavailable(self.conn.address, 0.0, exc) from None
        raise BrokerUnavailable(self.conn.address, 0.0)

    async def _declare_exchange(self, channel: AbstractChannel) -> None:
        await self.remember(f"x:{self.exchange}")
        # Durable, like the queues (their messages are not): the objects and their bindings
        # survive a broker restart; the messages queued at that moment do not.
        await channel.exchange_declare(self.exchange, exchange_type="direct", durable=True)
        self.conn.declared.add(self.exchange)

    async def send_direct(self, token: str, channel: str, payload: bytes) -> None:
        """To a process-local channel of another node: into that node's queue.

        A node that is gone has no queue; the message is then dropped by the broker, as a
        message to a dead node's inbox is never read on the Redis path.
        """
        await self._publish("", names.node_queue(self.prefix, token), payload, {"c": channel})

    async def group_send(
        self, group: str, payload: bytes, exclude: str = "", offset: str | None = None
    ) -> bool:
        """Through the group exchange: once to each node (and named queue) bound to ``group``.

        ``offset`` (a room send with history) travels as the ``h`` header; the receiving
        node adds it to the message. Returns False when a named member's queue refused it
        (full); others still got it.
        """
        headers: dict[str, Any] = {"g": group}
        if exclude:
            headers["x"] = exclude
        if offset:
            headers["h"] = offset
        return await self._publish(self.exchange, group, payload, headers)

    async def send_named(self, channel: str, payload: bytes) -> bool:
        """Into a normal channel's queue; False when the queue is full (nacked)."""
        queue = await self.declare_named(channel)
        return await self._publish("", queue, payload, None)

    # -- named queues ---------------------------------------------------------------------

    async def declare_named(self, channel: str) -> str:
        """Declare a normal channel's queue once per connection; returns its name.

        Another process may have declared it with another capacity (``channel_capacity``
        differs between them); RabbitMQ refuses such a redeclaration (PRECONDITION_FAILED)
        and closes the channel, so the declare runs on a channel of its own and is then
        repeated passively: the queue keeps the limit its first declarer gave it, and a
        warning says so once per channel.
        """
        queue = names.named_queue(self.prefix, channel)
        if queue in self.conn.declared:
            return queue
        # A channel.open or queue.declare cut off by a cancelled send would leave the AMQP
        # connection out of step (the broker then closes it): the declaration runs in a task
        # of its own that the caller's cancellation does not reach, shared by concurrent sends.
        task = self._declaring.get(queue)
        if task is None or task.done():
            task = self._declaring[queue] = asyncio.ensure_future(self._declare_named(channel, queue))
            task.add_done_callback(_retrieve)
        try:
            await asyncio.shield(task)
        except asyncio.CancelledError:
            if not self.conn.connected:
                task.cancel()  # still waiting for the broker: nothing is half-way, stop it
            raise
        return queue

    async def _declare_named(self, channel: str, queue: str) -> None:
        await self.remember(f"q:{queue}")
        arguments: dict[str, Any] = {
            "x-max-length": self.config.capacity_for(channel),
            "x-overflow": "reject-publish",
        }
        side = await self.conn.extra_channel()
        try:
            await side.queue_declare(queue, durable=True, arguments=arguments)
        except aiormq.exceptions.ChannelPreconditionFailed:
            if channel not in self._capacity_warned:
                self._capacity_warned.add(channel)
                logger.warning(
                    "Queue of %s was declared with another capacity elsewhere; using it as is",
                    channel,
                )
            side = await self.conn.extra_channel()
            await side.queue_declare(queue, passive=True)
        finally:
            if not side.is_closed:
                await side.close()
        self.conn.declared.add(queue)

    async def bind_named(self, group: str, channel: str) -> None:
        """A normal channel joined ``group``: its queue gets the group's messages."""
        queue = await self.declare_named(channel)
        publisher = await self.conn.channel()
        if self.exchange not in self.conn.declared:
            await self._declare_exchange(publisher)
        await publisher.queue_bind(queue, self.exchange, routing_key=group)

    async def unbind_named(self, group: str, channel: str) -> None:
        """A normal channel left ``group``."""
        queue = await self.declare_named(channel)
        publisher = await self.conn.channel()
        if self.exchange not in self.conn.declared:
            await self._declare_exchange(publisher)
        await publisher.queue_unbind(queue, self.exchange, routing_key=group)

    def receiver(self, channel: str) -> NamedReceiver:
        receiver = self.receivers.get(channel)
        if receiver is None:
            receiver = self.receivers[channel] = NamedReceiver(self, channel)
        return receiver

    # -- removal --------------------------------------------------------------------------

    async def delete_node_queue(self, token: str) -> None:
        """A pruned (or cleanly stopped) node: delete its queue and with it its bindings.

        ``if_unused``: a node that is still consuming (cut off from Redis, not from the
        broker) keeps its queue; it re-registers when Redis answers again.
        """
        await self._delete("queue", names.node_queue(self.prefix, token), if_unused=True)

    async def _delete(self, kind: str, name: str, *, if_unused: bool = False) -> None:
        """Delete a queue or exchange; shielded, so a cancelled caller leaves no half-done
        delete. aiormq cancels the RPCs of a channel or connection that closes under them:
        such a delete (idempotent) is tried again on a new channel, twice at most."""
        for attempt in range(3):
            job = asyncio.ensure_future(self._delete_now(kind, name, if_unused))
            try:
                await asyncio.shield(job)
                return
            except asyncio.CancelledError:
                current = asyncio.current_task()
                caller_cancelled = current is not None and getattr(current, "cancelling", int)()
                if not job.cancelled() or caller_cancelled or attempt == 2:
                    raise  # our caller was cancelled (the job runs on), or it keeps failing
                logger.debug("Deleting %s %s was cut off; trying again", kind, name)

    async def _delete_now(self, kind: str, name: str, if_unused: bool) -> None:
        side = await self.conn.extra_channel()
        try:
            if kind == "queue":
                await side.queue_delete(name, if_unused=if_unused)
            else:
                await side.exchange_delete(name)
        except (aiormq.exceptions.ChannelNotFoundEntity, aiormq.exceptions.ChannelPreconditionFailed):
            pass  # already gone, or still in use: nothing to do
        finally:
            if not side.is_closed:
                await side.close()

    async def delete_all(self, declared: list[str]) -> None:
        """flush(): delete the queues and exchanges this prefix declared (``kind:name``)."""
        for entry in declared:
            kind, _, name = entry.partition(":")
            await self._delete("queue" if kind == "q" else "exchange", name)
        self.conn.declared.clear()
        for receiver in self.receivers.values():
            receiver.buffer.clear()

    async def close(self) -> None:
        pending = [task for task in self._declaring.values() if not task.done()]
        for task in pending:
            task.cancel()
        if pending:
            await asyncio.wait(pending, timeout=1.0)
        for receiver in self.receivers.values():
            await receiver.close()
        self.receivers.clear()
        await self.conn.close()


def _retrieve(future: asyncio.Future[None]) -> None:
    """Mark a shared task's outcome as seen (its callers re-raise it themselves)."""
    if not future.cancelled():
        future.exception()


__all__ = ["BrokerClient"]
