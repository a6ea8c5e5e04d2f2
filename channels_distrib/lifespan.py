"""A clean stop under uvicorn and hypercorn: close the layer when the server shuts down.

daphne gets this through a Twisted shutdown trigger the node installs itself; uvicorn and
hypercorn have no such hook but send ASGI ``lifespan`` events, so route them here::

    application = ProtocolTypeRouter({
        "http": django_asgi_app,
        "websocket": BrowserOriginValidator(AuthMiddlewareStack(URLRouter(routes))),
        "lifespan": LayerLifespan(),
    })

On ``lifespan.shutdown`` (after the server has closed its connections) the layer is
closed, which removes this process's node and every membership it still holds at once,
instead of leaving them until other nodes prune it after ``node_timeout``.

hypercorn on Python 3.12+ sends ``lifespan.shutdown`` only once every client has gone
(hypercorn issue 308: asyncio's ``Server.wait_closed()`` now waits for open connections,
so ``--graceful-timeout`` is not applied); until then the node stays registered, which is
true, since it still serves those connections.
"""

from __future__ import annotations

import logging
from typing import Any

from channels.layers import channel_layers
from django.conf import settings

logger = logging.getLogger(__name__)

try:
    from channels import DEFAULT_CHANNEL_LAYER
except ImportError:  # pragma: no cover - every channels 4 release has it
    DEFAULT_CHANNEL_LAYER = "default"


class LayerLifespan:
    """ASGI app for the ``"lifespan"`` scope: closes channel layers on server shutdown.

    ``aliases`` names the ``CHANNEL_LAYERS`` entries to close (default: ``"default"``).
    A layer this process never used is not created just to be closed. Startup completes
    at once; the node registers on first use, as under daphne. A failing close is logged
    and reported to the server as ``lifespan.shutdown.failed``.
    """

    def __init__(self, *aliases: str) -> None:
        self.aliases = aliases or (DEFAULT_CHANNEL_LAYER,)

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope.get("type") != "lifespan":
            raise ValueError(f"LayerLifespan handles the 'lifespan' scope, not {scope.get('type')!r}")
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                await self._shutdown(send)
                return

    async def _shutdown(self, send: Any) -> None:
        failed: list[str] = []
        for alias in self.aliases:
            if alias not in getattr(settings, "CHANNEL_LAYERS", {}):
                continue
            layer = channel_layers.backends.get(alias)
            close = getattr(layer, "close", None)
            if close is None:
                continue
            try:
                await close()
            except Exception as exc:  # report it to the server; the process exits anyway
                logger.exception("Closing channel layer %r on shutdown failed", alias)
                failed.append(f"{alias}: {type(exc).__name__}")
            else:
                logger.info("Channel layer %r closed on server shutdown", alias)
        if failed:
            await send({"type": "lifespan.shutdown.failed", "message": "; ".join(failed)})
        else:
            await send({"type": "lifespan.shutdown.complete"})
