"""ASGI app for the token tests under daphne: ``tests.auth_app:application``.

``AUTH_DB`` is an SQLite file (migrated by the test) holding the users; ``AUTH_MODE`` picks
how tokens are checked: ``jwt`` (PyJWT, the default verifier) or ``verifier`` (the dotted
path ``tests.auth_app.verify`` in settings). The app answers every connection with one
frame naming ``scope["user"]``. The library logs at DEBUG to stderr (the daphne log), so a
test can grep it for tokens.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Any

import django
from django.conf import settings

from tests import settings as test_settings

JWT_KEY = "jwt-test-key-" + "x" * 32
MODE = os.environ.get("AUTH_MODE", "jwt")

if not settings.configured:
    settings.configure(
        SECRET_KEY=test_settings.SECRET_KEY,
        DEBUG=False,
        USE_TZ=True,
        INSTALLED_APPS=test_settings.INSTALLED_APPS,
        DATABASES={"default": {"ENGINE": "django.db.backends.sqlite3",
                               "NAME": os.environ["AUTH_DB"]}},
        CHANNEL_LAYERS={"default": {"BACKEND": "channels.layers.InMemoryChannelLayer"}},
        CHANNELS_DISTRIB_TOKEN_AUTH=(
            {"JWT_KEY": JWT_KEY, "JWT_AUDIENCE": "chat"} if MODE == "jwt"
            else {"VERIFIER": "tests.auth_app.verify"}
        ),
        LOGGING={
            "version": 1,
            "disable_existing_loggers": False,
            "handlers": {"stderr": {"class": "logging.StreamHandler"}},
            "loggers": {"channels_distrib": {"handlers": ["stderr"], "level": "DEBUG"}},
        },
    )
    django.setup()

from channels.auth import AuthMiddlewareStack  # noqa: E402
from channels.routing import ProtocolTypeRouter  # noqa: E402

from channels_distrib.auth import TokenAuthMiddleware  # noqa: E402
from channels_distrib.lifespan import LayerLifespan  # noqa: E402


@dataclass
class TokenUser:
    username: str
    is_authenticated: bool = True


def verify(token: str) -> TokenUser | None:
    """Test verifier: ``good-<name>`` → that user; ``boom-...`` raises quoting the token."""
    if token.startswith("good-"):
        return TokenUser(token.removeprefix("good-"))
    if token.startswith("boom-"):
        raise ValueError(f"cannot verify {token}")
    return None


async def whoami(scope: dict[str, Any], receive: Any, send: Any) -> None:
    while True:
        message = await receive()
        if message["type"] == "websocket.connect":
            await send({"type": "websocket.accept"})
            user = scope.get("user")
            await send({"type": "websocket.send", "text": json.dumps({
                "user": getattr(user, "username", None) or None,
                "authenticated": bool(getattr(user, "is_authenticated", False)),
            })})
        elif message["type"] == "websocket.disconnect":
            return


application = ProtocolTypeRouter({
    "websocket": AuthMiddlewareStack(TokenAuthMiddleware(whoami)),
    "lifespan": LayerLifespan(),  # uvicorn and hypercorn send lifespan events
})
