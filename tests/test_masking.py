"""Redis credentials never reach what the library prints, logs or raises.

Each config below hides a different secret in a different place (URL user info, URL query,
a channels_redis-style dict, an ``address`` dict, Sentinel kwargs); the tests feed them to
the management commands, the config validation, the system checks and a send, and grep
every byte of output and every log record for the secret.
"""

from __future__ import annotations

import asyncio
import io
import logging
from typing import Any

import pytest
import redis
from django.core.exceptions import ImproperlyConfigured
from django.core.management import CommandError, call_command
from django.test import override_settings

from channels_distrib.checks import check_channel_layers
from channels_distrib.exceptions import RedisUnavailable
from channels_distrib.layers import DistributedChannelLayer
from channels_distrib.masking import describe_host, mask_url, scrub
from tests.redis_server import RedisProcess, free_port

BACKEND = "channels_distrib.layers.DistributedChannelLayer"
SECRET = "s3cr3t-Pw-42"


def unreachable_hosts(port: int) -> dict[str, Any]:
    """Host entries pointing at a port nobody listens on, each carrying SECRET somewhere."""
    return {
        "url-userinfo": f"redis://admin:{SECRET}@127.0.0.1:{port}/0",
        "url-password-only": f"redis://:{SECRET}@127.0.0.1:{port}/0",
        "url-query": f"redis://127.0.0.1:{port}/0?password={SECRET}",
        "dict-host": {"host": "127.0.0.1", "port": port, "password": SECRET},
        "dict-address": {"address": f"redis://admin:{SECRET}@127.0.0.1:{port}/0",
                         "password": SECRET, "username": "admin"},
        "sentinel": {"sentinels": [("127.0.0.1", port)], "master_name": "mymaster",
                     "password": SECRET,
                     "sentinel_kwargs": {"password": SECRET, "username": "watcher"}},
    }


CASES = sorted(unreachable_hosts(1))


def layers(host: Any, **extra: Any) -> dict[str, Any]:
    return {"default": {"BACKEND": BACKEND, "CONFIG": {
        "hosts": [host], "prefix": "masking", "retry_timeout": 0.3, **extra}}}


def run(name: str, *args: str, host: Any) -> tuple[str, str]:
    """Run a command in this thread's own loop; return (stdout, the CommandError text)."""
    out, err = io.StringIO(), io.StringIO()
    with override_settings(CHANNEL_LAYERS=layers(host)):
        try:
            call_command(name, *args, "--timeout", "3", stdout=out, stderr=err)
        except CommandError as exc:
            return out.getvalue() + err.getvalue(), str(exc)
    return out.getvalue() + err.getvalue(), ""


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("command", ["distrib_status", "distrib_prune"])
def test_unreachable_redis_error_masks_the_secret(
    case: str, command: str, caplog: pytest.LogCaptureFixture
) -> None:
    host = unreachable_hosts(free_port())[case]
    caplog.set_level(logging.DEBUG)
    output, error = run(command, host=host)
    assert error.startswith("Cannot reach Redis at "), (output, error)
    assert "127.0.0.1" in error  # the host is still named
    assert SECRET not in output + error
    assert SECRET not in caplog.text


def test_masked_host_descriptions_keep_what_helps() -> None:
    hosts = unreachable_hosts(6390)
    assert describe_host(hosts["url-userinfo"]) == "redis://admin:***@127.0.0.1:6390/0"
    assert describe_host(hosts["url-query"]) == "redis://127.0.0.1:6390/0?password=***"
    assert describe_host(hosts["dict-host"]) == (
        "{'host': '127.0.0.1', 'port': 6390, 'password': '***'}")
    assert describe_host(hosts["sentinel"]) == (
        "sentinels [('127.0.0.1', 6390)] master mymaster {'password': '***', "
        "'sentinel_kwargs': {'password': '***', 'username': 'watcher'}}")
    assert mask_url("redis://127.0.0.1:6379/0") == "redis://127.0.0.1:6379/0"
    assert scrub(f"failed: rediss://u:{SECRET}@h:1/0 and more") == "failed: rediss://u:***@h:1/0 and more"
    # A raw "@" in the password: all of it is hidden, in free text and in a URL.
    assert scrub("failed: redis://u:p@ss@h:1/0, then redis://:x@y@h2:2 too") == (
        "failed: redis://u:***@h:1/0, then redis://:***@h2:2 too")
    assert mask_url("redis://u:p@ss@h:1/0") == "redis://u:***@h:1/0"


@pytest.mark.parametrize("host", [
    {"host": "127.0.0.1", "password": SECRET, "pasword": "typo"},   # unknown option
    {"address": f"redis://:{SECRET}@127.0.0.1:6379/0", "colour": 1},
    {"host": 6379, "password": SECRET},                              # host must be a str
    {"master_name": "m", "password": SECRET},                       # no sentinels
    f"redis://:{SECRET}@127.0.0.1:notaport/0",
    f"http://:{SECRET}@127.0.0.1:6379/0",
])
def test_config_errors_and_checks_mask_the_secret(host: Any) -> None:
    with pytest.raises(ImproperlyConfigured) as info:
        DistributedChannelLayer(hosts=[host])
    assert SECRET not in str(info.value)
    with override_settings(CHANNEL_LAYERS=layers(host)):
        messages = check_channel_layers()
    assert [m.id for m in messages] == ["channels_distrib.E004"]
    assert SECRET not in str(messages[0])


def test_several_hosts_warning_masks_the_secret(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="channels_distrib")
    hosts = [f"redis://:{SECRET}@127.0.0.1:6379/0", f"redis://:{SECRET}@127.0.0.1:6380/0"]
    DistributedChannelLayer(hosts=hosts)
    assert "2 hosts given" in caplog.text
    assert SECRET not in caplog.text


@pytest.mark.parametrize("case", ["url-userinfo", "dict-address", "dict-host"])
async def test_redis_unavailable_masks_the_secret(
    case: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    layer = DistributedChannelLayer(hosts=[unreachable_hosts(free_port())[case]],
                                    prefix="masking", retry_timeout=0.3)
    try:
        with pytest.raises(RedisUnavailable) as info:
            await asyncio.wait_for(layer.send("masking.target", {"type": "x"}), 10)
    finally:
        await layer.close()
    assert "127.0.0.1" in str(info.value)
    assert SECRET not in str(info.value) + repr(info.value.args) + caplog.text


def test_redis_unavailable_scrubs_its_cause() -> None:
    exc = RedisUnavailable("redis://127.0.0.1:1/0", 1.0,
                           ConnectionError(f"cannot parse redis://a:{SECRET}@h:1"))
    assert SECRET not in str(exc)
    assert "redis://a:***@h:1" in str(exc)


def test_commands_through_a_password_protected_redis_print_no_secret(
    caplog: pytest.LogCaptureFixture,
) -> None:
    from tests.redis_server import start_server

    server: RedisProcess = start_server()
    caplog.set_level(logging.DEBUG)
    try:
        # Set after start: the helper's readiness PING needs no password.
        admin = redis.Redis(host="127.0.0.1", port=server.port)
        admin.config_set("requirepass", SECRET)
        admin.close()
        for host in (f"redis://:{SECRET}@127.0.0.1:{server.port}/0",
                     {"host": "127.0.0.1", "port": server.port, "password": SECRET}):
            for command in ("distrib_status", "distrib_prune"):
                for extra in ((), ("--json",)):
                    output, error = run(command, *extra, host=host)
                    assert error == ""
                    assert output.strip()
                    assert SECRET not in output
        # With a wrong password the command fails, naming the host but not the password.
        output, error = run("distrib_status", host=f"redis://:wrong-{SECRET}@127.0.0.1:{server.port}/0")
        assert error.startswith("Cannot reach Redis at redis://:***@127.0.0.1"), error
        assert SECRET not in output + error
    finally:
        server.stop()
    assert SECRET not in caplog.text


@pytest.mark.parametrize(
    ("written", "shown"),
    [
        ("guest:s3cret-pw@rabbit:5672", "guest:***@rabbit:5672"),
        (":s3cret-pw@10.0.0.1:6379", ":***@10.0.0.1:6379"),
        ("someone@example.com", "someone@example.com"),  # no password: unchanged
    ],
)
def test_a_url_written_without_its_scheme_is_masked(written: str, shown: str) -> None:
    from channels_distrib.masking import mask_url, redact

    assert mask_url(written) == shown
    assert redact({"broker": written}) == {"broker": shown}


@pytest.mark.parametrize(
    ("written", "shown"),
    [
        # urlsplit ends the host part at the bare / and would show "pa" as a port, the
        # rest as a path: the whole password is hidden instead.
        ("amqp://guest:pa/s3cret-pw@rabbit:5672/vhost", "amqp://guest:***@rabbit:5672/vhost"),
        ("redis://:pa?s3cret-pw@10.0.0.1:6379/0", "redis://:***@10.0.0.1:6379/0"),
        ("amqps://guest:p@s3cret-pw@rabbit/?cafile=/ca.pem", "amqps://guest:***@rabbit/?cafile=/ca.pem"),
        ("amqp://rabbit:5672/%2F", "amqp://rabbit:5672/%2F"),  # no user info: unchanged
    ],
)
def test_a_password_with_a_bare_delimiter_is_masked_whole(written: str, shown: str) -> None:
    """A password not percent-encoded (``/``, ``?``, ``#`` or ``@`` in it) is masked whole,
    by mask_url and by scrub in free text; before, part of it showed."""
    assert mask_url(written) == shown
    assert "s3cret" not in scrub(f"cannot connect to {written}: refused")
