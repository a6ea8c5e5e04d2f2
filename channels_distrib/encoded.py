"""A presence diff's JSON text, encoded once per node instead of once per recipient.

A node delivers one presence diff to each of its members of the group from one payload
object (the inbox entry's). :class:`TextCache` keys the JSON text by that object, so the
first consumer to forward the diff encodes it and the others send the same text. It is used
only for consumer classes that change nothing on the way (:func:`passes_presence_through`):
with an override of ``presence_diff``, ``presence_state``, ``encode_json``, ``send_json``
or ``dispatch``, the class's own code runs for every message, as documented.
"""

from __future__ import annotations

import json
from typing import Any

#: How many payloads' texts are kept (the diffs of the last few windows of a busy node).
CACHE_SIZE = 64

#: The methods whose override turns the shared text off (they may change what is sent).
HOOKS = ("presence_diff", "presence_state", "encode_json", "send_json", "dispatch")


def passes_presence_through(cls: type, base: type) -> bool:
    """Whether ``cls`` sends presence diffs exactly as ``base`` (DistributedMixin) does."""
    return all(
        getattr(getattr(cls, name), "__func__", getattr(cls, name))
        is getattr(getattr(base, name), "__func__", getattr(base, name))
        for name in HOOKS
    )


class TextCache:
    """JSON texts by the payload object they were decoded from (identity, not equality:
    holding the payload keeps its id from being reused while the entry lives)."""

    def __init__(self, size: int = CACHE_SIZE) -> None:
        self.size = size
        self.entries: dict[int, tuple[bytes, str]] = {}
        self.encoded = 0  # texts made (the tests count them)

    def text(self, payload: bytes | None, message: Any) -> str:
        """The JSON of ``message`` (decoded from ``payload``, unchanged since)."""
        if payload is None:
            self.encoded += 1
            return json.dumps(message)
        hit = self.entries.get(id(payload))
        if hit is not None and hit[0] is payload:
            return hit[1]
        text = json.dumps(message)
        self.encoded += 1
        if len(self.entries) >= self.size:
            self.entries.clear()  # a burst past the size starts over: still once per window
        self.entries[id(payload)] = (payload, text)
        return text


#: One per process: payloads are process-wide objects, and a node is a process.
PRESENCE_TEXTS = TextCache()
