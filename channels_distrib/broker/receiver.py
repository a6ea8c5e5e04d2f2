"""Receiving from a normal channel's queue: taken only while a receive() waits, at most once.

A consumer with acknowledgements could hand a message out twice (the broker re-queues what
was delivered but whose ack was lost with the connection), and a consumer without them takes
messages nobody waits for. So messages are fetched one at a time with ``basic.get`` in
auto-ack mode, by one task per channel and event loop, and only while a receive waits: the
broker removes a message in the same step that hands it out, so a connection lost meanwhile
can lose that one message but never deliver it twice. The fetch runs in the task, not in the
receive, so a cancelled receive never abandons a fetched message: it lands in the buffer for
the next receive. An empty queue is polled again after a short wait (1 ms doubling to
:data:`POLL_MAX`), the price of never taking a message without a receiver for it.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import TYPE_CHECKING, Any

from pamqp.commands import Basic

from ..local import LocalChannel
from ..transport import backoff

if TYPE_CHECKING:
    from .client import BrokerClient

logger = logging.getLogger(__name__)

#: Longest wait between two polls of an empty queue (s).
POLL_MAX = 0.02
#: How long close() lets an in-flight fetch finish before cancelling it (s).
FINISH_GRACE = 0.5


class NamedReceiver:
    """One normal channel's receiving side on one event loop; owns its fetching task."""

    def __init__(self, client: BrokerClient, channel: str) -> None:
        self.client = client
        self.channel = channel
        self.buffer = LocalChannel(channel, 1 << 30)
        self._task: asyncio.Task[None] | None = None
        self._stopping = False

    async def get(self) -> bytes:
        """The next payload; cancellation-safe (a fetched message waits in the buffer)."""
        if not self.buffer.items and (self._task is None or self._task.done()):
            self._task = asyncio.get_running_loop().create_task(
                self._fetch_loop(), name=f"channels_distrib.broker.get.{self.channel}"
            )
        return (await self.buffer.get())[1]

    async def _fetch_loop(self) -> None:
        """Fetch while a receive waits and nothing is buffered for it; back off when empty."""
        pause = 0.001
        attempt = 0
        while self.buffer.waiters and not self.buffer.items and not self._stopping:
            try:
                got = await self._fetch_one()
                attempt = 0
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                attempt += 1
                if attempt in (1, 10):
                    logger.warning("Receive on %s lost RabbitMQ (%s); retrying", self.channel, exc)
                await asyncio.sleep(backoff(attempt))
                continue
            if got:
                pause = 0.001
            else:
                await asyncio.sleep(pause)
                pause = min(pause * 2, POLL_MAX)

    async def _fetch_one(self) -> bool:
        queue = await self.client.declare_named(self.channel)
        channel = await self.client.conn.channel()
        try:
            # Bounded: a hung broker fails the fetch (retried on a new connection) rather
            # than hold it; a message it had already handed out is lost, never doubled.
            message = await self.client.conn.bounded(
                channel.basic_get(queue, no_ack=True), "a basic.get"
            )
        except Exception:
            self.client.conn.forget(channel)
            raise
        if not isinstance(message.delivery, Basic.GetOk):
            return False
        if self._excluded(message.header.properties.headers):
            return True  # a presence diff about this channel's own join: it got its state
        # The broker drops expired messages itself (per-message TTL = expiry); what it hands
        # out waits here at most ``expiry`` more.
        self.buffer.put(message.body, time.monotonic() + self.client.config.expiry)
        return True

    def _excluded(self, headers: dict[str, Any] | None) -> bool:
        """A presence diff (header ``p``) whose joiners (``x``, space-separated) include this
        channel, as the node queue's fan-out skips them."""
        if not headers or "p" not in headers:
            return False
        exclude = headers.get("x", b"")
        text = exclude.decode() if isinstance(exclude, bytes) else str(exclude)
        return self.channel in text.split(" ")

    async def close(self) -> None:
        """Stop fetching; messages fetched for receives that were cancelled go back to the
        queue (at its tail: the one place AMQP can put them), so none is lost."""
        self._stopping = True
        task, self._task = self._task, None
        if task is not None and not task.done():
            await asyncio.wait({task}, timeout=FINISH_GRACE)
            if not task.done():
                task.cancel()
                await asyncio.wait({task}, timeout=FINISH_GRACE)
        now = time.monotonic()
        left = [payload for expires, payload, _shared in self.buffer.items if expires > now]
        self.buffer.clear()
        for payload in left:
            try:
                await self.client.send_named(self.channel, payload)
            except Exception as exc:  # the broker is gone: nothing more can be done
                logger.warning("Could not return a message to %s: %s", self.channel, exc)
                return


__all__ = ["NamedReceiver"]
