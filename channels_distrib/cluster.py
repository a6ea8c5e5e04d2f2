"""The registry's multi-slot steps on Redis Cluster: read, then pipeline per slot.

On a standalone server (or a Sentinel master) one script does each of these atomically. On
a cluster a script reaches one slot only, so each is split by slot (scripts ``CLUSTER_*``):

- group send: one script on the group's slot reads its nodes (and stores and numbers a room
  message), then the inbox appends and queue pushes go out in one pipeline, which redis-py
  sends to every master concurrently: 2 sequential round trips whatever the group size.
- group_add: the channel's side first (refused unless its node is live, atomically with the
  node's index), then the group's side: 2 round trips. group_discard: both sides in one
  pipeline (1 round trip).
- sync: the node's side (liveness, index), then one script per group pipelined: 2.
- heartbeat: the node table, then the node's own keys and one mark per master, by which a
  node sees that a master lost its data (it then re-registers its memberships).
- pruning: a claim in the node's slot (atomic: exactly when its deadline has passed), then
  per-group removals (idempotent; the group's HDEL decides who announces a leave, so two
  pruners never announce one twice), the leave diffs, and last the node table. A pruner
  that dies midway leaves the claimed index in ``:cp`` and the node listed as dead, so the
  next pruner finishes the job.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import defaultdict
from collections.abc import Awaitable, Callable, Sequence
from typing import TYPE_CHECKING, Any

from redis.asyncio import RedisCluster
from redis.exceptions import ClusterDownError, NoScriptError, ResponseError
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from .exceptions import RedisUnavailable
from .scripts import ALL as SCRIPT_SOURCES
from .transport import RECONNECT_CAP, backoff

#: Approximate cap on inbox length (entries); older entries are trimmed by XADD.
INBOX_MAXLEN = 100_000

if TYPE_CHECKING:
    from .registry import Registry
    from .transport import Client, Transport

logger = logging.getLogger(__name__)

#: One script call: name, KEYS, ARGV.
Call = tuple[str, list[str], list[Any]]

#: CLUSTER_FAN_READ's KEYS for a plain group; a room send with history adds its two.
PLAIN_FAN_KEYS = 5

#: How many candidate tags are tried to find one that lands on each master.
MARK_TAGS = 4096


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


def _noscript(result: object) -> bool:
    return isinstance(result, NoScriptError) or (
        isinstance(result, ResponseError) and str(result).startswith("NOSCRIPT")
    )


async def pipelined(
    t: Transport, calls: Sequence[Call | tuple[str, tuple[Any, ...]]], *, idempotent: bool = False
) -> list[Any]:
    """Run scripts (and plain commands, as ``("command", (key, args...))``) pipelined: one
    pipeline per master, all sent concurrently (one round trip).

    At most once, per master: a master's part is retried only when its connection could not
    be opened (nothing of it was written), while the other parts are not touched; a single
    cross-master pipeline would resend what the reachable masters had already run. Commands
    a master refused without running them (NOSCRIPT after it restarted empty, CLUSTERDOWN
    while another master is away) are sent again, alone, until ``retry_timeout``; still
    refused then, they raise RedisUnavailable, as a part whose master stayed unreachable does
    (the other parts may have run). ``idempotent`` calls (reads) are also sent again after a
    connection error once written: redis-py closes every connection of its cluster client
    when one command fails to connect (a master killed), so a read in flight on a healthy
    master sees "Connection closed by server".
    """
    results: list[Any] = [None] * len(calls)
    todo = list(range(len(calls)))
    started = time.monotonic()
    attempt = 0
    while todo:
        parts = await _by_master(t, [_first_key(calls[i]) for i in todo])


        def part_of(part: list[int], now: list[int]) -> Callable[[Client], Awaitable[list[Any]]]:
            return lambda client: _send(t, client, [calls[now[i]] for i in part])

        outcomes = await asyncio.gather(
            *(t.run(part_of(part, todo), idempotent=idempotent) for part in parts),
            return_exceptions=True,
        )
        refused: list[int] = []
        for part, outcome in zip(parts, outcomes, strict=True):
            if isinstance(outcome, asyncio.CancelledError):
                raise outcome
            for n, i in enumerate(part):
                result = outcome if isinstance(outcome, BaseException) else outcome[n]
                results[todo[i]] = result
                if _refused(result, idempotent):
                    refused.append(todo[i])
        todo = refused
        if any(_noscript(results[i]) for i in todo):
            await load_scripts(t)
        elif todo:
            t.mark_stale()
            attempt += 1
            if time.monotonic() - started >= t.retry_timeout:
                break
            await asyncio.sleep(backoff(attempt, RECONNECT_CAP))
    for result in results:
        if _refused(result, idempotent):
            # Refused (never run) until retry_timeout, or a read that kept failing: as for
            # a master that cannot be reached.
            raise RedisUnavailable(t.host.address, time.monotonic() - started, result) from result
        if isinstance(result, BaseException):
            raise result
    return results


def _refused(result: object, idempotent: bool) -> bool:
    """Whether a pipelined call's result asks for it to be sent again: refused unrun
    (NOSCRIPT, CLUSTERDOWN), or, for a read, failed on its connection (a pipeline puts such
    errors among the results: they never reach Transport.run)."""
    if _noscript(result) or isinstance(result, ClusterDownError):
        return True
    return idempotent and isinstance(result, (RedisConnectionError, RedisTimeoutError))


def _first_key(call: Any) -> str:
    return str(call[1][1] if call[0] == "command" else call[1][0])


def cluster_client(t: Transport) -> RedisCluster:
    """The transport's RedisCluster client; only cluster-mode code calls this."""
    client = t.client
    if not isinstance(client, RedisCluster):
        raise TypeError(f"a Redis Cluster client was expected, not {type(client).__name__}")
    return client


async def _by_master(t: Transport, keys: list[str]) -> list[list[int]]:
    """Positions of ``keys`` grouped by the master that serves each one's slot now."""
    client = await slot_map(t)
    parts: dict[str, list[int]] = defaultdict(list)
    for i, key in enumerate(keys):
        holders = client.nodes_manager.slots_cache.get(client.keyslot(key))
        parts[holders[0].name if holders else ""].append(i)
    return list(parts.values())


async def _send(t: Transport, client: Client, todo: Sequence[Any]) -> list[Any]:
    """One pipeline (of one master's commands); results, errors in place (not raised)."""
    async with client.pipeline(transaction=False) as pipe:
        for call in todo:
            if call[0] == "command":
                pipe.execute_command(*call[1])
            else:
                name, keys, args = call
                # evalsha() is blocked on cluster pipelines; the command itself is routed by key.
                pipe.execute_command("EVALSHA", t.scripts[name].sha, len(keys), *keys, *args)
        return list(await pipe.execute(raise_on_error=False))


async def load_scripts(t: Transport) -> None:
    """SCRIPT LOAD every script on every master (a cluster sends SCRIPT LOAD to all)."""

    async def load(client: Client) -> None:
        for source in SCRIPT_SOURCES.values():
            await client.script_load(source)

    await t.run(load)


def master_tag_map(client: RedisCluster, prefix: str) -> dict[str, int]:
    """Master name -> the lowest ``i`` whose keys ``P:{m.<i>}:...`` land on that master."""
    slots = client.nodes_manager.slots_cache
    found: dict[str, int] = {}
    masters = {node.name for node in client.get_primaries()}
    for i in range(MARK_TAGS):
        holders = slots.get(client.keyslot(f"{prefix}:{{m.{i}}}:seen"))
        if holders and holders[0].name not in found:
            found[holders[0].name] = i
            if len(found) == len(masters):
                break
    return found


def master_tags(client: RedisCluster, prefix: str) -> list[int]:
    """For each master, the lowest ``i`` whose key ``P:{m.<i>}:seen`` lands on it."""
    return sorted(master_tag_map(client, prefix).values())


async def slot_map(t: Transport) -> RedisCluster:
    """The cluster client, its slot map loaded (it is empty before the first command)."""
    client = cluster_client(t)
    if not client.nodes_manager.slots_cache:
        await t.run(lambda c: client.initialize())
    return client


class ClusterOps:
    """The registry's writes and fan-out on Redis Cluster; one per registry."""

    def __init__(self, registry: Registry) -> None:
        self.registry = registry
        self.keys = registry.keys
        self._suspects: set[str] = set()  # tokens found gone without trace once (purge_orphans)

    # -- group send -----------------------------------------------------------------------

    async def fan_out(self, t: Transport, sends: Sequence[tuple[list[str], list[Any]]]) -> list[
        tuple[int, int, int, Any]
    ]:
        """Group sends given as GROUP_SEND's (KEYS, ARGV) (a room send's KEYS carry the
        history keys too); returns (nodes written, queued, dropped, offset) for each."""
        reads = [
            ("cluster_fan_read", list(keys), [a[1], a[3], a[4], a[7], a[8]])
            for keys, a in sends
        ]
        # A read with no history keys only removes expired members: safe to send twice. A
        # room send's read numbers and stores the message, so it is sent at most once.
        found = await pipelined(
            t, reads, idempotent=all(len(keys) == PLAIN_FAN_KEYS for keys, _a in sends)
        )
        writes: list[Any] = []
        owners: list[tuple[int, str]] = []
        for n, ((_keys, a), (tokens, queues, offset)) in enumerate(zip(sends, found, strict=True)):
            _prefix, kind, group, payload, exclude, maxlen, expiry = a[:7]
            fields: list[Any] = [kind, group, "m", payload]
            if exclude:
                fields += ["x", exclude]
            if offset:
                fields += ["h", offset]
            for token in tokens:
                name = _text(token)
                inbox, armed, bell = self.keys.inbox(name), self.keys.armed(name), self.keys.bell(name)
                writes.append(("cluster_append", [inbox, armed], [bell, maxlen, *fields]))
                owners.append((n, "inbox"))
            for i in range(0, len(queues), 2):
                queue = self.keys.queue(_text(queues[i]))
                writes.append(("send_queue", [queue], [payload, int(queues[i + 1]), expiry]))
                owners.append((n, "queue"))
        counts = [[0, 0, 0, offset] for _tokens, _queues, offset in found]
        for (n, what), result in zip(owners, await pipelined(t, writes), strict=True):
            if what == "inbox":
                counts[n][0] += result is not None
            elif result:
                counts[n][1] += 1
            else:
                counts[n][2] += 1
        return [(int(c[0]), int(c[1]), int(c[2]), c[3]) for c in counts]

    # -- memberships ----------------------------------------------------------------------

    async def add(self, t: Transport, group: str, channel: str, token: str, args: list[Any]) -> Any:
        """GROUP_ADD as its two steps; ``args`` are GROUP_ADD's ARGV. Returns its reply."""
        k = self.keys
        side = k.node_channels(token) if token else k.channel_groups(channel)
        live, inbox, armed = (
            (k.live(token), k.inbox(token), k.armed(token)) if token else (side, side, side)
        )
        group_, channel_, token_, record, presence, gexp, notify, maxlen, cap, ttl, state, bell = args
        accepted = await t.script(
            "cluster_add_side",
            [side, live, inbox, armed],
            [group_, channel_, token_, record, presence, gexp, notify, maxlen, ttl, bell],
        )
        if int(accepted[0]) != 1:
            return [0]
        add: Call = (
            "cluster_add_group",
            k.group_keys(group),
            [group_, channel_, token_, accepted[1], presence, gexp, cap, state],
        )
        if not token:
            return await t.script(add[0], add[1], add[2])
        # The directory note goes first in the group's master's pipeline: no round trip more.
        return (await pipelined(t, [*await self._notes(t, token, [group]), add]))[-1]

    async def discard(
        self, t: Transport, group: str, channel: str, token: str, notify: bool
    ) -> bytes | None:
        """GROUP_DISCARD's two sides in one pipeline; the presence record if it was one."""
        k = self.keys
        side = k.node_channels(token) if token else k.channel_groups(channel)
        inbox, armed = (k.inbox(token), k.armed(token)) if token else (side, side)
        notify_ = "1" if notify and token else "0"
        bell = k.bell(token) if token else ""
        _side, removed = await pipelined(
            t,
            [
                (
                    "cluster_discard_side",
                    [side, inbox, armed],
                    [group, channel, token, notify_, INBOX_MAXLEN, bell],
                ),
                ("cluster_discard_group", k.group_keys(group), [group, token, channel]),
            ],
        )
        if removed and removed[1]:
            return bytes(removed[1]) if not isinstance(removed[1], str) else removed[1].encode()
        return None

    async def sync(self, t: Transport, token: str, items: list[Any]) -> list[Any] | None:
        """SYNC as the node's side then one script per group; SYNC's flat changes or None."""
        k = self.keys
        side: list[Any] = [self.registry.node_ttl_ms]
        per_group: dict[str, list[Any]] = defaultdict(list)
        for i in range(0, len(items), 5):
            op, group, channel, record, presence = items[i : i + 5]
            side += [op, group, channel]
            per_group[_text(group)] += [op, channel, record, presence]
        if not await t.script("cluster_sync_side", [k.live(token), k.node_channels(token)], side):
            return None
        gexp = int(self.registry.config.group_expiry * 1000)
        groups = sorted(per_group)
        added = sorted({_text(items[i + 1]) for i in range(0, len(items), 5) if _text(items[i]) == "a"})
        notes = await self._notes(t, token, added)
        calls: list[Call] = notes + [
            ("cluster_sync_group", k.group_keys(g), [g, token, gexp, *per_group[g]])
            for g in groups
        ]
        changes: list[Any] = []
        synced = (await pipelined(t, calls))[len(notes) :]
        for group, flat in zip(groups, synced, strict=True):
            for i in range(0, len(flat), 3):
                changes += [flat[i], group, flat[i + 1], flat[i + 2]]
        return changes

    # -- pruning --------------------------------------------------------------------------

    async def prune_token(self, t: Transport, token: str, own: bool) -> tuple[bool, list[Any]]:
        """Claim, remove per group, then leave the table. Returns (whether this call removed
        the node's table entry, flat group/channel/record triples of presence leaves)."""
        k = self.keys
        registry = self.registry
        claim = await t.script(
            "cluster_prune_claim",
            [k.live(token), k.node_channels(token), k.pruning(token), k.inbox(token),
             k.full(token), k.tombstone(token)],
            ["1" if own else "0", registry.retention_ms],
        )
        if int(claim[0]) != 1:
            return False, []
        flat = claim[1]
        by_group: dict[str, list[str]] = defaultdict(list)
        for i in range(0, len(flat), 2):
            for group in _text(flat[i + 1]).split():
                by_group[group].append(_text(flat[i]))
        # The directories name the groups the index may have lost (its master restarted).
        noted = (await self._noted(t, [token]))[token] - set(by_group)
        _count, leaves = await self._remove(t, {token: by_group}, {token: noted})
        # The leaves go out before the claim is dropped: a pruner dying here leaves the node
        # listed as dead, and the next one removes (and announces) what is left, nothing twice.
        await registry.send_leave_diffs(t, leaves)
        await t.run(lambda c: c.delete(k.pruning(token)))
        removed_entry = await t.script(
            "cluster_prune_table", k.table_keys(), [token, "1" if own else "0"]
        )
        if int(removed_entry) or own:
            await self._unmark(t, [token])
        return bool(int(removed_entry)) or own, leaves

    async def _remove(
        self, t: Transport, known: dict[str, dict[str, list[str]]], purged: dict[str, set[str]]
    ) -> tuple[int, list[Any]]:
        """Remove memberships of dead nodes: ``known[token][group]`` lists channels by name,
        ``purged[token]`` names groups to search for that token's channels. One pipelined
        round trip; each removal is idempotent and its HDEL decides the leave. Returns how
        many this call removed and the flat group/channel/record triples of presence leaves."""
        k = self.keys
        calls: list[Call] = [
            ("cluster_discard_group", k.group_keys(g), [g, token, *channels])
            for token, groups in known.items()
            for g, channels in sorted(groups.items())
        ] + [
            ("cluster_purge_token", k.group_keys(g), [g, token])
            for token, groups in purged.items()
            for g in sorted(groups)
        ]
        leaves: list[Any] = []
        count = 0
        for (_name, _keys, args), removed in zip(calls, await pipelined(t, calls), strict=True):
            count += len(removed) // 2
            for i in range(0, len(removed), 2):
                if removed[i + 1]:
                    leaves += [args[0], removed[i], removed[i + 1]]
        return count, leaves

    async def purge_orphans(self, t: Transport, groups: set[str], own: str) -> int:
        """Remove the memberships of nodes gone without trace (see CLUSTER_PURGE_TOKEN) from
        ``groups`` and from the groups their directories name, announce their leaves, and
        drop what is left of them on every master; returns how many memberships went.

        The candidates are the tokens in ``groups`` and in the masters' marks (a dead node's
        field stays there until it is pruned). One counts as gone when it is absent from the
        node table and its live mark is missing or past its deadline, twice in a row (calls
        are a reconcile period apart): a live node whose master just lost its keys writes
        them again within a heartbeat.
        """
        names = sorted(groups)
        k = self.keys
        listed = await pipelined(
            t, [("command", ("HKEYS", k.group_nodes(g))) for g in names], idempotent=True
        )
        by_group = {g: {_text(tok) for tok in toks} - {own} for g, toks in zip(names, listed, strict=True)}
        gone = await self._gone(t, set().union(*by_group.values(), await self._marked(t)) - {own})
        confirmed, self._suspects = gone & self._suspects, gone - self._suspects
        if not confirmed:
            return 0
        noted = await self._noted(t, sorted(confirmed))
        purged = {tok: noted[tok] | {g for g in names if tok in by_group[g]} for tok in confirmed}
        removed, leaves = await self._remove(t, {}, purged)
        if removed:
            logger.warning(
                "Removed %d membership(s) of %d node(s) gone without trace (a master lost its data)",
                removed,
                len(confirmed),
            )
        await self.registry.send_leave_diffs(t, leaves)
        await self._unmark(t, sorted(confirmed))
        return removed

    # -- heartbeat ------------------------------------------------------------------------

    async def beat(
        self, t: Transport, token: str, node_id: str, info: bytes, timeout_ms: int, first: bool
    ) -> list[Any]:
        """HEARTBEAT on a cluster: the node table, then the node's keys and its mark on
        every master. Returns HEARTBEAT's reply (existed is 0 when the node's own keys or
        any master's mark were gone: that master lost its data)."""
        k, registry = self.keys, self.registry
        flag = "1" if first else "0"
        table = await t.script(
            "cluster_beat_table",
            [*k.table_keys(), k.flush],
            [token, node_id, info, timeout_ms, flag, registry.table_ttl_ms],
        )
        if int(table[0]) != 1:
            return list(table)
        own = await t.script(
            "cluster_beat_node",
            [k.live(token), k.tombstone(token), k.inbox(token), k.full(token),
             k.node_channels(token)],
            [timeout_ms, flag, registry.node_ttl_ms, INBOX_MAXLEN, registry.retention_ms],
        )
        if int(own[0]) == -2:
            return [-2]
        lost = await self._marks(t, token)
        existed = int(own[0]) == 1 and not lost
        if lost and not first:
            logger.warning("A Redis Cluster master lost its data (node %s re-registers)", node_id)
        _ok, now_ms, flush, dead, alive = table
        return [int(existed), int(own[1]), now_ms, flush, dead, own[2], alive]

    async def _gone(self, t: Transport, tokens: set[str]) -> set[str]:
        """The ``tokens`` absent from the node table whose live mark is missing or past."""
        now_ms, deadlines, _info = await self.registry._node_table(t)
        unknown = sorted(tokens - set(deadlines))
        marks = await pipelined(
            t, [("command", ("GET", self.keys.live(tok))) for tok in unknown], idempotent=True
        )
        return {
            tok
            for tok, mark in zip(unknown, marks, strict=True)
            if mark is None or int(mark) < now_ms
        }

    async def _unmark(self, t: Transport, tokens: list[str]) -> None:
        """Drop removed nodes' fields from every master's mark and their directories there
        (the marks would otherwise collect one field per node process ever started)."""
        tags = master_tags(await slot_map(t), self.keys.prefix)
        calls: list[Any] = []
        for i in tags:
            calls.append(("command", ("HDEL", self.keys.master_mark(i), *tokens)))
            calls += [("command", ("DEL", self.keys.noted_groups(i, tok))) for tok in tokens]
        await pipelined(t, calls)

    async def _marks(self, t: Transport, token: str) -> bool:
        """Set this node's field in every master's mark and renew its directories there;
        True when a mark had to be created."""
        client = cluster_client(t)
        await t.run(lambda c: client.initialize())
        ttl, node_ttl = self.registry.table_ttl_ms, self.registry.node_ttl_ms
        calls: list[Any] = []
        for i in master_tags(client, self.keys.prefix):
            mark = self.keys.master_mark(i)
            calls += [
                ("command", ("HSET", mark, token, 1)),
                ("command", ("PEXPIRE", mark, ttl)),
                ("command", ("PEXPIRE", self.keys.noted_groups(i, token), node_ttl)),
            ]
        results = await pipelined(t, calls)
        return any(int(created) for created in results[0::3])

    async def _marked(self, t: Transport) -> set[str]:
        """Every token with a field in some master's mark (live nodes, and dead ones not yet
        removed)."""
        tags = master_tags(await slot_map(t), self.keys.prefix)
        found = await pipelined(
            t, [("command", ("HKEYS", self.keys.master_mark(i))) for i in tags], idempotent=True
        )
        return {_text(tok) for toks in found for tok in toks}

    # -- directories: a node's groups, per master -----------------------------------------

    async def _notes(self, t: Transport, token: str, groups: list[str]) -> list[Call]:
        """CLUSTER_NOTE_GROUPS calls noting ``groups`` in the directory of ``token`` on the
        master serving each group (put them before the group writes in one pipelined call)."""
        if not groups:
            return []
        client = await slot_map(t)
        tags = master_tag_map(client, self.keys.prefix)
        slots = client.nodes_manager.slots_cache
        by_key: dict[str, list[str]] = defaultdict(list)
        for group in groups:
            holders = slots.get(client.keyslot(self.keys.group(group)))
            index = tags.get(holders[0].name) if holders else None
            if index is None:  # the slot map is changing: any master's directory will do
                index = min(tags.values(), default=0)
            by_key[self.keys.noted_groups(index, token)].append(group)
        ttl = self.registry.node_ttl_ms
        return [("cluster_note_groups", [key], [ttl, *names]) for key, names in by_key.items()]

    async def _noted(self, t: Transport, tokens: list[str]) -> dict[str, set[str]]:
        """The groups each token's directories name, over every master (one round trip)."""
        tags = master_tags(await slot_map(t), self.keys.prefix)
        calls: list[Any] = [
            ("command", ("SMEMBERS", self.keys.noted_groups(i, tok))) for tok in tokens for i in tags
        ]
        found: dict[str, set[str]] = {tok: set() for tok in tokens}
        for (_c, (_cmd, key)), names in zip(
            calls, await pipelined(t, calls, idempotent=True), strict=True
        ):
            found[key.rsplit(":g.", 1)[1]] |= {_text(name) for name in names}
        return found

    async def tidy_notes(self, t: Transport, token: str, held: Callable[[], set[str]]) -> int:
        """Remove from this node's directories the groups it no longer holds (``held()`` is
        its memory, the truth); returns how many went. A group noted again meanwhile (a join
        racing this) is noted back at once."""
        tags = master_tags(await slot_map(t), self.keys.prefix)
        keys = [self.keys.noted_groups(i, token) for i in tags]
        found = await pipelined(t, [("command", ("SMEMBERS", key)) for key in keys], idempotent=True)
        before = held()
        stale = {
            key: sorted(g for g in map(_text, names) if g not in before)
            for key, names in zip(keys, found, strict=True)
        }
        calls: list[Any] = [("command", ("SREM", key, *gs)) for key, gs in stale.items() if gs]
        if not calls:
            return 0
        await pipelined(t, calls)
        back = sorted({g for gs in stale.values() for g in gs} & held())
        if back:
            await pipelined(t, await self._notes(t, token, back))
        return sum(len(gs) for gs in stale.values())
