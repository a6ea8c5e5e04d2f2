"""Fixtures for communicator-based consumer tests: two in-process nodes on the test's prefix.

``nodes(**config)`` installs ``CHANNEL_LAYERS`` with the aliases ``default`` and ``other``
(two layer instances, so two nodes) and returns channels' layer manager; ``connect``
opens WebsocketCommunicator clients. Import ``nodes_fixture`` and ``connect_fixture``
into a test module to use them (they register as ``nodes`` and ``connect``).
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import pytest
from channels.layers import channel_layers
from channels.testing import WebsocketCommunicator
from django.test import override_settings

from tests.consumer_app import ProbeConsumer, QueryUserMiddleware
from tests.consumer_clients import CommClient

BACKEND = "channels_distrib.layers.DistributedChannelLayer"


def layer_settings(
    redis_url: str, prefix: str, backend: str = BACKEND, **config: Any
) -> dict[str, Any]:
    conf = {"hosts": [redis_url], "prefix": prefix, **config}
    return {alias: {"BACKEND": backend, "CONFIG": conf} for alias in ("default", "other")}


@pytest.fixture(name="nodes")
async def nodes_fixture(
    redis_url: str, prefix: str, django_db_blocker: Any
) -> AsyncIterator[Callable[..., Any]]:
    """Installs CHANNEL_LAYERS for the test; call it (optionally with CONFIG, or
    ``backend=``) before the first connect to get layers.

    Channels' consumers call ``close_old_connections`` on every message, in the thread
    ``sync_to_async`` uses. If an earlier ``transaction=True`` test left a connection
    there, pytest-django's blocker would make that check fail, so DB access stays
    unblocked while the consumers run (they make no queries of their own).
    """
    state: dict[str, Any] = {"override": None}

    def install(**config: Any) -> Any:
        if state["override"] is None:
            state["override"] = override_settings(
                CHANNEL_LAYERS=layer_settings(redis_url, prefix, **config)
            )
            state["override"].enable()
        return channel_layers

    with django_db_blocker.unblock():
        yield install
        if state["override"] is None:
            return
        made = list(channel_layers.backends.values())
        try:
            if made:
                await made[0].flush()
            for layer in made:
                await layer.close()
        finally:
            state["override"].disable()


@pytest.fixture(name="connect")
async def connect_fixture(
    nodes: Callable[..., Any],
) -> AsyncIterator[Callable[..., Awaitable[CommClient]]]:
    """``await connect(consumer_class, user=None, name=None)`` → a connected CommClient."""
    clients: list[CommClient] = []

    async def open_client(
        consumer: type[Any] = ProbeConsumer, user: str | None = None, name: str | None = None
    ) -> CommClient:
        nodes()
        query = "&".join(f"{k}={v}" for k, v in (("user", user), ("name", name)) if v)
        comm = WebsocketCommunicator(QueryUserMiddleware(consumer.as_asgi()), f"/ws/?{query}")
        connected, _ = await comm.connect(timeout=5)
        assert connected
        client = CommClient(comm)
        clients.append(client)
        return client

    yield open_client
    for client in clients:
        if not client.closed and not client.comm.future.done():
            await client.close()
