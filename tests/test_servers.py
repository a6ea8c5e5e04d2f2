"""Close codes the consumer chooses reach clients the same under daphne, uvicorn and hypercorn.

``tests.consumer_asgi`` behind each server; ``/ws/limited/`` has a 1 KiB frame limit (1009)
and a small token bucket (10 rejected frames close with 1008).
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from typing import Any

import pytest
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed

from tests.helpers_daphne import DaphneProcess
from tests.helpers_servers import SERVERS, start_server

pytestmark = pytest.mark.timeout(60)


@pytest.fixture(scope="module", params=SERVERS)
def node(request: pytest.FixtureRequest, redis_url: str) -> Iterator[DaphneProcess]:
    env = {"DISTRIB_REDIS_URL": redis_url, "DISTRIB_PREFIX": f"servers-{request.param}"}
    server = start_server(request.param, "tests.consumer_asgi:application", env)
    try:
        yield server
    finally:
        server.terminate()


async def close_code(node: DaphneProcess, frames: list[str]) -> tuple[int | None, list[Any]]:
    """Send ``frames``, then read until the server closes; (close code, frames received)."""
    received: list[Any] = []
    async with connect(f"{node.url}/ws/limited/", origin="http://127.0.0.1",  # type: ignore[arg-type]
                       open_timeout=10, max_size=None) as ws:
        try:
            for frame in frames:
                await ws.send(frame)
            while True:
                received.append(json.loads(await asyncio.wait_for(ws.recv(), 10)))
        except ConnectionClosed as exc:
            return (exc.rcvd.code if exc.rcvd is not None else None), received
    raise AssertionError("unreachable")


async def test_oversized_frame_closes_1009(node: DaphneProcess) -> None:
    code, _ = await close_code(node, [json.dumps({"type": "echo", "pad": "x" * 2000})])
    assert code == 1009


async def test_flood_gets_rate_limited_then_1008(node: DaphneProcess) -> None:
    code, received = await close_code(node, [json.dumps({"type": "echo", "n": i})
                                             for i in range(20)])
    assert code == 1008
    errors = [f for f in received if f.get("type") == "error"]
    assert errors and {f["code"] for f in errors} == {"rate_limited"}
    assert sum(f.get("type") == "reply.echo" for f in received) == 3  # the burst
