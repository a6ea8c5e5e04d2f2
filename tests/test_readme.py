"""The README's examples run: each ```python block after a ``<!-- readme-test: NAME -->`` line
is executed here, against a real Redis; and the configuration table lists every option."""

from __future__ import annotations

import inspect
import json
import re
import time
from pathlib import Path
from typing import Any

import pytest
from django.test import RequestFactory, override_settings

from channels_distrib.layers import DistributedChannelLayer
from tests.helpers_layers import msg, recv
from tests.redis_server import free_port
from tests.test_redis_security import ACL_COMMANDS

README = Path(__file__).resolve().parent.parent / "README.md"
BLOCK = re.compile(r"<!-- readme-test: ([\w-]+) -->\n```python\n(.*?)```", re.S)

pytestmark = pytest.mark.timeout(60)


def readme_blocks() -> dict[str, str]:
    return dict(BLOCK.findall(README.read_text()))


def run_block(name: str) -> dict[str, Any]:
    namespace: dict[str, Any] = {"__name__": f"readme_{name}"}
    exec(compile(readme_blocks()[name], f"README.md:{name}", "exec"), namespace)  # noqa: S102
    return namespace


def test_the_marked_blocks_are_found() -> None:
    assert set(readme_blocks()) >= {"migrate", "readyz"}


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
