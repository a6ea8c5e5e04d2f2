"""Redis connections for one event loop, and the rule for when a command may be retried.

At most once: a command is retried only when it provably never reached Redis, which here
means the connection could not be established (redis-py's own retries are switched off).
A failure after the command was written raises, because it may have run.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
from collections.abc import Awaitable, Callable, Iterator
from typing import Any, TypeVar

from django.core.exceptions import ImproperlyConfigured
from redis.asyncio import Redis, RedisCluster
from redis.asyncio.connection import (
    AbstractConnection,
    Connection,
    ConnectionPool,
    SSLConnection,
    UnixDomainSocketConnection,
)
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import (
    AuthenticationError,
    ClusterDownError,
    RedisClusterException,
    ResponseError,
)
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

#: A standalone/Sentinel client or a Redis Cluster client.
Client = Redis | RedisCluster

#: Replies a standalone server never gives: the host entry names a cluster node.
CLUSTER_REPLIES = ("MOVED ", "ASK ", "CROSSSLOT", "CLUSTERDOWN")

#: Standalone addresses found not to be cluster nodes: checked once per process, not once per
#: event loop (``async_to_sync`` makes a loop, and so a transport, per call).
_CHECKED: set[str] = set()

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


#: What a failed connect raises. AttributeError: on a cluster, when a failure elsewhere makes
#: redis-py drop a connection that another task is still opening, its handshake finds the
#: writer gone ("'NoneType' object has no attribute 'writelines'"); nothing was written.
_CONNECT_ERRORS = (RedisConnectionError, RedisTimeoutError, OSError, AttributeError)


class _MarksConnectFailures:
    """Mixin for redis-py connection classes: failures while connecting raise NotConnected.

    Both entry points are wrapped: ``connect()`` (the pool's, which behind Sentinel first asks
    the sentinels for the master and raises MasterNotFoundError while there is none) and
    ``connect_check_health()`` (what a command on a disconnected connection calls).
    """

    async def connect(self, *args: Any, **kwargs: Any) -> None:
        with _connect_failures_marked():
            await super().connect(*args, **kwargs)  # type: ignore[misc]

    async def connect_check_health(self, *args: Any, **kwargs: Any) -> None:
        with _connect_failures_marked():
            await super().connect_check_health(*args, **kwargs)  # type: ignore[misc]


@contextlib.contextmanager
def _connect_failures_marked() -> Iterator[None]:
    """Re-raise a failure to connect as NotConnected (cancellation and our own errors pass)."""
    try:
        yield
    except asyncio.CancelledError:
        raise
    except (NotConnected, CredentialsRejected):
        raise
    except _CONNECT_ERRORS as exc:
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


def _make_cluster(host: HostConfig, options: dict[str, Any]) -> RedisCluster:
    """A RedisCluster from any startup node, its connections marking connect failures.

    redis-py's RedisCluster hard-wires its connection class; its nodes read it from the
    client's ``connection_kwargs`` (shared with the nodes manager) when they open a
    connection, so replacing it there before the first command covers every master found.
    """
    url = host.url or ""
    client = RedisCluster.from_url(url, **options)
    cls = _SslConnection if url.startswith("rediss://") else _TcpConnection
    client.connection_kwargs["connection_class"] = cls
    for node in client.startup_nodes:
        node.connection_class = cls
    return client


def make_client(
    host: HostConfig, *, client_name: str, socket_timeout: float | None
) -> tuple[Client, list[Redis]]:
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
    if host.cluster:
        return _make_cluster(host, options), []
    if host.sentinels:
        from redis.asyncio.sentinel import Sentinel, SentinelManagedConnection

        class _SentinelConnection(_MarksConnectFailures, SentinelManagedConnection):
            pass

        options["connection_class"] = _SentinelConnection

        sentinel = Sentinel(  # type: ignore[no-untyped-call, unused-ignore]
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
        self.cluster = host.cluster
        # Whether the server's kind was checked (see _check_kind).
        self._checked = host.cluster or host.address in _CHECKED
        self._stale_slots = False
        self._stale_map = False  # the client's slot map may be out of date (see _once)
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
        if not isinstance(self.blocking, Redis):
            raise TypeError("own_connection() is for one Redis; on a cluster use connection_for(key)")
        return Redis(connection_pool=self.blocking.connection_pool, single_connection_client=True)

    async def connection_for(self, key: str) -> Redis:
        """:meth:`own_connection`, on a cluster to the master that owns ``key``'s slot now.

        A cluster reader asks again after each connection error (a failover or resharding
        moves the slot); the lookup refreshes the slot map when it has to (a refused connect
        is retried like any command, see :meth:`run`).
        """
        if not isinstance(self.blocking, RedisCluster):
            return self.own_connection()
        cluster = self.blocking

        async def locate(_client: Client) -> tuple[str, int]:
            if self._stale_slots:
                await cluster.nodes_manager.initialize()
            else:
                await cluster.initialize()
            node = cluster.get_node_from_key(key)
            if node is None:
                raise NotConnected(f"no master serves the slot of {key!r} yet")
            return str(node.host), int(node.port)

        host, port = await self.run(locate)
        self._stale_slots = True  # the next ask comes after an error: refresh the map first
        options = {
            k: v
            for k, v in cluster.connection_kwargs.items()
            if k not in {"response_callbacks", "himport_registry", "max_connections"}
        }
        options["connection_class"] = _connection_class(self.host.url or "")
        pool = ConnectionPool(host=host, port=port, **options)
        conn = Redis(connection_pool=pool, single_connection_client=True)
        conn.auto_close_connection_pool = True  # the pool is this connection's alone
        return conn

    async def run(self, operation: Callable[[Client], Awaitable[T]], *, idempotent: bool = False) -> T:
        """Run ``operation``; retry only while no connection can be opened, up to ``retry_timeout``.

        An ``idempotent`` operation (a read) is also retried after a connection error once
        written (a pooled connection a restarted server had closed, "Connection closed by
        server"), or a timeout: running it twice changes nothing.
        """
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
                return await self._once(operation)
            except CredentialsRejected as exc:
                raise RedisUnavailable(
                    self.host.address, time.monotonic() - started, exc
                ) from exc
            except (RedisConnectionError, RedisTimeoutError) as exc:
                if not idempotent and not isinstance(exc, NotConnected):
                    raise
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

    async def _once(self, operation: Callable[[Client], Awaitable[T]]) -> T:
        """One attempt of :meth:`run`, its errors translated: a config mismatch (a cluster
        node named as a standalone server or the reverse) raises ImproperlyConfigured, a
        cluster no startup node of which answers raises NotConnected (retried)."""
        try:
            if not self._checked:
                await self._check_kind()
            if self._stale_map:
                await self._refresh_map()
            return await operation(self.client)
        except RedisClusterException as exc:
            raise self._not_a_cluster(exc) from exc
        except AttributeError as exc:
            # On a cluster, redis-py may drop a connection's writer (another task's failure
            # handling) between connecting and writing: nothing was sent, so it is retried.
            if not self.cluster or "writelines" not in str(exc):
                raise
            self._stale_map = True
            raise NotConnected(f"{self.host.address}: connection dropped before writing") from exc
        except ClusterDownError as exc:
            # CLUSTERDOWN: a master of the cluster is away (restarting, failing over). The
            # server refused the command without running it, so it is retried like a
            # refused connect (a pipeline's refusals are its callers' to judge: they read
            # results with raise_on_error=False, see channels_distrib.cluster.pipelined).
            self._stale_map = True
            raise NotConnected(f"{self.host.address}: {exc}") from exc
        except RedisConnectionError:
            # A master went away or a failover is under way: redis-py refreshes its slot map
            # after a failed single command but not after a failed pipeline, so every
            # failure marks it stale here and the next attempt asks the cluster first.
            self._stale_map = self.cluster
            raise
        except ResponseError as exc:
            if not self.cluster and str(exc).startswith(CLUSTER_REPLIES):
                raise self._a_cluster() from exc
            raise

    def mark_stale(self) -> None:
        """The cluster's slot map may be out of date: the next command re-reads it first."""
        self._stale_map = self.cluster

    async def _refresh_map(self) -> None:
        """Re-read the cluster's slot map (CLUSTER SLOTS from a node that answers)."""
        if not isinstance(self.client, RedisCluster):
            return  # one Redis: no slot map
        await self.client.nodes_manager.initialize()
        self._stale_map = False

    async def _check_kind(self) -> None:
        """Once per transport, before the first command: a standalone host entry must not
        name a cluster node (whose keys would answer MOVED at random). A user without INFO
        skips this check; a MOVED reply later raises the same error."""
        try:
            info = await self.client.info("cluster")
        except ResponseError:  # NOPERM: a least-privilege ACL user
            info = {}
        self._checked = True
        if int(info.get("cluster_enabled", 0)) == 1:
            raise self._a_cluster()
        _CHECKED.add(self.host.address)

    def _a_cluster(self) -> ImproperlyConfigured:
        return ImproperlyConfigured(
            f"channels_distrib: {self.host.address} is a Redis Cluster node, but its host "
            "entry is for a standalone server; write "
            f"{{'address': '{self.host.address}', 'cluster': True}}"
        )

    def _not_a_cluster(self, exc: RedisClusterException) -> Exception:
        """A cluster client's failure: not a cluster (a config error), or none reachable."""
        text = str(exc)
        cause = exc.__cause__
        if "Cluster mode is not enabled" in text:
            return ImproperlyConfigured(
                f"channels_distrib: {self.host.address} is not a Redis Cluster node (cluster mode "
                "is disabled there, or the user may not run CLUSTER SLOTS); for a standalone "
                f"server drop 'cluster': write {{'address': '{self.host.address}'}}"
            )
        if isinstance(cause, CredentialsRejected):
            return cause
        if isinstance(cause, NotConnected) or "at least one reachable node" in text:
            return NotConnected(text)
        return exc

    async def script(
        self, name: str, keys: list[str], args: list[Any], *, idempotent: bool = False
    ) -> Any:
        """Run one of :mod:`channels_distrib.scripts` by name (EVALSHA, loading it if needed);
        ``idempotent`` as in :meth:`run` (a script that only reads)."""
        script = self.scripts[name]
        return await self.run(
            lambda client: script(keys=keys, args=args, client=client), idempotent=idempotent
        )

    async def read(self, operation: Callable[[Client], Awaitable[T]]) -> T:
        """:meth:`run` for a read: retried after any connection error, up to ``retry_timeout``."""
        return await self.run(operation, idempotent=True)

    async def sync_clock(self) -> None:
        """Measure Redis time minus local time, for judging expiry stamps written by Lua."""
        seconds, micros = await self.run(lambda c: c.time())
        self.clock_offset = seconds + micros / 1e6 - time.time()
        self.clock_synced = True

    async def close(self) -> None:
        """Close both pools; safe to call twice."""
        for client in (self.client, self.blocking, *self._others):
            await client.aclose()
            if isinstance(client, Redis):
                await client.connection_pool.disconnect()
