"""A node's inbox reader: one stream per node, read from the last id seen, fanned out locally.

Direct messages name their channel; group messages name their group and the node delivers
them to its own members of it (read from its memory); control entries tell the node about
memberships of its channels that other processes added or removed.
"""

from __future__ import annotations

import asyncio
import functools
import itertools
import logging
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Collection
from typing import TYPE_CHECKING, Any

import msgpack
from redis.asyncio import Redis

from .doorbell import Doorbell
from .history import payload_with_offset
from .local import Item, LocalChannel, flat
from .tasks import cancellable
from .throttle import Throttle
from .transport import BLOCK_SECONDS, backoff

if TYPE_CHECKING:
    from .node import Node

logger = logging.getLogger(__name__)


def stream_id(entry_id: bytes | str) -> tuple[int, int]:
    """A stream entry id as a comparable (ms, seq) pair."""
    text = entry_id.decode() if isinstance(entry_id, bytes) else entry_id
    ms, _, seq = text.partition("-")
    return int(ms), int(seq or 0)


#: How many messages past its capacity a consumer may have waiting in Redis, as a multiple of
#: its capacity (10,000 with the default capacity of 100); past that its overflow is dropped.
DEFER_FACTOR = 100

#: Most entries one read takes (XREAD COUNT, ARM_INBOX's XRANGE COUNT).
READ_COUNT = 500

#: A read that returned at least this many entries means a backlog: the next read is a
#: plain XREAD rather than ARM_INBOX (see InboxReader._next).
BUSY_READ = 50

#: How long an armed mark lives (s): longer than a wait for the bell (BLOCK_SECONDS), after
#: which the reader reads and, finding nothing, arms again; a dead reader's mark lapses.
ARMED_SECONDS = 5.0

#: Why a deferred message fetched back from the inbox is dropped, by its drop kind.
DROP_REASONS = {"trimmed": "trimmed from the inbox", "corrupt": "corrupt payload"}


class InboxReader:
    """Reads one node's inbox and delivers each entry to the node's local channels."""

    def __init__(self, node: Node) -> None:
        self.node = node
        self.last_id = b"0-0"
        self.dropped = 0
        self.dropped_by: dict[str, int] = {}  # reason (channels_distrib.stats) -> count
        self._drop_log = Throttle()
        self.marked_full: set[str] = set()
        self._to_mark: set[str] = set()
        self._attempt = 0
        self.skipped = 0
        self._skip_log = Throttle()
        self._refill_wanted: set[str] = set()
        self._refill_wake = asyncio.Event()
        self.bell: Doorbell | None = None  # while run() runs
        self.from_bell = 0  # entries taken from a bell, without a read
        self._busy = False  # the last read found a backlog: read next with a plain XREAD

    async def run(self) -> None:
        """Read forever from the last id seen; reconnect on any error.

        The cursor lives here, not in Redis, so a reconnect resumes exactly where reading
        stopped; entries written meanwhile are still in the stream (within its retention).
        The reader has a connection of its own, so a cancelled read that redis-py will not
        let go of can be ended by closing that connection (see :func:`cancellable`); and a
        doorbell subscription of its own (:mod:`channels_distrib.doorbell`).
        """
        node = self.node
        inbox = node.keys.inbox(node.token)
        conn = await node.transport.connection_for(inbox)
        bell = Doorbell(node.transport, inbox, node.keys.bell(node.token))
        self.bell = bell
        try:
            while not node.stopped:
                if not await self._read_once(conn, bell):
                    await conn.aclose()
                    conn = await node.transport.connection_for(inbox)  # see own_connection
        finally:
            try:
                await conn.aclose()
            finally:
                await bell.close()

    async def _read_once(self, conn: Redis, bell: Doorbell) -> bool:
        """One step of reading (:meth:`_next`) and the dispatch of what it returned; False
        when a read failed."""
        node = self.node
        try:
            entries = await self._next(conn, bell)
            self._attempt = 0
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            self._attempt += 1
            if self._attempt == 1:
                node.registry.counters.reconnects += 1  # a streak of failures: one reconnect
            if self._attempt in (1, 10) or self._attempt % 100 == 0:
                logger.warning(
                    "Inbox read for node %s failed (%s); reconnecting", node.node_id, exc
                )
            await asyncio.sleep(backoff(self._attempt))
            return False
        if entries:
            self._dispatch_all(entries)
        if self._to_mark:
            await self._mark_full()
        return True

    async def _next(self, conn: Redis, bell: Doorbell) -> list[tuple[bytes, dict[bytes, bytes]]]:
        """The next entries after the cursor, or, when there are none, arm and wait for the
        bell (or at most BLOCK_SECONDS): then the entry the bell carried (:meth:`_rung`), or
        [] and the caller reads again.

        ARM_INBOX reads and, finding nothing, arms in the same atomic step, so an entry
        appended after it rings the bell. While the reader works through a backlog
        (``_busy``: its last read returned at least BUSY_READ entries) it reads with a plain
        non-blocking XREAD instead: ARM_INBOX copies the entries through Lua tables, which
        cost Redis 5.6x an XREAD's CPU at 100 entries a read and 5.4x at 500
        (benchmarks/bench_inbox_read.py), while the next read after a short one is likely to
        find nothing, where ARM_INBOX saves the round trip of an empty XREAD. An XREAD that
        finds nothing is followed by ARM_INBOX at once (what arrived meanwhile it returns).
        It arms only once its subscription is confirmed, so a bell rung after the arm
        reaches it; a reader without a bell (its subscription down, or refused to the ACL
        user) waits in XREAD BLOCK instead, as it did before the doorbell.
        """
        if not await bell.ready():
            return await self._xread(conn, int(BLOCK_SECONDS * 1000))
        if self._busy:
            entries = await self._xread(conn, None)
            if entries:
                self._busy = len(entries) >= BUSY_READ
                return entries
        entries = await self._arm(conn)
        self._busy = len(entries) >= BUSY_READ
        if entries:
            return entries
        return self._rung(await bell.wait(BLOCK_SECONDS))

    def _rung(self, bell: bytes | None) -> list[tuple[bytes, dict[bytes, bytes]]]:
        """The entry a bell carried, when the entry before it is the reader's cursor: then
        nothing lies between (scripts._BELL), and no read is needed. Otherwise (a late bell,
        one after an entry the reader has not read, no bell) nothing: the caller reads."""
        if not bell:
            return []
        try:
            prev, entry_id, flat = msgpack.unpackb(bell, raw=True)
            if prev != self.last_id:
                return []
            entry = (bytes(entry_id), dict(zip(flat[::2], flat[1::2], strict=True)))
        except Exception:
            return []
        self.from_bell += 1
        return [entry]

    async def _xread(
        self, conn: Redis, block_ms: int | None
    ) -> list[tuple[bytes, dict[bytes, bytes]]]:
        """XREAD from the cursor: BLOCK ``block_ms`` (the reader without a bell), or none."""
        cursor: Any = {self.node.keys.inbox(self.node.token): self.last_id}
        response: Any = await cancellable(
            lambda: conn.xread(cursor, count=READ_COUNT, block=block_ms), on_stuck=self._cut(conn)
        )
        return [entry for _stream, entries in response or [] for entry in entries]

    async def _arm(self, conn: Redis) -> list[tuple[bytes, dict[bytes, bytes]]]:
        """ARM_INBOX: the entries after the cursor, or (none) the armed mark set."""
        node = self.node
        keys = [node.keys.inbox(node.token), node.keys.armed(node.token)]
        args: list[Any] = [self.last_id, READ_COUNT, int(ARMED_SECONDS * 1000)]
        script = node.transport.scripts["arm_inbox"]
        reply: Any = await cancellable(
            lambda: script(keys=keys, args=args, client=conn), on_stuck=self._cut(conn)
        )
        return [
            (entry_id, dict(zip(flat[::2], flat[1::2], strict=True))) for entry_id, flat in reply
        ]

    @staticmethod
    def _cut(conn: Redis) -> Callable[[], Awaitable[None]]:
        """Close the reader's connection under a call stuck in it (see :func:`cancellable`)."""

        async def cut() -> None:
            if conn.connection is not None:
                await conn.connection.disconnect()

        return cut

    def _dispatch_all(self, entries: list[tuple[bytes, dict[bytes, bytes]]]) -> None:
        """Dispatch one read's entries in order; consecutive plain group messages to one
        group (no exclusion, no history offset) go out as one run (:meth:`_fan_out_run`)."""
        run: list[tuple[bytes, bytes]] = []  # (entry id, payload) of the current run
        group = b""
        for entry_id, fields in entries:
            self.last_id = entry_id  # nothing awaits before the run goes out: unobservable
            target = fields.get(b"g")
            if target is not None and len(fields) == 2 and b"m" in fields:
                if run and target != group:
                    self._flush_run(group, run)
                    run = []
                group = target
                run.append((entry_id, fields[b"m"]))
                continue
            if run:
                self._flush_run(group, run)
                run = []
            try:
                self._dispatch(entry_id, fields)
            except Exception:
                self._log_skip(entry_id)
        if run:
            self._flush_run(group, run)

    def _flush_run(self, group: bytes, run: list[tuple[bytes, bytes]]) -> None:
        try:
            self._fan_out_run(group.decode(), run)
        except Exception:
            for entry_id, _payload in run:
                self._log_skip(entry_id)

    def _log_skip(self, entry_id: bytes) -> None:
        """Log a skipped entry, at most once a second (a flood of corrupt entries is one line)."""
        self.skipped += 1
        if self._skip_log.ready():
            logger.error(
                "Skipping inbox entry %r of node %s (%d skipped so far)",
                entry_id,
                self.node.node_id,
                self.skipped,
                exc_info=True,
            )

    def has_read(self, entry_id: bytes | str) -> bool:
        """Whether the reader has passed the entry ``entry_id``."""
        return stream_id(self.last_id) >= stream_id(entry_id)

    def restart_if_ahead(self, newest: bytes | str) -> None:
        """After Redis lost the inbox: if the cursor is ahead of every entry now in it (the
        new server's clock is behind the old one's), read the new stream from its start.
        None of its entries can have been read yet: all lie below the cursor."""
        if stream_id(self.last_id) > stream_id(newest):
            logger.warning("Node %s restarts its inbox cursor", self.node.node_id)
            self.last_id = b"0-0"

    def _dispatch(self, entry_id: bytes, fields: dict[bytes, bytes]) -> None:
        """Deliver one inbox entry to its local channels (or apply a control entry).

        Never waits: a consumer whose queue is full (its budget, ``capacity`` messages) has
        the message dropped and counted, so one slow consumer never holds back the node's
        other channels (no head-of-line blocking).
        """
        node = self.node
        if b"o" in fields:
            self._control(fields)
            return
        payload = fields.get(b"m")
        if payload is None:
            raise ValueError("inbox entry without payload")
        if b"h" in fields:  # a room send with history: its offset joins the message
            payload = payload_with_offset(node.registry.serializer, payload, fields[b"h"])
        expires = self._expires(entry_id)
        if b"c" in fields:
            self._deliver(fields[b"c"].decode(), entry_id, (expires, payload, None))
            return
        group_field = fields.get(b"g") or fields.get(b"p")
        if group_field is None:
            raise ValueError("inbox entry of unknown kind")
        group = group_field.decode()
        presence_only = b"p" in fields
        # The node's presence replica takes the diff first (decoded once here for the node);
        # members whose presence.state already held all of it are skipped.
        known = node.presence.on_diff(group, payload) if presence_only else None
        members = node.memberships.members(group)
        if not members:
            return
        exclude = fields.get(b"x", b"").decode()
        if not exclude and not presence_only:
            self._fan_out(members, entry_id, payload, expires)
            return
        # One item for every local member: decoded here once, when more than one will take it
        # (presence diffs never: their entries are nested, so each receiver decodes its own).
        many = len(members) > 1 and not presence_only
        item: Item = (expires, payload, self._decode_once(payload) if many else None)
        # A batched presence diff names its window's joiners (space-separated): each gets
        # its own diff from its node (presence.py).
        excluded = set(exclude.split(" ")) if " " in exclude else None
        channels = node.channels
        for channel, membership in list(members.items()):
            if (
                channel == exclude
                or (excluded is not None and channel in excluded)
                or (presence_only and not membership.presence)
                or (known is not None and known[0].get(channel, -1) >= known[1])
            ):
                continue
            local = channels.get(channel)
            if local is not None and not local.deferred and len(local.items) < local.capacity:
                local.put_item(item)  # the fast path
            else:
                self._deliver(channel, entry_id, item)

    def _fan_out(
        self, members: Collection[str], entry_id: bytes, payload: bytes, expires: float
    ) -> None:
        """Queue one group message for every local member (no exclusions): the hot loop.

        One item for all of them, decoded once when the first member with room takes it (a
        message every member defers to Redis is not decoded here at all).
        """
        get = self.node.channels.get
        item: Item | None = None
        undecoded: Item | None = None  # for members that defer it: one tuple, not one each
        for channel in list(members):
            local = get(channel)
            if local is not None and not local.deferred and len(local.items) < local.capacity:
                if item is None:
                    shared = self._decode_once(payload) if len(members) > 1 else None
                    item = (expires, payload, shared)
                local.items.append(item)  # LocalChannel.put_item, inlined: the hot loop
                if local.waiters:
                    local.wake_one()
            elif item is not None:
                self._deliver(channel, entry_id, item)
            else:
                if undecoded is None:
                    undecoded = (expires, payload, None)
                self._deliver(channel, entry_id, undecoded)

    def _fan_out_run(self, group: str, run: list[tuple[bytes, bytes]]) -> None:
        """Queue consecutive messages of one group for every local member: batched local
        fan-out. A member with room for the whole run takes it in one extend (and as many
        wake-ups as one put per message would make); any other member takes it message by
        message, as :meth:`_fan_out` does. Each member sees the run in order and nothing
        runs in between, so this delivers exactly what one entry at a time did.

        Every message of the run is decoded once up front (when members are several): a run
        is one read's worth, so what every member defers costs one decode per entry, not
        one check per member and message on the hot path.
        """
        members = self.node.memberships.members(group)
        if not members:
            return
        if len(run) == 1:
            entry_id, payload = run[0]
            self._fan_out(members, entry_id, payload, self._expires(entry_id))
            return
        many = len(members) > 1
        decode = self._decode_once
        items: list[Item] = [
            (self._expires(entry_id), payload, decode(payload) if many else None)
            for entry_id, payload in run
        ]
        get = self.node.channels.get
        size = len(items)
        for channel in list(members):
            local = get(channel)
            if (
                local is not None
                and not local.deferred
                and len(local.items) + size <= local.capacity
            ):
                local.items.extend(items)
                waiters = local.waiters
                for _ in range(size):
                    if not waiters:
                        break
                    local.wake_one()
            else:
                self._fan_out_member(channel, local, run, items)

    def _fan_out_member(
        self,
        channel: str,
        local: LocalChannel | None,
        run: list[tuple[bytes, bytes]],
        items: list[Item],
    ) -> None:
        """One member's share of a run it has no room for at once: message by message, the
        overflow deferred to Redis (FIFO: once one waits there, the rest wait behind it)."""
        j = 0
        if local is not None:
            queue, capacity = local.items, local.capacity
            while j < len(items) and not local.deferred and len(queue) < capacity:
                queue.append(items[j])
                if local.waiters:
                    local.wake_one()
                j += 1
        for k in range(j, len(items)):
            self._deliver(channel, run[k][0], items[k])

    def _decode_once(self, payload: bytes) -> dict[str, Any] | None:
        """The message, decoded for every local member at once, when a shallow copy of it is a
        whole copy (:func:`local.flat`); else None, and each receiver decodes its own. A payload
        that does not decode is left to each receiver too, which counts and logs it as always."""
        try:
            message = self.node.registry.serializer.loads(payload)
        except Exception:
            return None
        return message if type(message) is dict and flat(message) else None

    def _control(self, fields: dict[bytes, bytes]) -> None:
        """Another process added or removed one of this node's channels in a group."""
        op = fields[b"o"]
        if op == b"n":
            return  # the heartbeat's marker that created the inbox
        group = fields[b"g"].decode()
        channel = fields[b"c"].decode()
        memberships = self.node.memberships
        if op == b"a":
            memberships.adopt(group, channel, fields[b"r"], fields.get(b"p") == b"1")
        else:
            memberships.forget_remote(group, channel)

    def _deliver(self, name: str, entry_id: bytes, item: Item) -> None:
        """Queue one message for a local channel; past its capacity the message waits in Redis
        (its inbox entry id is remembered) until the consumer has room, up to its budget."""
        node = self.node
        channel = node.channels.get(name)
        if channel is None:
            # Not a live channel of this node (never issued here, or its consumer is gone).
            self._count_drop(name, "no such channel on this node", "no_channel")
            return
        if not channel.deferred and not channel.full:
            channel.put_item(item)
            return
        if name not in self.marked_full:
            self._to_mark.add(name)  # direct senders get ChannelFull while it is backlogged
        if len(channel.deferred) >= channel.capacity * DEFER_FACTOR:
            self._count_drop(name, "capacity", "capacity")
            return
        channel.deferred.append(entry_id)
        if len(channel.items) <= channel.capacity // 2 and name not in self._refill_wanted:
            self._refill_wanted.add(name)  # on the node's loop here: no hand-over needed
            self._refill_wake.set()

    def want_refill(self, channel: LocalChannel) -> None:
        """A backlogged channel has room: bring its deferred messages back (from any thread)."""
        if channel.name in self._refill_wanted:
            return  # asked already (a receive calls this for every message it takes)
        loop = self.node.loop
        try:
            running = asyncio.get_running_loop()
        except RuntimeError:
            running = None
        if running is loop:
            self._refill_wanted.add(channel.name)
            self._refill_wake.set()
        else:
            loop.call_soon_threadsafe(self.want_refill, channel)

    async def run_refill(self) -> None:
        """Fetch deferred messages from the inbox stream for channels that have room again.

        Every channel waiting at that moment is served by one pipelined round trip, each
        entry fetched once however many of the node's channels wait for it (a group message
        deferred for 100 members is read once). Ids leave a backlog only once their messages
        are queued, so new messages keep waiting behind them (FIFO).
        """
        node = self.node
        attempt = 0
        while not node.stopped:
            await self._refill_wake.wait()
            self._refill_wake.clear()
            while self._refill_wanted and not node.stopped:
                names, self._refill_wanted = self._refill_wanted, set()
                try:
                    await cancellable(functools.partial(self._refill, names))
                    attempt = 0
                except asyncio.CancelledError:
                    raise
                except Exception as exc:
                    attempt += 1
                    logger.warning("Refill on node %s failed: %s", node.node_id, exc)
                    self._refill_wanted |= names
                    await asyncio.sleep(backoff(attempt, 1.0))

    async def _refill(self, names: set[str]) -> None:
        node = self.node
        wanted: dict[str, list[bytes]] = {}
        for name in names:
            channel = node.channels.get(name)
            if channel is not None and channel.deferred and len(channel.items) < channel.capacity:
                room = channel.capacity - len(channel.items)
                wanted[name] = list(itertools.islice(channel.deferred, room))
        readers: Counter[bytes] = Counter()  # entry id -> channels waiting for it
        for batch in wanted.values():
            readers.update(batch)  # counted in C: a backlog is ids x channels
        ids = sorted(readers, key=stream_id)
        if not ids:
            return
        inbox = node.keys.inbox(node.token)
        fetched = await node.transport.read(lambda client: self._fetch(client, inbox, ids))
        found = self._items(ids, fetched, readers)
        for name, batch in wanted.items():
            self._refill_one(name, batch, found)

    @staticmethod
    async def _fetch(client: Any, inbox: str, ids: list[bytes]) -> dict[bytes, Any]:
        """The inbox entries ``ids`` (sorted) that are still there, by id.

        One XRANGE over their span first: a backlog is mostly consecutive entries (one
        group's messages), so it usually comes back in one reply. The reply is capped, so
        a span full of other traffic costs no more than twice the entries wanted; ids past
        the cap are then fetched one by one in one pipeline (ids inside the span that the
        reply lacks were trimmed).
        """
        reply = await client.xrange(inbox, ids[0], ids[-1], count=2 * len(ids) + 16)
        found: dict[bytes, Any] = dict(reply)
        if len(reply) < 2 * len(ids) + 16:
            return found
        last = stream_id(reply[-1][0])
        rest = [i for i in ids if stream_id(i) > last]
        if rest:
            async with client.pipeline(transaction=False) as pipe:
                for entry_id in rest:
                    pipe.xrange(inbox, entry_id, entry_id)
                for entries in await pipe.execute():
                    found.update(entries)
        return found

    def _items(
        self, ids: list[bytes], fetched: dict[bytes, Any], readers: Counter[bytes]
    ) -> dict[bytes, Item | str]:
        """One queue item per fetched entry, shared by every channel it was deferred for
        (decoded once when several are); for an entry that cannot be delivered, the kind
        of drop it counts as (a key of :data:`DROP_REASONS`)."""
        serializer = self.node.registry.serializer
        items: dict[bytes, Item | str] = {}
        for entry_id in ids:
            fields = fetched.get(entry_id) or {}
            payload = fields.get(b"m")
            if payload is None:
                items[entry_id] = "trimmed"
                continue
            if b"h" in fields:
                try:
                    payload = payload_with_offset(serializer, payload, fields[b"h"])
                except ValueError:
                    items[entry_id] = "corrupt"
                    continue
            shared = self._decode_once(payload) if readers[entry_id] > 1 else None
            items[entry_id] = (self._expires(entry_id), payload, shared)
        return items

    def _expires(self, entry_id: bytes) -> float:
        """When a message expires (monotonic), from the Redis time its entry id was made."""
        node = self.node
        sent_ms = int(entry_id.split(b"-", 1)[0])
        return time.monotonic() + node.config.expiry - max(0.0, node.redis_now() - sent_ms / 1000.0)

    def _refill_one(self, name: str, batch: list[bytes], found: dict[bytes, Item | str]) -> None:
        channel = self.node.channels.get(name)
        if channel is None:
            return
        now = time.monotonic()
        deferred = channel.deferred
        for entry_id in batch:
            if not deferred or deferred[0] != entry_id:
                return  # cleared meanwhile (a flush)
            deferred.popleft()
            item = found[entry_id]  # every id of every batch was fetched
            if isinstance(item, str):  # trimmed from the inbox meanwhile, or corrupt
                self._count_drop(name, DROP_REASONS[item], item)
                continue
            if item[0] <= now:
                channel.expired += 1
                continue
            channel.put_item(item)
        if channel.deferred and len(channel.items) <= channel.capacity // 2:
            self._refill_wanted.add(name)
            self._refill_wake.set()

    def _count_drop(self, channel: str, reason: str, kind: str) -> None:
        self.dropped += 1
        self.dropped_by[kind] = self.dropped_by.get(kind, 0) + 1
        if self._drop_log.ready():
            logger.warning(
                "Node %s dropped a message for %s (%s); %d dropped so far",
                self.node.node_id,
                channel,
                reason,
                self.dropped,
            )

    async def _mark_full(self) -> None:
        """Tell senders (through Redis) which channels are dropping, so send() raises ChannelFull."""
        node = self.node
        names, self._to_mark = list(self._to_mark), set()
        key = node.keys.full(node.token)
        try:
            await node.transport.run(lambda c: c.sadd(key, *names))
            await node.transport.run(lambda c: c.pexpire(key, int(node.config.expiry * 1000)))
            self.marked_full.update(names)
        except asyncio.CancelledError:
            raise
        except Exception:
            logger.warning("Could not mark full channels of node %s", node.node_id, exc_info=True)

    async def refresh_marks(self) -> None:
        """Withdraw the full marks of channels that have room again (or are gone), and renew
        those still full, so a mark never lapses while its channel is still dropping."""
        node = self.node
        drained = [
            name
            for name in self.marked_full
            if name not in node.channels
            or not (node.channels[name].full or node.channels[name].deferred)
        ]
        self.marked_full.difference_update(drained)
        still = list(self.marked_full)
        if not drained and not still:
            return
        key = node.keys.full(node.token)
        ttl = int(node.config.expiry * 1000)

        async def write(client: Any) -> None:
            async with client.pipeline(transaction=False) as pipe:
                if drained:
                    pipe.srem(key, *drained)
                if still:
                    pipe.sadd(key, *still)
                    pipe.pexpire(key, ttl)
                await pipe.execute()

        await node.transport.run(write)
