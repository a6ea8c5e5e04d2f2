"""Constructor validation of DistributedChannelLayer (DESIGN.md "Configuration").

None of these tests needs a Redis server: construction must not connect, so hosts point
at addresses where nothing listens (or that do not resolve at all).
"""

from __future__ import annotations

import re
import time
from typing import Any

import pytest
from django.core.exceptions import ImproperlyConfigured

from channels_distrib.layers import DistributedChannelLayer

NOWHERE = "redis://127.0.0.1:1/0"  # nothing listens on port 1


def make(**config: Any) -> DistributedChannelLayer:
    config.setdefault("hosts", [NOWHERE])
    config.setdefault("prefix", "cfgtest")
    started = time.monotonic()
    layer = DistributedChannelLayer(**config)
    assert time.monotonic() - started < 1.0, "construction must not wait for Redis"
    return layer


# ------------------------------------------------------------------ importable / basics


def test_backend_paths():
    import channels_distrib
    from channels_distrib.layers import DistributedChannelLayer as Direct

    assert channels_distrib.DistributedChannelLayer is Direct


def test_channels_builds_it_from_settings(settings):
    """Channels calls backend_class(**CONFIG): the one-line switch from channels_redis."""
    from channels.layers import get_channel_layer

    settings.CHANNEL_LAYERS = {
        "default": {
            "BACKEND": "channels_distrib.layers.DistributedChannelLayer",
            "CONFIG": {"hosts": [NOWHERE], "prefix": "fromsettings", "capacity": 7},
        }
    }
    layer = get_channel_layer()
    assert isinstance(layer, DistributedChannelLayer)
    assert layer.get_capacity("anything") == 7


def test_extensions():
    ext = make().extensions
    for name in ("groups", "flush", "registry", "presence"):
        assert name in ext


def test_defaults():
    layer = make()
    assert layer.expiry == 60
    assert layer.group_expiry == 86400
    assert layer.capacity == 100
    assert layer.get_capacity("any.channel") == 100


def test_no_config_at_all_is_accepted():
    """channels_redis accepts an empty CONFIG (localhost:6379); so must we."""
    DistributedChannelLayer()


def test_positional_arguments_rejected():
    with pytest.raises(TypeError):
        DistributedChannelLayer([NOWHERE])  # type: ignore[misc]


def test_construction_needs_no_event_loop():
    """get_channel_layer() is called from sync code (views, management commands)."""
    layer = make()  # this test is sync: no running loop
    assert layer is not None


# ------------------------------------------------------------------ hosts


@pytest.mark.parametrize(
    "hosts",
    [
        None,
        ["redis://127.0.0.1:1"],
        ["redis://127.0.0.1:1/3"],
        ["redis://:secret@127.0.0.1:1/0"],
        ["redis://user:secret@localhost:1/0"],
        ["rediss://127.0.0.1:1/0"],
        ["rediss://example.invalid:6380?ssl_cert_reqs=none"],
        ["unix:///tmp/does-not-exist-redis.sock"],
        ["unix:///tmp/does-not-exist-redis.sock?db=2"],
        [("127.0.0.1", 1)],
        [["127.0.0.1", 1]],
        [{"address": "redis://127.0.0.1:1/0"}],
        [{"address": "redis://127.0.0.1:1/0", "password": "x", "socket_connect_timeout": 1,
          "retry_on_timeout": True, "health_check_interval": 10}],
        [{"address": "rediss://127.0.0.1:1/0", "ssl_cert_reqs": None}],
        [{"sentinels": [("127.0.0.1", 26379)], "master_name": "mymaster"}],
        [{"sentinels": [("127.0.0.1", 26379), ("127.0.0.2", 26379)], "master_name": "mymaster",
          "sentinel_kwargs": {"password": "sentinel-secret"}, "password": "x", "db": 1}],
    ],
    ids=lambda h: repr(h)[:60],
)
def test_hosts_forms_accepted(hosts):
    make(hosts=hosts)


@pytest.mark.parametrize(
    "hosts, hint",
    [
        ("redis://127.0.0.1:6379", r"list"),  # a bare string: channels_redis's classic mistake
        (b"redis://127.0.0.1:6379", r"list"),
        ([123], r"redis://"),
        ([("127.0.0.1",)], r"redis://|\(host, port\)"),
        ([("127.0.0.1", 6379, "extra", "more")], r"redis://|\(host, port\)"),
        ([("127.0.0.1", "not-a-port")], r"redis://|\(host, port\)"),
        (["http://127.0.0.1:6379"], r"redis://|rediss://|unix://"),
        (["127.0.0.1:6379"], r"redis://|rediss://|unix://"),
        (["redis://127.0.0.1:notaport/0"], r"port"),
        (["redis://"], r"redis://127"),
        ([{"nothing": "useful"}], r"address|host|sentinels"),
        ([{"sentinels": [("127.0.0.1", 26379)]}], r"master_name"),
        ([{"master_name": "mymaster"}], r"sentinels|address|host"),
        ([{"sentinels": "127.0.0.1:26379", "master_name": "m"}], r"sentinels"),
        ({"address": "redis://127.0.0.1:6379"}, r"list"),
        (42, r"hosts|list"),
    ],
    ids=lambda v: repr(v)[:50],
)
def test_malformed_hosts(hosts, hint):
    with pytest.raises(ImproperlyConfigured) as info:
        make(hosts=hosts)
    text = str(info.value)
    assert re.search(hint, text, re.I), f"message does not say what to write: {text!r}"
    assert len(text) > 20


# ------------------------------------------------------------------ channels_redis options


def test_channels_redis_options_accepted():
    layer = make(
        prefix="myapp",
        expiry=30,
        group_expiry=3600,
        capacity=50,
        channel_capacity={"http.request": 200, "http.response!*": 10, "websocket.*": 20},
        symmetric_encryption_keys=["first-secret", "older-secret"],
        serializer_format="json",
        random_prefix_length=12,
    )
    assert layer.expiry == 30
    assert layer.group_expiry == 3600
    assert layer.capacity == 50
    assert layer.get_capacity("http.request") == 200
    assert layer.get_capacity("http.response!abc") == 10
    assert layer.get_capacity("websocket.send") == 20
    assert layer.get_capacity("other") == 50


def test_channel_capacity_first_match_wins():
    layer = make(capacity=3, channel_capacity={"limited.*": 2, "lim*": 5, "*": 7})
    assert layer.get_capacity("limited.x") == 2
    assert layer.get_capacity("limbo") == 5
    assert layer.get_capacity("zzz") == 7


# channels_redis accepts these forms; "every channels_redis option is accepted with the same
# meaning" (DESIGN.md), so a settings file that works there must construct here.


def test_channels_redis_compat_regex_capacity_keys():
    """channels_redis (BaseChannelLayer.compile_capacities) accepts precompiled regexes."""
    layer = make(capacity=3, channel_capacity={re.compile(r"^rx\.\d+$"): 9, "*": 7})
    assert layer.get_capacity("rx.12") == 9
    assert layer.get_capacity("rx.ab") == 7


def test_channels_redis_compat_empty_hosts_means_localhost():
    """channels_redis decode_hosts: `if not hosts` → localhost:6379."""
    make(hosts=[])


@pytest.mark.parametrize("entry", [{"host": "127.0.0.1", "port": 1},
                                   {"host": "127.0.0.1", "port": 1, "db": 2, "password": "x"}])
def test_channels_redis_compat_host_dict_without_address(entry):
    """channels_redis create_pool: a dict without 'address' is ConnectionPool(**dict)."""
    make(hosts=[entry])


def test_channels_redis_compat_prefix_with_colon():
    """channels_redis prefixes are plain strings glued to key names; "myproject:" is a common
    way to get a separator, and must not stop a one-line switch of BACKEND."""
    make(prefix="myproject:")


def test_channels_redis_compat_several_hosts():
    """channels_redis shards over several hosts; the option must at least be accepted."""
    make(hosts=["redis://127.0.0.1:1/0", "redis://127.0.0.2:1/0"])


def test_random_prefix_length_accepted_with_any_value():
    for n in (0, 12, 32):
        make(random_prefix_length=n)


@pytest.mark.parametrize("fmt", ["msgpack", "json"])
def test_serializer_format(fmt):
    make(serializer_format=fmt)


def test_unknown_serializer_format():
    with pytest.raises((ImproperlyConfigured, ValueError, KeyError)) as info:
        make(serializer_format="yaml-please")
    assert "yaml-please" in str(info.value)


def test_symmetric_encryption_keys_must_be_a_list():
    with pytest.raises((ImproperlyConfigured, ValueError)) as info:
        make(symmetric_encryption_keys="just-one-key-as-a-string")
    assert "list" in str(info.value).lower()


@pytest.mark.parametrize("prefix", ["asgi", "my-app_1.v2", "x"])
def test_prefixes_accepted(prefix):
    make(prefix=prefix)


# ------------------------------------------------------------------ own options


def test_own_options_accepted():
    layer = make(
        node_id="web-1",
        heartbeat_interval=0.5,
        node_timeout=2.0,
        serializer="json",
        max_message_size=2 * 1024 * 1024,
        max_meta_size=8192,
        retry_timeout=1.5,
        connection_limit=500,
    )
    assert layer.node_id == "web-1"


@pytest.mark.parametrize("serializer", ["msgpack", "json", "tests.test_serializers.ReversingJSON"])
def test_serializer_option(serializer):
    make(serializer=serializer)


def test_serializer_bad_dotted_path():
    with pytest.raises((ImproperlyConfigured, ImportError, ValueError)) as info:
        make(serializer="tests.nope.NoSuchSerializer")
    assert "tests.nope.NoSuchSerializer" in str(info.value) or "nope" in str(info.value)


def test_own_defaults_do_not_raise():
    layer = make(node_id=None, connection_limit=None)
    assert layer.extensions


def test_generated_node_ids_differ():
    a, b = make(), make()
    # the id may be generated lazily; if present it must be distinct per instance
    if getattr(a, "node_id", None) and getattr(b, "node_id", None):
        assert a.node_id != b.node_id


@pytest.mark.parametrize(
    "heartbeat, timeout",
    [(2.0, 2.0), (2.0, 1.0), (5, 4), (0.5, 0.5)],
)
def test_node_timeout_must_exceed_heartbeat(heartbeat, timeout):
    with pytest.raises(ImproperlyConfigured) as info:
        make(heartbeat_interval=heartbeat, node_timeout=timeout)
    text = str(info.value)
    assert "node_timeout" in text and "heartbeat_interval" in text, text


def test_node_timeout_default_checked_against_heartbeat():
    """heartbeat_interval=10 with the default node_timeout (6) contradicts it."""
    with pytest.raises(ImproperlyConfigured) as info:
        make(heartbeat_interval=10)
    assert "node_timeout" in str(info.value)


@pytest.mark.parametrize("ok", [(0.5, 2.0), (2.0, 6.0), (1, 1.5)])
def test_node_timeout_valid_pairs(ok):
    make(heartbeat_interval=ok[0], node_timeout=ok[1])


@pytest.mark.parametrize(
    "option, suggestion",
    [
        ("capactiy", "capacity"),
        ("expirey", "expiry"),
        ("host", "hosts"),
        ("group_expire", "group_expiry"),
        ("heartbeat", "heartbeat_interval"),
        ("symmetric_encryption_key", "symmetric_encryption_keys"),
        ("channel_capacities", "channel_capacity"),
    ],
)
def test_unknown_option_suggests_the_right_name(option, suggestion):
    with pytest.raises(ImproperlyConfigured) as info:
        make(**{option: 1})
    text = str(info.value)
    assert option in text, text
    assert re.search(rf"\b{suggestion}\b", text), f"no suggestion {suggestion!r} in {text!r}"


def test_unknown_option_without_close_match():
    with pytest.raises(ImproperlyConfigured) as info:
        make(totally_unrelated_setting=True)
    assert "totally_unrelated_setting" in str(info.value)


@pytest.mark.parametrize(
    "config",
    [
        {"expiry": -1},
        {"capacity": -5},
        {"group_expiry": -1},
        {"heartbeat_interval": 0, "node_timeout": 6},
        {"heartbeat_interval": -1, "node_timeout": 6},
        {"retry_timeout": -1},
        {"max_meta_size": -1},
        {"connection_limit": -1},
        {"prefix": 123},
        {"channel_capacity": ["not", "a", "dict"]},
    ],
    ids=lambda c: repr(c),
)
def test_nonsense_values_rejected(config):
    with pytest.raises((ImproperlyConfigured, ValueError, TypeError)) as info:
        make(**config)
    assert str(info.value)


def test_max_message_size_below_1mib_keeps_1mib_working_or_is_rejected():
    """1 MiB encoded is always accepted, so a lower limit is refused, saying what to write;
    1 MiB itself is the smallest limit accepted."""
    for too_small in (1000, 1024 * 1024 - 1):
        with pytest.raises(ImproperlyConfigured, match=r"max_message_size must be at least"):
            make(max_message_size=too_small)
    assert make(max_message_size=1024 * 1024).config.max_message_size == 1024 * 1024


@pytest.mark.parametrize(
    ("config", "says"),
    [
        ({"hosts": [{"sentinels": ["redis://:s3cret-pw@10.0.0.1:26379"], "master_name": "m"}]},
         "Sentinel address 'redis://:***@10.0.0.1:26379' must be a (host, port) pair"),
        ({"broker": {"url": "amqp://guest:s3cret-pw@10.0.0.1/", "password": "s3cret-pw"}},
         "broker must be an 'amqp://' or 'amqps://' URL"),
        ({"broker": "guest:s3cret-pw@10.0.0.1:5672"}, "got guest:***@10.0.0.1:5672"),
    ],
)
def test_a_refused_entry_is_shown_without_its_password(config: dict[str, Any], says: str) -> None:
    with pytest.raises(ImproperlyConfigured) as info:
        make(**config)
    assert says in str(info.value)
    assert "s3cret-pw" not in str(info.value)
