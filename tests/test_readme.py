"""The README's examples run: each ```python block after a ``<!-- readme-test: NAME -->`` line
is executed here, against a real Redis; the server commands it shows (shell, systemd,
Kubernetes) start the demo project and serve it; and the configuration table lists every
option."""

from __future__ import annotations

import ast
import asyncio
import inspect
import json
import re
import sys
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from django.test import RequestFactory, override_settings
from websockets.asyncio.client import connect as ws_connect

from channels_distrib import api
from channels_distrib.layers import DistributedChannelLayer
from tests.consumer_app import ProbeConsumer
from tests.consumer_fixtures import connect_fixture, nodes_fixture  # noqa: F401  (fixtures)
from tests.helpers_layers import msg, recv
from tests.helpers_servers import start_command
from tests.redis_server import free_port
from tests.test_redis_security import ACL_COMMANDS

README = Path(__file__).resolve().parent.parent / "README.md"
NGINX = README.parent / "docs" / "nginx.conf"
BLOCK = re.compile(r"<!-- readme-test: ([\w-]+) -->\n```python\n(.*?)```", re.S)

pytestmark = pytest.mark.timeout(60)


def readme_blocks() -> dict[str, str]:
    return dict(BLOCK.findall(README.read_text()))


def run_block(name: str, given: dict[str, Any] | None = None) -> dict[str, Any]:
    """Execute block ``name``; ``given`` are the names it uses without defining them."""
    namespace: dict[str, Any] = {"__name__": f"readme_{name}", **(given or {})}
    exec(compile(readme_blocks()[name], f"README.md:{name}", "exec"), namespace)  # noqa: S102
    return namespace


async def run_async_block(name: str, given: dict[str, Any]) -> dict[str, Any]:
    """Execute block ``name``, whose top-level ``await`` lines stand for a coroutine's body."""
    namespace: dict[str, Any] = {"__name__": f"readme_{name}", **given}
    code = compile(readme_blocks()[name], f"README.md:{name}", "exec",
                   flags=ast.PyCF_ALLOW_TOP_LEVEL_AWAIT)
    result = eval(code, namespace)  # noqa: S307
    if inspect.iscoroutine(result):
        await result
    return namespace


SETTINGS_BLOCKS = ["settings-intro", "settings-install", "settings-broker", "settings-cluster"]


def test_the_marked_blocks_are_found() -> None:
    assert set(readme_blocks()) >= {
        "migrate", "readyz", "registry", "publish", "history", "disconnect", "metrics",
        "token-auth", *SETTINGS_BLOCKS}


@pytest.mark.parametrize("name", SETTINGS_BLOCKS)
async def test_settings_blocks_build_a_layer(name: str) -> None:
    """Each CHANNEL_LAYERS the README shows names the real backend and valid options (the
    layer validates them when built, without connecting)."""
    entry = run_block(name)["CHANNEL_LAYERS"]["default"]
    module, _, cls = entry["BACKEND"].rpartition(".")
    backend = getattr(__import__(module, fromlist=[cls]), cls)
    assert backend is DistributedChannelLayer
    layer = backend(**entry["CONFIG"])
    await layer.close()


async def test_registry_calls_run_as_written(redis_url: str, prefix: str) -> None:
    from channels.layers import get_channel_layer

    with override_settings(CHANNEL_LAYERS=_layers([redis_url], prefix)):
        layer = get_channel_layer()
        assert layer is not None
        try:
            me = SimpleNamespace(channel_name=await layer.new_channel())
            done = await run_async_block("registry", {"self": me, "node_id": layer.node_id})
            assert done["layer"] is layer
            members = await layer.group_members("room-1")
            assert [(m.channel, m.node_id, m.meta) for m in members] == [
                (me.channel_name, layer.node_id, {"name": "ada"})]
            assert await layer.node_channels(layer.node_id) == {me.channel_name}
            await layer.flush()
        finally:
            await layer.close()


async def test_publish_and_disconnect_from_sync_code_work_as_written(connect) -> None:
    listener = await connect(ProbeConsumer)
    await listener.request("join", room="chat-1")
    publish = run_block("publish")["publish"]
    await asyncio.to_thread(publish, RequestFactory().get("/"))
    assert await listener.expect("notice") == {"type": "notice", "text": "deploying"}

    tabs = [await connect(user="42"), await connect(user="42")]
    client_id = (await listener.request("whoami"))["client_id"]
    given = {"user": SimpleNamespace(pk=42), "client_id": client_id}
    await asyncio.to_thread(run_block, "disconnect", given)
    assert [await tab.expect_close() for tab in tabs] == [4000, 4000]
    assert await listener.expect_close() == 4003


async def test_history_consumer_works_as_written(connect) -> None:
    chat = run_block("history")["ChatConsumer"]
    first = await connect(chat)
    await first.send_json({"type": "joinRoom", "room": "hist-1"})
    joined = await first.expect("joined", room="hist-1")
    assert joined["recovered"] is False and joined["client_id"]
    offsets = [await api.send_to_room("hist-1", {"type": "m", "n": n}) for n in range(3)]
    assert [(await first.expect("m", n=n))["offset"] for n in range(3)] == offsets
    again = await connect(chat)
    await again.send_json({"type": "joinRoom", "room": "hist-1", "since": offsets[0],
                           "previous": joined["client_id"]})
    assert (await again.expect("joined", room="hist-1"))["recovered"] is True
    assert [(await again.expect("m", n=n))["offset"] for n in (1, 2)] == offsets[1:]


def test_metrics_urls_work_as_written() -> None:
    (pattern,) = run_block("metrics")["urlpatterns"]
    response = pattern.callback(RequestFactory().get("/metrics"))
    assert response.status_code == 200
    assert b"channels_distrib_" in response.content


def test_token_auth_application_is_built_as_written() -> None:
    from channels.routing import ProtocolTypeRouter

    from channels_distrib.auth import TokenAuthMiddleware
    from channels_distrib.lifespan import LayerLifespan
    from channels_distrib.security import BrowserOriginValidator

    done = run_block("token-auth", {"routes": []})
    application = done["application"]
    assert isinstance(application, ProtocolTypeRouter)
    assert isinstance(application.application_mapping["lifespan"], LayerLifespan)
    assert isinstance(application.application_mapping["websocket"], BrowserOriginValidator)
    assert set(done["CHANNELS_DISTRIB_TOKEN_AUTH"]) == {"VERIFIER"}
    # BrowserOriginValidator(AuthMiddlewareStack(TokenAuthMiddleware(URLRouter(routes))))
    chain = [application.application_mapping["websocket"]]
    while len(chain) < 10 and (getattr(chain[-1], "app", None) or getattr(chain[-1], "inner", None)):
        chain.append(getattr(chain[-1], "app", None) or chain[-1].inner)
    assert any(isinstance(layer, TokenAuthMiddleware) for layer in chain), chain


# -- the server commands ------------------------------------------------------------------

SERVER_NAMES = ("daphne", "uvicorn", "hypercorn")


def readme_server_commands() -> dict[str, list[str]]:
    """Every command line the README gives for starting a server, by where it stands."""
    text = README.read_text()
    section = text[text.index("## Servers, origins and authentication"):]
    shell = section[section.index("```sh\n") + 6:section.index("```", section.index("```sh\n") + 6)]
    commands = {f"sh-{line.split()[0]}": line.split() for line in shell.strip().splitlines()}
    commands["systemd"] = re.search(r"^ExecStart=(.*)$", text, re.M).group(1).split()  # type: ignore[union-attr]
    k8s = re.search(r"command: (\[.*?\])", text, re.S).group(1)  # type: ignore[union-attr]
    commands["kubernetes"] = json.loads(k8s)
    # docs/nginx.conf's comment: "#   daphne ... \" continued on the next comment line.
    comment = re.search(r"^#\s+(daphne .*?\\\n#\s+.*?)$", NGINX.read_text(), re.M)
    commands["nginx"] = comment.group(1).replace("\\\n#", " ").split()  # type: ignore[union-attr]
    return commands


def runnable(argv: list[str], port: int) -> list[str]:
    """``argv`` on loopback and ``port``, through this interpreter, serving the demo project."""
    name = Path(argv[0]).name
    assert name in SERVER_NAMES, argv
    out = [sys.executable, "-m", name]
    for word in argv[1:]:
        word = word.replace("0.0.0.0", "127.0.0.1")
        word = re.sub(r"^(?:mysite|myproject)\.", "testproject.", word)
        out.append(re.sub(r"^(?:8000|8001|%i)$|(?<=:)(?:8000|8001)$", str(port), word))
    return out


def test_the_readme_shows_every_server_command() -> None:
    assert set(readme_server_commands()) == set(COMMANDS)


COMMANDS = ["sh-daphne", "sh-uvicorn", "sh-hypercorn", "systemd", "kubernetes", "nginx"]


@pytest.mark.parametrize("where", COMMANDS)
async def test_readme_server_commands_serve_the_demo(
    where: str, redis_url: str, prefix: str, tmp_path: Path
) -> None:
    port = free_port()
    argv = runnable(readme_server_commands()[where], port)
    env = {"DJANGO_SETTINGS_MODULE": "testproject.settings", "REDIS_URL": redis_url,
           "DISTRIB_PREFIX": prefix, "DEMO_DATABASE": str(tmp_path / "db.sqlite3")}
    node = start_command(argv, port, "testproject.asgi:application", env)
    try:
        async with ws_connect(f"{node.url}/ws/chat/?name=ada", open_timeout=10) as ws:
            await ws.send(json.dumps({"type": "joinRoom", "room": "readme"}))
            while (frame := json.loads(await asyncio.wait_for(ws.recv(), 10)))["type"] != "joined":
                pass
            assert frame["room"] == "readme" and frame["name"] == "ada", node.log_tail()
    finally:
        node.terminate()


async def test_migration_settings_work_as_written(monkeypatch, redis_url, prefix) -> None:
    monkeypatch.setenv("REDIS_URL", redis_url)
    settings = run_block("migrate")
    layer_settings = settings["CHANNEL_LAYERS"]["default"]
    module, _, name = layer_settings["BACKEND"].rpartition(".")
    backend = getattr(__import__(module, fromlist=[name]), name)
    assert backend is DistributedChannelLayer
    config = dict(layer_settings["CONFIG"])
    assert config["hosts"] == [redis_url]
    config["prefix"] = prefix  # the example's "asgi" is not this test's to flush
    layer = backend(**config)
    try:
        local = await layer.new_channel()
        await layer.group_add("readme-room", local)
        await layer.group_send("readme-room", msg(1))
        assert await recv(layer, local) == msg(1)
        await layer.flush()
    finally:
        await layer.close_pools()  # the channels_redis name still works


def _layers(hosts: list[str], prefix: str) -> dict[str, Any]:
    return {"default": {"BACKEND": "channels_distrib.layers.DistributedChannelLayer",
                        "CONFIG": {"hosts": hosts, "prefix": prefix, "retry_timeout": 1}}}


async def _ready(view: Any) -> tuple[int, dict[str, Any], float]:
    from channels.layers import get_channel_layer

    started = time.monotonic()
    response = await view(RequestFactory().get("/readyz/"))
    took = time.monotonic() - started
    layer = get_channel_layer()
    assert layer is not None
    await layer.close()
    return response.status_code, json.loads(response.content), took


async def test_readiness_view_is_ready_only_when_redis_answers(redis_url, prefix) -> None:
    readyz = run_block("readyz")["readyz"]
    with override_settings(CHANNEL_LAYERS=_layers([redis_url], prefix)):
        status, body, _ = await _ready(readyz)
    assert (status, body["ready"]) == (200, True)
    assert isinstance(body["nodes"], int)
    closed = f"redis://127.0.0.1:{free_port()}/0"
    with override_settings(CHANNEL_LAYERS=_layers([closed], prefix)):
        status, body, took = await _ready(readyz)
    assert (status, body) == (503, {"ready": False})
    assert took < 3, f"the probe waited {took:.1f} s"


def test_configuration_table_has_one_line_per_option() -> None:
    text = README.read_text()
    table = text[text.index("| option | default | meaning |"):]
    table = table[:table.index("\n\n")]
    documented: list[str] = []
    for line in table.splitlines()[2:]:
        documented += re.findall(r"`(\w+)`", line.split("|")[1])
    params = [p.name for p in inspect.signature(DistributedChannelLayer.__init__).parameters.values()
              if p.kind is inspect.Parameter.KEYWORD_ONLY]
    assert params, "the constructor's options are keyword-only"
    missing = [p for p in params if p not in documented]
    assert missing == [], f"options without a line in the README's table: {missing}"
    assert sorted(documented) == sorted(set(documented)), "an option has two lines"
    assert all(len(line.split("|")) == 5 for line in table.splitlines()), "name|default|meaning"


def test_acl_rule_in_the_readme_is_the_one_the_security_test_runs() -> None:
    text = README.read_text()
    start = text.index("ACL SETUSER channels")
    rule = " ".join(text[start:text.index("```", start)].split())
    granted = [word[1:] for word in rule.split() if word.startswith("+")]
    assert granted == list(ACL_COMMANDS)
    assert " ~asgi:* resetchannels &asgi:* -@all " in rule  # the doorbells: &<prefix>:*


def test_nginx_example_does_what_the_readme_says() -> None:
    """docs/nginx.conf (no nginx here to run it): least_conn, no sticky sessions, upgrade
    headers on /ws/, a read timeout above daphne's ping interval, and an access log whose
    format cannot hold ``?token=`` (nginx's default "combined" logs ``$request``)."""
    conf = re.sub(r"#.*", "", NGINX.read_text())
    assert "least_conn;" in conf and "ip_hash" not in conf
    ws = conf[conf.index("location /ws/"):conf.index("location / ")]
    for line in ("proxy_http_version 1.1;", "proxy_set_header Upgrade $http_upgrade;",
                 "proxy_set_header Connection $connection_upgrade;", "proxy_set_header Host $host;"):
        assert line in ws, line
    timeout = re.search(r"proxy_read_timeout (\d+)s;", ws)
    assert timeout is not None and int(timeout.group(1)) > 20  # daphne's --ping-interval
    formats = dict(re.findall(r"log_format (\w+)((?:\s*'[^']*')+)\s*;", conf))
    logs = re.findall(r"access_log \S+ (\w+);", conf)
    assert logs and all(name in formats for name in logs), (logs, formats)
    for name in logs:
        assert "$uri" in formats[name]
        assert not re.search(r"\$(request|request_uri|args|query_string|arg_\w+)\b", formats[name])
