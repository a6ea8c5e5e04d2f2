"""The sole owner of one node's memberships: what the node holds, and Redis kept in step.

Every change to a node's memberships goes through :class:`Memberships`, whoever asks (the
layer's ``group_add``/``group_discard``, the inbox reader applying another process's add,
housekeeping expiring or burying channels, a flush). Memory changes first and at once; the
Redis write follows. Each (group, channel) carries a generation, bumped by every change, and
a key is *dirty* until a write of its current generation is confirmed with no older write
still in flight. Dirty keys are written again, in batches (one SYNC script per batch), by
:meth:`Memberships.sync`, which housekeeping runs every heartbeat. So:

- a removal whose write failed, timed out or was cancelled is a tombstone, retried until
  Redis confirms it: it is never lost;
- a late write (a re-registration batch, a write overtaken by a newer one on another
  connection) can never resurrect a newer discard: its generation is stale, so the key
  stays dirty and the newer state is written again;
- re-registration after pruning or data loss is "mark everything dirty, then sync";
- :meth:`Memberships.reconcile` compares Redis with memory now and then and marks what
  differs dirty: the safety net for anything the rules above did not foresee.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from .registry import AddResult, encode_record, presence_entry
from .types import Meta

if TYPE_CHECKING:
    from .node import Node

logger = logging.getLogger(__name__)

#: Memberships written per SYNC script call.
SYNC_BATCH = 200
#: Passes of one sync() at most (a pass repeats what changed while the previous one ran).
SYNC_PASSES = 3

Key = tuple[str, str]  # (group, channel)


@dataclass
class Membership:
    """One of this node's channels in one group, as the node holds it."""

    record: bytes  # b"<joined ms>:<msgpack [node_id, meta]>"; b":..." until Redis stamps it
    presence: bool
    joined: float  # time.monotonic() at join, for group_expiry


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


class Memberships:
    """A node's memberships in memory, and every Redis write that changes them."""

    def __init__(self, node: Node) -> None:
        self.node = node
        self.groups: dict[str, dict[str, Membership]] = {}
        self.by_channel: dict[str, set[str]] = {}
        self._next_gen = 0
        self._gens: dict[Key, int] = {}  # held keys, and removals not yet confirmed
        # Insertion-ordered (a dict as an ordered set): syncs write in the order changes were made.
        self._dirty: dict[Key, None] = {}
        self._writing: Counter[Key] = Counter()
        self._sync_lock = asyncio.Lock()
        # Keys changed or written since a reconciliation snapshot was started (None: none is).
        self._touched: set[Key] | None = None
        # Told (no arguments, no await) whenever a group gains its first member here or loses
        # its last, and likewise for its presence members: the broker's bindings follow the
        # groups this owner holds (broker/).
        self.listener: Callable[[], None] | None = None
        # Groups with presence members here -> how many (the broker binds their diffs' key).
        self.presence_groups: dict[str, int] = {}

    # -- reading --------------------------------------------------------------------------

    def members(self, group: str) -> dict[str, Membership] | None:
        """The node's members of ``group`` (do not modify)."""
        return self.groups.get(group)

    def groups_of(self, channel: str) -> set[str]:
        return set(self.by_channel.get(channel, ()))

    def held(self, group: str, channel: str) -> Membership | None:
        members = self.groups.get(group)
        return members.get(channel) if members is not None else None

    @property
    def dirty(self) -> int:
        """How many memberships Redis may not have as the node holds them (pending writes)."""
        return len(self._dirty)

    def __len__(self) -> int:
        return sum(len(members) for members in self.groups.values())

    # -- memory (no await: each change is whole when the next one starts) -------------------

    def _bump(self, key: Key) -> int:
        if self._touched is not None:
            self._touched.add(key)
        self._next_gen += 1
        self._gens[key] = self._next_gen
        return self._next_gen

    def _hold(self, key: Key, membership: Membership | None) -> int:
        """Set what the node holds for ``key`` (None: not a member); returns the new generation."""
        group, channel = key
        if membership is None:
            members = self.groups.get(group)
            old = members.pop(channel, None) if members is not None else None
            if members is not None and old is not None:
                self._count_presence(group, old.presence, False)
                if not members:
                    del self.groups[group]
                    if self.listener is not None:
                        self.listener()
                groups = self.by_channel[channel]
                groups.discard(group)
                if not groups:
                    del self.by_channel[channel]
        else:
            members = self.groups.get(group)
            if members is None:
                members = self.groups[group] = {}
                if self.listener is not None:
                    self.listener()
            old = members.get(channel)
            self._count_presence(group, old is not None and old.presence, membership.presence)
            members[channel] = membership
            self.by_channel.setdefault(channel, set()).add(group)
        return self._bump(key)

    def _count_presence(self, group: str, was: bool, now: bool) -> None:
        """Keep :attr:`presence_groups` in step; tell the listener when a group gains its
        first presence member here or loses its last (the broker binds its presence key)."""
        if was == now:
            return
        count = self.presence_groups.get(group, 0) + (1 if now else -1)
        if count > 0:
            self.presence_groups[group] = count
        else:
            self.presence_groups.pop(group, None)
        if ((count == 1 and now) or count <= 0) and self.listener is not None:
            self.listener()

    def _settle(self, key: Key, gen: int, confirmed: bool) -> None:
        """A write of generation ``gen`` ended: clean only if it is the latest and the last."""
        if confirmed and self._gens.get(key) == gen and not self._writing[key]:
            self._dirty.pop(key, None)
            if self.held(*key) is None:
                del self._gens[key]  # a confirmed removal: nothing left to remember
        else:
            self._dirty[key] = None
            if key not in self._gens:
                self._bump(key)  # forgotten meanwhile (a flush): its removal is now due

    def _begin(self, key: Key) -> int:
        self._writing[key] += 1
        return self._gens[key]

    def _end(self, key: Key, gen: int, confirmed: bool) -> None:
        if self._touched is not None:
            self._touched.add(key)  # written while a reconciliation snapshot was taken
        self._writing[key] -= 1
        if not self._writing[key]:
            del self._writing[key]
        self._settle(key, gen, confirmed)

    def adopt(self, group: str, channel: str, record: bytes, presence: bool) -> None:
        """Another process added one of this node's channels (already written to Redis)."""
        key = (group, channel)
        if channel not in self.node.channels:
            # Not a channel this node issued (a stale or made-up name): remove it again.
            self.release(key)
            return
        self._hold(key, Membership(record, presence, time.monotonic()))

    def forget_remote(self, group: str, channel: str) -> None:
        """Another process removed one of this node's channels from a group (already in Redis)."""
        self._hold((group, channel), None)

    def release(self, key: Key) -> None:
        """No longer a member: removed from memory now, from Redis by the next sync."""
        self._hold(key, None)
        self._dirty[key] = None

    def bury(self, channel: str) -> None:
        """A dead channel leaves all its groups (leaves are announced by the sync)."""
        for group in self.groups_of(channel):
            self.release((group, channel))

    def expire(self, now: float, group_expiry: float) -> None:
        """Release every membership older than ``group_expiry`` (monotonic seconds)."""
        for group, members in list(self.groups.items()):
            for channel, membership in list(members.items()):
                if now - membership.joined > group_expiry:
                    self.release((group, channel))

    def mark_all_dirty(self) -> None:
        """Redis lost some or all of it (pruned while alive, data loss): write everything again."""
        for group, members in self.groups.items():
            self._dirty.update(dict.fromkeys((group, channel) for channel in members))

    def clear(self) -> None:
        """After a flush: hold nothing. Writes still in flight settle as dirty removals."""
        self.groups.clear()
        self.by_channel.clear()
        self.presence_groups.clear()
        self._gens.clear()
        self._dirty.clear()
        if self.listener is not None:
            self.listener()

    # -- direct writes (one membership, one round trip) ------------------------------------

    async def join(
        self, group: str, channel: str, meta: Meta | None, presence: bool, read_state: bool = True
    ) -> AddResult | None:
        """Add (or update) one of this node's channels; None when Redis refused it.

        Memory first, so a group message racing the write still arrives. If the write fails
        or is cancelled, the caller is told so and the node goes back to what it held before;
        the write may have run, so the key stays dirty and the next sync puts Redis in step.
        ``read_state`` False skips reading the group's presence state (the node has a replica).
        """
        node = self.node
        key = (group, channel)
        previous = self.held(group, channel)
        record = encode_record(node.node_id, meta)
        self._hold(key, Membership(record, presence, time.monotonic()))
        gen = self._begin(key)
        result: AddResult | None = None
        try:
            result = await node.registry.add(
                node.transport,
                group,
                channel,
                node.node_id,
                meta,
                presence,
                notify=False,
                read_state=read_state,
            )
        except BaseException:
            if self._gens.get(key) == gen:
                gen = self._hold(key, previous)
            raise
        finally:
            # Refused (None): this node is not live in Redis; its heartbeat re-registers it.
            self._end(key, gen, result is not None)
        held = self.held(group, channel)
        if held is not None and self._gens.get(key) == gen:
            held.record = result.record if result is not None else record
        return result

    async def leave(self, group: str, channel: str) -> bytes | None:
        """Remove one of this node's channels from a group; returns its presence record if
        the write removed a presence membership. A failed write raises, and is retried."""
        node = self.node
        key = (group, channel)
        self._hold(key, None)
        gen = self._begin(key)
        confirmed = False
        try:
            record = await node.registry.discard(node.transport, group, channel, notify=False)
            confirmed = True
        finally:
            self._end(key, gen, confirmed)
        return record

    # -- batched writes ---------------------------------------------------------------------

    async def sync(self, *, announce: bool = False) -> int:
        """Write every dirty membership as the node holds it; returns how many remain dirty.

        Removals announce their presence leaves; with ``announce`` (the node had been pruned,
        so its members' leaves were announced), re-added presence members announce joins.
        """
        async with self._sync_lock:
            for _ in range(SYNC_PASSES):
                keys = [key for key in self._dirty if key not in self._writing]
                if not keys:
                    break
                for start in range(0, len(keys), SYNC_BATCH):
                    await self._sync_batch(keys[start : start + SYNC_BATCH], announce)
        return len(self._dirty)

    async def _sync_batch(self, keys: list[Key], announce: bool) -> None:
        node = self.node
        items: list[Any] = []
        started: list[tuple[Key, int]] = []
        for key in keys:
            if key not in self._gens:
                self._bump(key)
            membership = self.held(*key)
            if membership is None:
                items.extend(["r", key[0], key[1], b"", "0"])
            else:
                items.extend(["a", key[0], key[1], membership.record, "1" if membership.presence else "0"])
            started.append((key, self._begin(key)))
        changes: list[Any] | None = None
        try:
            changes = await node.registry.sync(node.transport, node.token, items)
        finally:
            for key, gen in started:
                self._end(key, gen, changes is not None)
        if changes:
            await self._apply_changes(changes, announce)

    async def _apply_changes(self, flat: list[Any], announce: bool) -> None:
        """Store Redis's join stamps and announce the presence changes SYNC reported."""
        joins: dict[str, list[dict[str, Any]]] = {}
        leaves: dict[str, list[dict[str, Any]]] = {}
        for i in range(0, len(flat), 4):
            kind, group, channel, record = (_text(flat[i]), _text(flat[i + 1]), _text(flat[i + 2]), flat[i + 3])
            if kind == "s" or kind == "j":
                held = self.held(group, channel)
                if held is not None and held.record[:1] == b":":
                    held.record = record
            if kind == "j" and announce:
                joins.setdefault(group, []).append(presence_entry(channel, record))
            elif kind == "l":
                leaves.setdefault(group, []).append(presence_entry(channel, record))
        if joins or leaves:
            await self.node.presence.announce(joins, leaves)

    # -- reconciliation ---------------------------------------------------------------------

    def start_reconcile(self) -> None:
        """A snapshot of Redis's index is about to be read: note what changes meanwhile."""
        self._touched = set()

    def reconcile_abandoned(self) -> None:
        self._touched = None

    def reconcile(self, stored: dict[str, set[str]]) -> int:
        """Compare Redis's index of this node's channels (channel -> groups) with memory and
        mark what differs dirty; returns how many differed. Keys being written are skipped."""
        touched, self._touched = self._touched or set(), None
        differ = 0
        for channel, groups in stored.items():
            for group in groups:
                key = (group, channel)
                if key in self._writing or key in self._dirty or key in touched:
                    continue
                if self.held(group, channel) is None:
                    self.release(key)
                    differ += 1
        for group, members in self.groups.items():
            for channel in members:
                key = (group, channel)
                if key in self._writing or key in self._dirty or key in touched:
                    continue
                if group not in stored.get(channel, ()):
                    self._dirty[key] = None
                    differ += 1
        return differ


__all__ = ["Membership", "Memberships"]
