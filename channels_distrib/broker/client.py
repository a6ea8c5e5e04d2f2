"""The layer's side of the broker on one event loop: publishing, named queues, flush.

Every publish waits for the broker's confirm. A nack (a named queue at ``x-max-length``
with ``x-overflow: reject-publish``) is reported to the caller; a connection that breaks
before the confirm raises :class:`~channels_distrib.exceptions.BrokerUnavailable` and the
message is never published again (it may have been queued: at most once, never twice).
Only a publish that provably reached no queue is repeated: the exchange was missing (the
broker closed the channel with 404; declared again first), or the broker returned a
``mandatory`` message as unroutable while Redis says it has a receiver (a broker that lost
its queues or bindings in a restart, before the receiving node re-created them).
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import secrets
import time
from collections.abc import Awaitable, Callable
from typing import Any

import aiormq
from aiormq.abc import AbstractChannel
from pamqp.commands import Basic

from ..config import LayerConfig
from ..exceptions import BrokerUnavailable
from ..throttle import Throttle
from ..transport import backoff
from . import names
from .connection import CONNECT_ERRORS, BrokerConnection
from .receiver import NamedReceiver

logger = logging.getLogger(__name__)

#: Records names this prefix declared (in Redis, for flush()); the layer provides it.
Remember = Callable[[str], Awaitable[None]]
#: Asked (one Redis read) when the broker routed a message to no queue: whether someone
#: should have got it (a member on a live node, a named member, a live target node).
Receivers = Callable[[], Awaitable[bool]]

#: What one publish came to.
ACKED, NACKED, UNROUTED = "acked", "nacked", "unrouted"
#: The longest pause between publishes of a message still unroutable (jittered backoff).
UNROUTED_PAUSE = 0.5
#: Routing keys remembered as given up on (see BrokerClient._recently_given_up).
GIVEN_UP_KEYS = 1024


class BrokerClient:
    """Publishes direct, group and named-channel messages; owns the named receivers."""

    #: AMQP delivery mode of every publish: 1 transient, 2 persistent (see README "RabbitMQ").
    delivery_mode = 1

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
        if config.broker_persistent:
            self.delivery_mode = 2
        self.remember = remember
        self.receivers: dict[str, NamedReceiver] = {}
        self._ids = itertools.count()
        self._id_prefix = f"{node_token}.{secrets.token_hex(3)}."
        self._capacity_warned: set[str] = set()
        self._declaring: dict[str, asyncio.Future[None]] = {}
        self._unrouted_log = Throttle()
        self.unrouted = 0  # messages given up on: unroutable for retry_timeout with receivers
        self._given_up: dict[str, float] = {}  # routing key -> when a send last waited in vain

    # -- publishing -----------------------------------------------------------------------

    def _properties(self, headers: dict[str, Any] | None) -> Basic.Properties:
        return Basic.Properties(
            delivery_mode=self.delivery_mode,
            expiration=self.expiration,
            headers=headers,
            message_id=f"{self._id_prefix}{next(self._ids)}",
        )

    async def _publish(
        self,
        exchange: str,
        routing_key: str,
        body: bytes,
        headers: dict[str, Any] | None,
        *,
        mandatory: bool = False,
    ) -> str:
        """Publish and wait for the confirm: ACKED, NACKED (a queue refused it) or, for a
        ``mandatory`` publish, UNROUTED (it reached no queue)."""
        for _ in range(2):
            channel = await self.conn.channel()  # BrokerUnavailable after retry_timeout
            if exchange and exchange not in self.conn.declared:
                await self._declare_exchange(channel)
            try:
                # A confirm that never comes (a hung broker) raises BrokerUnavailable after
                # retry_timeout, like one lost with the connection: never published again.
                await self.conn.bounded(
                    channel.basic_publish(
                        body,
                        exchange=exchange,
                        routing_key=routing_key,
                        properties=self._properties(headers),
                        mandatory=mandatory,
                    ),
                    "a publish",
                )
                return ACKED
            except aiormq.exceptions.PublishError:
                return UNROUTED  # basic.return: no queue is bound for this routing key
            except aiormq.exceptions.DeliveryError:
                return NACKED  # a queue refused it (reject-publish), nothing was queued
            except aiormq.exceptions.ChannelNotFoundEntity:
                # The exchange was deleted (a flush): the broker routed the message nowhere
                # and closed the channel, so publishing again cannot duplicate it.
                self.conn.forget(channel)
                self.conn.declared.discard(exchange)
                continue
            except (asyncio.CancelledError, BrokerUnavailable):
                raise
            except CONNECT_ERRORS + (aiormq.exceptions.AMQPError,) as exc:
                # Written, but the confirm was lost with the connection: never publish again.
                self.conn.forget(channel)
                raise BrokerUnavailable(self.conn.address, 0.0, exc) from None
        raise BrokerUnavailable(self.conn.address, 0.0)

    async def _publish_routed(
        self,
        exchange: str,
        routing_key: str,
        body: bytes,
        headers: dict[str, Any],
        receivers: Receivers,
    ) -> str:
        """A ``mandatory`` publish, repeated while the broker finds no queue for it but
        ``receivers()`` says someone should get it, for up to ``retry_timeout``.

        A returned message reached no queue, so publishing it again cannot duplicate it.
        This covers a broker restarted without its queues or bindings (until the receiving
        node re-creates them) and a binding still being made. A routing key that reaches
        some queues but not all is not returned: a node that has yet to re-bind after a
        broker restart misses what was sent to the others meanwhile. UNROUTED after the
        wait (counted in ``unrouted``, a rate-limited warning), and at once for a key given
        up on less than ``retry_timeout`` ago; with no receivers, an unroutable message had
        nobody to reach and counts as ACKED.
        """
        window = self.config.retry_timeout
        deadline = time.monotonic() + window
        attempt = 0
        while True:
            outcome = await self._publish(exchange, routing_key, body, headers, mandatory=True)
            if outcome != UNROUTED:
                self._given_up.pop(routing_key, None)
                return outcome
            if not await receivers():
                return ACKED
            remaining = deadline - time.monotonic()
            if remaining <= 0 or self._recently_given_up(routing_key, window):
                self._give_up(routing_key, waited=remaining <= 0)
                return UNROUTED
            attempt += 1
            await asyncio.sleep(min(backoff(attempt, cap=UNROUTED_PAUSE), remaining))

    def _recently_given_up(self, routing_key: str, window: float) -> bool:
        """A key given up on within ``window``: its receiver is broken (a node cut off from
        the broker for longer than its queue's x-expires), so later sends do not each wait."""
        since = self._given_up.get(routing_key)
        return since is not None and time.monotonic() - since < window

    def _give_up(self, routing_key: str, *, waited: bool) -> None:
        """Count a dropped message; a send that waited the whole window starts a new one."""
        if waited:
            if routing_key not in self._given_up and len(self._given_up) >= GIVEN_UP_KEYS:
                self._given_up.clear()  # bounded memory; the worst case is one more wait per key
            self._given_up[routing_key] = time.monotonic()
        self.unrouted += 1
        if self._unrouted_log.ready():
            logger.warning(
                "RabbitMQ routed messages for %r to no queue for %.1fs although it has "
                "receivers; dropped (%d in all)",
                routing_key,
                self.config.retry_timeout,
                self.unrouted,
            )

    async def _declare_exchange(self, channel: AbstractChannel) -> None:
        await self.remember(f"x:{self.exchange}")
        # Durable, like the queues: the objects and their bindings survive a broker restart;
        # the messages queued at that moment only with ``broker_persistent``.
        await self.conn.bounded(
            channel.exchange_declare(self.exchange, exchange_type="direct", durable=True),
            "an exchange declare",
        )
        self.conn.declared.add(self.exchange)

    async def send_direct(
        self, token: str, channel: str, payload: bytes, receivers: Receivers
    ) -> bool:
        """To a process-local channel of another node: into that node's queue.

        A node that is gone has no queue; the message is then dropped by the broker, as a
        message to a dead node's inbox is never read on the Redis path. ``receivers`` says
        whether the node is live (its queue is then waited for, see :meth:`_publish_routed`).
        False when the message was dropped.
        """
        queue = names.node_queue(self.prefix, token)
        return await self._publish_routed("", queue, payload, {"c": channel}, receivers) == ACKED

    async def group_send(
        self,
        group: str,
        payload: bytes,
        receivers: Receivers,
        exclude: str = "",
        offset: str | None = None,
    ) -> bool:
        """Through the group exchange: once to each node (and named queue) bound to ``group``.

        ``offset`` (a room send with history) travels as the ``h`` header; the receiving
        node adds it to the message. Returns False when a named member's queue refused it
        (full; others still got it) or when it stayed unroutable although ``receivers()``
        said the group has members (see :meth:`_publish_routed`).
        """
        headers: dict[str, Any] = {"g": group}
        if exclude:
            headers["x"] = exclude
        if offset:
            headers["h"] = offset
        return await self._publish_routed(self.exchange, group, payload, headers, receivers) == ACKED

    async def send_presence(
        self, group: str, payload: bytes, receivers: Receivers, exclude: str = ""
    ) -> bool:
        """A ``presence.diff`` to the nodes with presence members in ``group`` (bound with its
        presence key); ``exclude`` names the joiners that get their own (space-separated).
        False when it stayed unroutable although ``receivers()`` said someone should get it."""
        headers: dict[str, Any] = {"p": group}
        if exclude:
            headers["x"] = exclude
        key = names.presence_key(group)
        return await self._publish_routed(self.exchange, key, payload, headers, receivers) == ACKED

    async def send_note(
        self,
        token: str,
        op: str,
        group: str,
        channel: str,
        receivers: Receivers,
        *,
        record: bytes = b"",
        presence: bool = False,
    ) -> bool:
        """Tell node ``token`` that another process added (``op`` "a": the member ``record``
        travels as the body, ``presence`` as the ``pr`` header) or removed ("d") its
        ``channel`` in ``group``.

        Into the node's queue, so the node reads it in order with the messages sent after it.
        False when the node's queue stayed missing although ``receivers()`` (the node is
        live) said it should be there.
        """
        headers: dict[str, Any] = {"o": op, "g": group, "c": channel, "pr": "1" if presence else "0"}
        queue = names.node_queue(self.prefix, token)
        return await self._publish_routed("", queue, record, headers, receivers) == ACKED

    async def bind_node(self, token: str, group: str, *, presence: bool) -> None:
        """Bind node ``token``'s queue with ``group`` (and with ``presence``, its presence
        key) for it; the node binds them too once it reads the membership's note
        (idempotent), but a group send right after another process's ``group_add`` then
        reaches the node whatever its pace. A missing queue (the node is gone, or has yet to
        re-declare it after a broker restart) is left alone."""
        keys = [group, names.presence_key(group)] if presence else [group]
        queue = names.node_queue(self.prefix, token)
        publisher = await self.conn.channel()
        if self.exchange not in self.conn.declared:
            await self._declare_exchange(publisher)
        side = await self.conn.extra_channel()
        try:
            for key in keys:
                bind = side.queue_bind(queue, self.exchange, routing_key=key)
                await self.conn.bounded(bind, "a queue.bind")
        except aiormq.exceptions.ChannelNotFoundEntity:
            logger.debug("Queue of node token %s is missing; not bound", token)
        finally:
            await self.conn.close_side(side)

    async def send_named(self, channel: str, payload: bytes) -> bool:
        """Into a normal channel's queue; False when the queue is full (nacked)."""
        queue = await self.declare_named(channel)
        return await self._publish("", queue, payload, None) == ACKED

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
            # Its RPCs are bounded: on a hung broker it fails after retry_timeout, not runs on.
            declare = self._declare_named(channel, queue)
            task = self._declaring[queue] = asyncio.ensure_future(declare)
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
            declare = side.queue_declare(queue, durable=True, arguments=arguments)
            await self.conn.bounded(declare, "a queue.declare")
        except aiormq.exceptions.ChannelPreconditionFailed:
            if channel not in self._capacity_warned:
                self._capacity_warned.add(channel)
                logger.warning(
                    "Queue of %s was declared with another capacity elsewhere; using it as is",
                    channel,
                )
            side = await self.conn.extra_channel()
            await self.conn.bounded(side.queue_declare(queue, passive=True), "a queue.declare")
        finally:
            await self.conn.close_side(side)
        self.conn.declared.add(queue)

    async def bind_named(self, group: str, channel: str, *, presence: bool = False) -> None:
        """A normal channel joined ``group``: its queue gets the group's messages, and as a
        presence member the group's presence diffs; joined again without presence, not
        those any more."""
        queue = await self.declare_named(channel)
        publisher = await self.conn.channel()
        if self.exchange not in self.conn.declared:
            await self._declare_exchange(publisher)
        bounded = self.conn.bounded
        await bounded(publisher.queue_bind(queue, self.exchange, routing_key=group), "a queue.bind")
        key = names.presence_key(group)
        if presence:
            await bounded(publisher.queue_bind(queue, self.exchange, routing_key=key), "a queue.bind")
        else:
            await bounded(
                publisher.queue_unbind(queue, self.exchange, routing_key=key), "a queue.unbind"
            )

    async def unbind_named(self, group: str, channel: str) -> None:
        """A normal channel left ``group`` (and its presence diffs)."""
        queue = await self.declare_named(channel)
        publisher = await self.conn.channel()
        if self.exchange not in self.conn.declared:
            await self._declare_exchange(publisher)
        for key in (group, names.presence_key(group)):
            unbind = publisher.queue_unbind(queue, self.exchange, routing_key=key)
            await self.conn.bounded(unbind, "a queue.unbind")

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
            # Its RPCs are bounded: a hung broker fails it after retry_timeout (so a close()
            # that deletes the node's queue stays bounded).
            job = asyncio.ensure_future(self._delete_now(kind, name, if_unused))
            job.add_done_callback(_retrieve)  # seen here, or by no one once our caller has gone
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
                await self.conn.bounded(side.queue_delete(name, if_unused=if_unused), "a queue.delete")
            else:
                await self.conn.bounded(side.exchange_delete(name), "an exchange.delete")
        except (aiormq.exceptions.ChannelNotFoundEntity, aiormq.exceptions.ChannelPreconditionFailed):
            pass  # already gone, or still in use: nothing to do
        finally:
            await self.conn.close_side(side)

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
