"""The demo project under two real daphne processes sharing one Redis.

Covers the chat protocol of DESIGN.md "The test project" end to end: delivery across
nodes, room isolation, no echo to the sender, error frames, origin checks, the
dashboard feed, and presence after a node is SIGKILLed.
"""

from __future__ import annotations

import asyncio
import contextlib
import http.cookiejar
import json
import os
import re
import shutil
import subprocess
import sys
import time
import urllib.parse
import urllib.request
import uuid
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import redis
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidStatus

from channels_distrib.history import parse_offset
from tests.helpers_daphne import DaphneProcess, start_daphne

ROOT = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.timeout(60)


@dataclass
class Node:
    """A daphne process serving testproject.asgi:application, with its node id."""

    node_id: str
    daphne: DaphneProcess

    @property
    def pid(self) -> int:
        return self.daphne.pid

    @property
    def http_url(self) -> str:
        return self.daphne.http_url

    @property
    def ws_url(self) -> str:
        return self.daphne.url

    @property
    def origin(self) -> str:
        return self.daphne.http_url

    def kill(self) -> None:
        self.daphne.kill()

    def stop(self) -> None:
        self.daphne.terminate()


def start_node(redis_url: str, prefix: str, node_id: str, timeout: float = 20.0,
               database: str | None = None) -> Node:
    """Start the demo project under daphne; return once /healthz/ answers.

    The first /healthz/ also makes the process a node, so it is in ``nodes()`` at once.
    """
    env = {"DJANGO_SETTINGS_MODULE": "testproject.settings", "REDIS_URL": redis_url,
           "DISTRIB_PREFIX": prefix, "DISTRIB_NODE_ID": node_id}
    if database:
        env["DEMO_DATABASE"] = database
    daphne = start_daphne("testproject.asgi:application", env)
    deadline = time.monotonic() + timeout
    while True:
        try:
            with urllib.request.urlopen(f"{daphne.http_url}/healthz/", timeout=2) as resp:
                if json.load(resp)["node_id"] == node_id:
                    return Node(node_id, daphne)
        except OSError:
            pass
        if time.monotonic() > deadline or not daphne.alive():
            log = daphne.log_tail()
            daphne.terminate()
            raise RuntimeError(f"{node_id} never answered /healthz/:\n{log}")
        time.sleep(0.1)


def _drop_prefix(redis_url: str, prefix: str) -> None:
    client = redis.Redis.from_url(redis_url)
    try:
        keys = list(client.scan_iter(match=f"{prefix}*", count=500))
        if keys:
            client.delete(*keys)
    finally:
        client.close()


USER, PASSWORD = "dora", "dora-pw-1234"


def manage(*args: str, database: str, **env: str) -> None:
    """Run the demo's manage.py with its own settings and the given database."""
    child_env = {k: v for k, v in os.environ.items() if k != "DJANGO_SETTINGS_MODULE"}
    child_env.update(DEMO_DATABASE=database, **env)
    result = subprocess.run([sys.executable, "testproject/manage.py", *args], cwd=ROOT,
                            env=child_env, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr


@pytest.fixture(scope="module")
def cluster(redis_url: str, tmp_path_factory: pytest.TempPathFactory
            ) -> Iterator[tuple[Node, Node]]:
    """Nodes A and B of the demo project on one prefix and one database, for the module."""
    prefix = f"tp{uuid.uuid4().hex[:8]}"
    database = str(tmp_path_factory.mktemp("demo-db") / "db.sqlite3")
    manage("migrate", "--noinput", "-v", "0", database=database)
    manage("createsuperuser", "--noinput", "--username", USER, "--email", "dora@example.com",
           database=database, DJANGO_SUPERUSER_PASSWORD=PASSWORD)
    a = start_node(redis_url, prefix, "node-a", database=database)
    try:
        b = start_node(redis_url, prefix, "node-b", database=database)
    except BaseException:
        a.stop()
        raise
    try:
        yield a, b
    finally:
        b.stop()
        a.stop()
        _drop_prefix(redis_url, prefix)


def log_in(node: Node) -> str:
    """Log in through the admin's login form over HTTP; returns the session id."""
    jar = http.cookiejar.CookieJar()
    opener = urllib.request.build_opener(urllib.request.HTTPCookieProcessor(jar))
    with opener.open(f"{node.http_url}/admin/login/", timeout=5) as resp:
        form = resp.read().decode()
    token = re.search(r'name="csrfmiddlewaretoken" value="([^"]+)"', form)
    assert token, form
    data = urllib.parse.urlencode({"username": USER, "password": PASSWORD, "next": "/",
                                   "csrfmiddlewaretoken": token.group(1)}).encode()
    with opener.open(f"{node.http_url}/admin/login/?next=/", data=data, timeout=5) as resp:
        assert resp.status == 200
        assert f'value="{USER}"' in resp.read().decode()  # the chat page, name filled in
    session = next((c.value for c in jar if c.name == "sessionid"), None)
    assert session, list(jar)
    return session


class Client:
    """A chat connection that remembers unread frames and tracks presence per room."""

    def __init__(self, ws: ClientConnection) -> None:
        self.ws = ws
        self.unread: list[dict[str, Any]] = []
        self.presence: dict[str, dict[str, str | None]] = {}

    async def send(self, frame: dict[str, Any] | str) -> None:
        await self.ws.send(frame if isinstance(frame, str) else json.dumps(frame))

    async def _read(self, timeout: float) -> dict[str, Any]:
        frame: dict[str, Any] = json.loads(await asyncio.wait_for(self.ws.recv(), timeout))
        group = frame.get("group")
        if frame.get("type") == "presence.state":
            self.presence[group] = {m["channel"]: (m["meta"] or {}).get("name")
                                    for m in frame["members"]}
        elif frame.get("type") == "presence.diff":
            members = self.presence.setdefault(group, {})
            for m in frame["leaves"]:
                members.pop(m["channel"], None)
            for m in frame["joins"]:
                members[m["channel"]] = (m["meta"] or {}).get("name")
        self.unread.append(frame)
        return frame

    async def next(self, wanted: str, timeout: float = 5.0) -> dict[str, Any]:
        """The next unread frame of type ``wanted``; frames of other types stay unread."""
        deadline = time.monotonic() + timeout
        while True:
            for i, frame in enumerate(self.unread):
                if frame.get("type") == wanted:
                    return self.unread.pop(i)
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise AssertionError(f"no {wanted!r} frame within {timeout} s: {self.unread}")
            try:
                await self._read(remaining)
            except asyncio.TimeoutError:
                pass

    async def nothing(self, unwanted: str, within: float = 1.0) -> None:
        """Fail if a frame of type ``unwanted`` is or becomes unread within ``within`` s."""
        try:
            frame = await self.next(unwanted, within)
        except AssertionError:
            return
        raise AssertionError(f"unexpected frame {frame}")

    async def members(self, room: str, done: Any, timeout: float = 5.0) -> set[str | None]:
        """Read frames until the names present in ``room`` satisfy ``done``."""
        deadline = time.monotonic() + timeout
        while True:
            names = set(self.presence.get(room, {}).values())
            if room in self.presence and done(names):
                return names
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise AssertionError(f"presence of {room} stuck at {self.presence.get(room)}")
            try:
                await self._read(remaining)
            except asyncio.TimeoutError:
                pass

    async def join(self, room: str, **extra: Any) -> dict[str, Any]:
        await self.send({"type": "joinRoom", "room": room, **extra})
        joined = await self.next("joined")
        assert joined["room"] == room
        return joined


@asynccontextmanager
async def chat(node: Node, name: str | None = None, origin: str | None = None,
               session: str | None = None) -> AsyncIterator[Client]:
    url = f"{node.ws_url}/ws/chat/" + (f"?name={name}" if name else "")
    headers = {"Cookie": f"sessionid={session}"} if session else None
    async with connect(url, origin=origin or node.origin,  # type: ignore[arg-type]
                       additional_headers=headers, open_timeout=10) as ws:
        yield Client(ws)


@asynccontextmanager
async def dashboard(node: Node) -> AsyncIterator[Client]:
    async with connect(f"{node.ws_url}/ws/dashboard/", origin=node.origin,  # type: ignore[arg-type]
                       open_timeout=10) as ws:
        yield Client(ws)


def test_manage_check_passes() -> None:
    # pytest-django exported tests.settings; the demo's manage.py must use its own.
    env = {k: v for k, v in os.environ.items() if k != "DJANGO_SETTINGS_MODULE"}
    result = subprocess.run(
        [sys.executable, "testproject/manage.py", "check"], cwd=ROOT,
        capture_output=True, text=True, timeout=60, env=env,
    )
    assert result.returncode == 0, result.stderr
    assert "no issues" in result.stdout, result.stderr


def test_pages_are_served_by_every_node(cluster: tuple[Node, Node]) -> None:
    for node in cluster:
        with urllib.request.urlopen(f"{node.http_url}/", timeout=5) as resp:
            page = resp.read().decode()
        assert "/ws/chat/" in page
        assert node.node_id in page
        with urllib.request.urlopen(f"{node.http_url}/dashboard/", timeout=5) as resp:
            assert "/ws/dashboard/" in resp.read().decode()


async def test_message_reaches_other_node_not_other_room_not_sender(
    cluster: tuple[Node, Node],
) -> None:
    a, b = cluster
    async with chat(a, "alice") as alice, chat(b, "bob") as bob, chat(b, "carol") as carol:
        assert (await bob.join("room1"))["node"] == "node-b"
        await carol.join("room2")
        assert (await alice.join("room1"))["node"] == "node-a"
        await alice.send({"type": "sendMessage", "message": "hello from A"})
        got = await bob.next("message")
        assert parse_offset(got.pop("offset")) is not None  # the chat keeps history
        assert got == {"type": "message", "room": "room1", "from": "alice",
                       "message": "hello from A"}
        await asyncio.gather(carol.nothing("message"), alice.nothing("message"))


async def test_rejoin_with_since_on_the_other_node_recovers_missed_messages(
    cluster: tuple[Node, Node],
) -> None:
    """joinRoom with since/previous: joined (client_id, recovered) first, then the missed
    messages in order, without the previous connection's own ones, then live ones."""
    a, b = cluster
    async with chat(b, "bob") as bob:
        await bob.join("recover")
        async with chat(a, "alice") as alice:
            first = await alice.join("recover")
            assert first["recovered"] is False and first["client_id"].startswith("specific.")
            await bob.send({"type": "sendMessage", "message": "one"})
            since = (await alice.next("message"))["offset"]
            await alice.send({"type": "sendMessage", "message": "alice's own"})
            assert (await bob.next("message"))["message"] == "alice's own"
        for text in ("two", "three"):
            await bob.send({"type": "sendMessage", "message": text})
        async with chat(b, "alice") as again:  # the other node
            await again.send({"type": "joinRoom", "room": "recover", "since": since,
                              "previous": first["client_id"]})
            joined = await again.next("joined")
            assert joined["recovered"] is True and joined["node"] == "node-b"
            assert [f["type"] for f in again.unread if f["type"] == "message"] == []
            replayed = [await again.next("message") for _ in range(2)]
            assert [f["message"] for f in replayed] == ["two", "three"]
            assert replayed[0]["offset"] < replayed[1]["offset"]
            await again.nothing("message", within=0.5)
        async with chat(a, "carol") as carol:
            lost = await carol.join("recover", since="not-an-offset")
            assert lost["recovered"] is False
            await carol.nothing("message", within=0.3)


def test_nodes_endpoint_lists_the_live_nodes_urls(cluster: tuple[Node, Node]) -> None:
    a, b = cluster
    with urllib.request.urlopen(f"{a.http_url}/nodes/", timeout=5) as resp:
        rows = json.load(resp)["nodes"]
    assert rows == [{"node_id": "node-a", "url": f"{a.http_url}/"},
                    {"node_id": "node-b", "url": f"{b.http_url}/"}]


async def test_display_name_from_join_else_short_client_id(cluster: tuple[Node, Node]) -> None:
    a, b = cluster
    async with chat(a) as anon, chat(b) as named, chat(b) as listener:
        await listener.join("names")
        anon_joined = await anon.join("names")
        assert anon_joined["name"].startswith("guest-")
        await named.join("names", name="  Dora   Explorer ")
        await anon.send({"type": "sendMessage", "message": "hi"})
        assert (await listener.next("message"))["from"] == anon_joined["name"]
        await named.send({"type": "sendMessage", "message": "yo"})
        assert (await listener.next("message"))["from"] == "Dora Explorer"


async def test_second_join_moves_the_connection(cluster: tuple[Node, Node]) -> None:
    a, b = cluster
    async with chat(a, "mover") as mover, chat(b, "old") as old, chat(b, "new") as new:
        await old.join("lobby")
        await new.join("kitchen")
        await mover.join("lobby")
        await mover.join("kitchen")
        await old.send({"type": "sendMessage", "message": "still there?"})
        await mover.nothing("message")
        await new.send({"type": "sendMessage", "message": "welcome"})
        assert (await mover.next("message"))["room"] == "kitchen"
        await old.members("lobby", lambda names: names == {"old"})


async def test_logged_in_user_is_named_by_username_on_any_node(
    cluster: tuple[Node, Node],
) -> None:
    a, b = cluster
    session = await asyncio.to_thread(log_in, a)
    # Logged in on A's HTTP side; the session is in the shared database, so B knows it too.
    async with chat(b, "someone-else", session=session) as dora, chat(a, "eve") as eve:
        await eve.join("auth-room")
        assert (await dora.join("auth-room", name="not-dora"))["name"] == USER
        await dora.send({"type": "sendMessage", "message": "signed"})
        assert (await eve.next("message"))["from"] == USER


async def test_a_signed_in_user_keeps_at_most_five_chats_across_nodes(
    cluster: tuple[Node, Node],
) -> None:
    a, b = cluster
    session = await asyncio.to_thread(log_in, b)
    async with contextlib.AsyncExitStack() as stack:
        tabs = [await stack.enter_async_context(chat((a, b)[i % 2], session=session))
                for i in range(5)]
        for i, tab in enumerate(tabs):  # five are fine, on either node
            await tab.join(f"capped-{i}")
        for node in (a, b):
            async with chat(node, session=session) as sixth:
                with pytest.raises(ConnectionClosed) as closed:
                    await asyncio.wait_for(sixth.ws.recv(), 10)
                assert closed.value.rcvd is not None and closed.value.rcvd.code == 4008
        # Anonymous chats are not counted, and the five stay open.
        async with chat(a, "anon-6") as anon:
            await anon.join("capped-anon")
        for i, tab in enumerate(tabs):
            await tab.join(f"capped-again-{i}")


async def test_invalid_json_gets_error_frame_and_stays_open(cluster: tuple[Node, Node]) -> None:
    async with chat(cluster[0], "x") as ws:
        await ws.send("this is {not json")
        assert await ws.next("error") == {
            "type": "error", "code": "invalid_json", "message": "Invalid message format"}
        await ws.join("after-error")


async def test_other_bad_frames_get_their_error_codes(cluster: tuple[Node, Node]) -> None:
    async with chat(cluster[1], "z") as ws:
        await ws.send("[1, 2]")
        assert (await ws.next("error"))["code"] == "invalid_message"
        await ws.send({"type": "dance"})
        assert (await ws.next("error"))["code"] == "unknown_type"
        await ws.join("codes")
        await ws.send({"type": "sendMessage", "message": {"not": "text"}})
        assert (await ws.next("error"))["code"] == "invalid_message"
        await ws.send({"type": "leaveRoom"})
        await ws.next("left")
        await ws.send({"type": "sendMessage", "message": "gone"})
        assert (await ws.next("error"))["code"] == "not_in_room"


async def test_send_before_join_is_not_in_room(cluster: tuple[Node, Node]) -> None:
    async with chat(cluster[1], "y") as ws:
        await ws.send({"type": "sendMessage", "message": "too early"})
        error = await ws.next("error")
        assert error["code"] == "not_in_room"
        assert error["message"]
        await ws.join("later")


async def test_bad_room_name_is_invalid_room(cluster: tuple[Node, Node]) -> None:
    async with chat(cluster[0]) as ws:
        await ws.send({"type": "joinRoom", "room": "no spaces allowed"})
        assert (await ws.next("error"))["code"] == "invalid_room"


async def test_foreign_origin_is_refused(cluster: tuple[Node, Node]) -> None:
    with pytest.raises(InvalidStatus) as info:
        async with chat(cluster[0], origin="http://evil.example"):
            pass
    assert info.value.response.status_code == 403


# A plain Node.js client as the chat protocol's own clients are written: no Origin header
# (Node's WebSocket sends none), join, print what arrives, answer once, exit.
NODE_CLIENT = """
const ws = new WebSocket(process.argv[1]);
ws.onopen = () => ws.send(JSON.stringify({type: "joinRoom", room: "from-node", name: "nodejs"}));
ws.onmessage = (event) => {
  const frame = JSON.parse(event.data);
  console.log(JSON.stringify(frame));
  if (frame.type === "message") {
    ws.send(JSON.stringify({type: "sendMessage", message: "hi from node"}));
    setTimeout(() => ws.close(), 500);
  }
};
ws.onclose = () => process.exit(0);
ws.onerror = (event) => { console.log(JSON.stringify({type: "ws-error"})); process.exit(3); };
"""


async def test_plain_nodejs_client_without_origin_chats(cluster: tuple[Node, Node]) -> None:
    a, b = cluster
    node = shutil.which("node")
    if node is None:
        pytest.skip("Node.js is not installed (apt-get install nodejs)")
    proc = await asyncio.create_subprocess_exec(
        node, "--experimental-websocket", "-e", NODE_CLIENT, f"{a.ws_url}/ws/chat/",
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.DEVNULL,
    )
    frames: list[dict[str, Any]] = []

    async def node_frame(wanted: str) -> dict[str, Any]:
        assert proc.stdout is not None
        while True:
            line = await asyncio.wait_for(proc.stdout.readline(), 10)
            assert line, f"the Node.js client exited early after {frames}"
            frames.append(json.loads(line))
            if frames[-1]["type"] == wanted:
                return frames[-1]

    try:
        assert (await node_frame("joined"))["node"] == "node-a"
        async with chat(b, "bob") as bob:
            await bob.join("from-node")
            await bob.send({"type": "sendMessage", "message": "hello node"})
            got = await node_frame("message")
            assert parse_offset(got.pop("offset")) is not None
            assert got == {"type": "message", "room": "from-node", "from": "bob",
                           "message": "hello node"}
            reply = await bob.next("message", timeout=10)
            assert reply["message"] == "hi from node"
        assert await asyncio.wait_for(proc.wait(), 10) == 0
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()


async def test_chat_rate_limit_stops_a_burst(cluster: tuple[Node, Node]) -> None:
    a, b = cluster
    async with chat(a, "flooder") as flooder, chat(b, "reader") as reader:
        await reader.join("flood-room")
        await flooder.join("flood-room")
        for i in range(300):
            try:
                await flooder.send({"type": "sendMessage", "message": f"m{i}"})
            except ConnectionClosed:
                break
        limited = await flooder.next("error", timeout=10)
        assert limited["code"] == "rate_limited"
        with pytest.raises(ConnectionClosed) as info:
            while True:
                await flooder._read(10)
        assert info.value.rcvd is not None and info.value.rcvd.code == 1008
        delivered = 0
        try:
            while True:
                await reader.next("message", timeout=1.5)
                delivered += 1
        except AssertionError:
            pass
    # The burst (20), plus 5/s for the moment the burst took, minus the join frame.
    assert 15 <= delivered <= 40, delivered


async def test_presence_lists_members_with_their_nodes(cluster: tuple[Node, Node]) -> None:
    a, b = cluster
    async with chat(a, "ann") as ann, chat(b, "ben") as ben:
        await ann.join("presence-room")
        await ben.join("presence-room")
        state = await ben.next("presence.state")
        nodes = {(m["meta"] or {}).get("name"): m["node_id"] for m in state["members"]}
        assert nodes == {"ann": "node-a", "ben": "node-b"}


async def test_renaming_in_the_same_room_updates_presence_elsewhere(
    cluster: tuple[Node, Node],
) -> None:
    a, b = cluster
    async with chat(a, "watcher") as watcher, chat(b, "before") as renamer:
        await watcher.join("rename-room")
        await renamer.join("rename-room")
        await watcher.members("rename-room", lambda names: names == {"watcher", "before"})
        assert (await renamer.join("rename-room", name="after"))["name"] == "after"
        await watcher.members("rename-room", lambda names: names == {"watcher", "after"})
        await renamer.send({"type": "sendMessage", "message": "new name"})
        assert (await watcher.next("message"))["from"] == "after"


async def test_dashboard_lists_both_nodes_and_rooms(cluster: tuple[Node, Node]) -> None:
    a, b = cluster
    async with chat(b, "dash") as member:
        await member.join("dash-room")
        async with dashboard(a) as dash:
            snap = await dash.next("cluster")
            assert {n["node_id"] for n in snap["nodes"]} == {"node-a", "node-b"}
            node_b = next(n for n in snap["nodes"] if n["node_id"] == "node-b")
            assert node_b["pid"] == b.pid
            assert node_b["hostname"] and node_b["uptime"] >= 0 and node_b["heartbeat_age"] < 7
            rooms = {r["room"]: r for r in snap["rooms"]}
            assert rooms["dash-room"]["members"] == 1
            assert rooms["dash-room"]["nodes"] == {"node-b": 1}
            # Connection counts follow the nodes' heartbeats (every 2 s by default):
            # the chat connection on B, this dashboard on A.
            for _ in range(8):
                counts = {n["node_id"]: n["connections"] for n in snap["nodes"]}
                if counts == {"node-a": 1, "node-b": 1}:
                    break
                snap = await dash.next("cluster")
            assert counts == {"node-a": 1, "node-b": 1}


async def test_sigkilled_node_leaves_presence_within_pruning_time(redis_url: str) -> None:
    prefix = f"tk{uuid.uuid4().hex[:8]}"
    a = start_node(redis_url, prefix, "node-a")
    b = start_node(redis_url, prefix, "node-b")
    try:
        async with chat(a, "survivor") as survivor, chat(b, "doomed") as doomed:
            await survivor.join("ghosts")
            await doomed.join("ghosts")
            await survivor.members("ghosts", lambda names: names == {"survivor", "doomed"})
            b.kill()
            killed_at = time.monotonic()
            await survivor.members("ghosts", lambda names: names == {"survivor"}, timeout=12.0)
            elapsed = time.monotonic() - killed_at
            assert elapsed <= 10.0, f"leave arrived after {elapsed:.1f} s"
            print(f"leave seen on node A {elapsed:.2f} s after SIGKILL of node B")
            # The dashboard on A no longer lists B either.
            async with dashboard(a) as dash:
                snap = await dash.next("cluster")
                assert [n["node_id"] for n in snap["nodes"]] == ["node-a"]
    finally:
        b.stop()
        a.stop()
        _drop_prefix(redis_url, prefix)
