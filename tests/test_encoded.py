"""channels_distrib.encoded: a presence diff's JSON text, once per payload object."""

from __future__ import annotations

import json

from channels_distrib.encoded import TextCache


def test_one_text_per_payload_object() -> None:
    cache = TextCache()
    payload = b"diff payload"
    diff = {"type": "presence.diff", "group": "g", "joins": [{"channel": "a"}], "leaves": []}
    texts = {cache.text(payload, diff) for _ in range(5)}
    assert texts == {json.dumps(diff)}
    assert cache.encoded == 1


def test_an_equal_payload_that_is_another_object_is_encoded_again() -> None:
    # Identity, not equality: another entry's payload may carry the same bytes.
    cache = TextCache()
    first, second = bytes(bytearray(b"same")), bytes(bytearray(b"same"))
    assert first == second and first is not second
    cache.text(first, {"type": "presence.diff", "n": 1})
    assert cache.text(second, {"type": "presence.diff", "n": 2}) == json.dumps(
        {"type": "presence.diff", "n": 2}
    )
    assert cache.encoded == 2


def test_no_payload_means_no_sharing_and_the_cache_stays_bounded() -> None:
    cache = TextCache(size=4)
    assert cache.text(None, {"type": "x"}) == '{"type": "x"}'
    assert cache.text(None, {"type": "x"}) == '{"type": "x"}'
    assert cache.encoded == 2
    payloads = [bytes(bytearray([i])) for i in range(10)]
    for i, payload in enumerate(payloads):
        cache.text(payload, {"i": i})
        assert len(cache.entries) <= 4
