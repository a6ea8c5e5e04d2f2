"""The layer's shared token buckets (the ``ratelimit`` extension)."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest


async def test_bucket_allows_the_burst_then_refuses(make_layer: Any) -> None:
    a, b = make_layer(), make_layer()  # two processes' worth of layers share one bucket
    taken = [await (a if i % 2 else b).take_tokens("user-1", rate=1.0, burst=4) for i in range(6)]
    assert taken == [True, True, True, True, False, False]
    assert await a.take_tokens("user-2", rate=1.0, burst=4)  # buckets are per key


async def test_bucket_refills_at_its_rate(make_layer: Any) -> None:
    layer = make_layer()
    assert await layer.take_tokens("refill", rate=10.0, burst=2, cost=2)
    assert not await layer.take_tokens("refill", rate=10.0, burst=2)
    await asyncio.sleep(0.25)  # 10/s for 0.25 s: two tokens back
    assert await layer.take_tokens("refill", rate=10.0, burst=2, cost=2)
    assert not await layer.take_tokens("refill", rate=10.0, burst=2)


@pytest.mark.parametrize(
    ("kwargs", "error"),
    [
        ({"key": "", "rate": 1.0, "burst": 1}, TypeError),
        ({"key": "k", "rate": 0, "burst": 1}, ValueError),
        ({"key": "k", "rate": 1.0, "burst": 0}, ValueError),
        ({"key": "k", "rate": 1.0, "burst": 2, "cost": 3}, ValueError),
    ],
)
async def test_bad_arguments(make_layer: Any, kwargs: dict[str, Any], error: type) -> None:
    with pytest.raises(error):
        await make_layer().take_tokens(**kwargs)
