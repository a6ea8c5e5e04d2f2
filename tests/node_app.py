"""A tests-only ASGI app for node-lifecycle tests under a real daphne.

One plain ``AsyncWebsocketConsumer`` (no project mixin): Channels' own machinery gives it a
channel with ``new_channel`` (so the daphne process becomes a node), and ``connect`` joins the
group named by ``NODE_APP_GROUP``, then sends ``{"channel", "node_id"}`` to the client.
Configured from the environment: ``NODE_APP_REDIS_URL``, ``NODE_APP_PREFIX``,
``NODE_APP_GROUP`` (default ``daphne-room``), ``NODE_APP_PRESENCE`` ("1" for presence) and
``NODE_APP_CONFIG`` (JSON, extra layer options).

Run: ``python -m daphne -b 127.0.0.1 -p PORT tests.node_app:application``.
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
        SECRET_KEY="tests-node-app",
        ALLOWED_HOSTS=["*"],
        INSTALLED_APPS=["channels"],
        CHANNEL_LAYERS={
            "default": {
                "BACKEND": "channels_distrib.layers.DistributedChannelLayer",
                "CONFIG": {
                    "hosts": [os.environ.get("NODE_APP_REDIS_URL", "redis://127.0.0.1:6379/0")],
                    "prefix": os.environ.get("NODE_APP_PREFIX", "nodeapp"),
                    **json.loads(os.environ.get("NODE_APP_CONFIG", "{}")),
                },
            }
        },
    )
    django.setup()

from channels.generic.websocket import AsyncWebsocketConsumer  # noqa: E402
from channels.routing import URLRouter  # noqa: E402
from django.urls import path  # noqa: E402

GROUP = os.environ.get("NODE_APP_GROUP", "daphne-room")
PRESENCE = os.environ.get("NODE_APP_PRESENCE") == "1"


class JoinConsumer(AsyncWebsocketConsumer):  # type: ignore[misc]
    """Joins GROUP at connect, leaves at disconnect, forwards ``room.message`` events."""

    async def connect(self) -> None:
        await self.channel_layer.group_add(
            GROUP, self.channel_name, meta={"via": "daphne"}, presence=PRESENCE
        )
        await self.accept()
        await self.send(
            text_data=json.dumps(
                {"channel": self.channel_name, "node_id": self.channel_layer.node_id}
            )
        )

    async def disconnect(self, code: int) -> None:
        await self.channel_layer.group_discard(GROUP, self.channel_name)

    async def room_message(self, event: dict[str, Any]) -> None:
        await self.send(text_data=json.dumps(event))


application = URLRouter([path("ws/", JoinConsumer.as_asgi())])
