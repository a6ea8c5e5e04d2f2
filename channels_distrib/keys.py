"""Redis key names, one function per kind of key, so the layout is written down once.

Layout under ``<prefix>`` (P)::

    P:q:<channel>        list     normal channel queue; items are b"<expire ms>:<payload>"
    P:in:<token>         stream   a node's inbox: direct, group and control entries
    P:full:<token>       set      that node's local channels currently dropping (senders get ChannelFull)
    P:g:<group>          hash     channel -> member record (msgpack [node_id, meta, joined_at])
    P:gn:<group>         hash     node token -> number of that node's members in the group
    P:gp:<group>         hash     node token -> number of that node's presence members
    P:gpm:<group>        hash     channel -> member record, presence members only
    P:gq:<group>         zset     normal channel members -> joined ms (for group_expiry)
    P:qc                 hash     normal channel -> its capacity (read by GROUP_SEND)
    P:cg:<channel>       set      groups the channel is in
    P:nc:<token>         set      a node's channels that are in any group
    P:nodes              zset     node token -> deadline ms (last heartbeat + its node_timeout; Redis time)
    P:ni                 hash     node token -> msgpack node info
    P:nid                hash     node id -> token (refuses a second live process with the same id)
    P:tid                hash     token -> node id
    P:rl:<key>           hash     a shared token bucket (take_tokens)
    P:pruned:<token>     string   tombstone: this node was pruned (it re-announces joins on return)
    P:flush              string   flush epoch: nodes that see it change drop their local state

The Lua scripts in :mod:`channels_distrib.scripts` build the per-group and per-node names from
the prefix the same way; keep the two in step.
"""

from __future__ import annotations

import re

# What follows "<prefix>:" in a key of ours. Channel and group names hold no ':', so a key of
# a longer prefix ("p:q:..." for prefix "p:q") never matches for prefix "p".
_OWN_KEY = re.compile(
    rb"(?:(?:q|in|full|g|gn|gp|gpm|gq|cg|nc|pruned|rl):[^:]+"
    rb"|q:[^:]+:inflight:[0-9a-f]+|nodes|ni|nid|tid|qc|flush)"
)


class Keys:
    """Key names for one prefix."""

    __slots__ = ("prefix",)

    def __init__(self, prefix: str) -> None:
        self.prefix = prefix

    def queue(self, channel: str) -> str:
        return f"{self.prefix}:q:{channel}"

    def inbox(self, token: str) -> str:
        return f"{self.prefix}:in:{token}"

    def full(self, token: str) -> str:
        return f"{self.prefix}:full:{token}"

    def group(self, group: str) -> str:
        return f"{self.prefix}:g:{group}"

    def group_nodes(self, group: str) -> str:
        return f"{self.prefix}:gn:{group}"

    def group_presence_nodes(self, group: str) -> str:
        return f"{self.prefix}:gp:{group}"

    def group_presence(self, group: str) -> str:
        return f"{self.prefix}:gpm:{group}"

    def group_queues(self, group: str) -> str:
        return f"{self.prefix}:gq:{group}"

    def channel_groups(self, channel: str) -> str:
        return f"{self.prefix}:cg:{channel}"

    def node_channels(self, token: str) -> str:
        return f"{self.prefix}:nc:{token}"

    @property
    def nodes(self) -> str:
        return f"{self.prefix}:nodes"

    @property
    def node_info(self) -> str:
        return f"{self.prefix}:ni"

    @property
    def node_ids(self) -> str:
        return f"{self.prefix}:nid"

    @property
    def token_ids(self) -> str:
        return f"{self.prefix}:tid"

    def bucket(self, key: str) -> str:
        return f"{self.prefix}:rl:{key}"

    def tombstone(self, token: str) -> str:
        return f"{self.prefix}:pruned:{token}"

    @property
    def flush(self) -> str:
        return f"{self.prefix}:flush"

    def membership_keys(self, group: str, channel: str, token: str) -> list[str]:
        """KEYS[1..7] of GROUP_ADD / GROUP_DISCARD for one (group, channel), in their documented order.

        ``token`` is the owning node's token, or "" for a normal channel (KEYS[7] is then unused).
        """
        return [
            self.group(group),
            self.group_nodes(group),
            self.group_presence_nodes(group),
            self.group_presence(group),
            self.group_queues(group),
            self.channel_groups(channel),
            self.node_channels(token) if token else self.channel_groups(channel),
        ]

    def owns(self, key: bytes) -> bool:
        """Whether a key SCAN found under :meth:`scan_pattern` is this prefix's (not a longer one's)."""
        head = self.prefix.encode() + b":"
        return key.startswith(head) and _OWN_KEY.fullmatch(key[len(head) :]) is not None

    def scan_pattern(self) -> str:
        """SCAN MATCH pattern for every key of this prefix (glob characters escaped)."""
        escaped = "".join("\\" + c if c in "*?[]\\" else c for c in self.prefix)
        return f"{escaped}:*"
