"""Test clients for the consumer tests: one interface over a WebsocketCommunicator and a
real ``websockets`` connection, buffering frames so tests can wait for the one they need
while presence messages and replies interleave."""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any

from channels.testing import WebsocketCommunicator


class Closed(Exception):
    """The server closed the connection (``code`` is the close code)."""

    def __init__(self, code: int | None) -> None:
        super().__init__(f"closed with {code}")
        self.code = code


def _matches(frame: dict[str, Any], kind: str, fields: dict[str, Any]) -> bool:
    return frame.get("type") == kind and all(frame.get(k) == v for k, v in fields.items())


class FrameClient:
    """Send JSON, wait for frames of a given type, assert absence; subclasses do the I/O."""

    def __init__(self) -> None:
        self.backlog: list[dict[str, Any]] = []
        self.close_code: int | None = None
        self.closed = False

    async def _next(self, timeout: float) -> dict[str, Any]:
        """The next frame as JSON; raises TimeoutError, or Closed when the server closed."""
        raise NotImplementedError

    async def send_text(self, text: str) -> None:
        raise NotImplementedError

    async def send_bytes(self, data: bytes) -> None:
        raise NotImplementedError

    async def close(self) -> None:
        raise NotImplementedError

    async def send_json(self, content: Any) -> None:
        await self.send_text(json.dumps(content))

    async def expect(self, kind: str, timeout: float = 5.0, **fields: Any) -> dict[str, Any]:
        """The first frame (buffered or new) with this ``type`` and these field values."""
        for i, frame in enumerate(self.backlog):
            if _matches(frame, kind, fields):
                return self.backlog.pop(i)
        deadline = time.monotonic() + timeout
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise AssertionError(
                    f"no {kind!r} frame {fields} within {timeout} s; got {self.backlog}"
                )
            try:
                frame = await self._next(remaining)
            except asyncio.TimeoutError:
                continue
            if _matches(frame, kind, fields):
                return frame
            self.backlog.append(frame)

    async def expect_error(self, code: str, timeout: float = 5.0) -> dict[str, Any]:
        frame = await self.expect("error", timeout, code=code)
        assert set(frame) == {"type", "code", "message"} and isinstance(frame["message"], str)
        return frame

    async def request(self, kind: str, timeout: float = 5.0, **fields: Any) -> dict[str, Any]:
        """Send ``{"type": kind, **fields}`` and wait for ``reply.<kind>``."""
        await self.send_json({"type": kind, **fields})
        reply = "reply." + kind.replace(".", "_").replace("-", "_")
        return await self.expect(reply, timeout)

    async def assert_none(self, kind: str, within: float = 0.5, **fields: Any) -> None:
        """Fail if a frame of this type (and field values) arrives within ``within`` s."""
        for frame in self.backlog:
            assert not _matches(frame, kind, fields), f"unexpected {frame}"
        deadline = time.monotonic() + within
        while (remaining := deadline - time.monotonic()) > 0:
            try:
                frame = await self._next(remaining)
            except asyncio.TimeoutError:
                return
            assert not _matches(frame, kind, fields), f"unexpected {frame}"
            self.backlog.append(frame)

    async def expect_close(self, timeout: float = 5.0) -> int | None:
        """Read (and buffer) frames until the server closes; return the close code."""
        deadline = time.monotonic() + timeout
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise AssertionError(f"not closed within {timeout} s; got {self.backlog}")
            try:
                self.backlog.append(await self._next(remaining))
            except Closed as closed:
                return closed.code
            except asyncio.TimeoutError:
                continue


class CommClient(FrameClient):
    """A FrameClient over ``channels.testing.WebsocketCommunicator``.

    Waiting uses ``receive_nothing`` polling, because a timed-out ``receive_output``
    cancels the application under test.
    """

    def __init__(self, communicator: WebsocketCommunicator) -> None:
        super().__init__()
        self.comm = communicator

    async def _next(self, timeout: float) -> dict[str, Any]:
        if self.closed:
            raise Closed(self.close_code)
        if await self.comm.receive_nothing(timeout=timeout, interval=0.005):
            raise asyncio.TimeoutError
        output = await self.comm.receive_output(1)
        if output["type"] == "websocket.close":
            self.closed, self.close_code = True, output.get("code", 1000)
            raise Closed(self.close_code)
        assert output["type"] == "websocket.send", output
        if output.get("text") is None:
            return {"type": "__binary__", "bytes": output["bytes"]}
        frame: dict[str, Any] = json.loads(output["text"])
        return frame

    async def send_text(self, text: str) -> None:
        await self.comm.send_input({"type": "websocket.receive", "text": text})

    async def send_bytes(self, data: bytes) -> None:
        await self.comm.send_input({"type": "websocket.receive", "bytes": data})

    async def close(self) -> None:
        """Send websocket.disconnect and wait for the consumer to finish (cleanup included)."""
        await self.comm.disconnect(timeout=10)


class WsClient(FrameClient):
    """A FrameClient over a real ``websockets`` asyncio client connection."""

    def __init__(self, connection: Any) -> None:
        super().__init__()
        self.ws = connection

    @classmethod
    async def connect(cls, url: str, origin: str | None = "http://127.0.0.1") -> WsClient:
        from websockets.asyncio.client import connect

        ws = await connect(url, origin=origin, proxy=None, open_timeout=10, close_timeout=5)
        return cls(ws)

    async def _next(self, timeout: float) -> dict[str, Any]:
        from websockets.exceptions import ConnectionClosed

        if self.closed:
            raise Closed(self.close_code)
        try:
            message = await asyncio.wait_for(self.ws.recv(), timeout)
        except ConnectionClosed as exc:
            self.closed = True
            self.close_code = exc.rcvd.code if exc.rcvd is not None else None
            raise Closed(self.close_code) from exc
        if isinstance(message, bytes):
            return {"type": "__binary__", "bytes": message}
        frame: dict[str, Any] = json.loads(message)
        return frame

    async def send_text(self, text: str) -> None:
        await self.ws.send(text)

    async def send_bytes(self, data: bytes) -> None:
        await self.ws.send(data)

    async def close(self) -> None:
        await self.ws.close()
