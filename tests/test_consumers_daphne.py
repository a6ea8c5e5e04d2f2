"""DistributedConsumer served by real daphne processes, driven by real ``websockets`` clients.

Two daphne nodes share one prefix for the whole module (each test uses its own rooms and
users); tests that kill or limit a node start their own. The app is
``tests.consumer_asgi:application`` (AllowedHostsOriginValidator + AuthMiddlewareStack +
a ``?user=`` test middleware around the consumers of :mod:`tests.consumer_app`).
"""

from __future__ import annotations

import asyncio
import json
import urllib.request
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from typing import Any

import pytest
from channels.layers import channel_layers
from django.test import RequestFactory, override_settings

from channels_distrib import api
from tests.conftest import MESSAGE_PATHS
from tests.consumer_app import send_room_view
from tests.consumer_clients import WsClient
from tests.helpers_daphne import DaphneProcess, start_daphne
from tests.helpers_servers import SERVERS, start_server

APP = "tests.consumer_asgi:application"
# Short node timeouts so node death is noticed within a few seconds.
FAST_NODES = {"heartbeat_interval": 0.5, "node_timeout": 2.0}


def node_env(redis_url: str, prefix: str, **config: Any) -> dict[str, str]:
    return {
        "DISTRIB_REDIS_URL": redis_url,
        "DISTRIB_PREFIX": prefix,
        "DISTRIB_LAYER_CONFIG": json.dumps({**FAST_NODES, **config}),
    }


@pytest.fixture(scope="module", params=MESSAGE_PATHS)
def daphne_path(request: pytest.FixtureRequest) -> dict[str, Any]:
    """The module's daphne nodes run with messages through Redis, then through RabbitMQ:
    the CONFIG entries of that path ({} or {"broker": url})."""
    if request.param == "broker":
        return {"broker": request.getfixturevalue("broker_url")}
    return {}


async def _flush(redis_url: str, prefix: str, path: dict[str, Any]) -> None:
    from channels_distrib.layers import DistributedChannelLayer

    layer = DistributedChannelLayer(hosts=[redis_url], prefix=prefix, **path)
    try:
        await layer.flush()
    finally:
        await layer.close()


@pytest.fixture(scope="module")
def cluster_prefix(redis_url: str, daphne_path: dict[str, Any]) -> Iterator[str]:
    prefix = f"d{uuid.uuid4().hex[:10]}"
    yield prefix
    asyncio.run(_flush(redis_url, prefix, daphne_path))


@pytest.fixture(scope="module")
def cluster(
    redis_url: str,
    cluster_prefix: str,
    daphne_path: dict[str, Any],
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[list[DaphneProcess]]:
    """Two daphne nodes on one prefix and one SQLite file (users, sessions), for the module."""
    env = node_env(redis_url, cluster_prefix, **daphne_path)
    env["DISTRIB_DB"] = str(tmp_path_factory.mktemp("consumer-db") / "db.sqlite3")
    started: list[DaphneProcess] = []
    try:
        for _ in range(2):
            started.append(start_daphne(APP, env))
        yield started
    finally:
        for node in started:
            node.terminate()


@pytest.fixture
def spawn(
    redis_url: str, cluster_prefix: str, daphne_path: dict[str, Any]
) -> Iterator[Callable[..., DaphneProcess]]:
    """Start extra nodes on the cluster's prefix for one test (daphne unless ``server`` names
    another of :data:`SERVERS`); stopped by pid at teardown."""
    started: list[DaphneProcess] = []

    def start(server: str = "daphne", **config: Any) -> DaphneProcess:
        env = node_env(redis_url, cluster_prefix, **daphne_path, **config)
        node = start_server(server, APP, env)
        started.append(node)
        return node

    yield start
    for node in started:
        node.terminate()


@pytest.fixture
async def ws() -> AsyncIterator[Callable[..., Awaitable[WsClient]]]:
    """``await ws(node, path="/ws/test/", user=None, name=None)`` → a connected WsClient."""
    clients: list[WsClient] = []

    async def open_client(
        node: DaphneProcess,
        path: str = "/ws/test/",
        user: str | None = None,
        name: str | None = None,
    ) -> WsClient:
        query = "&".join(f"{k}={v}" for k, v in (("user", user), ("name", name)) if v)
        client = await WsClient.connect(f"{node.url}{path}?{query}")
        clients.append(client)
        return client

    yield open_client
    for client in clients:
        await client.close()


def unique(name: str) -> str:
    return f"{name}-{uuid.uuid4().hex[:8]}"


# -- every method across two nodes ----------------------------------------------------


async def test_every_method_across_two_daphne_nodes(cluster, ws) -> None:
    node1, node2 = cluster
    room = unique("room")
    a = await ws(node1, user=unique("ua"), name="a")
    b = await ws(node2, name="b")
    a_me, b_me = await a.request("whoami"), await b.request("whoami")
    assert a_me["node_id"] != b_me["node_id"]

    # join_room, presence state and diffs across nodes
    await a.request("join", room=room)
    await a.expect("presence.state", group=room)
    await b.request("join", room=room)
    state = await b.expect("presence.state", group=room)
    assert {m["node_id"] for m in state["members"]} == {a_me["node_id"], b_me["node_id"]}
    diff = await a.expect("presence.diff", group=room)
    assert diff["joins"][0]["channel"] == b_me["client_id"]
    assert diff["joins"][0]["node_id"] == b_me["node_id"]
    assert diff["joins"][0]["meta"]["name"] == "b"

    # joined_rooms, room_members, room_size
    assert (await b.request("rooms"))["rooms"] == [room]
    members = (await b.request("members", room=room))["members"]
    assert {(m["channel"], m["node_id"]) for m in members} == {
        (a_me["client_id"], a_me["node_id"]),
        (b_me["client_id"], b_me["node_id"]),
    }
    assert (await a.request("size", room=room))["size"] == 2

    # broadcast_to_room, with and without exclude_self
    await a.request("room.send", room=room, message={"type": "r", "n": 1})
    assert await a.expect("r") == {"type": "r", "n": 1}
    assert await b.expect("r") == {"type": "r", "n": 1}
    await b.request("room.send", room=room, message={"type": "r", "n": 2}, exclude_self=True)
    assert await a.expect("r") == {"type": "r", "n": 2}
    await b.assert_none("r", within=0.3)

    # send_to_client both ways
    await a.request("client.send", client_id=b_me["client_id"], message={"type": "c", "to": "b"})
    assert await b.expect("c") == {"type": "c", "to": "b"}
    await b.request("client.send", client_id=a_me["client_id"], message={"type": "c", "to": "a"})
    assert await a.expect("c") == {"type": "c", "to": "a"}

    # send_to_user from the other node
    await b.request("user.send", user_id=a_me["user_id"], message={"type": "u"})
    assert await a.expect("u") == {"type": "u"}
    await b.assert_none("u", within=0.2)

    # leave_room: the other node sees the leave
    await b.request("leave", room=room)
    diff = await a.expect("presence.diff", group=room)
    assert [x["channel"] for x in diff["leaves"]] == [b_me["client_id"]]
    assert (await a.request("size", room=room))["size"] == 1

    # disconnect: leave diff on the other node, membership gone
    await b.request("join", room=room)
    await a.expect("presence.diff", group=room)
    await b.close()
    diff = await a.expect("presence.diff", group=room)
    assert [x["channel"] for x in diff["leaves"]] == [b_me["client_id"]]
    assert (await a.request("size", room=room))["size"] == 1


async def test_broadcast_across_nodes_and_exclude_self(cluster, ws) -> None:
    node1, node2 = cluster
    a = await ws(node1)
    b = await ws(node2)
    lobby = await ws(node2, path="/ws/lobby/")
    tag = unique("b")
    await a.request("broadcast", message={"type": "all", "tag": tag})
    assert await a.expect("all", tag=tag)
    assert await b.expect("all", tag=tag)
    await lobby.assert_none("all", within=0.3)  # another consumer class
    await a.request("broadcast", message={"type": "all", "tag": tag + "x"}, exclude_self=True)
    assert await b.expect("all", tag=tag + "x")
    await a.assert_none("all", within=0.3, tag=tag + "x")


async def test_send_to_user_reaches_the_user_on_both_nodes(cluster, ws) -> None:
    node1, node2 = cluster
    user = unique("user")
    tab1 = await ws(node1, user=user)
    tab2 = await ws(node2, user=user)
    stranger = await ws(node1, user=unique("other"))
    sender = await ws(node2)
    await sender.request("user.send", user_id=user, message={"type": "dm", "text": "hi"})
    assert await tab1.expect("dm") == {"type": "dm", "text": "hi"}
    assert await tab2.expect("dm") == {"type": "dm", "text": "hi"}
    await stranger.assert_none("dm", within=0.3)
    # exclude_self in a room excludes this tab only, not the same user's other tab
    room = unique("tabs")
    for tab in (tab1, tab2):
        await tab.request("join", room=room)
    await tab1.request("room.send", room=room, message={"type": "t"}, exclude_self=True)
    assert await tab2.expect("t") == {"type": "t"}
    await tab1.assert_none("t", within=0.3)


async def test_api_from_this_process_reaches_daphne_clients(
    cluster, ws, redis_url, cluster_prefix, daphne_path
) -> None:
    node1, node2 = cluster
    user, room = unique("user"), unique("room")
    a = await ws(node1, user=user)
    b = await ws(node2)
    await b.request("join", room=room)
    b_id = (await b.request("whoami"))["client_id"]
    config = {"hosts": [redis_url], "prefix": cluster_prefix, **daphne_path}
    backend = "channels_distrib.layers.DistributedChannelLayer"
    with override_settings(CHANNEL_LAYERS={"default": {"BACKEND": backend, "CONFIG": config}}):
        try:
            await api.send_to_user(user, {"type": "x", "v": "user"})
            await api.send_to_room(room, {"type": "x", "v": "room"})
            await api.send_to_client(b_id, {"type": "x", "v": "client"})
        finally:
            for layer in list(channel_layers.backends.values()):
                await layer.close()
    assert await a.expect("x") == {"type": "x", "v": "user"}
    assert await b.expect("x", v="room") == {"type": "x", "v": "room"}
    assert await b.expect("x", v="client") == {"type": "x", "v": "client"}


async def test_sync_view_send_to_room_over_http_on_the_other_node(cluster, ws) -> None:
    node1, node2 = cluster
    room = unique("news")
    listener = await ws(node2)
    await listener.request("join", room=room)

    def get() -> Any:
        url = f"{node1.http_url}/send-room/?room={room}&text=extra"
        opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
        with opener.open(url, timeout=10) as response:
            return json.loads(response.read())

    assert await asyncio.to_thread(get) == {"sent": room}
    assert await listener.expect("notice") == {"type": "notice", "text": "extra"}


async def test_sync_view_called_from_a_plain_thread(
    cluster, ws, redis_url, cluster_prefix, daphne_path
) -> None:
    """async_to_sync in a thread with no event loop: the layer runs on a fresh loop."""
    node1, _ = cluster
    room = unique("thread")
    listener = await ws(node1)
    await listener.request("join", room=room)
    config = {"hosts": [redis_url], "prefix": cluster_prefix, **daphne_path}
    backend = "channels_distrib.layers.DistributedChannelLayer"
    request = RequestFactory().get("/send-room/", {"room": room, "text": "from a thread"})
    with override_settings(CHANNEL_LAYERS={"default": {"BACKEND": backend, "CONFIG": config}}):
        response = await asyncio.to_thread(send_room_view, request)
    assert response.status_code == 200
    assert await listener.expect("notice") == {"type": "notice", "text": "from a thread"}


# -- inbound errors -------------------------------------------------------------------


async def test_rate_limited_error_then_close_1008_through_daphne(cluster, ws) -> None:
    node1, node2 = cluster
    client = await ws(node1, path="/ws/limited/")
    for _ in range(3):
        await client.request("echo")
    for _ in range(10):
        await client.send_json({"type": "echo"})
    await client.expect_error("rate_limited")
    assert await client.expect_close() == 1008
    # Both nodes still accept.
    for node in (node1, node2):
        other = await ws(node, path="/ws/limited/")
        assert (await other.request("echo", ok=True))["ok"] is True


async def test_oversized_frame_closes_1009_through_daphne(cluster, ws) -> None:
    node1, node2 = cluster
    client = await ws(node1, path="/ws/limited/")
    await client.send_text(json.dumps({"type": "echo", "pad": "x" * 2000}))
    assert await client.expect_close() == 1009
    other = await ws(node2, path="/ws/limited/")
    assert (await other.request("echo", ok=1))["ok"] == 1


@pytest.mark.parametrize("server", SERVERS)
async def test_connection_limit_closes_1013_while_other_node_accepts(
    cluster, ws, spawn, server
) -> None:
    """The limited node runs under each server (1013 is one of the codes daphne refuses
    without the mixin's patch); the other node is the module's daphne."""
    _, node2 = cluster
    limited = spawn(server, connection_limit=2)
    first = await ws(limited)
    await ws(limited)
    third = await ws(limited)  # the handshake succeeds, so browsers see the code
    assert await third.expect_close() == 1013
    assert (await (await ws(node2)).request("echo", ok=1))["ok"] == 1
    await first.close()
    # The server frees the slot when its consumer has processed the disconnect: retry.
    for _ in range(50):
        again = await ws(limited)
        try:
            assert (await again.request("echo", timeout=2, ok=2))["ok"] == 2
            break
        except AssertionError:
            assert again.close_code == 1013
            await asyncio.sleep(0.1)
    else:
        raise AssertionError("the freed slot was never reused")


async def test_user_logged_in_over_http_on_one_node_is_known_on_the_other(cluster) -> None:
    """A real Django login (session cookie) through AuthMiddlewareStack, across nodes."""
    node1, node2 = cluster
    username = unique("ivy")

    def login() -> tuple[int, str]:
        opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
        with opener.open(f"{node1.http_url}/login/?user={username}", timeout=10) as response:
            cookie = response.headers["Set-Cookie"].split(";", 1)[0]
            return int(json.loads(response.read())["pk"]), cookie

    pk, cookie = await asyncio.to_thread(login)
    from websockets.asyncio.client import connect

    ws2 = await connect(
        f"{node2.url}/ws/test/",
        origin="http://127.0.0.1",  # type: ignore[arg-type]
        additional_headers={"Cookie": cookie},
        proxy=None,
    )
    tab2 = WsClient(ws2)
    anon = await WsClient.connect(f"{node1.url}/ws/test/")
    try:
        assert (await tab2.request("whoami"))["user_id"] == str(pk)
        assert (await anon.request("whoami"))["user_id"] is None
        await anon.request("user.send", user_id=pk, message={"type": "for-you"})
        assert await tab2.expect("for-you") == {"type": "for-you"}
    finally:
        await tab2.close()
        await anon.close()


async def test_origin_validator_and_auth_stack_are_in_front(cluster) -> None:
    from websockets.exceptions import InvalidStatus

    node1, _ = cluster
    with pytest.raises(InvalidStatus) as info:
        await WsClient.connect(f"{node1.url}/ws/test/", origin="http://evil.example")
    assert info.value.response.status_code == 403
    client = await WsClient.connect(f"{node1.url}/ws/test/", origin="http://localhost")
    try:
        assert (await client.request("whoami"))["user_id"] is None  # AnonymousUser
    finally:
        await client.close()


# -- node death and clean shutdown ------------------------------------------------------


async def test_presence_leave_when_a_node_is_killed_or_stopped(cluster, ws, spawn) -> None:
    node1, _ = cluster
    room = unique("doom")
    watcher = await ws(node1)
    await watcher.request("join", room=room)
    await watcher.expect("presence.state", group=room)

    doomed = spawn()
    victim = await ws(doomed, name="victim")
    await victim.request("join", room=room)
    victim_id = (await victim.request("whoami"))["client_id"]
    await watcher.expect("presence.diff", group=room)
    doomed.kill()
    diff = await watcher.expect("presence.diff", timeout=10, group=room)
    assert [x["channel"] for x in diff["leaves"]] == [victim_id]
    assert (await watcher.request("size", room=room))["size"] == 1

    # node_timeout 30 s: pruning could remove this node only 29 s or more after its stop, so
    # the leave within 8 s below is the clean stop's own.
    stopping = spawn(heartbeat_interval=1.0, node_timeout=30.0)
    leaver = await ws(stopping)
    await leaver.request("join", room=room)
    leaver_id = (await leaver.request("whoami"))["client_id"]
    await watcher.expect("presence.diff", group=room)
    await asyncio.to_thread(stopping.terminate)
    # A clean stop removes the node at once (under a loaded machine, with py3.13 and the
    # broker path, it took more than 3.5 s once in CI: the consumers' 1012 close first).
    diff = await watcher.expect("presence.diff", timeout=8.0, group=room)
    assert [x["channel"] for x in diff["leaves"]] == [leaver_id], diff


async def test_crashed_consumer_leaves_its_rooms_under_daphne(cluster, ws) -> None:
    node1, node2 = cluster
    room = unique("crash")
    watcher = await ws(node2)
    await watcher.request("join", room=room)
    crasher = await ws(node1, user=unique("crasher"))
    await crasher.request("join", room=room)
    crasher_id = (await crasher.request("whoami"))["client_id"]
    await watcher.expect("presence.diff", group=room)
    await crasher.send_json({"type": "crash"})
    assert await crasher.expect_close() == 1011
    diff = await watcher.expect("presence.diff", group=room)
    assert [x["channel"] for x in diff["leaves"]] == [crasher_id]
    assert (await watcher.request("size", room=room))["size"] == 1
    assert (await (await ws(node1)).request("echo", ok=1))["ok"] == 1
