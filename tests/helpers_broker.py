"""Helpers for the broker-path tests: observe RabbitMQ (queues, bindings) and cut connections.

Nothing here stands in for RabbitMQ: ``rabbitmqctl`` and a plain aiormq connection only look
at the broker, and ``close_connections`` makes the broker close a real connection.
"""

from __future__ import annotations

import contextlib
import shutil
import subprocess
from collections.abc import AsyncIterator

import aiormq
import pytest


def rabbitmqctl(*args: str) -> str:
    """Run rabbitmqctl (skipping the test, saying why, when it is not on PATH)."""
    if shutil.which("rabbitmqctl") is None:
        pytest.skip("rabbitmqctl not on PATH (needed to inspect or cut broker connections)")
    done = subprocess.run(
        ["rabbitmqctl", "-q", *args], capture_output=True, text=True, timeout=60, check=True
    )
    return done.stdout


def close_connections(name_part: str) -> int:
    """Make the broker close every connection whose connection_name contains ``name_part``."""
    closed = 0
    for line in rabbitmqctl("list_connections", "pid", "client_properties").splitlines():
        pid, _, properties = line.partition("\t")
        if pid.startswith("<") and name_part in properties:
            rabbitmqctl("close_connection", pid, "test: connection cut")
            closed += 1
    return closed


def queue_arguments(name: str) -> str | None:
    """The arguments column of ``rabbitmqctl list_queues`` for the queue ``name`` (None: absent)."""
    for line in rabbitmqctl("list_queues", "name", "arguments").splitlines():
        queue, _, arguments = line.partition("\t")
        if queue == name:
            return arguments
    return None


def queue_bindings(queue: str, exchange: str, node: str | None = None) -> set[str]:
    """The routing keys ``queue`` is bound with on ``exchange``, as the broker lists them
    (``rabbitmqctl list_bindings``; ``node`` names a private broker's Erlang node)."""
    target = ["-n", node] if node else []
    keys = set()
    listing = rabbitmqctl(*target, "list_bindings", "source_name", "destination_name", "routing_key")
    for line in listing.splitlines():
        source, _, rest = line.partition("\t")
        destination, _, key = rest.partition("\t")
        if source == exchange and destination == queue:
            keys.add(key)
    return keys


@contextlib.asynccontextmanager
async def amqp(url: str) -> AsyncIterator[aiormq.abc.AbstractConnection]:
    connection = await aiormq.connect(url)
    try:
        yield connection
    finally:
        await connection.close()


async def exists(url: str, name: str, kind: str = "queue") -> bool:
    """Whether a queue (or exchange) exists: a passive declare on a channel of its own."""
    async with amqp(url) as connection:
        channel = await connection.channel()
        try:
            if kind == "queue":
                await channel.queue_declare(name, passive=True)
            else:
                await channel.exchange_declare(name, passive=True)
        except aiormq.exceptions.ChannelNotFoundEntity:
            return False
        await channel.close()
        return True
