"""``TokenAuthMiddleware`` under real servers: tokens in the header or the query, JWT (under
daphne, uvicorn and hypercorn) or a verifier from settings, the session user kept when
there is no token, 4001 after accept for a bad token, and no token in any log line
(library logs and the server's own log)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jwt
import pytest
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed

from channels_distrib.auth import token_from_scope
from tests.auth_app import JWT_KEY
from tests.helpers_daphne import DaphneProcess
from tests.helpers_servers import SERVERS, start_server

ROOT = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.timeout(90)

SETUP = """
import json
from tests import auth_app  # configures settings for AUTH_DB
from django.contrib.auth.models import User
from django.contrib.sessions.backends.db import SessionStore
from django.core.management import call_command
call_command("migrate", verbosity=0, interactive=False)
ann = User.objects.create_user("ann")
User.objects.create_user("ivan", is_active=False)
session = SessionStore()
session.update({"_auth_user_id": str(ann.pk),
                "_auth_user_backend": "django.contrib.auth.backends.ModelBackend",
                "_auth_user_hash": ann.get_session_auth_hash()})
session.create()
print(json.dumps({"ann": ann.pk, "ivan": User.objects.get(username="ivan").pk,
                  "session": session.session_key}))
"""

SENT_TOKENS: list[str] = []  # every token a test sent; none may appear in a log


@pytest.fixture(scope="module")
def database(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, dict[str, Any]]:
    path = str(tmp_path_factory.mktemp("auth-db") / "db.sqlite3")
    env = {k: v for k, v in os.environ.items() if k != "DJANGO_SETTINGS_MODULE"}
    result = subprocess.run([sys.executable, "-c", SETUP], cwd=ROOT, capture_output=True,
                            text=True, timeout=60, env={**env, "AUTH_DB": path})
    assert result.returncode == 0, result.stderr
    return path, json.loads(result.stdout)


# What the README tells users to run so ?token= stays out of the server's own logs: uvicorn
# logs every WebSocket handshake with its query string at INFO on "uvicorn.error", even
# with --no-access-log; hypercorn's default access log format ("%(r)s") has no query
# string, so its access log can stay on (it is on here, to prove that).
QUIET = {"daphne": [], "uvicorn": ["--no-access-log", "--log-level", "warning"],
         "hypercorn": ["--access-logfile", "-"]}
# A line each server's log has once a client connected (uvicorn at warning: none).
ACCESS_LINE = {"daphne": "WSCONNECT", "uvicorn": "", "hypercorn": '"GET /ws/ 1.1"'}


def _server(mode: str, database: tuple[str, dict[str, Any]],
            server: str = "daphne") -> Iterator[DaphneProcess]:
    env = {"AUTH_DB": database[0], "AUTH_MODE": mode}
    node = start_server(server, "tests.auth_app:application", env, extra_args=QUIET[server])
    try:
        yield node
        time.sleep(0.3)  # let the server flush its access log
        log = node.log_tail(1_000_000)
        assert ACCESS_LINE[server] in log, log  # the access log is on (without the query)
        for token in SENT_TOKENS:
            assert token not in log, f"a token reached the {mode} {server} log:\n{log}"
    finally:
        node.terminate()


@pytest.fixture(scope="module", params=SERVERS)
def jwt_node(request: pytest.FixtureRequest,
             database: tuple[str, dict[str, Any]]) -> Iterator[DaphneProcess]:
    """The JWT app under each server: the user, 4001 and no token in any log, under each."""
    yield from _server("jwt", database, request.param)


@pytest.fixture(scope="module")
def verifier_node(database: tuple[str, dict[str, Any]]) -> Iterator[DaphneProcess]:
    yield from _server("verifier", database)


def make_jwt(user_id: Any, *, exp: float | None = 300, key: str = JWT_KEY,
             aud: str = "chat") -> str:
    claims: dict[str, Any] = {"user_id": user_id, "aud": aud}
    if exp is not None:
        claims["exp"] = int(time.time() + exp)
    return jwt.encode(claims, key, algorithm="HS256")


async def whoami(node: DaphneProcess, token: str | None = None, *, header: bool = False,
                 cookie: str | None = None) -> dict[str, Any]:
    """The app's one frame; ``{"closed": code}`` if the server closes the socket instead."""
    url = f"{node.url}/ws/"
    headers: list[tuple[str, str]] = []
    if token is not None:
        SENT_TOKENS.append(token)
        if header:
            headers.append(("Authorization", f"Bearer {token}"))
        else:
            url += f"?token={token}"
    if cookie:
        headers.append(("Cookie", f"sessionid={cookie}"))
    async with connect(url, additional_headers=headers, open_timeout=10) as ws:
        try:
            frame: dict[str, Any] = json.loads(await ws.recv())
        except ConnectionClosed as exc:
            return {"closed": exc.rcvd.code if exc.rcvd else None}
    return frame


ANON = {"user": None, "authenticated": False}


async def test_no_token_keeps_the_anonymous_user(jwt_node: DaphneProcess) -> None:
    assert await whoami(jwt_node) == ANON


async def test_no_token_keeps_the_session_user(jwt_node: DaphneProcess, database: Any) -> None:
    got = await whoami(jwt_node, cookie=database[1]["session"])
    assert got == {"user": "ann", "authenticated": True}


@pytest.mark.parametrize("header", [False, True], ids=["query", "bearer"])
async def test_valid_jwt_sets_the_user(jwt_node: DaphneProcess, database: Any,
                                       header: bool) -> None:
    token = make_jwt(database[1]["ann"])
    assert await whoami(jwt_node, token, header=header) == {"user": "ann", "authenticated": True}


async def test_token_wins_over_the_session(jwt_node: DaphneProcess, database: Any) -> None:
    token = make_jwt(database[1]["ann"])
    got = await whoami(jwt_node, token, cookie="no-such-session")
    assert got["user"] == "ann"


@pytest.mark.parametrize("case", ["expired", "wrong-key", "wrong-audience", "no-exp",
                                  "inactive-user", "no-such-user", "garbage"])
async def test_bad_jwt_is_accepted_then_closed_4001(jwt_node: DaphneProcess, database: Any,
                                                    case: str) -> None:
    ann, ivan = database[1]["ann"], database[1]["ivan"]
    token = {
        "expired": lambda: make_jwt(ann, exp=-60),
        "wrong-key": lambda: make_jwt(ann, key="another-key-" + "y" * 32),
        "wrong-audience": lambda: make_jwt(ann, aud="billing"),
        "no-exp": lambda: make_jwt(ann, exp=None),
        "inactive-user": lambda: make_jwt(ivan),
        "no-such-user": lambda: make_jwt(987654),
        "garbage": lambda: "not-a-jwt-secret-garbage",
    }[case]()
    assert await whoami(jwt_node, token) == {"closed": 4001}
    # A bad token never falls back to the session user either.
    assert await whoami(jwt_node, token, cookie=database[1]["session"]) == {"closed": 4001}


async def test_verifier_from_settings(verifier_node: DaphneProcess) -> None:
    assert await whoami(verifier_node, "good-zoe") == {"user": "zoe", "authenticated": True}
    assert await whoami(verifier_node, "good-zed", header=True) == {
        "user": "zed", "authenticated": True}
    assert await whoami(verifier_node, "unknown-tok-123") == {"closed": 4001}
    # The verifier raises with the token in its message; that message is never logged.
    assert await whoami(verifier_node, "boom-secret-tok-456") == {"closed": 4001}
    assert await whoami(verifier_node) == ANON


def test_token_from_scope() -> None:
    def scope(headers: list[tuple[bytes, bytes]], query: bytes = b"") -> dict[str, Any]:
        return {"type": "websocket", "headers": headers, "query_string": query}

    assert token_from_scope(scope([(b"authorization", b"Bearer abc")])) == "abc"
    assert token_from_scope(scope([(b"authorization", b"bearer  abc ")])) == "abc"
    assert token_from_scope(scope([(b"authorization", b"Basic abc")])) is None
    assert token_from_scope(scope([], b"room=1&token=x%2By")) == "x+y"
    assert token_from_scope(scope([], b"token=")) is None
    assert token_from_scope(scope([(b"authorization", b"Bearer h")], b"token=q")) == "h"
