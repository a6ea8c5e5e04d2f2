"""Receiving from normal channels (shared queues): each message to at most one receiver.

A blocking pop cancelled mid-flight is the classic way to lose a message: the server pops it,
the client never reads the reply. Here the pop moves the item into a per-receiver
"in flight" list (``BLMOVE``), and the item leaves that list only once it is in this
process's buffer; a cancelled or failed pop puts whatever is in flight back at the head of
the queue, after making sure the abandoned ``BLMOVE`` can no longer fire (``CLIENT
UNBLOCK``). The in-flight list holds a placeholder and has a TTL the receiver renews, so a
receiver that dies between a pop and its acknowledgement leaves no key behind for good.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import secrets
import time
from dataclasses import dataclass
from typing import Any

from redis.asyncio import Redis

from .keys import Keys
from .local import Item, LocalChannel
from .tasks import cancel_and_wait, cancellable
from .transport import BLOCK_SECONDS, Transport, backoff

logger = logging.getLogger(__name__)

#: TTL of an in-flight list (ms), renewed by its receiver at least every BLOCK_SECONDS.
INFLIGHT_TTL_MS = 30_000


@dataclass
class _Run:
    """One popping run's state: its in-flight list, its own connection, and the item that is
    in the buffer but not yet acknowledged (removed from the in-flight list)."""

    inflight: str
    conn: Redis
    delivered: bytes | None = None
    client_id: int | None = None  # of ``conn``, for CLIENT UNBLOCK when a pop is abandoned


class NamedQueue:
    """One normal channel's receiving side on one event loop; owns its popping task."""

    def __init__(self, keys: Keys, transport: Transport, channel: str, expiry: float) -> None:
        self.channel = channel
        self.transport = transport
        self.keys = keys
        self.key = keys.queue(channel)
        self.expiry_ms = int(expiry * 1000)
        self.buffer = LocalChannel(channel, 1 << 30)
        self.popping: asyncio.Task[None] | None = None  # the run currently popping
        self.runs: set[asyncio.Task[None]] = set()  # every run not finished yet

    async def get(self) -> Item:
        """The next item (see :mod:`channels_distrib.local`); a cancelled get stops the popping when nobody else waits here."""
        if not self.buffer.items and self.popping is None:
            # Earlier runs may still be putting back what they had in flight: the new run
            # waits for them first, so the queue's order is kept.
            run = asyncio.get_running_loop().create_task(
                self._pop_loop(list(self.runs)), name=f"channels_distrib.pop.{self.channel}"
            )
            self.popping = run
            self.runs.add(run)
            run.add_done_callback(self.runs.discard)
        try:
            return await self.buffer.get()
        except asyncio.CancelledError:
            if not self.buffer.waiters and self.popping is not None:
                # Nobody here wants messages any more: stop taking them from other receivers.
                run, self.popping = self.popping, None
                run.cancel()
            raise

    async def close(self) -> None:
        self.popping = None
        await cancel_and_wait(list(self.runs))

    async def _pop_loop(self, previous: list[asyncio.Task[None]]) -> None:
        """Move items into the buffer while a receive waits; restore anything abandoned.

        Each run has its own in-flight list, so a run's clean-up never touches another's.
        """
        inflight = self.keys.inflight(self.channel, secrets.token_hex(4))
        if previous:
            await asyncio.wait(previous)
        run = _Run(inflight, await self.transport.connection_for(self.key))
        clean = False
        try:
            if not self.transport.clock_synced:
                await self.transport.sync_clock()
            await self.transport.script("inflight_open", [inflight], [INFLIGHT_TTL_MS])
            attempt = 0
            # Pop only while a receive here is unserved: never take what others could receive.
            while self.buffer.waiters:
                try:
                    await self._pop_one(run)
                    attempt = 0
                except asyncio.CancelledError:
                    raise
                except Exception as exc:
                    attempt = await self._reconnect(run, exc, attempt + 1)
            clean = True  # every item moved was delivered and acknowledged
        finally:
            if self.popping is asyncio.current_task():
                self.popping = None  # from here on a new receive starts a new run
            await self._finish_whole(run, clean)

    async def _pop_one(self, run: _Run) -> None:
        """One blocking move into the in-flight list; a moved item is delivered, then acked."""
        conn = run.conn
        if run.client_id is None:
            run.client_id = int(await conn.client_id())

        async def cut() -> None:
            if conn.connection is not None:
                await conn.connection.disconnect()

        item = await cancellable(
            functools.partial(conn.blmove, self.key, run.inflight, int(BLOCK_SECONDS), "LEFT", "RIGHT"),
            on_stuck=cut,
        )
        if item is None:
            await self.transport.run(lambda c: c.pexpire(run.inflight, INFLIGHT_TTL_MS))
            return
        run.delivered = item if isinstance(item, bytes) else item.encode()
        self._deliver(run.delivered)
        await self.transport.script("inflight_ack", [run.inflight], [INFLIGHT_TTL_MS])
        run.delivered = None

    async def _reconnect(self, run: _Run, exc: Exception, attempt: int) -> int:
        """Redis failed mid-run: put back what is in flight, then a new connection."""
        if attempt == 1:
            self.transport.counters.reconnects += 1
        if attempt in (1, 10):
            logger.warning("Receive on %s lost Redis (%s); reconnecting", self.channel, exc)
        # Until the restore is known to have run, remember what was delivered: restoring
        # later without it would hand that message out again.
        while not await self._restore(run.inflight, run.delivered, run.client_id, reopen=True):
            attempt += 1
            await asyncio.sleep(backoff(attempt))
        run.delivered, run.client_id = None, None
        await run.conn.aclose()
        run.conn = await self.transport.connection_for(self.key)  # see Transport.own_connection
        await asyncio.sleep(backoff(attempt))
        return attempt

    async def _finish_whole(self, run: _Run, clean: bool) -> None:
        """The run's clean-up, on cancellation too. Further cancels (several receivers giving
        up at once) must not cut it short: it finishes, then the cancellation goes on."""
        abandoned = None if clean else (run.delivered, run.client_id)
        finish = asyncio.ensure_future(self._finish(run.conn, run.inflight, abandoned))
        cancelled = False
        while not finish.done():
            try:
                await asyncio.shield(finish)
            except asyncio.CancelledError:
                cancelled = True
        if cancelled and not finish.cancelled():
            raise asyncio.CancelledError

    async def _finish(
        self, conn: Redis, inflight: str, abandoned: tuple[bytes | None, int | None] | None
    ) -> None:
        try:
            if abandoned is not None:
                for attempt in range(1, 6):  # a few tries, then give up: we are stopping
                    if await self._restore(inflight, *abandoned):
                        break
                    await asyncio.sleep(backoff(attempt))
        finally:
            await conn.aclose()

    def _deliver(self, item: bytes) -> None:
        stamp, _, payload = item.partition(b":")
        try:
            expires_at = int(stamp) / 1000.0  # Redis time
        except ValueError:
            logger.error("Skipping a malformed item in %s", self.key)
            return
        remaining = expires_at - (time.time() + self.transport.clock_offset)
        if remaining > 0:
            self.buffer.put(payload, time.monotonic() + remaining)

    async def _restore(
        self,
        inflight: str,
        delivered: bytes | None,
        client_id: int | None,
        *,
        reopen: bool = False,
    ) -> bool:
        """Put in-flight items back at the head of the queue (except the one delivered).

        Idempotent (the script empties the in-flight list), so a failed attempt may simply be
        repeated; returns whether it is known to have run.
        """
        try:
            if client_id is not None:
                # The abandoned BLMOVE must not move another item after we looked.
                blocked = client_id
                await self.transport.run(lambda c: c.client_unblock(blocked))
            args: list[Any] = [
                delivered if delivered is not None else b"",
                self.expiry_ms,
                INFLIGHT_TTL_MS if reopen else "",
            ]
            await self.transport.script("restore_inflight", [inflight, self.key], args)
            return True
        except asyncio.CancelledError:
            raise
        except Exception:
            logger.warning(
                "Could not restore in-flight messages of %s", self.channel, exc_info=True
            )
            return False
