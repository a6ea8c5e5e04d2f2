"""Shared plumbing of the ``distrib_*`` management commands (not a command itself).

Each command builds its own layer instance from ``CHANNEL_LAYERS`` (so it never
touches a layer the process may already use), runs one coroutine on one event loop,
and closes the layer. A Redis that cannot be reached becomes a ``CommandError``:
Django prints it as one line on stderr and exits with status 1, without a traceback.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from typing import Any, TypeVar

from asgiref.sync import async_to_sync
from channels.layers import channel_layers
from django.conf import settings
from django.core.management.base import BaseCommand, CommandError, CommandParser

from channels_distrib.masking import describe_host, scrub

T = TypeVar("T")

# redis-py's errors are imported lazily so the module imports without Redis installed.
_UNREACHABLE: tuple[type[BaseException], ...] = (OSError, asyncio.TimeoutError)


def _unreachable_errors() -> tuple[type[BaseException], ...]:
    import redis.exceptions

    from channels_distrib.exceptions import RedisUnavailable

    return (
        *_UNREACHABLE,
        redis.exceptions.ConnectionError,
        redis.exceptions.TimeoutError,
        RedisUnavailable,
    )


def describe_hosts(alias: str) -> str:
    """The configured Redis hosts of ``alias`` as one string, passwords masked."""
    config: dict[str, Any] = settings.CHANNEL_LAYERS.get(alias, {}).get("CONFIG", {}) or {}
    hosts = config.get("hosts") or ["redis://localhost:6379"]
    return ", ".join(describe_host(host) for host in hosts)


@contextmanager
def _quiet_library_logs() -> Iterator[None]:
    """Keep the layer's reconnect warnings out of a command's one-line error."""
    library = logging.getLogger("channels_distrib")
    previous = library.level
    library.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        library.setLevel(previous)


class LayerCommand(BaseCommand):
    """A command that runs one coroutine against a fresh instance of a configured layer."""

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument(
            "--layer", default="default", help="CHANNEL_LAYERS alias (default: default)."
        )
        parser.add_argument(
            "--timeout",
            type=float,
            default=10.0,
            help="Seconds to wait for Redis before giving up (default: 10; the layer's own "
            "retry_timeout, 5 s by default, usually ends the wait first).",
        )

    def run_on_layer(self, alias: str, timeout: float, work: Callable[[Any], Awaitable[T]]) -> T:
        if alias not in settings.CHANNEL_LAYERS:
            raise CommandError(f"No channel layer {alias!r} in CHANNEL_LAYERS.")
        layer = channel_layers.make_backend(alias)
        if "registry" not in getattr(layer, "extensions", ()):
            raise CommandError(
                f"CHANNEL_LAYERS[{alias!r}] is {type(layer).__module__}.{type(layer).__name__}; "
                "these commands need channels_distrib.layers.DistributedChannelLayer."
            )

        async def run() -> T:
            try:
                return await asyncio.wait_for(work(layer), timeout)
            finally:
                await layer.close()

        started = time.monotonic()
        with _quiet_library_logs():
            try:
                return async_to_sync(run)()
            except _unreachable_errors() as exc:
                waited = time.monotonic() - started
                raise CommandError(
                    f"Cannot reach Redis at {describe_hosts(alias)} "
                    f"(gave up after {waited:.0f} s): {scrub(_root_cause(exc))}"
                ) from None


def _root_cause(exc: BaseException) -> str:
    """The first line of the innermost exception's message ("timed out" if it has none)."""
    seen: set[int] = set()
    while id(exc) not in seen:
        seen.add(id(exc))
        inner = exc.__cause__ or exc.__context__
        if inner is None or not str(inner).strip():
            break
        exc = inner
    text = str(exc).strip()
    return text.splitlines()[0] if text else "timed out"
