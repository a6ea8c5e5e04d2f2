"""Origin checking for WebSocket handshakes that lets non-browser clients in.

Channels' ``AllowedHostsOriginValidator`` refuses a handshake that carries no ``Origin``
header, which shuts out every script, mobile app and server-side client (none of them send
one). The check only protects against other web pages opening a socket with the visitor's
cookies, and only browsers do that, and browsers always send ``Origin``. So
:class:`BrowserOriginValidator` checks the header when it is there and lets a handshake
without it through::

    application = ProtocolTypeRouter({
        "websocket": BrowserOriginValidator(AuthMiddlewareStack(URLRouter(routes))),
    })
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any
from urllib.parse import urlsplit

from django.conf import settings
from django.http.request import validate_host

logger = logging.getLogger(__name__)

Scope = dict[str, Any]
ASGIApp = Any  # an ASGI 3 application: async (scope, receive, send) -> None

# What Django itself allows when DEBUG is on and ALLOWED_HOSTS is empty.
DEBUG_HOSTS = (".localhost", "127.0.0.1", "[::1]")


class BrowserOriginValidator:
    """Refuse WebSocket handshakes whose ``Origin`` is not one of this site's hosts.

    A handshake with an ``Origin`` header is let through when the header's host matches
    ``allowed_hosts`` (by default ``settings.ALLOWED_HOSTS``, read on every handshake, with
    Django's own matching: ``"*"``, ``".example.com"`` for a domain and its subdomains;
    with ``DEBUG`` and an empty list, the local hosts Django allows). A foreign, malformed
    or ``null`` Origin, or more than one Origin header, is refused with HTTP 403 before the
    inner application runs. A handshake with no ``Origin`` header (scripts, mobile apps,
    a plain Node.js client) is let through. Other scope types pass through unchanged.
    """

    def __init__(self, app: ASGIApp, *, allowed_hosts: Sequence[str] | None = None) -> None:
        self.app = app
        self.allowed_hosts = None if allowed_hosts is None else list(allowed_hosts)

    async def __call__(self, scope: Scope, receive: Any, send: Any) -> None:
        if scope.get("type") != "websocket":
            await self.app(scope, receive, send)
            return
        origins = [value for name, value in scope.get("headers", ()) if name.lower() == b"origin"]
        if not origins or (len(origins) == 1 and self.origin_allowed(origins[0])):
            await self.app(scope, receive, send)
            return
        logger.info("WebSocket handshake to %s refused: Origin %r", scope.get("path"), origins)
        await self._deny(receive, send)

    def origin_allowed(self, origin: bytes) -> bool:
        """Whether one ``Origin`` header value names a host of this site."""
        try:
            parts = urlsplit(origin.decode("ascii").strip())
            hostname = parts.hostname
        except (UnicodeDecodeError, ValueError):
            return False
        if parts.scheme not in {"http", "https"} or not hostname:
            return False  # "null" (sandboxed pages, file://) and garbage
        if ":" in hostname:
            hostname = f"[{hostname}]"  # ALLOWED_HOSTS spells IPv6 hosts in brackets
        return validate_host(hostname, self._hosts())

    def _hosts(self) -> list[str]:
        if self.allowed_hosts is not None:
            return self.allowed_hosts
        hosts = list(settings.ALLOWED_HOSTS)
        if not hosts and settings.DEBUG:
            hosts = list(DEBUG_HOSTS)
        return hosts

    @staticmethod
    async def _deny(receive: Any, send: Any) -> None:
        # Closing before accepting makes the server answer the handshake with HTTP 403
        # (daphne, uvicorn and hypercorn alike). The connect event comes first.
        message = await receive()
        if message.get("type") == "websocket.connect":
            await send({"type": "websocket.close"})
