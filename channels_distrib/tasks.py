"""Stopping background tasks for good."""

from __future__ import annotations

import asyncio
import logging

logger = logging.getLogger(__name__)


async def cancel_and_wait(tasks: list[asyncio.Task[None]]) -> None:
    """Cancel tasks and wait until they are done, cancelling again if one swallowed it.

    redis-py turns a cancellation that races its own read timeout into a TimeoutError, which
    a reconnecting loop would treat as a network error; so cancel until the task is done
    (the loops also check their owner's ``stopped`` flag after each Redis call).
    """
    pending = [task for task in tasks if not task.done()]
    while pending:
        for task in pending:
            task.cancel()
        _done, still = await asyncio.wait(pending, timeout=0.5)
        pending = list(still)
    for task in tasks:
        if not task.cancelled() and task.exception() is not None:
            logger.error("Task %s ended with an error", task.get_name(), exc_info=task.exception())
