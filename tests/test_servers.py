"""Close codes the consumer chooses, and error frames for bad client frames, reach clients
the same under daphne, uvicorn and hypercorn.

``tests.consumer_asgi`` behind each server; ``/ws/test/`` has the default 64 KiB frame limit,
``/ws/limited/`` a 1 KiB one (1009) and a small token bucket (10 rejected frames close with
1008).
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from typing import Any

import pytest
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed

from tests.consumer_clients import WsClient
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


async def close_code(
    node: DaphneProcess, frames: list[str | bytes]
) -> tuple[int | None, list[Any]]:
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


# Under the limit but far from small: each still gets its error frame.
BIG = 60 * 1024


async def test_every_error_code_and_the_connection_stays_open(node: DaphneProcess) -> None:
    client = await WsClient.connect(f"{node.url}/ws/test/")
    frames: list[tuple[str | bytes, str]] = [
        ("{not json", "invalid_json"),
        ("", "invalid_json"),
        ("{" * BIG, "invalid_json"),
        ("[" * 30000, "invalid_json"),  # deeper than json's recursion allows
        ("[1, 2, 3]", "invalid_message"),
        ("null", "invalid_message"),
        ('{"no": "type"}', "invalid_message"),
        ('{"type": 7}', "invalid_message"),
        (b"\x89PNG", "unsupported_frame"),
        (b"", "unsupported_frame"),
        (b"\x00" * BIG, "unsupported_frame"),
        ('{"type": "launch.rockets"}', "unknown_type"),
        (json.dumps({"type": "x" * BIG}), "unknown_type"),
        ('{"type": "join", "room": "private-x"}', "forbidden"),
        ('{"type": "join", "room": "spaces are bad"}', "invalid_room"),
    ]
    try:
        for frame, code in frames:
            if isinstance(frame, bytes):
                await client.send_bytes(frame)
            else:
                await client.send_text(frame)
            error = await client.expect_error(code)
            if code == "invalid_json":
                assert error["message"] == "Invalid message format"
            assert len(error["message"]) < 300  # client input is never echoed in full
        assert (await client.request("echo", still="open"))["still"] == "open"
        assert client.close_code is None
    finally:
        await client.close()


# 2 KiB is over /ws/limited/'s limit; 2 MiB over daphne's own 1 MiB too (autobahn closes
# with 1009 there), under uvicorn's and hypercorn's 16 MiB (the consumer closes).
@pytest.mark.parametrize("size", [2000, 2 * 1024 * 1024], ids=["2KiB", "2MiB"])
@pytest.mark.parametrize("binary", [False, True], ids=["text", "binary"])
async def test_oversized_frame_closes_1009(node: DaphneProcess, size: int, binary: bool) -> None:
    frame = json.dumps({"type": "echo", "pad": "x" * size})
    code, _ = await close_code(node, [frame.encode() if binary else frame])
    assert code == 1009


async def test_flood_gets_rate_limited_then_1008(node: DaphneProcess) -> None:
    code, received = await close_code(node, [json.dumps({"type": "echo", "n": i})
                                             for i in range(20)])
    assert code == 1008
    errors = [f for f in received if f.get("type") == "error"]
    assert errors and {f["code"] for f in errors} == {"rate_limited"}
    assert sum(f.get("type") == "reply.echo" for f in received) == 3  # the burst
