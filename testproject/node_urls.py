"""Where each demo node can be reached, so a chat page whose node died can move to another.

Each node advertises its own base URL (``DEMO_PUBLIC_URL``, else the scheme and host its
``/healthz/`` or chat page was requested on) in the hash ``<prefix>:demo:urls`` (node id ->
URL), under the layer's prefix so ``flush()`` clears it. ``/nodes/`` answers the URLs of the
nodes the layer lists as live now; the chat page fetches it while connected and, when its
connection drops and its own node does not answer, reconnects to one of the others.
"""

from __future__ import annotations

import os
from typing import Any

from django.conf import settings

from testproject.rooms import _client

KEY_TTL = 86400  # seconds the hash outlives the last advertisement

_advertised: set[tuple[str, str]] = set()


def urls_key() -> str:
    """The Redis key of the node URL hash (documented above)."""
    prefix = settings.CHANNEL_LAYERS["default"]["CONFIG"].get("prefix", "asgi")
    return f"{prefix}:demo:urls"


async def advertise(node_id: str, seen_as: str) -> None:
    """Record this node's base URL (once per URL per process; refreshes the TTL)."""
    url = os.environ.get("DEMO_PUBLIC_URL") or seen_as
    url = url.rstrip("/") + "/"
    if (node_id, url) in _advertised:
        return
    async with _client().pipeline(transaction=True) as pipe:
        pipe.hset(urls_key(), node_id, url)
        pipe.expire(urls_key(), KEY_TTL)
        await pipe.execute()
    _advertised.add((node_id, url))


async def live_urls(layer: Any) -> list[dict[str, str]]:
    """``[{"node_id", "url"}]`` of the live nodes that advertised a URL, by node id."""
    live = {info.node_id for info in await layer.nodes()}
    raw: dict[Any, Any] = await _client().hgetall(urls_key())
    rows = []
    for node_id, url in raw.items():
        name = node_id.decode() if isinstance(node_id, bytes) else node_id
        if name in live:
            rows.append({"node_id": name, "url": url.decode() if isinstance(url, bytes) else url})
    return sorted(rows, key=lambda row: row["node_id"])
