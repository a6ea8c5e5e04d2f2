"""A node's queue on the broker: declared, consumed, and bound to exactly its groups.

The queue (``<prefix>.node.<token>``) is not exclusive, so it outlives a connection blip with
what was sent meanwhile; ``x-expires`` (twice ``node_timeout``) makes the broker delete it
once nobody has consumed it for that long, and pruning deletes it at once (when unused).

Bindings follow :class:`~channels_distrib.membership.Memberships`, the sole owner of the
node's memberships: it calls :meth:`NodeQueue.groups_changed` when a group gains its first
or loses its last member here, and the keeper task makes the bindings equal to the groups
the owner holds. The same task re-declares queue, consumer and every binding after a
reconnect, a broker restart, or a flush/prune that deleted the queue (seen as a consumer
count of 0 when it re-declares the queue every heartbeat).

Messages are consumed with acknowledgements (a message in flight when the connection drops
is delivered again, not lost); each publish carries a unique id, and a redelivered message
whose id this node has already delivered is acknowledged and skipped, so nothing arrives
twice.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import OrderedDict
from typing import TYPE_CHECKING, Any

from aiormq.abc import AbstractChannel, DeliveredMessage

from ..history import payload_with_offset
from ..tasks import cancellable
from ..transport import backoff
from . import names
from .connection import BrokerConnection

if TYPE_CHECKING:
    from ..node import Node

logger = logging.getLogger(__name__)

#: Unacknowledged messages the broker may have in flight to the node at once.
PREFETCH = 1000
#: Delivered message ids remembered to recognise redeliveries (a few prefetch windows).
SEEN = PREFETCH * 4


class NodeQueue:
    """The node's broker queue, its consumer and its bindings; its task is owned by the node."""

    def __init__(self, node: Node, url: str) -> None:
        self.node = node
        prefix = node.config.prefix
        self.conn = BrokerConnection(
            url,
            retry_timeout=node.config.retry_timeout,
            name=f"distrib:{prefix}:node:{node.token}",
        )
        self.queue = names.node_queue(prefix, node.token)
        self.exchange = names.exchange(prefix)
        self.expires_ms = int(2 * node.config.node_timeout * 1000)
        self.bound: set[str] = set()
        # Keys that may be bound without being in ``bound`` -> until when (monotonic) each
        # sync unbinds them while unwanted: another process's bind (see _note), and what
        # was bound before a reconnect (see _consume).
        self._maybe_bound: dict[str, float] = {}
        self._consuming: AbstractChannel | None = None
        self._consumer_tag: str | None = None
        self._consumed_on: AbstractChannel | None = None  # kept across on_flush()
        self._seen: OrderedDict[str, None] = OrderedDict()
        self._wake = asyncio.Event()
        self._passed: asyncio.Future[None] = node.loop.create_future()
        self.received = 0  # broker messages taken from the queue (redeliveries skipped)
        self.delivered = 0  # local deliveries they made (a group message: one per member)

    # -- the membership owner's listener --------------------------------------------------

    def groups_changed(self) -> None:
        """The node's set of groups changed (called by Memberships): sync the bindings."""
        self._wake.set()

    async def wait_bound(self, group: str, timeout: float, *, presence: bool = False) -> bool:
        """Wait until the bindings include ``group`` (and, with ``presence``, its presence
        key), or the node no longer holds what asked for them."""
        deadline = time.monotonic() + timeout
        while self._missing(group, presence):
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return False
            self._wake.set()
            try:
                await asyncio.wait_for(asyncio.shield(self._passed), remaining)
            except asyncio.TimeoutError:
                return False
        return True

    def _missing(self, group: str, presence: bool) -> bool:
        """Whether a binding the node wants for ``group`` is not made yet."""
        memberships = self.node.memberships
        if group not in self.bound and memberships.members(group):
            return True
        key = names.presence_key(group)
        return presence and key not in self.bound and group in memberships.presence_groups

    def wanted(self) -> set[str]:
        """The routing keys the queue is to be bound with: every group the node holds, and
        the presence key of every group it has presence members in."""
        memberships = self.node.memberships
        keys = set(memberships.groups)
        keys.update(names.presence_key(group) for group in memberships.presence_groups)
        return keys

    # -- the keeper task -------------------------------------------------------------------

    async def start(self) -> None:
        """The first pass, before the node's first channel exists (raises if unreachable)."""
        await self._keep()

    async def run(self) -> None:
        """Keep queue, consumer and bindings in step: on every change, and every heartbeat."""
        node = self.node
        attempt = 0
        while not node.stopped:
            try:
                await asyncio.wait_for(self._wake.wait(), node.config.heartbeat_interval)
            except asyncio.TimeoutError:
                pass
            self._wake.clear()
            try:
                await cancellable(self._keep)
                attempt = 0
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                attempt += 1
                if attempt == 1:
                    node.registry.counters.reconnects += 1
                if attempt in (1, 10):
                    logger.warning(
                        "Node %s lost its RabbitMQ queue (%s); reconnecting", node.node_id, exc
                    )
                self._consuming = None
                self.conn.kill()
                await asyncio.sleep(backoff(attempt))
                self._wake.set()

    async def _keep(self) -> None:
        # Every RPC below is bounded by retry_timeout: on a hung broker the pass fails (and
        # run() reconnects) rather than wait for ever.
        channel = await self.conn.channel()
        # Durable (the messages only with broker_persistent): queue and bindings survive a
        # broker restart, so what is sent once the broker is back is routed here before this
        # node reconnects.
        declared = await self.conn.bounded(
            channel.queue_declare(self.queue, durable=True, arguments={"x-expires": self.expires_ms}),
            "the node queue's declare",
        )
        if channel is not self._consuming or not declared.consumer_count:
            # A new connection, or the queue was deleted under us (flush, prune): consume
            # again and re-create every binding.
            await self._consume(channel)
        await self._sync_bindings(channel)
        passed, self._passed = self._passed, self.node.loop.create_future()
        passed.set_result(None)

    async def _consume(self, channel: AbstractChannel) -> None:
        # The queue is durable and not exclusive: it may have outlived the old connection
        # (or a broker restart) with its bindings, among them groups the node left meanwhile.
        # Every wanted key is bound again (the queue may be new), and what was bound is
        # unbound once more unless wanted (a no-op for a binding that is gone).
        now = time.monotonic()
        for key in self.bound:
            self._maybe_bound.setdefault(key, now)
        self.bound = set()
        if self._consumer_tag is not None and channel is self._consumed_on:
            # After a flush, on the same channel: never two consumers of one queue. The
            # broker answers cancel-ok for a tag it has already cancelled itself.
            await self.conn.bounded(channel.basic_cancel(self._consumer_tag), "a basic.cancel")
        await self.remember()
        bounded = self.conn.bounded
        await bounded(
            channel.exchange_declare(self.exchange, exchange_type="direct", durable=True),
            "an exchange declare",
        )
        await bounded(channel.basic_qos(prefetch_count=PREFETCH), "a basic.qos")
        ok = await bounded(
            channel.basic_consume(self.queue, self._on_message, no_ack=False), "a basic.consume"
        )
        self._consumer_tag = ok.consumer_tag
        self._consuming = self._consumed_on = channel

    async def remember(self) -> None:
        """Keep the queue's and exchange's names in Redis, so flush() can delete them."""
        node = self.node
        key = node.keys.broker_names
        entries = [f"q:{self.queue}", f"x:{self.exchange}"]
        await node.transport.run(lambda c: c.sadd(key, *entries))
        await node.transport.run(lambda c: c.pexpire(key, 7 * 86400 * 1000))

    def on_flush(self) -> None:
        """flush() deleted this prefix's broker objects: declare, consume and bind again.

        Called on the node's loop (the layer hands it over when it flushes from another).
        """
        self._consuming = None
        self.bound = set()
        self._wake.set()

    async def _sync_bindings(self, channel: AbstractChannel) -> None:
        """Bind the keys :meth:`wanted` names, unbind the others (one RPC each)."""
        now = time.monotonic()
        wanted = self.wanted()
        for key in sorted(wanted - self.bound):
            await self.conn.bounded(
                channel.queue_bind(self.queue, self.exchange, routing_key=key), "a queue.bind"
            )
            self.bound.add(key)
        for key in sorted((self.bound | set(self._maybe_bound)) - wanted):
            if key in self.wanted():
                # Wanted since ``wanted`` was read: a note adopted a membership during the
                # binds above (its adder bound the key): never unbind it; the next pass
                # binds it again (idempotent) in case the adder's bind failed.
                continue
            # Unbinding a key that is not bound is a no-op for RabbitMQ.
            await self.conn.bounded(
                channel.queue_unbind(self.queue, self.exchange, routing_key=key), "a queue.unbind"
            )
            self.bound.discard(key)
        # Reached only when every unbind above was made: entries past their time go now (a
        # pass cancelled or failed above keeps them all for the next one).
        for key, until in list(self._maybe_bound.items()):
            if until <= now:
                del self._maybe_bound[key]

    async def stop(self) -> None:
        """Close the connection (the node then deletes its queue through pruning itself)."""
        self._consuming = None
        await self.conn.close()

    # -- delivery -------------------------------------------------------------------------

    async def _on_message(self, message: DeliveredMessage) -> None:
        properties = message.header.properties
        message_id = properties.message_id or ""
        if not (message.delivery.redelivered and message_id in self._seen):  # type: ignore[union-attr]
            self._seen[message_id] = None
            self.received += 1
            if len(self._seen) > SEEN:
                self._seen.popitem(last=False)
            try:
                self._dispatch(properties.headers or {}, message.body)
            except Exception:
                logger.exception("Skipping a broker message of node %s", self.node.node_id)
            inbox = self.node.inbox
            if inbox._to_mark:
                # Channels that dropped: marked full in Redis (as the Redis path does), so
                # direct senders get ChannelFull; housekeeping withdraws the marks.
                await inbox._mark_full()
        # Acknowledged after delivery: lost with the connection, it comes again (and is
        # recognised by its id above).
        tag = getattr(message.delivery, "delivery_tag", None)
        if isinstance(tag, int):
            await message.channel.basic_ack(tag)

    def _dispatch(self, headers: dict[str, Any], payload: bytes) -> None:
        """Queue one message for the node's local channels, never waiting (a full channel
        drops), or apply a membership note (``o``) or a presence diff (``p``)."""
        node = self.node
        if "o" in headers:
            self._note(headers, payload)
            return
        expires = time.monotonic() + node.config.expiry
        if "p" in headers:
            self._presence_diff(_text(headers["p"]), _text(headers.get("x", "")), payload, expires)
            return
        channel = headers.get("c")
        if channel is not None:
            self._put(_text(channel), payload, expires)
            return
        group = _text(headers["g"])
        members = node.memberships.members(group)
        if not members:
            return
        if "h" in headers:  # a room send with history: its offset joins the message
            payload = payload_with_offset(node.registry.serializer, payload, _text(headers["h"]))
        exclude = _text(headers.get("x", ""))
        for name in list(members):
            if name != exclude:
                self._put(name, payload, expires)

    def _note(self, headers: dict[str, Any], record: bytes) -> None:
        """Another process added (``o`` = ``a``; the body is the member record) or removed one
        of this node's channels in a group; already written to Redis (the Redis path's inbox
        control entry)."""
        group, channel = _text(headers["g"]), _text(headers["c"])
        memberships = self.node.memberships
        if _text(headers["o"]) == "a":
            presence = _text(headers.get("pr", "0")) == "1"
            # The adder binds these keys to this queue itself, right after this note: each
            # sync until then unbinds them unless the node wants them (a channel it no
            # longer has, say), so a bind that lands after the first such sync goes too.
            config = self.node.config
            until = time.monotonic() + config.retry_timeout + 2 * config.heartbeat_interval
            self._maybe_bound[group] = until
            if presence:
                self._maybe_bound[names.presence_key(group)] = until
            self._wake.set()
            memberships.adopt(group, channel, record, presence)
        else:
            memberships.forget_remote(group, channel)

    def _presence_diff(self, group: str, exclude: str, payload: bytes, expires: float) -> None:
        """A ``presence.diff``: into the node's replica first, then to its presence members
        (not the joiners named in ``exclude``, space-separated, nor members whose state
        already held it), as the Redis path's inbox reader does."""
        node = self.node
        known = node.presence.on_diff(group, payload)
        members = node.memberships.members(group)
        if not members:
            return
        excluded = set(exclude.split(" ")) if exclude else set()
        for name, membership in list(members.items()):
            if (
                name in excluded
                or not membership.presence
                or (known is not None and known[0].get(name, -1) >= known[1])
            ):
                continue
            self._put(name, payload, expires)

    def _put(self, name: str, payload: bytes, expires: float) -> None:
        local = self.node.channels.get(name)
        if local is None:
            self.node.inbox._count_drop(name, "no such channel on this node", "no_channel")
        elif local.full:
            inbox = self.node.inbox
            if name not in inbox.marked_full:
                inbox._to_mark.add(name)
            inbox._count_drop(name, "capacity", "capacity")
        else:
            local.put(payload, expires)
            self.delivered += 1


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


__all__ = ["NodeQueue"]
