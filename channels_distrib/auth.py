"""Token authentication for WebSocket clients that have no session cookie.

Mobile apps and scripts log in elsewhere and present a token, either as an
``Authorization: Bearer <token>`` header or as ``?token=<token>`` (browsers cannot set
headers on a WebSocket). Put the middleware inside the session stack, so a token, when
given, wins over the cookie, and clients without one keep the user the session stack set
(anonymous included)::

    "websocket": BrowserOriginValidator(
        AuthMiddlewareStack(TokenAuthMiddleware(URLRouter(routes)))
    )

How a token is checked, in this order:

1. ``TokenAuthMiddleware(inner, verifier=callable)``;
2. ``settings.CHANNELS_DISTRIB_TOKEN_AUTH["VERIFIER"]``, a dotted path to a callable;
3. a JWT checked with PyJWT (``pip install channels-distrib[jwt]``) under the same
   setting's ``JWT_KEY`` (default ``SECRET_KEY``), ``JWT_ALGORITHMS`` (``["HS256"]``),
   optional ``JWT_AUDIENCE`` and ``JWT_ISSUER``, and ``JWT_LEEWAY`` seconds (0). The token
   must carry ``exp`` and the ``USER_ID_CLAIM`` (``"user_id"``), the primary key of an
   active user.

A verifier takes the token and returns the user (sync or async), or ``None`` (or raises)
when the token is not valid. An invalid token is accepted, then closed with code 4001, so
a browser client can tell "bad token" from a network failure. Tokens are never logged.
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import Callable
from typing import Any
from urllib.parse import parse_qsl

from channels.db import database_sync_to_async
from django.conf import settings
from django.core.exceptions import ImproperlyConfigured
from django.utils.module_loading import import_string

logger = logging.getLogger(__name__)

INVALID_TOKEN_CLOSE_CODE = 4001
SETTING = "CHANNELS_DISTRIB_TOKEN_AUTH"

Verifier = Callable[[str], Any]  # returns a user, None, or an awaitable of either


def token_from_scope(scope: dict[str, Any]) -> str | None:
    """The ``Bearer`` token of the ``Authorization`` header, else ``?token=``, else None."""
    for name, value in scope.get("headers", ()):
        if name.lower() == b"authorization":
            scheme, _, credentials = bytes(value).decode("latin-1").strip().partition(" ")
            if scheme.lower() == "bearer" and credentials.strip():
                return credentials.strip()
    raw = scope.get("query_string", b"")
    query = raw.decode("latin-1") if isinstance(raw, bytes) else str(raw)
    for name, found in parse_qsl(query, keep_blank_values=True):
        if name == "token" and found:
            return found
    return None


class TokenAuthMiddleware:
    """Set ``scope["user"]`` from a token; keep the user set before it when there is none.

    ``verifier`` overrides the setting (see the module docstring). Other scope types pass
    through unchanged.
    """

    def __init__(self, inner: Any, *, verifier: Verifier | None = None) -> None:
        self.inner = inner
        self.verifier = verifier

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope.get("type") != "websocket":
            await self.inner(scope, receive, send)
            return
        token = token_from_scope(scope)
        if token is None:
            await self.inner(scope, receive, send)
            return
        user = await self.authenticate(token, scope)
        if user is None:
            await _accept_and_close(receive, send)
            return
        await self.inner({**scope, "user": user}, receive, send)

    async def authenticate(self, token: str, scope: dict[str, Any]) -> Any:
        """The user ``token`` belongs to, or None; never lets the token reach a log."""
        verifier = self.verifier or _configured_verifier()
        try:
            user = verifier(token)
            if inspect.isawaitable(user):
                user = await user
        except ImproperlyConfigured:
            raise  # a setup mistake, not a bad token
        except Exception as exc:  # a rejected token, or a verifier bug: refuse either way
            # The type only: messages of JWT and verifier errors may quote the token.
            logger.info("WebSocket %s: token refused (%s)", scope.get("path"), type(exc).__name__)
            return None
        if user is None or not getattr(user, "is_authenticated", False):
            logger.info("WebSocket %s: token refused", scope.get("path"))
            return None
        return user


async def _accept_and_close(receive: Any, send: Any) -> None:
    # Accept first: a close before accepting becomes HTTP 403, which browsers do not show
    # to the page; after accepting, the client sees code 4001.
    message = await receive()
    if message.get("type") != "websocket.connect":
        return
    await send({"type": "websocket.accept"})
    await send({"type": "websocket.close", "code": INVALID_TOKEN_CLOSE_CODE})
    while (await receive()).get("type") != "websocket.disconnect":
        pass


def _options() -> dict[str, Any]:
    options = getattr(settings, SETTING, None) or {}
    if not isinstance(options, dict):
        raise ImproperlyConfigured(f"{SETTING} must be a dict, e.g. {{'VERIFIER': 'myapp.auth.verify'}}")
    return options


def _configured_verifier() -> Verifier:
    path = _options().get("VERIFIER")
    if path:
        verifier: Verifier = import_string(path)
        return verifier
    return verify_jwt


async def verify_jwt(token: str) -> Any:
    """The active user whose primary key is the JWT's ``USER_ID_CLAIM``, or None."""
    try:
        import jwt
    except ImportError:
        raise ImproperlyConfigured(
            f"TokenAuthMiddleware needs PyJWT (pip install channels-distrib[jwt]) or "
            f"{SETTING}['VERIFIER'] naming a verifier callable"
        ) from None
    options = _options()
    claim = options.get("USER_ID_CLAIM", "user_id")
    claims = jwt.decode(
        token,
        options.get("JWT_KEY", settings.SECRET_KEY),
        algorithms=list(options.get("JWT_ALGORITHMS", ["HS256"])),
        audience=options.get("JWT_AUDIENCE"),
        issuer=options.get("JWT_ISSUER"),
        leeway=options.get("JWT_LEEWAY", 0),
        options={"require": ["exp", claim]},
    )
    return await database_sync_to_async(_active_user)(claims[claim])


def _active_user(user_id: Any) -> Any:
    from django.contrib.auth import get_user_model

    model = get_user_model()
    try:
        user = model._default_manager.get(pk=user_id)
    except (model.DoesNotExist, ValueError, TypeError):
        return None
    return user if getattr(user, "is_active", True) else None

