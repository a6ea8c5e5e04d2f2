"""Per-channel local queues of a node: where inbox entries wait for ``receive()``.

An item is ``(expires, payload, shared)``. A group message fanned out to many local channels
is one item, appended to each of their queues: ``shared`` is the message decoded once for the
node when a shallow copy of it is a full copy (every value a str, bytes, number, bool or None;
see :func:`flat`), so each receiver gets its own copy for the price of a dict copy. Otherwise
``shared`` is None and each receiver decodes the payload itself (nested values are never
shared between consumers, so one consumer changing its message cannot change another's).
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Callable
from time import monotonic
from typing import Any

#: One queued message: (expires at, monotonic s; encoded payload; decoded message or None).
Item = tuple[float, bytes, "dict[str, Any] | None"]

#: Value types a shallow copy of a message duplicates in full (immutable ones).
_FLAT = frozenset({str, bytes, int, float, bool, type(None)})

#: A channel counts as "receiving" while a receive() is pending or ended this recently (s).
RECEIVING_GRACE = 1.0


def _wake(future: asyncio.Future[None]) -> None:
    """Resolve a waiter from whatever loop or thread the caller is on."""
    loop = future.get_loop()
    try:
        running = asyncio.get_running_loop()
    except RuntimeError:
        running = None
    if running is loop:
        if not future.done():
            future.set_result(None)
    else:

        def resolve() -> None:
            if not future.done():
                future.set_result(None)

        loop.call_soon_threadsafe(resolve)


def flat(message: dict[str, Any]) -> bool:
    """Whether a shallow copy of ``message`` shares nothing mutable with it."""
    return _FLAT.issuperset(map(type, message.values()))


class LocalChannel:
    """The messages waiting for one process-local channel, and who is waiting for them."""

    __slots__ = (
        "name",
        "capacity",
        "items",
        "waiters",
        "pending",
        "last_active",
        "expired",
        "created",
        "creator",
        "deferred",
        "on_room",
        "last_decoded",
    )

    def __init__(
        self, name: str, capacity: int, creator: asyncio.Task[object] | None = None
    ) -> None:
        self.name = name
        self.capacity = capacity
        self.items: deque[Item] = deque()
        self.waiters: deque[asyncio.Future[None]] = deque()
        self.pending = 0
        self.created = time.monotonic()
        # Never received yet: not "receiving", so a channel nobody reads never paces the node.
        self.last_active = self.created - RECEIVING_GRACE
        self.expired = 0
        # The task that called new_channel(): while it runs, the channel is alive.
        self.creator = creator
        # Inbox entry ids of messages past capacity, waiting in Redis (the node's inbox stream)
        # until the consumer has room again; FIFO: while any wait, new ones wait behind them.
        self.deferred: deque[bytes] = deque()
        self.on_room: Callable[[LocalChannel], None] | None = None  # set by the inbox reader
        # The message the last receive() decoded on its own, and the payload it came from
        # (see DistributedChannelLayer.received_payload).
        self.last_decoded: tuple[dict[str, Any] | None, bytes] | None = None

    @property
    def full(self) -> bool:
        return len(self.items) >= self.capacity

    def receiving(self, now: float) -> bool:
        """True while a consumer is taking messages: a receive is pending or just returned."""
        return self.pending > 0 or now - self.last_active < RECEIVING_GRACE

    def dead(self, now: float, grace: float) -> bool:
        """Its consumer is gone: the creating task ended and nobody has received for ``grace`` s.

        A consumer that is alive but busy (a handler waiting a minute on a slow API) is not
        dead: its task still runs. A channel made in a short helper task stays alive while
        another task keeps receiving on it.
        """
        creator = self.creator
        if creator is not None and not creator.done():
            return False
        return self.pending == 0 and now - self.last_active > grace

    def put(self, payload: bytes, expires: float) -> None:
        """Queue one payload (the caller has checked capacity) and wake one waiting receive."""
        self.items.append((expires, payload, None))
        if self.waiters:
            self.wake_one()

    def put_item(self, item: Item) -> None:
        """Queue an item that may also sit in other channels' queues (one group message)."""
        self.items.append(item)
        if self.waiters:
            self.wake_one()

    def wake_one(self) -> None:
        """Wake the first receive still waiting (one item was queued for it)."""
        waiters = self.waiters
        while waiters:
            waiter = waiters.popleft()
            if not waiter.done():
                _wake(waiter)
                return

    def purge_expired(self, now: float) -> None:
        """Drop expired payloads from the head, counting them as expired unconsumed."""
        while self.items and self.items[0][0] <= now:
            self.items.popleft()
            self.expired += 1

    def take(self) -> Item | None:
        """The next unexpired item, taken off the queue; None when none is waiting."""
        items = self.items
        while items:
            item = items.popleft()
            now = monotonic()
            if item[0] <= now:
                self.expired += 1
                continue
            self.last_active = now
            if self.deferred and self.on_room is not None and len(items) <= self.capacity // 2:
                self.on_room(self)  # bring deferred messages back from Redis
            return item
        return None

    async def get(self) -> Item:
        """Wait for the next unexpired item.

        Cancellation-safe: an item is taken off the queue only in the same step that
        returns it, so a receive cancelled while waiting leaves every item queued.
        """
        items = self.items
        while True:
            item = self.take()
            if item is not None:
                return item
            waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
            self.waiters.append(waiter)
            self.pending += 1
            try:
                await waiter
            except BaseException as exc:
                self.pending -= 1
                self.last_active = monotonic()
                if not isinstance(exc, asyncio.CancelledError):
                    raise
                if waiter.cancelled():
                    try:
                        self.waiters.remove(waiter)  # still queued: put() never reached it
                    except ValueError:
                        pass
                elif items:
                    # Woken, then cancelled before running: pass the wake-up on, or another
                    # receiver of this channel would sleep on a non-empty queue.
                    self.wake_one()
                raise
            # Woken: the take() this loop runs next stamps last_active when it returns an
            # item; until then pending covers the gap (no await in between, nobody looks).
            self.pending -= 1

    def clear(self) -> None:
        self.items.clear()
        self.deferred.clear()
