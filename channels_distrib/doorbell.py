"""A node's inbox doorbell: the pub/sub message an idle inbox reader waits for.

A reader that found its inbox empty arms itself (ARM_INBOX, :mod:`channels_distrib.scripts`)
and waits here rather than in ``XREAD BLOCK``; the next script that appends to the inbox
deletes the mark and publishes on the node's bell channel. Redis writes a script's own reply
before the bells it published, where an ``XREAD BLOCK`` it unblocked was answered first (the
woken nodes then took the CPU the sender was waiting for). A reader that keeps finding entries
never arms, so under load no bell is rung at all.

The subscription has a connection of its own, to the master that owns the inbox's slot (a
shard channel, ``SSUBSCRIBE``, on a cluster). A bell published while it is down is lost, so
the reader reads (and arms) only after the subscription is confirmed; and whatever happens to
it, the reader's wait ends after a safety timeout and reads anyway.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

from redis.asyncio import Redis
from redis.asyncio.client import PubSub
from redis.exceptions import NoPermissionError

from .tasks import cancellable
from .transport import BLOCK_SECONDS, Transport

logger = logging.getLogger(__name__)

#: After a failed subscribe, how long the reader waits in ``XREAD BLOCK`` before trying again (s).
RETRY_SECONDS = 1.0

_BELLS = ("message", "smessage")
_DROPPED = ("unsubscribe", "sunsubscribe")  # by the server: the slot moved to another master


class Doorbell:
    """One node's bell subscription: :meth:`ready` before arming, then :meth:`wait`."""

    def __init__(self, transport: Transport, inbox: str, channel: str) -> None:
        self.transport = transport
        self.inbox = inbox  # the subscription goes to the master of this key's slot
        self.channel = channel
        self.sharded = transport.cluster
        self.refused = False  # the ACL user may not subscribe: the reader never arms
        self.rings = 0  # bells heard (tests, and an eye on how often a reader arms)
        self._client: Redis | None = None
        self._pubsub: PubSub | None = None
        self._retry_at = 0.0

    async def ready(self) -> bool:
        """Whether the subscription is up, subscribing first when it is not (its confirmation
        read, so a bell published after this returns True reaches :meth:`wait`). False when
        it cannot be had now; the reader then waits in ``XREAD BLOCK`` as it did without one.
        """
        if self._pubsub is not None:
            return True
        if self.refused or time.monotonic() < self._retry_at:
            return False
        try:
            await cancellable(self._subscribe, on_stuck=self._cut)
            return True
        except asyncio.CancelledError:
            raise  # the reader's run() closes the subscription on its way out
        except Exception as exc:
            await self.close()
            self._retry_at = time.monotonic() + RETRY_SECONDS
            if isinstance(exc, NoPermissionError):
                self.refused = True
                logger.warning(
                    "Inbox doorbell refused (%s): the inbox reader waits in XREAD BLOCK; "
                    "allow the layer's user its prefix's channels (&<prefix>:*)",
                    exc,
                )
            else:
                logger.debug("Inbox doorbell subscribe failed: %s", exc)
            return False

    async def _subscribe(self) -> None:
        self._client = client = await self.transport.connection_for(self.inbox)
        self._pubsub = pubsub = client.pubsub()
        if self.sharded:
            await pubsub.ssubscribe(self.channel)
        else:
            await pubsub.subscribe(self.channel)
        reply = await pubsub.get_message(timeout=BLOCK_SECONDS)
        if reply is None or reply["type"] not in ("subscribe", "ssubscribe"):
            raise ConnectionError(f"no subscribe confirmation from Redis ({reply!r})")

    async def wait(self, timeout: float) -> bytes | None:
        """Wait for the bell, at most ``timeout`` seconds; what it carried when it rang (see
        scripts._BELL), else None. A failure (the
        connection lost, or the server ended the subscription) closes the subscription and
        returns None at once: the next :meth:`ready` makes a new one, and the reader reads
        in between, so a bell lost meanwhile costs nothing."""
        pubsub = self._pubsub
        if pubsub is None:
            return None
        deadline = time.monotonic() + timeout
        try:
            while (left := deadline - time.monotonic()) > 0:
                reply: Any = await cancellable(
                    lambda: pubsub.get_message(timeout=left), on_stuck=self._cut
                )
                if reply is None:
                    continue  # within a read's timeout, nothing: the loop checks the deadline
                if reply["type"] in _BELLS:
                    self.rings += 1
                    return bytes(reply["data"])
                if reply["type"] in _DROPPED:
                    await self.close()
                    return None
            return None
        except asyncio.CancelledError:
            raise  # the reader's run() closes the subscription on its way out
        except Exception as exc:
            logger.debug("Inbox doorbell lost: %s", exc)
            await self.close()
            return None

    async def _cut(self) -> None:
        """Close the subscription's connection under a call stuck in it (see cancellable)."""
        pubsub = self._pubsub
        if pubsub is not None and pubsub.connection is not None:
            await pubsub.connection.disconnect(nowait=True)

    async def close(self) -> None:
        """Drop the subscription and its connection; safe to call twice."""
        pubsub, client = self._pubsub, self._client
        self._pubsub = self._client = None
        try:
            if pubsub is not None:
                await pubsub.aclose()  # type: ignore[no-untyped-call, unused-ignore]
        finally:
            if client is not None:
                await client.aclose()


__all__ = ["Doorbell"]
