"""``DistributedChannelLayer``: the Channels layer spec on Redis, plus registry and presence.

Process-local channels (``specific.<token>!<id>``) are delivered through their node's inbox
stream; normal channels are shared Redis lists; a group send writes one inbox entry per node
that has members (the node fans out locally) and one list item per normal-channel member.
"""

from __future__ import annotations

import asyncio
import difflib
import logging
import secrets
import time
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any, TypeVar

import msgpack
from channels.exceptions import ChannelFull, MessageTooLarge
from channels.layers import BaseChannelLayer
from django.core.exceptions import ImproperlyConfigured

from .config import MIB, LayerConfig, build_config
from .exceptions import BrokerUnavailable
from .heartbeat import TokenTaken
from .history import HistoryInfo, HistoryRead, RoomHistory, check_room_message
from .keys import Keys
from .node import Node, default_node_id, new_token
from .queues import NamedQueue
from .registry import (
    INBOX_MAXLEN,
    AddResult,
    Registry,
    presence_entry,
    token_of,
)
from .serializers import SerializerError, make_serializer
from .stats import figures
from .throttle import Throttle
from .transport import Transport
from .types import Member, Message, Meta, NodeInfo, NodeStats

logger = logging.getLogger(__name__)

T = TypeVar("T")

#: Life of the Redis set of broker names (renewed by each new name; flush() deletes it).
BROKER_NAMES_TTL_MS = 7 * 86400 * 1000
#: Presence diffs published at once (each waits for its confirm) with ``broker``.
DIFF_BATCH = 100


def _require_broker_client() -> None:
    """``broker`` needs aiormq (the ``rabbitmq`` extra): fail at start-up saying so."""
    try:
        import aiormq  # noqa: F401
    except ImportError as exc:
        raise ImproperlyConfigured(
            "channels_distrib: the broker option needs aiormq; "
            'pip install "channels-distrib[rabbitmq]"'
        ) from exc

_OPTIONS = (
    "hosts",
    "prefix",
    "expiry",
    "group_expiry",
    "capacity",
    "channel_capacity",
    "symmetric_encryption_keys",
    "serializer_format",
    "random_prefix_length",
    "node_id",
    "heartbeat_interval",
    "node_timeout",
    "serializer",
    "max_message_size",
    "max_meta_size",
    "retry_timeout",
    "connection_limit",
    "presence_interval",
    "broker",
    "broker_persistent",
)


class _LoopState:
    """What one event loop owns: its Redis connections and its normal-channel receivers."""

    def __init__(self, transport: Transport) -> None:
        self.transport = transport
        self.queues: dict[str, NamedQueue] = {}
        self.broker: Any = None  # a broker.BrokerClient, with the ``broker`` option

    async def close(self) -> None:
        for queue in self.queues.values():
            await queue.close()
        self.queues.clear()
        if self.broker is not None:
            await self.broker.close()
            await _settle_leftovers()
        await self.transport.close()


async def _settle_leftovers(timeout: float = 1.0) -> None:
    """Let the tasks still pending on a loop that is about to close finish (at most
    ``timeout``). aiormq starts a clean-up task from a done callback when its reader task is
    cancelled (as ``asyncio.run`` cancels every task before closing the loop); closed at once,
    that task would be destroyed while pending."""
    current = asyncio.current_task()
    others = [task for task in asyncio.all_tasks() if task is not current]
    if others:
        await asyncio.wait(others, timeout=timeout)


class DistributedChannelLayer(BaseChannelLayer):  # type: ignore[misc]
    """A Channels layer whose groups know their members, nodes and presence, cluster-wide.

    Options (the ``CONFIG`` dict): every channels_redis option (``hosts``, ``prefix``,
    ``expiry``, ``group_expiry``, ``capacity``, ``channel_capacity``,
    ``symmetric_encryption_keys``, ``serializer_format``, ``random_prefix_length`` — accepted,
    no effect) plus ``node_id``, ``heartbeat_interval``, ``node_timeout``, ``serializer``,
    ``max_message_size``, ``max_meta_size``, ``retry_timeout``, ``connection_limit`` and
    ``presence_interval`` (seconds, default 0.1: a node's presence joins and leaves of one
    group within that long are sent as one ``presence.diff``; 0 sends each at once) and
    ``broker`` (an ``amqp://`` URL: messages travel through RabbitMQ, see broker/) and
    ``broker_persistent`` (with ``broker``: persistent messages, kept across a broker restart).
    See the README for each option's meaning and default.
    """

    extensions = ["groups", "flush", "registry", "presence", "ratelimit", "history"]

    def __init__(
        self,
        *,
        hosts: Any = None,
        prefix: str = "asgi",
        expiry: float = 60,
        group_expiry: float = 86400,
        capacity: int = 100,
        channel_capacity: dict[str, int] | None = None,
        symmetric_encryption_keys: list[str] | None = None,
        serializer_format: str | None = None,
        random_prefix_length: int = 12,
        node_id: str | None = None,
        heartbeat_interval: float = 2.0,
        node_timeout: float = 6.0,
        serializer: str | None = None,
        max_message_size: int = 16 * MIB,
        max_meta_size: int = 4096,
        retry_timeout: float = 5.0,
        connection_limit: int | None = None,
        presence_interval: float = 0.1,
        broker: str | None = None,
        broker_persistent: bool = False,
        **unknown: Any,
    ) -> None:
        if unknown:
            name = sorted(unknown)[0]
            close = difflib.get_close_matches(name, _OPTIONS, n=1)
            hint = (
                f"; did you mean {close[0]!r}?"
                if close
                else f"; valid options: {', '.join(_OPTIONS)}"
            )
            raise ImproperlyConfigured(f"channels_distrib: unknown CONFIG option {name!r}{hint}")
        self.config: LayerConfig = build_config(
            hosts=hosts,
            prefix=prefix,
            expiry=expiry,
            group_expiry=group_expiry,
            capacity=capacity,
            channel_capacity=channel_capacity,
            symmetric_encryption_keys=symmetric_encryption_keys,
            serializer_format=serializer_format,
            random_prefix_length=random_prefix_length,
            node_id=node_id,
            heartbeat_interval=heartbeat_interval,
            node_timeout=node_timeout,
            serializer=serializer,
            max_message_size=max_message_size,
            max_meta_size=max_meta_size,
            retry_timeout=retry_timeout,
            connection_limit=connection_limit,
            presence_interval=presence_interval,
            broker=broker,
            broker_persistent=broker_persistent,
        )
        super().__init__(expiry=self.config.expiry, capacity=self.config.capacity)
        self.channel_capacity = list(self.config.channel_capacity)
        self.group_expiry = self.config.group_expiry
        self.prefix = self.config.prefix
        self.connection_limit = self.config.connection_limit
        self.serializer = make_serializer(
            self.config.serializer, self.config.symmetric_encryption_keys
        )
        self.keys = Keys(self.config.prefix)
        self.registry = Registry(self.config, self.keys, self.serializer)
        self.history = RoomHistory(
            self.keys, self.serializer, int(self.config.group_expiry * 1000)
        )
        # Plain-int counters (see channels_distrib.stats); read by the heartbeat and metrics.
        self.counters = self.registry.counters
        self._token = new_token()
        self._loops: dict[asyncio.AbstractEventLoop, _LoopState] = {}
        self._node: Node | None = None
        self._node_starting: asyncio.Future[Node] | None = None
        self._drop_log = Throttle()
        self._corrupt_log = Throttle()
        self._remembered: set[str] = set()
        if self.config.broker is not None:
            _require_broker_client()
            self.registry.prune_listeners.append(self._on_pruned)
            self.registry.diff_sender = self._broker_diffs

    # -- connections per event loop -------------------------------------------------------

    def _state(self) -> _LoopState:
        loop = asyncio.get_running_loop()
        state = self._loops.get(loop)
        if state is None:
            transport = Transport(
                self.config.host,
                client_name=f"distrib:{self.config.prefix}",
                retry_timeout=self.config.retry_timeout,
            )
            transport.counters = self.counters
            state = self._loops[loop] = _LoopState(transport)
            if self.config.broker is not None:
                from .broker import BrokerClient  # imported only when the option is set

                state.broker = BrokerClient(self.config, self._remember, node_token=self._token)
            self._wrap_close(loop)
        return state

    def _transport(self) -> Transport:
        return self._state().transport

    async def _remember(self, name: str) -> None:
        """Keep a broker name this prefix declared in Redis (AMQP cannot list them) for flush()."""
        if name in self._remembered:
            return
        key = self.keys.broker_names
        await self._transport().run(lambda c: c.sadd(key, name))
        await self._transport().run(lambda c: c.pexpire(key, BROKER_NAMES_TTL_MS))
        self._remembered.add(name)

    async def _bind_named(
        self, group: str, channel: str, broker: Any, presence: bool = False
    ) -> None:
        """A normal channel joined: bind its queue, and note when (for group_expiry)."""
        transport = self._transport()
        key = self.keys.broker_bindings(group)
        if not transport.clock_synced:
            await transport.sync_clock()
        now_ms = (time.time() + transport.clock_offset) * 1000
        await broker.bind_named(group, channel, presence=presence)
        await transport.run(lambda c: c.zadd(key, {channel: now_ms}))
        await transport.run(lambda c: c.pexpire(key, BROKER_NAMES_TTL_MS))

    async def _unbind_named(self, group: str, channel: str, broker: Any) -> None:
        key = self.keys.broker_bindings(group)
        await broker.unbind_named(group, channel)
        await self._transport().run(lambda c: c.zrem(key, channel))

    async def _expire_named_members(self, group: str, broker: Any) -> None:
        """Before a broker group send: normal-channel members past ``group_expiry`` leave
        (Redis record and broker binding), as GROUP_SEND does on the Redis path; one round
        trip when none has expired."""
        transport = self._transport()
        key = self.keys.broker_bindings(group)
        if not transport.clock_synced:
            await transport.sync_clock()
        oldest = (time.time() + transport.clock_offset - self.config.group_expiry) * 1000
        expired = await transport.read(lambda c: c.zrangebyscore(key, "-inf", oldest))
        for item in expired:
            channel = item.decode() if isinstance(item, bytes) else str(item)
            await self.registry.discard(transport, group, channel, notify=True)
            await self._unbind_named(group, channel, broker)

    def _group_has_receivers(
        self, transport: Transport, group: str, exclude: str = ""
    ) -> Callable[[], Awaitable[bool]]:
        """For the broker path: asked when RabbitMQ routed a group message to no queue."""
        return lambda: self.registry.has_receivers(transport, group, exclude)

    def _node_is_live(self, transport: Transport, token: str) -> Callable[[], Awaitable[bool]]:
        """For the broker path: asked when a node's queue is missing on RabbitMQ."""

        async def live() -> bool:
            return token in await self.registry.live_tokens(transport)

        return live

    async def _broker_diffs(self, transport: Transport, sends: list[tuple[str, bytes, str]]) -> None:
        """Presence diffs through RabbitMQ (the registry's ``diff_sender``): each published to
        its group's presence key, concurrently, each confirmed."""
        broker = self._state().broker

        def receivers(group: str) -> Callable[[], Awaitable[bool]]:
            return lambda: self.registry.has_presence_receivers(transport, group)

        for start in range(0, len(sends), DIFF_BATCH):
            batch = sends[start : start + DIFF_BATCH]
            # return_exceptions: every publish has ended before an error is raised (none is
            # left running); a cancelled caller cancels them all.
            results = await asyncio.gather(
                *(broker.send_presence(g, p, receivers(g), x) for g, p, x in batch),
                return_exceptions=True,
            )
            for result in results:
                if isinstance(result, BaseException):
                    raise result

    async def _broker_note(
        self, token: str, op: str, group: str, channel: str, record: bytes = b"", presence: bool = False
    ) -> None:
        """With ``broker``: tell node ``token`` of a membership change another process made
        (the Redis path writes it into the node's inbox inside GROUP_ADD/GROUP_DISCARD). For
        an add, the note goes first and the binding after it, so whatever the binding routes
        to the node arrives after the note (the node then knows the member)."""
        broker = self._state().broker
        live = self._node_is_live(self._transport(), token)
        if not await broker.send_note(token, op, group, channel, live, record=record, presence=presence):
            logger.warning("Node token %s missed a membership note for %s", token, group)
        if op == "a":
            await broker.bind_node(token, group, presence=presence)

    async def _on_pruned(self, token: str) -> None:
        """A node this process pruned (or this node, stopping): delete its broker queue."""
        try:
            await self._state().broker.delete_node_queue(token)
        except Exception as exc:  # it expires by itself (x-expires) if this fails
            logger.warning("Could not delete the broker queue of node token %s: %s", token, exc)

    def _wrap_close(self, loop: asyncio.AbstractEventLoop) -> None:
        """Close this loop's connections and node before the loop itself closes.

        ``async_to_sync`` runs each call in a fresh loop that it closes afterwards; without
        this the connections (and a node's tasks) would be destroyed while still open.
        """
        original = loop.close

        def close() -> None:
            if not loop.is_running() and not loop.is_closed():
                loop.run_until_complete(self._close_loop(loop))
            original()

        loop.close = close  # type: ignore[method-assign]

    async def _close_loop(self, loop: asyncio.AbstractEventLoop) -> None:
        node = self._node
        if node is not None and node.loop is loop:
            self._node = None
            await node.stop()
        state = self._loops.pop(loop, None)
        if state is not None:
            await state.close()

    # -- validation -----------------------------------------------------------------------

    def _encode(self, message: Any) -> bytes:
        if not isinstance(message, dict):
            raise TypeError(f"message must be a dict, not {type(message).__name__}")
        payload = self.serializer.dumps(message)
        if len(payload) > self.config.max_message_size:
            raise MessageTooLarge(
                f"message is {len(payload)} bytes encoded; max_message_size is {self.config.max_message_size}"
            )
        return payload

    def _decode(self, payload: bytes, channel: str) -> Message | None:
        try:
            return self.serializer.loads(payload)
        except SerializerError as exc:
            # Counted always, logged at most once a second: a flood is one line, not a storm.
            self.counters.corrupt += 1
            if self._corrupt_log.ready():
                logger.error(
                    "Skipping a corrupt or foreign payload for %s: %s (%d skipped so far)",
                    channel,
                    exc,
                    self.counters.corrupt,
                )
            return None

    def _check_meta(self, meta: Any) -> None:
        if meta is None:
            return
        if not isinstance(meta, dict):
            raise TypeError(f"meta must be a dict or None, not {type(meta).__name__}")
        try:
            size = len(msgpack.packb(meta, use_bin_type=True))
        except (TypeError, ValueError, OverflowError) as exc:
            raise TypeError(
                f"meta must be serializable (str keys, JSON-like values): {exc}"
            ) from exc
        if size > self.config.max_meta_size:
            raise ValueError(
                f"meta is {size} bytes encoded; max_meta_size is {self.config.max_meta_size}"
            )

    # -- channels -------------------------------------------------------------------------

    async def _ensure_node(self) -> Node:
        node = self._node
        if node is not None and not node.stopped:
            return node
        if self._node_starting is not None:
            return await asyncio.shield(self._node_starting)
        starting: asyncio.Future[Node] = asyncio.get_running_loop().create_future()
        self._node_starting = starting
        try:
            node = await self._start_node()
            self._node = node
            starting.set_result(node)
            return node
        except BaseException as exc:
            starting.set_exception(exc)
            starting.exception()  # retrieved here: callers waiting on it re-raise it themselves
            raise
        finally:
            self._node_starting = None

    async def _start_node(self) -> Node:
        """Register a node; a token Redis already knows (a 40-bit collision) is replaced."""
        for attempt in range(3):
            node = Node(
                self.config,
                self.keys,
                self.registry,
                self._transport(),
                token=self._token,
                node_id=self.node_id,
            )
            node.figures = self._figures
            node.history_rooms.history = self.history
            try:
                await node.start()
                return node
            except TokenTaken:
                if attempt == 2:
                    raise
                logger.warning("Node token %s is taken; drawing another", self._token)
                self._token = new_token()
        raise AssertionError("unreachable")  # pragma: no cover

    @staticmethod
    async def _on_node_loop(node: Node, change: Coroutine[Any, Any, T]) -> T:
        """Run a change of the node's memberships on the node's own event loop.

        ``async_to_sync`` callers (a sync view in the node's process) run on a loop of their
        own; the node's state and its Redis connections belong to the node's loop, so the
        change is handed over there and awaited (one owner, one loop, changes in order).
        """
        if asyncio.get_running_loop() is node.loop:
            return await change
        return await asyncio.wrap_future(asyncio.run_coroutine_threadsafe(change, node.loop))

    @property
    def node_id(self) -> str:
        """This process's node id (the configured one, or the generated one)."""
        if self._node is not None:
            return self._node.node_id
        return self.config.node_id or default_node_id(self._token)

    async def new_channel(self, prefix: str = "specific") -> str:
        """A new process-local channel, delivered to this process; makes this process a node."""
        if not isinstance(prefix, str) or not self.group_name_regex.match(prefix):
            raise TypeError(
                "new_channel prefix must be letters, digits, hyphens, underscores or periods"
            )
        node = await self._ensure_node()
        return node.new_channel(prefix)

    async def send(self, channel: str, message: Message) -> None:
        """Send to one channel; raises ChannelFull when the channel is known to be at capacity."""
        self.require_valid_channel_name(channel)
        payload = self._encode(message)
        token = token_of(channel)
        if token:
            node = self._node
            if node is not None and node.owns(channel):
                # Our own channel: deliver in memory, so capacity is exact and no round trip
                # is spent. FIFO per sender holds: every send() of ours to it takes this path.
                local = node.local_channel(channel)
                if local.full:
                    raise ChannelFull(channel)
                local.put(payload, time.monotonic() + self.config.expiry)
                self.counters.sent_direct += 1
                return
            await self._send_to_node(token, channel, payload)
            return
        broker = self._state().broker
        if broker is not None:
            if not await broker.send_named(channel, payload):
                raise ChannelFull(channel)
        else:
            args = [payload, self.config.capacity_for(channel), int(self.config.expiry * 1000)]
            if not await self._transport().script("send_queue", [self.keys.queue(channel)], args):
                raise ChannelFull(channel)
        self.counters.sent_named += 1

    async def _send_to_node(self, token: str, channel: str, payload: bytes) -> None:
        """A process-local channel of another node: into its inbox (or its broker queue)."""
        transport = self._transport()
        broker = self._state().broker
        if broker is None:
            keys = [self.keys.inbox(token), self.keys.full(token), self.keys.armed(token)]
            publish = "SPUBLISH" if transport.cluster else "PUBLISH"
            args = [channel, payload, INBOX_MAXLEN, self.keys.bell(token), publish]
            if not await transport.script("send_inbox", keys, args):
                raise ChannelFull(channel)
            self.counters.sent_direct += 1
            return
        # The owner marks a channel that drops in Redis, as on the Redis path.
        full_key = self.keys.full(token)
        if await transport.read(lambda c: c.sismember(full_key, channel)):
            raise ChannelFull(channel)
        if await broker.send_direct(token, channel, payload, self._node_is_live(transport, token)):
            self.counters.sent_direct += 1

    async def receive(self, channel: str) -> Message:
        """Wait for the next message on a channel; cancellation-safe, never a connection error."""
        node = self._node
        # Fast path: a channel this node made was validated when new_channel() named it.
        local = node.channels.get(channel) if node is not None and type(channel) is str else None
        if local is None:
            self.require_valid_channel_name(channel)
            if not token_of(channel):
                return await self._receive_named(channel)
            if node is None or not node.owns(channel):
                raise ValueError(f"{channel} is a process-local channel of another process")
            local = node.local_channel(channel)
        while True:
            # A message already waiting is taken without suspending (no coroutine, no future).
            item = local.take()
            if item is None:
                item = await local.get()
            shared = item[2]
            message: Message | None
            if shared is not None:
                # Decoded once for the node, and flat: a dict copy is this receiver's own.
                message = shared.copy()
            else:
                message = self._decode(item[1], channel)
                local.last_decoded = (message, item[1])
            if message is not None:
                self.counters.delivered += 1
                return message

    def received_payload(self, channel: str, message: Message) -> bytes | None:
        """The encoded payload that the last ``receive()`` on this node's ``channel``
        decoded ``message`` (this very object) from, or None.

        A message many of the node's channels receive (a presence diff) arrives as one
        payload object shared by all of them, so a consumer can key by it whatever it
        derives from the message, and derive it once per node (DistributedMixin encodes
        a diff's JSON once).
        """
        node = self._node
        local = node.channels.get(channel) if node is not None else None
        last = local.last_decoded if local is not None else None
        return last[1] if last is not None and last[0] is message else None

    async def _receive_named(self, channel: str) -> Message:
        state = self._state()
        if state.broker is not None:
            receiver = state.broker.receiver(channel)
            while True:
                message = self._decode(await receiver.get(), channel)
                if message is not None:
                    self.counters.delivered += 1
                    return message
        queue = state.queues.get(channel)
        if queue is None:
            queue = state.queues[channel] = NamedQueue(
                self.keys, state.transport, channel, self.config.expiry
            )
        while True:
            message = self._decode((await queue.get())[1], channel)
            if message is not None:
                self.counters.delivered += 1
                return message

    # -- groups ---------------------------------------------------------------------------

    async def group_add(
        self, group: str, channel: str, *, meta: Meta | None = None, presence: bool = False
    ) -> None:
        """Add a channel to a group (with optional ``meta``; ``presence`` announces it)."""
        self.require_valid_group_name(group)
        self.require_valid_channel_name(channel)
        self._check_meta(meta)
        transport = self._transport()
        node = self._node
        if node is not None and node.owns(channel):
            await self._join_own(node, group, channel, meta, presence)
            return
        node_id = await self.registry.owner_id(transport, channel)
        broker = self._state().broker
        result = await self.registry.add(
            transport, group, channel, node_id, meta, presence, notify=broker is None
        )
        if result is None:
            # A process-local channel whose node is not live (a stale or made-up name): never
            # recorded. (For our own channels: this node was pruned; its heartbeat re-adds it.)
            logger.debug("group_add of %s to %s ignored: its node is not live", channel, group)
            return
        token = token_of(channel)
        if broker is not None and not token:
            await self._bind_named(group, channel, broker, presence)
        elif broker is not None:
            await self._broker_note(token, "a", group, channel, result.record, presence)
        await self._announce(transport, group, channel, result, presence)

    async def _join_own(
        self, node: Node, group: str, channel: str, meta: Meta | None, presence: bool
    ) -> None:
        """group_add of one of this node's channels: through its membership owner."""
        if channel not in node.channels:
            # This node's token, but not a live channel of it (never issued here, or its
            # consumer is gone): a dead channel is never recorded.
            logger.debug("group_add of %s to %s ignored: not a live channel", channel, group)
            return
        # The membership owner writes it and keeps Redis in step if the write fails; the
        # node's presence owner queues the state and batches the diff.
        if not await self._on_node_loop(node, node.presence.join(group, channel, meta, presence)):
            logger.debug("group_add of %s to %s ignored: this node is not live", channel, group)
        if node.broker_queue is not None:
            # Return only once the node's queue is bound to the group, and for a presence
            # member to its presence key (whenever the node holds the membership, even
            # one Redis has yet to get back): a group_send or another member's diff
            # right after this call reaches the new member.
            bound = node.broker_queue.wait_bound(
                group, self.config.retry_timeout, presence=presence
            )
            if not await self._on_node_loop(node, bound):
                raise BrokerUnavailable(node.broker_queue.conn.address, self.config.retry_timeout)

    async def _announce(
        self, transport: Transport, group: str, channel: str, result: AddResult, presence: bool
    ) -> None:
        """presence.state to a presence member another node owns (or a normal channel),
        presence.diff to the others (this node's own channels go through its presence owner)."""
        if presence:
            state = {"type": "presence.state", "group": group, "members": result.state}
            await self.send(channel, state)
            leaves = [presence_entry(channel, result.old_presence)] if result.old_presence else []
            if (
                result.old_presence is None
                or result.old_presence.partition(b":")[2] != result.record.partition(b":")[2]
            ):
                joins = [presence_entry(channel, result.record)]
                await self.registry.send_presence(transport, group, joins, leaves, exclude=channel)
        elif result.old_presence is not None:
            await self.registry.send_presence(
                transport, group, [], [presence_entry(channel, result.old_presence)]
            )

    async def group_discard(self, group: str, channel: str) -> None:
        """Remove a channel from a group; does nothing if it is not a member."""
        self.require_valid_group_name(group)
        self.require_valid_channel_name(channel)
        node = self._node
        transport = self._transport()
        if node is not None and node.owns(channel):
            # A failed write raises, and the membership owner retries it until Redis confirms.
            await self._on_node_loop(node, node.presence.leave(group, channel))
            return
        broker = self._state().broker
        token = token_of(channel)
        if broker is not None and token:
            # The note first: should the Redis write then fail, the node no longer holds the
            # member and its reconciliation removes it from Redis (the discard completes).
            await self._broker_note(token, "d", group, channel)
        record = await self.registry.discard(transport, group, channel, notify=broker is None)
        if broker is not None and not token:
            await self._unbind_named(group, channel, broker)
        if record is not None:
            await self.registry.send_presence(
                transport, group, [], [presence_entry(channel, record)]
            )

    async def group_send(self, group: str, message: Message) -> None:
        """Send to every member of a group: one Redis round trip, encoded once, never ChannelFull."""
        self.require_valid_group_name(group)
        payload = self._encode(message)
        broker = self._state().broker
        if broker is not None:
            await self._expire_named_members(group, broker)
            # One publish and its confirm; the broker routes a copy to each bound queue.
            receivers = self._group_has_receivers(self._transport(), group)
            accepted = await broker.group_send(group, payload, receivers)
            self._count_group_send(group, 1, 0, 0 if accepted else 1)
            return
        keys, args = self.registry.group_send_args("g", group, payload)
        transport = self._transport()
        if transport.cluster:  # two round trips there (channels_distrib.cluster)
            written, queued, dropped, _ = (await self.registry.fan_out(transport, [(keys, args)]))[0]
        else:
            written, queued, dropped = await transport.script("group_send", keys, args)
        self._count_group_send(group, written, queued, dropped)

    def _count_group_send(self, group: str, written: int, queued: int, dropped: int) -> None:
        counters = self.counters
        counters.group_sends += 1
        counters.sent_group += written + queued
        if dropped:
            counters.group_dropped += int(dropped)
            if self._drop_log.ready():
                logger.warning(
                    "group_send to %s dropped %d message(s) for full channels (%d in all)",
                    group,
                    dropped,
                    counters.group_dropped,
                )

    # -- rooms with history ---------------------------------------------------------------

    async def room_send(
        self, room: str, message: Message, *, exclude: str | None = None
    ) -> str | None:
        """``group_send`` for a room: kept in the room's history when it has one.

        In the same round trip, a room with history stores the message and numbers it; every
        member then receives it with a top-level ``"offset"`` key (returned here; None when
        the room keeps no history). ``exclude`` names a channel that does not receive it.
        Raises ``ValueError`` when the message already has an ``"offset"`` key and
        ``MessageTooLarge`` past ``max_message_size`` (nothing is stored then).
        """
        self.require_valid_group_name(room)
        if exclude is not None:
            self.require_valid_channel_name(exclude)
        check_room_message(message)
        payload = self._encode(message)
        transport = self._transport()
        broker = self._state().broker
        if broker is not None:
            offset = await self._broker_room_send(broker, transport, room, payload, exclude)
            return offset
        keys, args = self.registry.group_send_args("g", room, payload, exclude or "")
        keys += self.history.keys_of(room)
        if transport.cluster:  # two round trips there (channels_distrib.cluster)
            sent = await self.registry.fan_out(transport, [(keys, args)])
            written, queued, dropped, offset = sent[0]
        else:
            written, queued, dropped, offset = await transport.script("room_send", keys, args)
        self._count_group_send(room, written, queued, dropped)
        if not offset:
            return None
        return offset.decode() if isinstance(offset, bytes) else str(offset)

    async def _broker_room_send(
        self, broker: Any, transport: Transport, room: str, payload: bytes, exclude: str | None
    ) -> str | None:
        """Over RabbitMQ: the history step in Redis (it assigns the offset), then the publish
        with the offset in its headers; two round trips. A publish that fails leaves the
        message in the history: a rejoin with ``since`` replays it (never delivered twice)."""
        await self._expire_named_members(room, broker)
        offset = await self.history.append(transport, room, payload, exclude or "")
        receivers = self._group_has_receivers(transport, room, exclude or "")
        accepted = await broker.group_send(room, payload, receivers, exclude or "", offset=offset)
        self._count_group_send(room, 1, 0, 0 if accepted else 1)
        return offset

    async def history_configure(
        self, room: str, *, count: int, ttl: float = 300.0, max_bytes: int = MIB
    ) -> str:
        """Make ``room`` keep its last ``count`` messages for ``ttl`` seconds, at most
        ``max_bytes`` (each only grows: the larger setting wins); returns its epoch."""
        self.require_valid_group_name(room)
        for name, value in (("count", count), ("max_bytes", max_bytes)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"history {name} must be a positive int, not {value!r}")
        if isinstance(ttl, bool) or not isinstance(ttl, (int, float)) or ttl <= 0:
            raise ValueError(f"history ttl must be a positive number of seconds, not {ttl!r}")
        node = self._node
        if node is not None and node.loop is asyncio.get_running_loop():
            # The node writes these settings again should Redis lose them (data loss).
            node.history_rooms.keep(room, count, float(ttl), max_bytes)
        return await self.history.configure(self._transport(), room, count, ttl, max_bytes)

    async def room_history(
        self, room: str, since: object = None, limit: int = 100
    ) -> HistoryRead:
        """The room's kept messages after offset ``since`` (or its newest, when None), at
        most ``limit`` (0: all). An unknown ``since`` gives ``known=False``, never an error."""
        self.require_valid_group_name(room)
        if isinstance(limit, bool) or not isinstance(limit, int) or limit < 0:
            raise ValueError(f"limit must be an int >= 0, not {limit!r}")
        return await self.history.read(self._transport(), room, since, limit)

    async def room_history_info(self, room: str) -> HistoryInfo | None:
        """Entries, bytes and Redis memory of the room's history (None when it keeps none)."""
        self.require_valid_group_name(room)
        return await self.history.info(self._transport(), room)

    # -- registry queries -----------------------------------------------------------------

    async def group_channels(self, group: str) -> set[str]:
        """Every member channel of the group, on all nodes."""
        self.require_valid_group_name(group)
        return await self.registry.group_channels(self._transport(), group)

    async def group_size(self, group: str) -> int:
        """The number of members of the group (O(1) in Redis)."""
        self.require_valid_group_name(group)
        return await self.registry.group_size(self._transport(), group)

    async def group_members(self, group: str) -> list[Member]:
        """The group's members with their node, meta and join time, oldest first."""
        self.require_valid_group_name(group)
        return await self.registry.group_members(self._transport(), group)

    async def channel_groups(self, channel: str) -> set[str]:
        """The groups a channel is in."""
        self.require_valid_channel_name(channel)
        return await self.registry.channel_groups(self._transport(), channel)

    async def nodes(self) -> list[NodeInfo]:
        """The live nodes, oldest first."""
        return await self.registry.nodes(self._transport())

    async def node_channels(self, node_id: str) -> set[str]:
        """A node's channels that are in any group; empty for an unknown node."""
        if not isinstance(node_id, str):
            raise TypeError("node_id must be a string")
        return await self.registry.node_channels(self._transport(), node_id)

    async def node_stats(self) -> list[NodeStats]:
        """Every live node's own figures (messages sent, delivered and dropped, connections,
        prunes...), as each node's last heartbeat published them; by node id. One round trip."""
        return await self.registry.node_stats(self._transport())

    def _figures(self) -> dict[str, Any]:
        return figures(self)

    async def prune(self) -> list[str]:
        """Remove nodes silent for longer than ``node_timeout`` now; returns their node ids."""
        return await self.registry.prune(self._transport())

    # -- shared rate limits ---------------------------------------------------------------

    async def take_tokens(self, key: str, rate: float, burst: int, cost: int = 1) -> bool:
        """Take ``cost`` tokens from the cluster-wide bucket ``key`` (refilling at ``rate``/s up
        to ``burst``); False, taking nothing, when too few are left. One round trip."""
        if not isinstance(key, str) or not self.group_name_regex.match(key) or len(key) > 200:
            raise TypeError(
                "bucket key must be 1-200 ASCII letters, digits, hyphens, underscores or periods"
            )
        if isinstance(rate, bool) or not isinstance(rate, (int, float)) or rate <= 0:
            raise ValueError(f"rate must be a positive number of tokens per second, not {rate!r}")
        if isinstance(burst, bool) or not isinstance(burst, int) or burst < 1:
            raise ValueError(f"burst must be a positive integer, not {burst!r}")
        if isinstance(cost, bool) or not isinstance(cost, int) or not 0 < cost <= burst:
            raise ValueError(f"cost must be an integer from 1 to burst ({burst}), not {cost!r}")
        taken = await self._transport().script(
            "take_tokens", [self.keys.bucket(key)], [rate, burst, cost]
        )
        return bool(taken)

    # -- flush and close ------------------------------------------------------------------

    async def flush(self) -> None:
        """Delete everything under this prefix (SCAN, never KEYS); nodes drop their local state."""
        transport = self._transport()
        epoch = secrets.token_hex(8).encode()
        node = self._node
        if node is not None:
            node.on_flush(epoch)
        for state in self._loops.values():
            for queue in state.queues.values():
                queue.buffer.clear()
        # The epoch is written first: a heartbeat that runs while the keys are deleted sees
        # it and drops its node's state, instead of taking the missing keys for data loss and
        # writing flushed memberships back. It is the one key a flush leaves, and it expires
        # once every live node has seen it.
        ttl_ms = int((self.config.node_timeout * 10 + 60) * 1000)
        await transport.run(lambda c: c.set(self.keys.flush, epoch, px=ttl_ms))
        broker = self._state().broker
        if broker is not None:
            await self._flush_broker(broker)
        epoch_key = self.keys.flush.encode()

        async def delete_all(client: Any) -> None:
            batch: list[bytes] = []
            async for key in client.scan_iter(match=self.keys.scan_pattern(), count=1000):
                # "p:{*" never matches a prefix "p:q"'s keys, but owns() is the rule.
                if self.keys.owns(key) and key != epoch_key:
                    batch.append(key)
                if len(batch) >= 500:
                    await client.unlink(*batch)
                    batch = []
            if batch:
                await client.unlink(*batch)

        await transport.run(delete_all)

    async def _flush_broker(self, broker: Any) -> None:
        """Delete the queues and exchanges this prefix declared (names kept in Redis)."""
        key = self.keys.broker_names
        declared = await self._transport().read(lambda c: c.smembers(key))
        await broker.delete_all(sorted(n.decode() if isinstance(n, bytes) else n for n in declared))
        self._remembered.clear()
        for state in self._loops.values():
            if state.broker is not None:
                state.broker.conn.declared.clear()
        node = self._node
        if node is not None and node.broker_queue is not None:
            node.loop.call_soon_threadsafe(node.broker_queue.on_flush)

    async def close(self) -> None:
        """Stop this process's node (removing it and its memberships) and close connections."""
        node, self._node = self._node, None
        loop = asyncio.get_running_loop()
        if node is not None:
            if node.loop is loop:
                await node.stop()
            elif node.loop.is_running():
                # The node lives on another thread's loop: stop it there and wait.
                await asyncio.wrap_future(asyncio.run_coroutine_threadsafe(node.stop(), node.loop))
        state = self._loops.pop(loop, None)
        if state is not None:
            await state.close()

    async def close_pools(self) -> None:
        """The same as :meth:`close`, for code written for channels_redis."""
        await self.close()


__all__ = ["DistributedChannelLayer"]
