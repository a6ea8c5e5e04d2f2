"""Serializers: msgpack (default), JSON, a dotted path, and symmetric encryption with key
rotation (encrypt with the first key, decrypt with any).

The first half needs no Redis (channels_distrib.serializers directly); the second half checks
the same behaviour end to end through layers, including what is actually stored in Redis.
"""

from __future__ import annotations

import json
import logging
from typing import Any

import pytest
from django.core.exceptions import ImproperlyConfigured

from channels_distrib.serializers import SerializerError, make_serializer
from tests.helpers_layers import key_values, msg, nothing_arrives, prefix_keys, raw_redis, recv

MESSAGE = {
    "type": "chat.message",
    "text": "héllo ✓",
    "n": 2**62,
    "neg": -12,
    "f": 0.25,
    "list": [1, "a", None, True, {"k": [False]}],
    "dict": {"nested": {"x": 1}},
    "none": None,
}


class ReversingJSON:
    """A user serializer named by dotted path: JSON, stored reversed (so it is recognisable)."""

    def dumps(self, message: dict[str, Any]) -> bytes:
        return json.dumps(message).encode()[::-1]

    def loads(self, data: bytes) -> dict[str, Any]:
        try:
            value = json.loads(data[::-1])
        except ValueError as exc:
            raise SerializerError(str(exc)) from exc
        if not isinstance(value, dict):
            raise SerializerError("not a dict")
        return value


class NotASerializer:
    pass


class CountingMsgpack:
    """msgpack that counts dumps() calls, to see how often the layer encodes."""

    dumps_calls = 0

    def __init__(self) -> None:
        from channels_distrib.serializers import MsgPackSerializer

        self._inner = MsgPackSerializer()

    def dumps(self, message: dict[str, Any]) -> bytes:
        type(self).dumps_calls += 1
        return self._inner.dumps(message)

    def loads(self, data: bytes) -> dict[str, Any]:
        return self._inner.loads(data)


# ------------------------------------------------------------------ unit level


@pytest.mark.parametrize("name", ["msgpack", "json", "tests.test_serializers.ReversingJSON"])
def test_round_trip(name):
    serializer = make_serializer(name)
    data = serializer.dumps(MESSAGE)
    assert isinstance(data, bytes)
    assert serializer.loads(data) == MESSAGE


def test_msgpack_keeps_bytes_and_turns_tuples_into_lists():
    serializer = make_serializer("msgpack")
    out = serializer.loads(serializer.dumps({"type": "b", "raw": b"\x00\xff", "t": (1, 2)}))
    assert out == {"type": "b", "raw": b"\x00\xff", "t": [1, 2]}
    assert isinstance(out["raw"], bytes)


def test_json_is_json():
    data = make_serializer("json").dumps({"type": "j", "v": [1, 2]})
    assert json.loads(data) == {"type": "j", "v": [1, 2]}


def test_dotted_path_is_used():
    data = make_serializer("tests.test_serializers.ReversingJSON").dumps({"type": "r"})
    assert json.loads(data[::-1]) == {"type": "r"}


@pytest.mark.parametrize("name", ["tests.test_serializers.NotASerializer", "tests.nope.Missing",
                                  "yaml"])
def test_bad_serializer_names(name):
    with pytest.raises(ImproperlyConfigured) as info:
        make_serializer(name)
    assert name in str(info.value)


@pytest.mark.parametrize("name", ["msgpack", "json"])
@pytest.mark.parametrize("data", [b"\xc1\xc1\xc1", b"", b"{not json", b"\x93\x01\x02\x03",
                                  b'"a string"', b"[1, 2]"])
def test_corrupt_or_foreign_bytes_raise_serializer_error(name, data):
    with pytest.raises(SerializerError):
        make_serializer(name).loads(data)


def test_unserializable_message_is_type_error():
    with pytest.raises(TypeError):
        make_serializer("msgpack").dumps({"type": "x", "obj": object()})
    with pytest.raises(TypeError):
        make_serializer("json").dumps({"type": "x", "raw": b"bytes are not JSON"})


def test_serializer_error_is_value_error():
    assert issubclass(SerializerError, ValueError)


@pytest.mark.parametrize("name", ["msgpack", "json"])
def test_encryption_round_trip_and_ciphertext(name):
    serializer = make_serializer(name, ("secret-one", "secret-two"))
    data = serializer.dumps({"type": "s", "text": "plain-marker"})
    assert b"plain-marker" not in data
    assert serializer.loads(data) == {"type": "s", "text": "plain-marker"}


def test_key_rotation_encrypts_with_first_decrypts_with_any():
    new_then_old = make_serializer("msgpack", ("new-key", "old-key"))
    old_only = make_serializer("msgpack", ("old-key",))
    new_only = make_serializer("msgpack", ("new-key",))
    other_then_new = make_serializer("msgpack", ("other", "new-key"))

    # messages written by a process still on the old key are readable after rotation
    from_old = old_only.dumps({"type": "old"})
    assert new_then_old.loads(from_old) == {"type": "old"}

    # the rotated process encrypts with its FIRST key: new-key
    from_rotated = new_then_old.dumps({"type": "rotated"})
    assert new_only.loads(from_rotated) == {"type": "rotated"}
    assert other_then_new.loads(from_rotated) == {"type": "rotated"}
    with pytest.raises(SerializerError):
        old_only.loads(from_rotated)


def test_wrong_key_and_plaintext_are_serializer_errors():
    encrypted = make_serializer("msgpack", ("k1",))
    with pytest.raises(SerializerError):
        make_serializer("msgpack", ("k2",)).loads(encrypted.dumps({"type": "x"}))
    with pytest.raises(SerializerError):
        encrypted.loads(make_serializer("msgpack").dumps({"type": "x"}))


def test_encryption_is_not_deterministic():
    serializer = make_serializer("msgpack", ("k",))
    assert serializer.dumps({"type": "x"}) != serializer.dumps({"type": "x"})


# ------------------------------------------------------------------ through the layer


@pytest.mark.parametrize("config", [{"serializer": "json"}, {"serializer_format": "json"},
                                    {"serializer": "msgpack"},
                                    {"serializer": "tests.test_serializers.ReversingJSON"}],
                         ids=repr)
async def test_layer_round_trip_with_serializer(make_layer, config):
    layer = make_layer(**config)
    local = await layer.new_channel()
    await layer.group_add("sergroup", local)
    message = dict(MESSAGE.items())
    await layer.send("ser.named", message)
    await layer.send(local, message)
    await layer.group_send("sergroup", message)
    assert await recv(layer, "ser.named") == message
    assert await recv(layer, local) == message
    assert await recv(layer, local) == message


async def test_layer_dotted_path_serializer_is_what_is_stored(make_layer, redis_url, prefix):
    layer = make_layer(serializer="tests.test_serializers.ReversingJSON")
    await layer.send("ser.stored", {"type": "x", "marker": "dotted-marker"})
    async with raw_redis(redis_url) as raw:
        values = [v for k in await prefix_keys(raw, prefix) for v in await key_values(raw, k)]
    assert any(b"dotted-marker"[::-1] in v for v in values), values


async def _stored_values(redis_url: str, prefix: str) -> list[bytes]:
    async with raw_redis(redis_url) as raw:
        return [v for k in await prefix_keys(raw, prefix) for v in await key_values(raw, k)]


async def test_layer_encrypts_what_it_stores(make_layer, redis_url, prefix):
    plain = make_layer()
    await plain.send("enc.control", {"type": "x", "marker": "visible-marker-123"})
    values = await _stored_values(redis_url, prefix)
    assert any(b"visible-marker-123" in v for v in values)  # the check can see plaintext

    secret = make_layer(symmetric_encryption_keys=["k-one", "k-two"])
    node = make_layer(symmetric_encryption_keys=["k-one"])
    local = await node.new_channel()
    await node.group_add("encgroup", local)
    await secret.send("enc.named", {"type": "x", "marker": "hidden-marker-456"})
    await secret.send(local, {"type": "x", "marker": "hidden-marker-456"})
    await secret.group_send("encgroup", {"type": "x", "marker": "hidden-marker-456"})
    values = await _stored_values(redis_url, prefix)
    assert not any(b"hidden-marker-456" in v for v in values)
    assert (await recv(node, "enc.named"))["marker"] == "hidden-marker-456"
    assert (await recv(node, local))["marker"] == "hidden-marker-456"
    assert (await recv(node, local))["marker"] == "hidden-marker-456"


async def test_layer_key_rotation(make_layer, caplog):
    caplog.set_level(logging.DEBUG, logger="channels_distrib")
    rotated = make_layer(symmetric_encryption_keys=["new", "old"])
    old = make_layer(symmetric_encryption_keys=["old"])
    other_then_new = make_layer(symmetric_encryption_keys=["other", "new"])

    # old process -> rotated process: decrypt with any key
    await old.send("rot.a", msg(1))
    assert await recv(rotated, "rot.a") == msg(1)
    # rotated process encrypts with its first key: readable wherever "new" is known
    await rotated.send("rot.b", msg(2))
    assert await recv(other_then_new, "rot.b") == msg(2)
    # ... and not by a process that only knows "old": skipped (logged), receive keeps working
    local = await old.new_channel()
    await rotated.send("rot.c", msg(3))
    await rotated.send(local, msg(3))
    await old.send("rot.c", msg(4))
    await old.send(local, msg(4))
    assert await recv(old, "rot.c") == msg(4)
    assert await recv(old, local) == msg(4)
    assert await nothing_arrives(old, local, 0.2)
    assert any(r.levelno >= logging.WARNING for r in caplog.records
               if r.name.startswith("channels_distrib"))


async def test_group_send_encodes_once(make_layer):
    """The payload is encoded once per group_send, whatever the group size and node count."""
    path = "tests.test_serializers.CountingMsgpack"
    sender, n1, n2 = make_layer(serializer=path), make_layer(serializer=path), \
        make_layer(serializer=path)
    members = []
    for node in (n1, n2):
        for _ in range(25):
            channel = await node.new_channel()
            await node.group_add("encodeonce", channel)
            members.append((node, channel))
    for i in range(3):
        await sender.group_add("encodeonce", f"encodeonce.q{i}")
    before = CountingMsgpack.dumps_calls
    await sender.group_send("encodeonce", msg(1))
    assert CountingMsgpack.dumps_calls - before == 1
    for node, channel in members:
        assert await recv(node, channel) == msg(1)
    for i in range(3):
        assert await recv(sender, f"encodeonce.q{i}") == msg(1)
    assert CountingMsgpack.dumps_calls - before == 1
