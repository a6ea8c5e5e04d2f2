"""System checks (channels_distrib/checks.py), each asserted by its exact id.

No Redis needed: the checks build the layer, which validates without connecting.
"""

from __future__ import annotations

import time
from typing import Any

import pytest
from django.apps import apps
from django.core.checks import Error, Warning, run_checks
from django.test import override_settings

from channels_distrib.checks import BACKEND, TAG, check_channel_layers
from channels_distrib.layers import DistributedChannelLayer

NOWHERE = "redis://127.0.0.1:1/0"  # nothing listens on port 1: a check must never connect
INMEMORY = {"BACKEND": "channels.layers.InMemoryChannelLayer"}


class MyLayer(DistributedChannelLayer):
    """A user's subclass under their own dotted path: still checked."""


def ours(**config: Any) -> dict[str, Any]:
    config.setdefault("hosts", [NOWHERE])
    return {"BACKEND": BACKEND, "CONFIG": config}


def ids(layers: Any) -> list[str]:
    with override_settings(CHANNEL_LAYERS=layers):
        return [message.id for message in check_channel_layers(None)]


def test_app_config_is_ours():
    config = apps.get_app_config("channels_distrib")
    assert type(config).__module__ == "channels_distrib.apps"


def test_registered_under_own_tag():
    with override_settings(CHANNEL_LAYERS={"default": ours(prefix="x", no_such_option=1)}):
        found = [m.id for m in run_checks(tags=[TAG])]
    assert found == ["channels_distrib.E004"]


def test_valid_config_passes_without_connecting():
    started = time.monotonic()
    assert ids({"default": ours()}) == []
    assert time.monotonic() - started < 2.0


def test_every_channels_redis_option_passes():
    config = ours(
        prefix="asgi",
        expiry=60,
        group_expiry=86400,
        capacity=100,
        channel_capacity={"http.request": 200, "websocket.send*": 20},
        random_prefix_length=12,
        serializer_format="msgpack",
    )
    assert ids({"default": config}) == []


def test_package_level_backend_path_is_recognised():
    entry = {"BACKEND": "channels_distrib.DistributedChannelLayer",
             "CONFIG": {"hosts": [NOWHERE], "capacity": 0}}
    assert ids({"default": entry}) == ["channels_distrib.E004"]


def test_e001_channel_layers_not_a_dict():
    assert ids(["redis://127.0.0.1:6379"]) == ["channels_distrib.E001"]


def test_e002_config_not_a_dict():
    entry = {"BACKEND": BACKEND, "CONFIG": "redis://127.0.0.1:6379"}
    assert ids({"default": entry}) == ["channels_distrib.E002", "channels_distrib.W001"]


def test_e003_backend_under_our_package_does_not_import():
    entry = {"BACKEND": "channels_distrib.layers.NoSuchLayer", "CONFIG": {}}
    assert ids({"default": entry}) == ["channels_distrib.E003", "channels_distrib.W001"]


@pytest.mark.parametrize(
    "config",
    [
        pytest.param({"no_such_option": 1}, id="unknown-option"),
        pytest.param({"heartbeat_interval": 2.0, "node_timeout": 1.0}, id="timeout-le-heartbeat"),
        pytest.param({"hosts": "redis://127.0.0.1:6379/0"}, id="hosts-not-a-list"),
        pytest.param({"hosts": ["http://127.0.0.1:6379"]}, id="hosts-bad-scheme"),
        pytest.param({"capacity": 0}, id="capacity-zero"),
    ],
)
def test_e004_layer_rejects_config(config: dict[str, Any]):
    with override_settings(CHANNEL_LAYERS={"default": ours(**config)}):
        messages = check_channel_layers(None)
    assert [m.id for m in messages] == ["channels_distrib.E004"]
    assert isinstance(messages[0], Error)
    assert messages[0].obj == "CHANNEL_LAYERS['default']"


def test_e004_message_carries_the_layers_reason():
    with override_settings(CHANNEL_LAYERS={"default": ours(no_such_option=1)}):
        (message,) = check_channel_layers(None)
    assert "no_such_option" in message.msg


def test_subclass_under_another_path_is_checked():
    entry = {"BACKEND": "tests.test_checks.MyLayer", "CONFIG": {"hosts": [NOWHERE], "capacity": 0}}
    assert ids({"default": entry}) == ["channels_distrib.E004"]


def test_w001_app_installed_but_layer_unused():
    messages_ids = ids({"default": INMEMORY})
    assert messages_ids == ["channels_distrib.W001"]
    with override_settings(CHANNEL_LAYERS={"default": INMEMORY}):
        (message,) = check_channel_layers(None)
    assert isinstance(message, Warning)


def test_other_backends_are_left_alone():
    layers = {
        "default": ours(),
        "memory": INMEMORY,
        "typo": {"BACKEND": "myproject.layers.NoSuchLayer"},
        "odd": "not a dict",
    }
    assert ids(layers) == []


def test_w002_two_aliases_share_redis_and_prefix():
    layers = {"default": ours(prefix="app"), "other": ours(prefix="app")}
    assert ids(layers) == ["channels_distrib.W002"]


def test_distinct_prefixes_do_not_warn():
    assert ids({"default": ours(prefix="app"), "other": ours(prefix="jobs")}) == []
