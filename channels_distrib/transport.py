"""Redis connections for one event loop, and the rule for when a command may be retried.

At most once: a command is retried only when it provably never reached Redis, which here
means the connection could not be established (redis-py's own retries are switched off).
A failure after the command was written raises, because it may have run.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

from redis.asyncio import Redis
from redis.asyncio.connection import (
    AbstractConnection,
    Connection,
    ConnectionPool,
    SSLConnection,
    UnixDomainSocketConnection,
)
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import AuthenticationError
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from .config import HostConfig
from .exceptions import RedisUnavailable
from .scripts import ALL as SCRIPT_SOURCES
from .stats import Counters

try:  # redis-py >= 7
    from redis.maint_notifications import MaintNotificationsConfig
except ImportError:  # pragma: no cover - older redis-py has no maintenance notifications
    MaintNotificationsConfig = None  # type: ignore[assignment,misc]

logger = logging.getLogger(__name__)

T = TypeVar("T")

#: Idle time after which a command first lets the event loop notice closed connections (s).
IDLE_CHECK = 0.001

#: The longest wait between two attempts to open a connection while Redis is unreachable (s).
RECONNECT_CAP = 0.25

#: How long a blocking read (XREAD/BLPOP) waits server-side before coming back empty.
BLOCK_SECONDS = 2.0


class NotConnected(RedisConnectionError):
    """The connection could not be opened: the command was never written, so a retry is safe."""


class CredentialsRejected(RedisConnectionError):
    """Redis refused the password or ACL user while connecting: retrying cannot help, so the
    command fails at once instead of after ``retry_timeout``; it was never written."""


def _connect_failure(exc: Exception) -> RedisConnectionError:
    if isinstance(exc, AuthenticationError):
        return CredentialsRejected(str(exc))
    return NotConnected(str(exc))


class _MarksConnectFailures:
    """Mixin for redis-py connection classes: failures while connecting raise NotConnected.

    Both entry points are wrapped: ``connect()`` (the pool's, which behind Sentinel first asks
    the sentinels for the master and raises MasterNotFoundError while there is none) and
    ``connect_check_health()`` (what a command on a disconnected connection calls).
    """

    async def connect(self, *args: Any, **kwargs: Any) -> None:
        try:
            await super().connect(*args, **kwargs)  # type: ignore[misc]
        except asyncio.CancelledError:
            raise
        except (NotConnected, CredentialsRejected):
            raise
        except (RedisConnectionError, RedisTimeoutError, OSError) as exc:
            raise _connect_failure(exc) from exc

    async def connect_check_health(self, *args: Any, **kwargs: Any) -> None:
        try:
            await super().connect_check_health(*args, **kwargs)  # type: ignore[misc]
        except asyncio.CancelledError:
            raise
        except (NotConnected, CredentialsRejected):
            raise
        except (RedisConnectionError, RedisTimeoutError, OSError) as exc:
            raise _connect_failure(exc) from exc


class _TcpConnection(_MarksConnectFailures, Connection):
    pass


class _SslConnection(_MarksConnectFailures, SSLConnection):
    pass


class _UnixConnection(_MarksConnectFailures, UnixDomainSocketConnection):
    pass


def _connection_class(url: str) -> type[AbstractConnection]:
    if url.startswith("rediss://"):
        return _SslConnection
    if url.startswith("unix://"):
        return _UnixConnection
    return _TcpConnection


def make_client(
    host: HostConfig, *, client_name: str, socket_timeout: float | None
) -> tuple[Redis, list[Redis]]:
    """A redis.asyncio client for ``host`` (redis-py retries off, our connect marker on).

    Also returns the clients of the sentinels behind it, which the owner must close too.
    """
    options: dict[str, Any] = {
        "client_name": client_name,
        "socket_timeout": socket_timeout,
        "socket_connect_timeout": 2.0,
        "socket_keepalive": True,
        "retry": Retry(NoBackoff(), 0),
        "health_check_interval": 0,
    }
    if MaintNotificationsConfig is not None:
        # With maintenance notifications on ("auto"), redis-py skips its check that a pooled
        # connection is still open, and a killed connection fails the next command.
        options["maint_notifications_config"] = MaintNotificationsConfig(enabled=False)
    if host.url is not None and host.url.startswith("unix://"):
        del options["socket_keepalive"]  # TCP only
    options.update(host.kwargs)
    if host.sentinels:
        from redis.asyncio.sentinel import Sentinel, SentinelManagedConnection

        class _SentinelConnection(_MarksConnectFailures, SentinelManagedConnection):
            pass

        options["connection_class"] = _SentinelConnection

        sentinel = Sentinel(  # type: ignore[no-untyped-call]
            list(host.sentinels), sentinel_kwargs=host.sentinel_kwargs or None
        )
        client: Redis = sentinel.master_for(host.master_name or "", **options)
        return client, list(sentinel.sentinels)
    if host.url is None:
        raise ValueError("host has neither url nor sentinels")
    pool = ConnectionPool.from_url(
        host.url, connection_class=_connection_class(host.url), **options
    )
    return Redis(connection_pool=pool), []


def backoff(attempt: int, cap: float = 2.0) -> float:
    """Exponential backoff with full jitter, so reconnecting nodes do not stampede Redis."""
    return random.uniform(0, min(cap, 0.05 * (2**attempt)))


class Transport:
    """The connections and registered scripts one event loop uses; created lazily per loop."""

    def __init__(self, host: HostConfig, *, client_name: str, retry_timeout: float) -> None:
        self.host = host
        self.retry_timeout = retry_timeout
        self.client, sentinels = make_client(
            host, client_name=client_name, socket_timeout=max(retry_timeout, 2.0) + 3.0
        )
        # Blocking reads get their own pool whose socket timeout outlasts the server-side block,
        # so an idle receive never surfaces a timeout (channels_redis 4.3 on redis-py 8 raises
        # TimeoutError from a receive() idle for 5 s).
        self.blocking, more = make_client(
            host, client_name=client_name, socket_timeout=BLOCK_SECONDS + 5.0
        )
        self._others = sentinels + more
        self._last_used = 0.0
        self.clock_offset = 0.0
        self.clock_synced = False
        self.counters = Counters()  # the layer's own, once the layer has made this transport
        self.scripts = {
            name: self.client.register_script(src) for name, src in SCRIPT_SOURCES.items()
        }

    def own_connection(self) -> Redis:
        """A client holding one blocking-pool connection of its own (for a reader that must be
        able to close it under a stuck call). Replace it after a connection error: redis-py
        reconnects a held connection to the address it had, so behind Sentinel it would keep
        dialling the old master after a failover, where a new one asks the sentinels."""
        return Redis(connection_pool=self.blocking.connection_pool, single_connection_client=True)

    async def run(self, operation: Callable[[Redis], Awaitable[T]]) -> T:
        """Run ``operation``; retry only while no connection can be opened, up to ``retry_timeout``."""
        started = time.monotonic()
        attempt = 0
        # After a quiet spell, two passes of the event loop first, so a close the server sent
        # meanwhile (a restart, a CLIENT KILL) is seen before a pooled connection is reused:
        # that reconnects without ever writing, instead of failing a command that cannot be
        # retried. Two, because in the pass where the selector reports the close this task
        # resumes before the socket's reader callback has fed the EOF to the stream.
        now = time.monotonic()
        if now - self._last_used > IDLE_CHECK:
            await asyncio.sleep(0)
            await asyncio.sleep(0)
        self._last_used = now
        while True:
            try:
                return await operation(self.client)
            except CredentialsRejected as exc:
                raise RedisUnavailable(
                    self.host.address, time.monotonic() - started, exc
                ) from exc
            except NotConnected as exc:
                if attempt == 0:
                    self.counters.reconnects += 1
                waited = time.monotonic() - started
                if waited >= self.retry_timeout:
                    raise RedisUnavailable(self.host.address, waited, exc) from exc
                attempt += 1
                # Short, jittered waits: a refused connect costs nothing, and a caller (a
                # heartbeat above all) should get through soon after Redis answers again.
                pause = backoff(attempt, RECONNECT_CAP)
                await asyncio.sleep(min(pause, max(0.0, self.retry_timeout - waited)))

    async def script(self, name: str, keys: list[str], args: list[Any]) -> Any:
        """Run one of :mod:`channels_distrib.scripts` by name (EVALSHA, loading it if needed)."""
        script = self.scripts[name]
        return await self.run(lambda client: script(keys=keys, args=args, client=client))

    async def sync_clock(self) -> None:
        """Measure Redis time minus local time, for judging expiry stamps written by Lua."""
        seconds, micros = await self.run(lambda c: c.time())
        self.clock_offset = seconds + micros / 1e6 - time.time()
        self.clock_synced = True

    async def close(self) -> None:
        """Close both pools; safe to call twice."""
        for client in (self.client, self.blocking, *self._others):
            await client.aclose()
            await client.connection_pool.disconnect()
