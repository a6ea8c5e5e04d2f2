"""ASGI app for the origin tests under daphne: ``tests.origin_app:application``.

A bare echo WebSocket app behind ``BrowserOriginValidator`` with a fixed host list, so
the process needs no Django project beyond ``tests.settings``.
"""

from __future__ import annotations

import os
from typing import Any

import django

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "tests.settings")
django.setup()

from channels_distrib.security import BrowserOriginValidator  # noqa: E402

ALLOWED = ["127.0.0.1", ".example.com"]


async def echo(scope: dict[str, Any], receive: Any, send: Any) -> None:
    while True:
        message = await receive()
        if message["type"] == "websocket.connect":
            await send({"type": "websocket.accept"})
        elif message["type"] == "websocket.receive":
            await send({"type": "websocket.send", "text": message.get("text") or ""})
        else:
            return


application = BrowserOriginValidator(echo, allowed_hosts=ALLOWED)
