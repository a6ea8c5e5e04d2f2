"""Background tasks that end when they are told to, whatever the Redis client does.

Two tools: :func:`cancellable` for the Redis calls inside a loop, and :func:`cancel_and_wait`
for the owner that stops the loops.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import TypeVar

logger = logging.getLogger(__name__)

T = TypeVar("T")

#: How long a cancelled call may take to unwind before its connection is closed under it (s).
UNWIND = 0.4


async def cancellable(
    call: Callable[[], Awaitable[T]], on_stuck: Callable[[], Awaitable[None]] | None = None
) -> T:
    """Await ``call()`` so that a cancellation of the caller is never lost.

    redis-py can swallow a cancellation: one that lands while it writes a command can vanish
    in ``asyncio.wait_for`` on Python 3.11, and one racing its own read timeout comes back as
    ``TimeoutError``. A loop that then carries on would block in the next read, and an event
    loop shutting down (``asyncio.run``, pytest-asyncio's teardown: each cancels once) would
    wait for it forever. So the call runs in a child task and the caller waits through a
    shield: the caller's cancellation always reaches the caller. The child is cancelled too,
    given :data:`UNWIND` seconds, then ``on_stuck`` (closing the connection under it) ends it.
    ``call`` is a factory, so a child cancelled before it ever ran leaves no coroutine behind.
    """

    async def run() -> T:
        return await call()

    child = asyncio.ensure_future(run())
    try:
        return await asyncio.shield(child)
    except asyncio.CancelledError:
        child.cancel()
        await _unwind(child, on_stuck)
        raise


async def _unwind(child: asyncio.Future[T], on_stuck: Callable[[], Awaitable[None]] | None) -> None:
    try:
        await asyncio.wait({child}, timeout=UNWIND)
        if not child.done() and on_stuck is not None:
            await on_stuck()
            await asyncio.wait({child}, timeout=UNWIND)
    finally:
        if child.done():
            _retrieve(child)
        else:
            child.add_done_callback(_retrieve)


def _retrieve(future: asyncio.Future[T]) -> None:
    """Mark a child's outcome as seen: its caller has gone, and so has any interest in it."""
    if not future.cancelled():
        future.exception()


async def cancel_and_wait(tasks: list[asyncio.Task[None]]) -> None:
    """Cancel tasks and wait until they are done, cancelling again if one swallowed it."""
    pending = [task for task in tasks if not task.done()]
    while pending:
        for task in pending:
            task.cancel()
        _done, still = await asyncio.wait(pending, timeout=0.5)
        pending = list(still)
    for task in tasks:
        if not task.cancelled() and task.exception() is not None:
            logger.error("Task %s ended with an error", task.get_name(), exc_info=task.exception())


__all__ = ["cancel_and_wait", "cancellable"]
