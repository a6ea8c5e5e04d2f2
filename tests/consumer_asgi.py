"""ASGI entry point for daphne nodes in the consumer tests: ``tests.consumer_asgi:application``.

Configures Django itself from the environment (``tests.settings`` is left alone):

- ``DISTRIB_REDIS_URL`` (default ``redis://127.0.0.1:6379/0``), ``DISTRIB_PREFIX``;
- ``DISTRIB_LAYER_CONFIG``: JSON object merged into the layer's CONFIG
  (``connection_limit``, ``heartbeat_interval``, ``node_timeout``...);
- ``DISTRIB_DB``: an SQLite file shared by the nodes (migrated at startup), so a user
  logged in over HTTP on one node is authenticated on every node; default in-memory;
- ``DISTRIB_LOG_LEVEL``: when set, the library's log records at that level go to stderr.
"""

from __future__ import annotations

import json
import os

import django
from django.conf import settings

from tests import settings as test_settings

_config = {
    "hosts": [os.environ.get("DISTRIB_REDIS_URL", "redis://127.0.0.1:6379/0")],
    "prefix": os.environ.get("DISTRIB_PREFIX", "distrib-consumer-tests"),
    **json.loads(os.environ.get("DISTRIB_LAYER_CONFIG", "{}")),
}

_db_file = os.environ.get("DISTRIB_DB")
_databases = (
    {"default": {"ENGINE": "django.db.backends.sqlite3", "NAME": _db_file}}
    if _db_file
    else test_settings.DATABASES
)

_log_level = os.environ.get("DISTRIB_LOG_LEVEL")
_logging = (
    {
        "version": 1,
        "disable_existing_loggers": False,
        "handlers": {"stderr": {"class": "logging.StreamHandler"}},
        "loggers": {"channels_distrib": {"handlers": ["stderr"], "level": _log_level}},
    }
    if _log_level
    else {}
)

if not settings.configured:
    settings.configure(
        SECRET_KEY=test_settings.SECRET_KEY,
        DEBUG=False,
        USE_TZ=True,
        INSTALLED_APPS=test_settings.INSTALLED_APPS,
        DATABASES=_databases,
        MIDDLEWARE=[
            "django.contrib.sessions.middleware.SessionMiddleware",
            "django.contrib.auth.middleware.AuthenticationMiddleware",
        ],
        ROOT_URLCONF="tests.consumer_app",
        ALLOWED_HOSTS=["127.0.0.1", "localhost"],
        LOGGING=_logging,
        CHANNEL_LAYERS={
            "default": {
                "BACKEND": "channels_distrib.layers.DistributedChannelLayer",
                "CONFIG": _config,
            }
        },
    )
    django.setup()
    if _db_file:
        from django.core.management import call_command

        call_command("migrate", verbosity=0, interactive=False)

from channels.auth import AuthMiddlewareStack  # noqa: E402  (needs configured settings)
from channels.routing import ProtocolTypeRouter  # noqa: E402
from channels.security.websocket import AllowedHostsOriginValidator  # noqa: E402
from django.core.asgi import get_asgi_application  # noqa: E402

from channels_distrib.lifespan import LayerLifespan  # noqa: E402
from tests.consumer_app import QueryUserMiddleware, websocket_routes  # noqa: E402

application = ProtocolTypeRouter(
    {
        "http": get_asgi_application(),
        "websocket": AllowedHostsOriginValidator(
            AuthMiddlewareStack(QueryUserMiddleware(websocket_routes()))
        ),
        # uvicorn and hypercorn send lifespan events (daphne does not): a clean stop there.
        "lifespan": LayerLifespan(),
    }
)
