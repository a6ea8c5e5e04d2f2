"""Local fan-out (channels_distrib.local and the inbox's dispatch): a group message reaching
several channels of one node is decoded once for the node, yet every receiver gets a message
of its own that no other consumer can change.
"""

from __future__ import annotations

import asyncio
import itertools
from typing import Any

from channels_distrib.serializers import MsgPackSerializer
from tests.helpers_layers import recv, recv_n

#: Serializer loads() calls, by every CountingSerializer (the tests read differences).
LOADS = itertools.count()


class CountingSerializer(MsgPackSerializer):
    """msgpack, counting how often a payload is decoded."""

    def loads(self, data: bytes) -> dict[str, Any]:
        next(LOADS)
        return super().loads(data)


COUNTING = "tests.test_local.CountingSerializer"


def loads_so_far() -> int:
    return next(LOADS)  # itertools.count has no peek: read by taking one (each read costs 1)


async def members(layer: Any, group: str, n: int) -> list[str]:
    names = [await layer.new_channel() for _ in range(n)]
    for name in names:
        await layer.group_add(group, name)
    return names


async def test_flat_group_message_is_decoded_once_per_node(make_layer):
    layer = make_layer(serializer=COUNTING)
    names = await members(layer, "fan", 5)
    message = {"type": "chat.message", "text": "hi", "n": 1, "f": 0.5, "b": b"x", "none": None}
    before = loads_so_far()
    await layer.group_send("fan", message)
    got = [await recv(layer, name) for name in names]
    assert got == [message] * 5
    # One decode for the node's five members (the other read is loads_so_far's own).
    assert loads_so_far() - before == 2


async def test_each_member_gets_its_own_copy_of_a_flat_message(make_layer):
    layer = make_layer()
    first, second, third = await members(layer, "own", 3)
    await layer.group_send("own", {"type": "chat.message", "text": "hi"})
    a = await recv(layer, first)
    a["text"] = "changed by the first consumer"
    a["added"] = True
    del a["type"]
    assert await recv(layer, second) == {"type": "chat.message", "text": "hi"}
    assert await recv(layer, third) == {"type": "chat.message", "text": "hi"}


async def test_nested_values_are_never_shared_between_members(make_layer):
    layer = make_layer(serializer=COUNTING)
    first, second = await members(layer, "nested", 2)
    message = {"type": "chat.message", "tags": ["a"], "meta": {"k": "v"}}
    before = loads_so_far()
    await layer.group_send("nested", message)
    a = await recv(layer, first)
    a["tags"].append("added by the first consumer")
    a["meta"]["k"] = "changed"
    assert await recv(layer, second) == message
    # Nested: each receiver decodes its own (plus the node's one look at it, plus this read).
    assert loads_so_far() - before == 4


async def test_direct_and_single_member_messages_are_decoded_by_their_receiver(make_layer):
    layer = make_layer(serializer=COUNTING)
    (only,) = await members(layer, "single", 1)
    before = loads_so_far()
    await layer.group_send("single", {"type": "a"})
    assert await recv(layer, only) == {"type": "a"}
    await layer.send(only, {"type": "b"})
    assert await recv(layer, only) == {"type": "b"}
    assert loads_so_far() - before == 3


async def test_a_backlog_brought_back_from_redis_is_decoded_once_per_entry(make_layer):
    # capacity 5: most of the 20 messages wait in Redis and are fetched back per entry, once
    # for all three members (decoded once there, or at dispatch for members that had room).
    layer = make_layer(serializer=COUNTING, capacity=5)
    names = await members(layer, "backlog", 3)
    before = loads_so_far()
    for i in range(20):
        await layer.group_send("backlog", {"type": "m", "i": i})
    # Received side by side, as consumers do, so their refills from Redis coincide.
    lists = await asyncio.gather(*(recv_n(layer, name, 20) for name in names))
    got = dict(zip(names, lists, strict=True))
    for received in got.values():
        assert [m["i"] for m in received] == list(range(20))
    got[names[0]][0]["i"] = "changed"
    assert got[names[1]][0] == {"type": "m", "i": 0}
    # Decoded per receiver it would be 5 + 3 x 15; here at most once per entry and receiver
    # that fetched it back on its own (refills of several channels that coincide share one).
    assert loads_so_far() - before <= 2 * 20 + 1
