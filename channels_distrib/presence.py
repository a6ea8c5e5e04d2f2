"""A node's presence: a replica of each group's presence members, and batched diffs.

One :class:`Presence` per node owns both (DESIGN.md "Presence at scale"):

- **The replica.** For every group where this node has a presence member, the node keeps
  the group's presence entries (``{"channel", "node_id", "meta"}`` by channel). It is filled
  by one ``HGETALL`` (inside GROUP_ADD) when the node's first presence member of the group
  joins, then kept current by the presence diffs the node reads from its inbox (each decoded
  once per node) and by the node's own joins and leaves. A joiner's ``presence.state`` comes
  from it, so a join costs Redis no read of the whole table. It is dropped when the node has
  no presence member left in the group, and after a flush, pruning or data loss (the node
  may have missed diffs; the next join fills it again).
- **Batching.** With ``presence_interval`` > 0, the node's joins and leaves of one group are
  collected for that long from the first one, then sent as one ``presence.diff`` (a join and
  a leave of the same channel inside one window cancel out). The task that sends them is
  owned by the node. With 0, each change is sent at once, as a diff of its own.

The joiner must not be told of its own join. A window's diff is written to every node with
presence members, this one included, with the window's joiners in the entry's exclude field
(``x``, space-separated: channel names hold no spaces), so no node delivers it to them; the
node hands each joiner, in memory, a diff of only what changed after it joined (its state
already held everything before). Filtering per recipient this way costs only the joiners of
one window on one node; every other member on every node gets the same encoded bytes.
"""

from __future__ import annotations

import asyncio
import logging
import sys
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import msgpack

from .registry import AddResult, presence_entry
from .serializers import MsgPackSerializer, SerializerError
from .tasks import cancellable
from .transport import backoff
from .types import Meta

if TYPE_CHECKING:
    from .node import Node

logger = logging.getLogger(__name__)

Entry = dict[str, Any]  # {"channel", "node_id", "meta"}
#: The state version of a member whose join is on its way (it is given no diff meanwhile).
JOINING = sys.maxsize
#: One change in a window: (kind "j"/"l", channel, entry, whether the channel is a joiner that
#: was given a presence.state, so must not be told of its own join).
Change = tuple[str, str, Entry, bool]


@dataclass
class _Window:
    deadline: float
    changes: list[Change] = field(default_factory=list)


class Replica:
    """One group's presence entries as this node knows them, versioned: ``since`` is the
    version of each entry's last change, so a diff of joins that a member's state already
    listed need not reach it."""

    __slots__ = ("_body", "_stale", "entries", "packed", "since", "version")

    def __init__(self, state: Iterable[Entry] = ()) -> None:
        self.entries: dict[str, Entry] = {entry["channel"]: entry for entry in state}
        self.since: dict[str, int] = {}
        # Each entry msgpack-encoded once, in the same order as ``entries``, and all of them
        # end to end (``_body``): a state is that body behind a header (see pack_state).
        self.packed: dict[str, bytes] = {
            channel: _pack(entry) for channel, entry in self.entries.items()
        }
        self._body = bytearray(b"".join(self.packed.values()))
        self._stale = False
        self.version = 0

    def packed_members(self) -> tuple[int, bytearray]:
        """(how many entries, all of them msgpack-encoded end to end). The body is the
        replica's own buffer: copy it (as :func:`pack_state` does) before the next change."""
        if self._stale:
            self._body = bytearray(b"".join(self.packed.values()))
            self._stale = False
        return len(self.packed), self._body

    def put(self, channel: str, entry: Entry) -> int:
        """Hold ``entry`` for ``channel``; returns the version since which it is held."""
        if self.entries.get(channel) == entry:
            return self.since.get(channel, 0)
        self.version += 1
        blob = _pack(entry)
        if channel in self.entries:
            self._stale = True  # changed in place: the body is rebuilt when next needed
        elif not self._stale:
            self._body += blob  # a new entry goes last, in the dicts as in the body
        self.entries[channel] = entry
        self.packed[channel] = blob
        self.since[channel] = self.version
        return self.version

    def remove(self, channel: str) -> None:
        """Hold no entry for ``channel``."""
        if self.entries.pop(channel, None) is not None:
            self.version += 1
            self.since.pop(channel, None)
            del self.packed[channel]
            self._stale = True


def _pack(entry: Entry) -> bytes:
    packed: bytes = msgpack.packb(entry, use_bin_type=True)
    return packed


@dataclass
class _Fill:
    """A replica being filled: the diffs read while the state read was on its way."""

    diffs: list[tuple[list[Entry], list[Entry]]] = field(default_factory=list)


def msgpack_array_header(length: int) -> bytes:
    """The msgpack header of an array of ``length`` items."""
    if length < 16:
        return bytes([0x90 | length])
    if length < 0x10000:
        return b"\xdc" + length.to_bytes(2, "big")
    return b"\xdd" + length.to_bytes(4, "big")


def pack_state(group: str, count: int, body: bytes | bytearray) -> bytes:
    """A ``presence.state`` in msgpack from its ``count`` entries already encoded end to end
    (``body``): the same bytes as encoding the whole message, without encoding every entry
    again for every joiner (the states of N joiners hold N²/2 entries)."""
    head: bytes = msgpack.packb(
        {"type": "presence.state", "group": group, "members": []}, use_bin_type=True
    )
    # "members" is the last key, so the message ends with its empty array (0x90).
    return b"".join((head[:-1], msgpack_array_header(count), body))


def net_changes(changes: Iterable[Change]) -> tuple[dict[str, Entry], dict[str, Entry]]:
    """Merge changes in order into (joins, leaves) by channel; a join and a leave of one
    channel cancel out, and a leave then a join with the same entry is no change at all."""
    joins: dict[str, Entry] = {}
    leaves: dict[str, Entry] = {}
    for kind, channel, entry, _joiner in changes:
        if kind == "j":
            if channel in leaves and channel not in joins and leaves[channel] == entry:
                del leaves[channel]
            else:
                joins[channel] = entry
        elif channel in joins:
            del joins[channel]  # joined inside the window: nobody was told (a leave before stays)
        else:
            leaves[channel] = entry
    return joins, leaves


class Presence:
    """The presence replica and diff batching of one node; its task is owned by the node."""

    def __init__(self, node: Node) -> None:
        self.node = node
        self.interval = node.config.presence_interval
        self.replicas: dict[str, Replica] = {}
        self._fills: dict[str, list[_Fill]] = {}
        # Per group, the replica version of each local member's presence.state (JOINING
        # while its join is on its way: its state will hold every diff read meanwhile).
        self._seen: dict[str, dict[str, int]] = {}
        self._windows: dict[str, _Window] = {}
        self._wake = asyncio.Event()
        self.diffs_sent = 0
        self.dropped = 0

    # -- joins and leaves of this node's channels --------------------------------------------

    async def join(self, group: str, channel: str, meta: Meta | None, presence: bool) -> bool:
        """Add one of this node's channels to a group; a presence member gets its
        ``presence.state`` queued before this returns. False when Redis refused it."""
        node = self.node
        fill = self._begin_fill(group) if presence and group not in self.replicas else None
        before = None
        if presence:
            seen = self._seen.setdefault(group, {})
            before = seen.get(channel)
            seen[channel] = JOINING
        try:
            result = await node.memberships.join(
                group, channel, meta, presence, read_state=fill is not None
            )
        except BaseException:
            self._unjoin(group, channel, presence, before, fill)
            raise
        if result is None:
            self._unjoin(group, channel, presence, before, fill)
            return False
        if fill is not None:
            self._end_fill(group, fill, result.state)
        elif presence and group not in self.replicas:
            # The replica was dropped while the write was on its way: read the state now.
            try:
                await self._fill_now(group)
            except BaseException:
                self._seen.get(group, {}).pop(channel, None)  # no state: every diff reaches it
                raise
        await self._joined(group, channel, result, presence)
        return True

    def _unjoin(
        self, group: str, channel: str, presence: bool, before: int | None, fill: _Fill | None
    ) -> None:
        """A join that did not happen: back to what the member's state was."""
        seen = self._seen.get(group)
        if presence and seen is not None:
            if before is None:
                seen.pop(channel, None)
            else:
                seen[channel] = before
            if not seen and group not in self.replicas:
                del self._seen[group]
        if fill is not None:
            self._end_fill(group, fill, None)
        self._drop_if_unused(group)

    async def _joined(self, group: str, channel: str, result: AddResult, presence: bool) -> None:
        changes: list[Change] = []
        old = presence_entry(channel, result.old_presence) if result.old_presence else None
        if presence:
            entry = presence_entry(channel, result.record)
            if old != entry:
                if old is not None:
                    changes.append(("l", channel, old, False))
                changes.append(("j", channel, entry, True))
            replica = self.replicas.get(group)
            if replica is not None:
                replica.put(channel, entry)
                self._seen.setdefault(group, {})[channel] = replica.version
            else:  # unreachable in practice: the replica was just filled
                self._seen.get(group, {}).pop(channel, None)
            self._queue_state(group, channel, replica, entry)
        elif old is not None:
            changes.append(("l", channel, old, False))
            self._forget(group, channel)
        if changes:
            await self._record(group, changes)

    async def leave(self, group: str, channel: str) -> None:
        """Remove one of this node's channels from a group (a failed write raises, and the
        membership owner retries it); a presence member's leave is announced."""
        record = await self.node.memberships.leave(group, channel)
        self._forget(group, channel)
        if record is not None:
            await self._record(group, [("l", channel, presence_entry(channel, record), False)])

    async def announce(self, joins: dict[str, list[Entry]], leaves: dict[str, list[Entry]]) -> None:
        """Presence changes of this node's channels reported by a membership sync (leaves of
        buried or expired channels, joins re-announced after pruning), one diff per group."""
        if self.interval <= 0:
            for group, entries in leaves.items():
                for entry in entries:
                    self._forget(group, entry["channel"])
            await self.node.registry.send_diffs(self.node.transport, joins, leaves)
            return
        for group in sorted(set(joins) | set(leaves)):
            changes: list[Change] = [("l", e["channel"], e, False) for e in leaves.get(group, [])]
            changes += [("j", e["channel"], e, False) for e in joins.get(group, [])]
            for entry in leaves.get(group, []):
                self._forget(group, entry["channel"])
            await self._record(group, changes)

    def _forget(self, group: str, channel: str) -> None:
        """One of this node's channels is no longer a presence member of ``group``."""
        replica = self.replicas.get(group)
        if replica is not None and not self._holds_presence(group, channel):
            replica.remove(channel)
            self._seen.get(group, {}).pop(channel, None)
            self._drop_if_unused(group)

    def _queue_state(self, group: str, channel: str, replica: Replica | None, entry: Entry) -> None:
        node = self.node
        serializer = node.registry.serializer
        if replica is not None and type(serializer) is MsgPackSerializer:
            payload = pack_state(group, *replica.packed_members())
        else:
            members = list(replica.entries.values()) if replica is not None else [entry]
            payload = serializer.dumps(
                {"type": "presence.state", "group": group, "members": members}
            )
        node.local_channel(channel).put(payload, time.monotonic() + node.config.expiry)

    # -- the replica -------------------------------------------------------------------------

    def _holds_presence(self, group: str, channel: str) -> bool:
        held = self.node.memberships.held(group, channel)
        return held is not None and held.presence

    def _has_local_presence(self, group: str) -> bool:
        members = self.node.memberships.members(group)
        return members is not None and any(m.presence for m in members.values())

    def _drop_if_unused(self, group: str) -> None:
        if group not in self._fills and not self._has_local_presence(group):
            self.replicas.pop(group, None)
            self._seen.pop(group, None)

    def _begin_fill(self, group: str) -> _Fill:
        fill = _Fill()
        self._fills.setdefault(group, []).append(fill)
        return fill

    def _end_fill(self, group: str, fill: _Fill, state: list[Entry] | None) -> None:
        """A state read came back (None: it failed): the replica is that state plus the diffs
        read since the read was started (diffs are applied in order, so replaying ones the
        state already reflects changes nothing)."""
        fills = self._fills.get(group, [])
        if fill in fills:
            fills.remove(fill)
        if not fills:
            self._fills.pop(group, None)
        if state is not None and group not in self.replicas:
            # (A replica another join filled meanwhile has read every diff since: kept.)
            replica = Replica(state)
            for joins, leaves in fill.diffs:
                self._apply(group, replica, joins, leaves)
            self.replicas[group] = replica
        self._drop_if_unused(group)

    async def _fill_now(self, group: str, *, replace: bool = False) -> None:
        """Read the group's presence table into its replica (``replace``: even when one is
        held, since it may have been filled from a table other nodes had not written again)."""
        node = self.node
        key = node.keys.group_presence(group)
        fill = self._begin_fill(group)
        state: list[Entry] | None = None
        try:
            raw = await node.transport.read(lambda c: c.hgetall(key))
            state = [presence_entry(_text(ch), rec) for ch, rec in raw.items()]
        finally:
            if replace and state is not None:
                self.replicas.pop(group, None)
            self._end_fill(group, fill, state)

    async def resync(self) -> None:
        """Give each local presence member a fresh ``presence.state`` of each of its groups.

        Called by the housekeeper after pruning or data loss, once every live node has had
        a heartbeat to write its memberships again: the members may have missed diffs (an
        append to an inbox Redis had lost goes nowhere), and the entries of a node that
        died during a data loss went with the data, so no pruning will announce their
        leaves. The state read from Redis now holds exactly the live members. A member
        whose join is on its way is skipped: its join hands it a state from this replica.
        A failed read raises (the housekeeper retries the resync at its next pass).
        """
        for group in sorted(self.node.memberships.presence_groups):
            await self._fill_now(group, replace=True)
            replica = self.replicas.get(group)
            members = self.node.memberships.members(group)
            if replica is None or not members:
                continue  # the group's last presence member left during the read
            seen = self._seen.setdefault(group, {})
            for channel, membership in list(members.items()):
                entry = replica.entries.get(channel)
                if membership.presence and entry is not None and seen.get(channel) != JOINING:
                    self._queue_state(group, channel, replica, entry)
                    seen[channel] = replica.version

    def _apply(self, group: str, replica: Replica, joins: list[Entry], leaves: list[Entry]) -> int:
        """Apply one diff; returns the replica version since which all of it was known (a
        member whose state is at least that recent learns nothing from it). For this node's
        own channels its memory is the truth: a diff changes them only where it agrees."""
        node = self.node
        for entry in leaves:
            channel = entry.get("channel") if isinstance(entry, dict) else None
            if isinstance(channel, str) and not (
                node.owns(channel) and self._holds_presence(group, channel)
            ):
                replica.remove(channel)
        # A leave is always delivered: a member may know of a channel this replica never
        # held (its join was still waiting for its window when its node died, or the member's
        # state came from elsewhere). Only a diff of joins every state already listed is held back.
        news = replica.version + 1 if leaves else 0
        for entry in joins:
            channel = entry.get("channel") if isinstance(entry, dict) else None
            if not isinstance(channel, str):
                continue
            if not node.owns(channel) or self._holds_presence(group, channel):
                known = replica.put(channel, entry)
            else:
                known = replica.since.get(channel, 0)
            news = max(news, known)
        return news

    def on_diff(self, group: str, payload: bytes) -> tuple[dict[str, int], int] | None:
        """A presence diff read from the inbox: applied to the group's replica (decoded once
        for the whole node) before the same bytes go to the node's presence members.

        Returns (each local member's state version, the version since which the diff was
        known): members whose state is that recent are skipped. None: deliver to all.
        """
        replica = self.replicas.get(group)
        fills = self._fills.get(group)
        seen = self._seen.get(group)
        if replica is None and not fills:
            return None if seen is None else (seen, 0)
        try:
            diff = self.node.registry.serializer.loads(payload)
        except SerializerError:
            return None  # the layer's own decode logs it when a member receives it
        joins, leaves = diff.get("joins"), diff.get("leaves")
        if not isinstance(joins, list) or not isinstance(leaves, list):
            return None
        for fill in fills or ():
            fill.diffs.append((joins, leaves))
        news = 0 if replica is None else self._apply(group, replica, joins, leaves)
        if replica is not None:
            self._drop_if_unused(group)
        return None if seen is None else (seen, news)

    def reset(self) -> None:
        """The node may have missed diffs (it was pruned, or Redis lost its data): drop every
        replica; the next join of each group fills it again."""
        self.replicas.clear()
        self._fills.clear()
        self._seen.clear()

    def clear(self) -> None:
        """After a flush: no replica and nothing waiting to be announced."""
        self.reset()
        self._windows.clear()

    # -- batching ----------------------------------------------------------------------------

    async def _record(self, group: str, changes: list[Change]) -> None:
        if self.interval <= 0:
            joins, leaves = net_changes(changes)
            if joins or leaves:
                joiners = [c for kind, c, _e, joiner in changes if kind == "j" and joiner]
                await self.node.registry.send_presence(
                    self.node.transport,
                    group,
                    list(joins.values()),
                    list(leaves.values()),
                    exclude=joiners[0] if len(joiners) == 1 else "",
                )
                self.diffs_sent += 1
            return
        window = self._windows.get(group)
        if window is None:
            window = self._windows[group] = _Window(time.monotonic() + self.interval)
            self._wake.set()
        window.changes.extend(changes)

    async def run(self) -> None:
        """Send each window's diff when its time is up; a failed send is kept and retried."""
        node = self.node
        attempt = 0
        while not node.stopped:
            if not self._windows:
                await self._wake.wait()
                self._wake.clear()
                continue
            delay = min(w.deadline for w in self._windows.values()) - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
            try:
                await cancellable(self.flush_due)
                attempt = 0
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                attempt += 1
                logger.warning("Presence diffs of node %s not sent: %s", node.node_id, exc)
                await asyncio.sleep(backoff(attempt, 1.0))

    async def flush_due(self, *, everything: bool = False) -> None:
        """Send the diffs of every window whose time is up (``everything``: all of them)."""
        now = time.monotonic()
        due = {
            group: window
            for group, window in self._windows.items()
            if everything or window.deadline <= now
        }
        for group in due:
            del self._windows[group]
        try:
            await self._send(due)
        except BaseException:
            for group, window in due.items():
                # Put back in front of anything recorded meanwhile, to keep the order.
                later = self._windows.get(group)
                if later is not None:
                    window.changes.extend(later.changes)
                self._windows[group] = window
            raise

    async def _send(self, due: dict[str, _Window]) -> None:
        node = self.node
        registry = node.registry
        serializer = registry.serializer
        sends: list[tuple[str, bytes, str]] = []
        private: list[tuple[str, bytes]] = []
        for group, window in due.items():
            joins, leaves = net_changes(window.changes)
            if not joins and not leaves:
                continue
            diff = {
                "type": "presence.diff",
                "group": group,
                "joins": list(joins.values()),
                "leaves": list(leaves.values()),
            }
            joiners = self._joiners(window.changes)
            sends.append((group, serializer.dumps(diff), " ".join(joiners)))
            for channel, position in joiners.items():
                if not self._holds_presence(group, channel):
                    continue
                later_joins, later_leaves = net_changes(window.changes[position + 1 :])
                if later_joins or later_leaves:
                    mine = {
                        "type": "presence.diff",
                        "group": group,
                        "joins": list(later_joins.values()),
                        "leaves": list(later_leaves.values()),
                    }
                    private.append((channel, serializer.dumps(mine)))
        if sends:
            await registry.send_diff_payloads(node.transport, sends)
            self.diffs_sent += len(sends)
        expires = time.monotonic() + node.config.expiry
        for channel, payload in private:
            local = node.channels.get(channel)
            if local is None or local.full:
                self.dropped += 1
                logger.debug("Presence diff for %s dropped: gone or full", channel)
                continue
            local.put(payload, expires)

    @staticmethod
    def _joiners(changes: list[Change]) -> dict[str, int]:
        """Each joiner given a state in this window, with the position of its last join."""
        return {
            channel: i
            for i, (kind, channel, _e, joiner) in enumerate(changes)
            if kind == "j" and joiner
        }


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


__all__ = ["Presence", "Replica", "net_changes", "pack_state"]
