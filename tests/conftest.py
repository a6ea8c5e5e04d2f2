"""Shared fixtures: a real Redis for the whole run and per-test layers with their own prefix."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import sys
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any
from urllib.parse import urlparse

import pytest

from tests.redis_server import RedisProcess, ping, start_server

if sys.version_info < (3, 11):  # pragma: no cover - the tests use asyncio.timeout (3.11+)
    import async_timeout  # installed with redis-py on these versions

    @contextlib.asynccontextmanager
    async def _timeout(delay: float | None) -> AsyncIterator[None]:
        try:
            async with async_timeout.timeout(delay):
                yield
        except asyncio.TimeoutError as exc:  # a separate class before 3.11
            raise TimeoutError from exc

    asyncio.timeout = _timeout  # type: ignore[attr-defined]


def pytest_configure(config: pytest.Config) -> None:
    # A shell without job control starts background commands with SIGINT ignored, and an
    # ignored signal is inherited by every server a test starts: daphne (Twisted) then never
    # installs its SIGINT handler and the Ctrl-C tests wait in vain. Tests run as if started
    # from a terminal.
    if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
        signal.signal(signal.SIGINT, signal.default_int_handler)


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--redis-url", default=None, help="Redis to test against (else REDIS_URL).")


@pytest.fixture(scope="session")
def redis_url(request: pytest.FixtureRequest) -> Iterator[str]:
    """REDIS_URL or --redis-url; else 127.0.0.1:6379 when it answers; else a throwaway server."""
    url = request.config.getoption("--redis-url") or os.environ.get("REDIS_URL")
    if url:
        yield url
        return
    if ping("127.0.0.1", 6379):
        yield "redis://127.0.0.1:6379/0"
        return
    server = start_server()
    try:
        yield server.url
    finally:
        server.stop()


@pytest.fixture
def own_redis() -> Iterator[RedisProcess]:
    """A private server for tests that kill, restart or FLUSHALL Redis."""
    server = start_server()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def prefix() -> str:
    """A prefix no other test uses, so tests never see each other's keys."""
    return f"t{uuid.uuid4().hex[:10]}"


def amqp_answers(url: str, timeout: float = 1.0) -> bool:
    """Whether an AMQP 0-9-1 broker answers the protocol header at ``url`` (no login)."""
    parsed = urlparse(url)
    try:
        with socket.create_connection(
            (parsed.hostname or "127.0.0.1", parsed.port or 5672), timeout=timeout
        ) as sock:
            sock.sendall(b"AMQP\x00\x00\x09\x01")
            return sock.recv(1) == b"\x01"  # a method frame: connection.start
    except OSError:
        return False


@pytest.fixture(scope="session")
def broker_url() -> str:
    """RABBITMQ_URL, else the local RabbitMQ (guest/guest); the test is skipped, saying why,
    when none answers (the README says how to start one)."""
    url = os.environ.get("RABBITMQ_URL", "amqp://guest:guest@127.0.0.1:5672/")
    try:
        import aiormq  # noqa: F401
    except ImportError:
        pytest.skip("aiormq is not installed (pip install -e . --group test, or the rabbitmq extra)")
    if not amqp_answers(url):
        pytest.skip(
            f"no RabbitMQ answers at {urlparse(url).hostname}:{urlparse(url).port or 5672} "
            "(set RABBITMQ_URL, or start one: see README 'RabbitMQ')"
        )
    return url


@pytest.fixture
def message_path(request: pytest.FixtureRequest) -> str:
    """How messages travel in this test: "redis" (default) or "broker" (RabbitMQ).

    A module that sets ``BOTH_MESSAGE_PATHS = True`` runs each of its tests that makes
    layers (through ``make_layer``/``layer``) over both (see pytest_generate_tests); a test marked ``redis_internals`` (it inspects the Redis message path's own keys) runs
    on the Redis path only.
    """
    path = getattr(request, "param", "redis")
    if path == "broker" and request.node.get_closest_marker("redis_internals") is not None:
        pytest.skip("inspects the Redis message path's keys; the broker path has none")
    return str(path)


#: Both ways messages can travel.
MESSAGE_PATHS = ["redis", "broker"]


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    """Run the tests of modules with ``BOTH_MESSAGE_PATHS`` over Redis and over RabbitMQ."""
    if getattr(metafunc.module, "BOTH_MESSAGE_PATHS", False) and (
        "message_path" in metafunc.fixturenames
    ):
        metafunc.parametrize("message_path", MESSAGE_PATHS, indirect=True)


def path_config(request: pytest.FixtureRequest, message_path: str) -> dict[str, Any]:
    """The CONFIG entries that select the test's message path."""
    if message_path == "broker":
        return {"broker": request.getfixturevalue("broker_url")}
    return {}


@pytest.fixture
def path_options(request: pytest.FixtureRequest, message_path: str) -> dict[str, Any]:
    """The CONFIG entries of the test's message path ({} or {"broker": url})."""
    return path_config(request, message_path)


@pytest.fixture
async def make_layer(
    redis_url: str, prefix: str, message_path: str, request: pytest.FixtureRequest
) -> AsyncIterator[Callable[..., Any]]:
    """Factory for layers on the test's prefix; every layer made is flushed once and closed."""
    from channels_distrib.layers import DistributedChannelLayer

    made: list[DistributedChannelLayer] = []
    path = path_config(request, message_path)

    def factory(**config: Any) -> DistributedChannelLayer:
        config.setdefault("hosts", [redis_url])
        config.setdefault("prefix", prefix)
        for key, value in path.items():
            config.setdefault(key, value)
        layer = DistributedChannelLayer(**config)
        made.append(layer)
        return layer

    yield factory
    if made:
        await made[0].flush()
    for layer in made:
        await layer.close()


@pytest.fixture
async def layer(make_layer: Callable[..., Any]) -> Any:
    """One layer on the test's own prefix."""
    return make_layer()


def redis_host_port(url: str) -> tuple[str, int]:
    parsed = urlparse(url)
    return parsed.hostname or "127.0.0.1", parsed.port or 6379


@pytest.fixture(scope="session")
def redis_cluster() -> Iterator[Any]:
    """A 3-master Redis Cluster of our own for the whole run (tests marked ``cluster``);
    skipped, saying why, when redis-server here cannot run one."""
    from tests.helpers_cluster import cluster_support, start_cluster

    reason = cluster_support()
    if reason is not None:
        pytest.skip(f"Redis Cluster tests need cluster support: {reason}")
    cluster = start_cluster(masters=3)
    try:
        yield cluster
    finally:
        cluster.stop()
