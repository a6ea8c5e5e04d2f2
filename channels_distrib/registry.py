"""The membership and node registry in Redis: writes through the Lua scripts, cluster-wide queries.

Every query is one or two round trips and never scans the keyspace. Member records are
``b"<joined ms>:<msgpack [node_id, meta]>"``; the join time is Redis server time.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import msgpack

from .cluster import INBOX_MAXLEN as INBOX_MAXLEN  # re-exported: heartbeat, layers
from .cluster import ClusterOps
from .config import LayerConfig
from .keys import Keys
from .serializers import Serializer
from .stats import Counters
from .transport import Transport
from .types import Member, Meta, NodeInfo, NodeStats

logger = logging.getLogger(__name__)



def token_of(channel: str) -> str:
    """The owning node's token of a process-local channel ``specific.<token>!<id>``; "" otherwise."""
    bang = channel.find("!")
    if bang < 0:
        return ""
    head = channel[:bang]
    dot = head.rfind(".")
    return head[dot + 1 :] if dot >= 0 else head


def encode_record(node_id: str | None, meta: Meta | None) -> bytes:
    """A member record without its time; the script stamps the join time (leading ':')."""
    packed: bytes = msgpack.packb([node_id, meta], use_bin_type=True)
    return b":" + packed


def decode_record(record: bytes) -> tuple[float, str | None, Meta | None]:
    """(joined_at seconds, node_id, meta) from a stored record; tolerant of damage."""
    stamp, _, blob = record.partition(b":")
    try:
        node_id, meta = msgpack.unpackb(blob, raw=False)
        return int(stamp) / 1000.0, node_id, meta
    except Exception:  # a damaged record must not break a query
        logger.warning("Skipping a malformed member record %r", record[:60])
        return 0.0, None, None


def presence_entry(channel: str, record: bytes | str) -> dict[str, Any]:
    """The ``{"channel", "node_id", "meta"}`` form presence messages carry."""
    _joined, node_id, meta = decode_record(record.encode() if isinstance(record, str) else record)
    return {"channel": channel, "node_id": node_id, "meta": meta}


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


@dataclass(frozen=True)
class AddResult:
    """What GROUP_ADD reported: whether it was new, the stored record, and presence state."""

    new: bool
    old_presence: bytes | None
    record: bytes
    state: list[dict[str, Any]]


#: Sends (group, ``presence.diff`` payload, excluded channels) triples on the calling loop.
DiffSender = Callable[[Transport, list[tuple[str, bytes, str]]], Awaitable[None]]


class Registry:
    """Registry operations for one prefix; each takes the Transport of the calling loop."""

    def __init__(self, config: LayerConfig, keys: Keys, serializer: Serializer) -> None:
        self.config = config
        self.keys = keys
        self.serializer = serializer
        self.counters = Counters()
        # A node's own keys (inbox, full set, channel index) outlive it by this much; its
        # heartbeat renews them.
        self.node_ttl_ms = int(max(config.expiry, config.node_timeout) * 2000) + 10_000
        # What a pruned node leaves: its inbox (what was sent before the pruning still reaches
        # it if it returns within expiry) and its tombstone (it then re-announces its joins).
        self.retention_ms = int(max(config.expiry, config.node_timeout) * 1000) + 1000
        # The node table outlives the last node long enough for a restarted one to prune it.
        self.table_ttl_ms = int(max(config.group_expiry, config.node_timeout * 10) * 1000)
        self.cluster = ClusterOps(self)  # the multi-slot steps, on Redis Cluster
        # Awaited with the token of each node this process pruned (or deregistered): with
        # ``broker``, the layer deletes that node's broker queue. Their errors are theirs.
        self.prune_listeners: list[Callable[[str], Awaitable[None]]] = []
        # With ``broker``: sends presence diffs, as (group, payload, exclude) triples, through
        # RabbitMQ instead of the nodes' Redis inboxes (set by the layer).
        self.diff_sender: DiffSender | None = None

    # -- writes ---------------------------------------------------------------------------

    def _membership_keys(self, group: str, channel: str, token: str) -> list[str]:
        """KEYS[1..10] of GROUP_ADD (GROUP_DISCARD takes them but the node table)."""
        side = self.keys.node_channels(token) if token else self.keys.channel_groups(channel)
        inbox = self.keys.inbox(token) if token else side
        armed = self.keys.armed(token) if token else side
        return [*self.keys.group_keys(group), side, self.keys.nodes, inbox, armed]

    async def add(
        self,
        t: Transport,
        group: str,
        channel: str,
        node_id: str | None,
        meta: Meta | None,
        presence: bool,
        notify: bool,
        record: bytes | None = None,
        read_state: bool = True,
    ) -> AddResult | None:
        """Add or update one membership; ``notify`` tells the owning node through its inbox.

        A presence member's result carries the group's presence state unless ``read_state``
        is False (the caller's node has a replica of it). Returns None when Redis refused it:
        the channel's node is not live.
        """
        token = token_of(channel)
        args = [
            group,
            channel,
            token,
            record if record is not None else encode_record(node_id, meta),
            "1" if presence else "0",
            int(self.config.group_expiry * 1000),
            "1" if notify and token else "0",
            INBOX_MAXLEN,
            self.config.capacity_for(channel),
            self.node_ttl_ms,
            "1" if read_state else "0",
            self.keys.bell(token) if token else "",
        ]
        if t.cluster:
            reply = await self.cluster.add(t, group, channel, token, args)
        else:
            reply = await t.script("group_add", self._membership_keys(group, channel, token), args)
        if int(reply[0]) != 1:
            return None
        _ok, old, old_presence, stored, flat = reply
        state = [presence_entry(_text(flat[i]), flat[i + 1]) for i in range(0, len(flat), 2)]
        return AddResult(new=old is None, old_presence=old_presence, record=stored, state=state)

    async def discard(self, t: Transport, group: str, channel: str, notify: bool) -> bytes | None:
        """Remove one membership; returns its presence record when it was a presence member."""
        token = token_of(channel)
        if t.cluster:
            return await self.cluster.discard(t, group, channel, token, notify)
        keys = self._membership_keys(group, channel, token)
        del keys[7]  # GROUP_DISCARD takes no node table
        bell = self.keys.bell(token) if token else ""
        args = [group, channel, token, "1" if notify and token else "0", INBOX_MAXLEN, bell]
        removed, presence = await t.script("group_discard", keys, args)
        return presence if removed and presence else None

    async def sync(self, t: Transport, token: str, items: list[Any]) -> list[Any] | None:
        """Write a batch of one node's memberships (flat op, group, channel, record, presence
        quintuples); returns the flat presence changes, or None when the node is not live."""
        if t.cluster:
            return await self.cluster.sync(t, token, items)
        keys = [self.keys.nodes, self.keys.node_channels(token)]
        args = [
            self.keys.prefix,
            token,
            int(self.config.group_expiry * 1000),
            self.node_ttl_ms,
            *items,
        ]
        reply = await t.script("sync", keys, args)
        if int(reply[0]) != 1:
            return None
        return list(reply[1:])

    def group_send_args(
        self, kind: str, group: str, payload: bytes, exclude: str = ""
    ) -> tuple[list[str], list[Any]]:
        """KEYS and ARGV of GROUP_SEND; 'g' reaches all members, 'p' presence members only."""
        nodes = (
            self.keys.group_nodes(group) if kind == "g" else self.keys.group_presence_nodes(group)
        )
        keys = [
            nodes,
            self.keys.group_queues(group),
            self.keys.group(group),
            self.keys.group_queue_capacity(group),
            self.keys.group_presence(group),
        ]
        args: list[Any] = [
            self.keys.prefix,
            kind,
            group,
            payload,
            exclude,
            INBOX_MAXLEN,
            int(self.config.expiry * 1000),
            int(self.config.group_expiry * 1000),
            self.config.capacity,
        ]
        return keys, args

    async def send_presence(
        self,
        t: Transport,
        group: str,
        joins: list[dict[str, Any]],
        leaves: list[dict[str, Any]],
        exclude: str = "",
    ) -> None:
        """Send one ``presence.diff`` to the group's presence members (except ``exclude``)."""
        payload = self.serializer.dumps(
            {"type": "presence.diff", "group": group, "joins": joins, "leaves": leaves}
        )
        await self.send_diff_payloads(t, [(group, payload, exclude)])

    async def send_diffs(
        self,
        t: Transport,
        joins: dict[str, list[dict[str, Any]]],
        leaves: dict[str, list[dict[str, Any]]],
    ) -> None:
        """One ``presence.diff`` per group for many groups at once, in one pipeline."""
        groups = sorted(set(joins) | set(leaves))
        if not groups:
            return
        sends = []
        for group in groups:
            diff = {
                "type": "presence.diff",
                "group": group,
                "joins": joins.get(group, []),
                "leaves": leaves.get(group, []),
            }
            sends.append((group, self.serializer.dumps(diff), ""))
        await self.send_diff_payloads(t, sends)

    async def send_diff_payloads(self, t: Transport, sends: list[tuple[str, bytes, str]]) -> None:
        """Encoded presence diffs as (group, payload, exclude) to each group's presence
        members: through the nodes' inboxes in one pipeline, or through RabbitMQ."""
        if self.diff_sender is not None:
            await self.diff_sender(t, sends)
            return
        await self.fan_out(t, [self.group_send_args("p", *send) for send in sends])

    async def fan_out(
        self, t: Transport, sends: list[tuple[list[str], list[Any]]], script: str = "group_send"
    ) -> list[tuple[int, int, int, Any]]:
        """Group sends given as GROUP_SEND's (or ROOM_SEND's) KEYS and ARGV, in one pipeline
        (one round trip; two on a cluster, see :mod:`channels_distrib.cluster`). Returns
        (nodes written, queued, dropped, room offset or None) for each."""
        if t.cluster:
            return await self.cluster.fan_out(t, sends)
        if len(sends) == 1:
            keys, args = sends[0]
            reply = await t.script(script, keys, args)
            return [(int(reply[0]), int(reply[1]), int(reply[2]), reply[3] if len(reply) > 3 else None)]
        runner = t.scripts[script]

        async def send_all(client: Any) -> list[Any]:
            async with client.pipeline(transaction=False) as pipe:
                for keys, args in sends:
                    await runner(keys=keys, args=args, client=pipe)
                return list(await pipe.execute())

        replies = await t.run(send_all)
        return [(int(r[0]), int(r[1]), int(r[2]), r[3] if len(r) > 3 else None) for r in replies]

    async def send_leave_diffs(self, t: Transport, flat: list[Any]) -> None:
        """One diff per group for flat (group, channel, record) triples from PRUNE_NODE."""
        by_group: dict[str, list[dict[str, Any]]] = defaultdict(list)
        for i in range(0, len(flat), 3):
            by_group[_text(flat[i])].append(presence_entry(_text(flat[i + 1]), flat[i + 2]))
        await self.send_diffs(t, {}, by_group)

    async def prune_token(self, t: Transport, token: str, *, own: bool = False) -> bool:
        """Remove a dead node (or, with ``own``, this node on a clean stop) and announce leaves."""
        keys = [
            *self.keys.table_keys(),
            self.keys.node_channels(token),
            self.keys.inbox(token),
            self.keys.full(token),
            self.keys.tombstone(token),
        ]
        if t.cluster:
            removed, _leaves = await self.cluster.prune_token(t, token, own)
            if removed and not own:
                self.counters.prunes += 1
            if removed:
                await self._tell_pruned(token)
            return removed
        args = [self.keys.prefix, token, self.retention_ms, "1" if own else "0"]
        result = await t.script("prune_node", keys, args)
        if not result or int(result[0]) != 1:
            return False
        if not own:
            self.counters.prunes += 1
        await self.send_leave_diffs(t, list(result[1:]))
        await self._tell_pruned(token)
        return True

    async def _tell_pruned(self, token: str) -> None:
        for listener in self.prune_listeners:
            await listener(token)

    async def prune(self, t: Transport) -> list[str]:
        """Find nodes past their deadline (silent for longer than their own ``node_timeout``)
        and prune them; returns their node ids."""
        now_ms, deadlines, info = await self._node_table(t)
        pruned = []
        for token, deadline in deadlines.items():
            if deadline < now_ms and await self.prune_token(t, token):
                pruned.append(self._node_id(token, info))
        return pruned

    # -- queries --------------------------------------------------------------------------

    async def owner_id(self, t: Transport, channel: str) -> str | None:
        """The node id owning a process-local channel (None for a normal channel).

        Falls back to the token when that node is not registered (it records its own id
        again when it re-registers its memberships).
        """
        token = token_of(channel)
        if not token:
            return None
        node_id = await t.read(lambda c: c.hget(self.keys.token_ids, token))
        return _text(node_id) if node_id is not None else token

    async def group_channels(self, t: Transport, group: str) -> set[str]:
        names = await t.read(lambda c: c.hkeys(self.keys.group(group)))
        return {_text(name) for name in names}

    async def group_size(self, t: Transport, group: str) -> int:
        return int(await t.read(lambda c: c.hlen(self.keys.group(group))))

    async def group_members(self, t: Transport, group: str) -> list[Member]:
        raw = await t.read(lambda c: c.hgetall(self.keys.group(group)))
        members = []
        for channel, record in raw.items():
            joined_at, node_id, meta = decode_record(
                record if isinstance(record, bytes) else record.encode()
            )
            members.append(Member(_text(channel), node_id, meta, joined_at))
        members.sort(key=lambda m: (m.joined_at, m.channel))
        return members

    async def has_receivers(self, t: Transport, group: str, exclude: str = "") -> bool:
        """Whether a message to ``group`` (sent excluding ``exclude``) should reach someone:
        a normal-channel member, or a member on a live node. Asked by the broker path when
        RabbitMQ routed a group message to no queue (one or two round trips)."""
        tokens = {token_of(name) for name in await self.group_channels(t, group) if name != exclude}
        if "" in tokens:
            return True
        return bool(tokens) and bool(tokens & await self.live_tokens(t))

    async def has_presence_receivers(self, t: Transport, group: str) -> bool:
        """Whether a live node has presence members in ``group`` (asked by the broker path
        when RabbitMQ routed a presence diff to no queue; two round trips)."""
        key = self.keys.group_presence_nodes(group)
        tokens = {_text(token) for token in await t.run(lambda c: c.hkeys(key))}
        return bool(tokens) and bool(tokens & await self.live_tokens(t))

    async def live_tokens(self, t: Transport) -> set[str]:
        """The tokens of the nodes whose heartbeat deadline has not passed."""
        now_ms, deadlines, _info = await self._node_table(t)
        return {token for token, deadline in deadlines.items() if deadline >= now_ms}

    async def channel_groups(self, t: Transport, channel: str) -> set[str]:
        token = token_of(channel)
        if token:
            words = await t.read(lambda c: c.hget(self.keys.node_channels(token), channel))
            return set(_text(words).split()) if words else set()
        groups = await t.read(lambda c: c.smembers(self.keys.channel_groups(channel)))
        return {_text(group) for group in groups}

    async def _node_table(self, t: Transport) -> tuple[float, dict[str, float], dict[str, Any]]:
        now_ms, flat_seen, flat_info = await t.script(
            "nodes", [self.keys.nodes, self.keys.node_info], [], idempotent=True
        )
        seen = {_text(flat_seen[i]): float(flat_seen[i + 1]) for i in range(0, len(flat_seen), 2)}
        info = {}
        for i in range(0, len(flat_info), 2):
            try:
                info[_text(flat_info[i])] = msgpack.unpackb(flat_info[i + 1], raw=False)
            except Exception:
                logger.warning("Skipping malformed node info for %r", flat_info[i])
        return float(now_ms), seen, info

    @staticmethod
    def _node_id(token: str, info: dict[str, Any]) -> str:
        entry = info.get(token)
        return str(entry["node_id"]) if isinstance(entry, dict) and "node_id" in entry else token

    async def nodes(self, t: Transport) -> list[NodeInfo]:
        now_ms, deadlines, info = await self._node_table(t)
        result = []
        for token, deadline in deadlines.items():
            entry = info.get(token)
            if deadline < now_ms or not isinstance(entry, dict):
                continue
            timeout = float(entry.get("node_timeout", self.config.node_timeout))
            result.append(
                NodeInfo(
                    node_id=str(entry.get("node_id", token)),
                    hostname=str(entry.get("hostname", "")),
                    pid=int(entry.get("pid", 0)),
                    started_at=float(entry.get("started_at", 0.0)),
                    last_seen=deadline / 1000.0 - timeout,
                    channel_count=int(entry.get("channel_count", 0)),
                )
            )
        result.sort(key=lambda n: (n.started_at, n.node_id))
        return result

    async def node_stats(self, t: Transport) -> list[NodeStats]:
        """The figures each live node published with its last heartbeat (one round trip)."""
        now_ms, deadlines, info = await self._node_table(t)
        result = []
        for token, deadline in deadlines.items():
            entry = info.get(token)
            if deadline < now_ms or not isinstance(entry, dict):
                continue
            try:
                stats = NodeStats.from_info(token, entry)
            except (TypeError, ValueError):
                logger.warning("Skipping malformed node figures for %r", token)
                continue
            if stats is not None:
                result.append(stats)
        result.sort(key=lambda s: s.node_id)
        return result

    async def node_channels(self, t: Transport, node_id: str) -> set[str]:
        token = await t.read(lambda c: c.hget(self.keys.node_ids, node_id))
        if token is None:
            return set()
        names = await t.read(lambda c: c.hkeys(self.keys.node_channels(_text(token))))
        return {_text(name) for name in names}
