"""ASGI entry point (run from the repository root) for any ASGI server::

    daphne testproject.asgi:application
    uvicorn testproject.asgi:application
    hypercorn testproject.asgi:application
"""

from __future__ import annotations

import os

from django.core.asgi import get_asgi_application

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "testproject.settings")
# Django must be set up before anything imports models (AuthMiddlewareStack does).
django_asgi_app = get_asgi_application()

from channels.auth import AuthMiddlewareStack  # noqa: E402
from channels.routing import ProtocolTypeRouter, URLRouter  # noqa: E402
from django.contrib.staticfiles.handlers import ASGIStaticFilesHandler  # noqa: E402

from channels_distrib.auth import TokenAuthMiddleware  # noqa: E402
from channels_distrib.lifespan import LayerLifespan  # noqa: E402
from channels_distrib.security import BrowserOriginValidator  # noqa: E402
from testproject.routing import websocket_urlpatterns  # noqa: E402

application = ProtocolTypeRouter(
    {
        # Static files (only the admin has any) served by the nodes themselves.
        "http": ASGIStaticFilesHandler(django_asgi_app),
        # Origin is checked when a browser sends one; scripts and apps send none. A client
        # with no session may present a JWT (?token= or Authorization: Bearer, needs the
        # jwt extra); without one it keeps the session user, anonymous included.
        "websocket": BrowserOriginValidator(
            AuthMiddlewareStack(TokenAuthMiddleware(URLRouter(websocket_urlpatterns)))
        ),
        # A clean stop under uvicorn and hypercorn (daphne stops cleanly without it).
        "lifespan": LayerLifespan(),
    }
)
