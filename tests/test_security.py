"""``BrowserOriginValidator`` under a real daphne, driven by a ``websockets`` client."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from django.test import override_settings
from websockets.asyncio.client import connect
from websockets.exceptions import InvalidStatus

from channels_distrib.security import BrowserOriginValidator
from tests.helpers_daphne import DaphneProcess, start_daphne

pytestmark = pytest.mark.timeout(60)


@pytest.fixture(scope="module")
def node() -> Iterator[DaphneProcess]:
    daphne = start_daphne("tests.origin_app:application")
    try:
        yield daphne
    finally:
        daphne.terminate()


async def echo_once(node: DaphneProcess, **kwargs: object) -> str:
    async with connect(f"{node.url}/ws/", open_timeout=10, **kwargs) as ws:  # type: ignore[arg-type]
        await ws.send("ping")
        reply = await ws.recv(decode=True)
    assert isinstance(reply, str)
    return reply


async def refused_status(node: DaphneProcess, **kwargs: object) -> int:
    with pytest.raises(InvalidStatus) as info:
        await echo_once(node, **kwargs)
    return info.value.response.status_code


async def test_no_origin_is_accepted(node: DaphneProcess) -> None:
    # websockets sends no Origin unless asked to, like Node.js and mobile clients.
    assert await echo_once(node) == "ping"


@pytest.mark.parametrize("origin", [
    "http://127.0.0.1:8000", "https://example.com", "https://chat.example.com:8443",
])
async def test_allowed_origin_is_accepted(node: DaphneProcess, origin: str) -> None:
    assert await echo_once(node, origin=origin) == "ping"


@pytest.mark.parametrize("origin", [
    "http://evil.example", "https://example.com.evil.example", "null", "ftp://example.com",
    "http://localhost",
])
async def test_foreign_origin_gets_403(node: DaphneProcess, origin: str) -> None:
    assert await refused_status(node, origin=origin) == 403


async def test_two_origin_headers_get_403(node: DaphneProcess) -> None:
    headers = [("Origin", "https://example.com"), ("Origin", "http://evil.example")]
    assert await refused_status(node, additional_headers=headers) == 403


def check(origin: bytes) -> bool:
    return BrowserOriginValidator(None).origin_allowed(origin)


def test_reads_allowed_hosts_from_settings_on_each_call() -> None:
    with override_settings(ALLOWED_HOSTS=["chat.example.org"]):
        assert check(b"https://chat.example.org")
        assert not check(b"https://other.example.org")
    with override_settings(ALLOWED_HOSTS=["*"]):
        assert check(b"https://other.example.org")


def test_debug_with_no_allowed_hosts_allows_local_hosts_only() -> None:
    with override_settings(ALLOWED_HOSTS=[], DEBUG=True):
        assert check(b"http://localhost:8000")
        assert check(b"http://[::1]:8000")
        assert not check(b"http://example.com")
    with override_settings(ALLOWED_HOSTS=[], DEBUG=False):
        assert not check(b"http://localhost:8000")
