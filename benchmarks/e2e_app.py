"""The ASGI app bench_e2e and bench_connections serve (daphne or uvicorn): one plain Channels
consumer per WebSocket.

The consumer is the same for every layer (no channels_distrib consumer features), so the
figures compare layers, not consumers. ``/ws/<room>`` joins group ``<room>``; every
``room.message`` event is sent to the client as its ``text``. Configured from the
environment: ``BENCH_BACKEND`` (dotted layer class), ``BENCH_REDIS``, ``BENCH_PREFIX``, and
``BENCH_REDIS_CLUSTER`` (non-empty: ``BENCH_REDIS`` is a Redis Cluster node), ``BENCH_CONFIG``
(JSON: more CONFIG, e.g. the broker column's ``broker``).
"""

from __future__ import annotations

import json
import os
from typing import Any

import django
from django.conf import settings

if not settings.configured:
    settings.configure(
        DEBUG=False,
        SECRET_KEY="benchmarks-only",
        ALLOWED_HOSTS=["*"],
        INSTALLED_APPS=["channels"],
        CHANNEL_LAYERS={
            "default": {
                "BACKEND": os.environ.get("BENCH_BACKEND", "channels.layers.InMemoryChannelLayer"),
                "CONFIG": {
                    "hosts": [
                        {"address": os.environ["BENCH_REDIS"], "cluster": True}
                        if os.environ.get("BENCH_REDIS_CLUSTER")
                        else os.environ.get("BENCH_REDIS", "redis://127.0.0.1:6379/0")
                    ],
                    "prefix": os.environ.get("BENCH_PREFIX", "bench-e2e-"),
                    **json.loads(os.environ.get("BENCH_CONFIG") or "{}"),
                },
            }
        },
    )
    django.setup()

from channels.generic.websocket import AsyncWebsocketConsumer  # noqa: E402  (needs settings)


class RoomConsumer(AsyncWebsocketConsumer):  # type: ignore[misc]  # channels is untyped
    room = ""

    async def connect(self) -> None:
        self.room = self.scope["path"].rstrip("/").rsplit("/", 1)[-1]
        await self.channel_layer.group_add(self.room, self.channel_name)
        await self.accept()
        await self.send(text_data="ready")

    async def disconnect(self, code: int) -> None:
        if self.room:
            await self.channel_layer.group_discard(self.room, self.channel_name)

    async def room_message(self, event: dict[str, Any]) -> None:
        await self.send(text_data=event["text"])


application = RoomConsumer.as_asgi()
