"""Redis key names, one method per kind of key, so the layout is written down once.

Layout 2. Every key is ``<prefix>:{<tag>}<suffix>``. The prefix may contain ':' but never
'{' or '}', and neither do the tag (a kind letter, '.', a group, channel, token or bucket
name) or the suffix; so the first '{' of a key marks where its prefix ends, and two prefixes,
or two kinds under one prefix, can never name the same key. The braces are also a Redis
Cluster hash tag: the keys of one group, one channel or one node share a slot, while
different groups, channels and nodes spread over the slots.

Under prefix ``P``::

    P:{g.<group>}:m       hash    channel -> member record (every member)
    P:{g.<group>}:n       hash    node token -> number of that node's members
    P:{g.<group>}:p       hash    node token -> number of that node's presence members
    P:{g.<group>}:pm      hash    channel -> member record, presence members only
    P:{g.<group>}:q       zset    normal-channel members -> joined ms (for group_expiry)
    P:{g.<group>}:qc      hash    normal-channel member -> its capacity (read by GROUP_SEND)
    P:{g.<group>}:bb      zset    with ``broker``: normal channels bound -> last add ms
    P:{g.<group>}:h       stream  room history: the room's last messages (history.py)
    P:{g.<group>}:hc      hash    room history settings, epoch and bookkeeping
    P:{c.<channel>}:q     list    a normal channel's queue; items b"<expire ms>:<payload>"
    P:{c.<channel>}:i.<run>  list a receiver's in-flight items of that queue (has a TTL)
    P:{c.<channel>}:g     set     groups a normal channel is in
    P:{n.<token>}:in      stream  a node's inbox: direct, group and control entries
    P:{n.<token>}:armed   string  the inbox reader found its inbox empty and waits for the
                                  bell (has a TTL; a writer that deletes it rings the bell)
    P:{n.<token>}:bell    channel not a key: the pub/sub channel (sharded on a cluster) of
                                  that doorbell; its message is empty
    P:{n.<token>}:full    set     that node's channels currently dropping (senders: ChannelFull)
    P:{n.<token>}:c       hash    that node's channel -> its groups, space separated
    P:{n.<token>}:pruned  string  this node was pruned (it re-announces joins on return)
    P:{n.<token>}:live    string  Redis Cluster only: the node's deadline ms (its liveness,
                                  in its own slot)
    P:{n.<token>}:cp      hash    Redis Cluster only: the index a pruner is removing
    P:{m.<i>}:seen        hash    Redis Cluster only: node token -> 1, one per master (tag
                                  m.<i> chosen to land there): a node finding its field gone
                                  knows that master lost its data
    P:{m.<i>}:g.<token>   set     Redis Cluster only: the groups on master i (the one tag m.<i>
                                  lands on) that node token has members in: how a pruner finds
                                  them when the node's own index (on another master) is lost
    P:{x}:nodes           zset    node token -> deadline ms (last beat + its node_timeout)
    P:{x}:ni              hash    node token -> msgpack node info
    P:{x}:nid             hash    node id -> token (refuses a second live process with one id)
    P:{x}:tid             hash    token -> node id
    P:{x}:flush           string  flush epoch: nodes that see it change drop their local state
    P:{x}:broker          set     RabbitMQ queues/exchanges this prefix declared (``broker``)
    P:{r.<key>}:b         hash    a shared token bucket (take_tokens)

Every key has a TTL: the node keys and the ``{x}`` keys are refreshed by the live nodes'
heartbeats, so a prefix whose nodes all died empties itself. The Lua scripts that must reach
keys named by data (a group's nodes' inboxes, a dead node's groups) build those names with
the same functions, written once in :data:`channels_distrib.scripts.LUA_KEYS`.
"""

from __future__ import annotations

#: The version of this layout; nodes of another layout on one prefix refuse to start.
LAYOUT = 2

#: Node zsets of other layouts this code knows; a live entry there means an incompatible node.
#: Layout 1 (channels_distrib 0.1) kept its node deadlines in ``<prefix>:nodes``.
FOREIGN_NODE_KEYS = ("{prefix}:nodes",)


class Keys:
    """Key names for one prefix."""

    __slots__ = ("prefix",)

    def __init__(self, prefix: str) -> None:
        if "{" in prefix or "}" in prefix:
            raise ValueError("a prefix must not contain '{' or '}'")
        self.prefix = prefix

    # -- one group ------------------------------------------------------------------------

    def _group(self, group: str, suffix: str) -> str:
        return f"{self.prefix}:{{g.{group}}}:{suffix}"

    def group(self, group: str) -> str:
        return self._group(group, "m")

    def group_nodes(self, group: str) -> str:
        return self._group(group, "n")

    def group_presence_nodes(self, group: str) -> str:
        return self._group(group, "p")

    def group_presence(self, group: str) -> str:
        return self._group(group, "pm")

    def group_queues(self, group: str) -> str:
        return self._group(group, "q")

    def group_queue_capacity(self, group: str) -> str:
        return self._group(group, "qc")

    def history(self, group: str) -> str:
        """A room's history stream (same hash tag as the group: ROOM_SEND touches both)."""
        return self._group(group, "h")

    def history_config(self, group: str) -> str:
        """A room's history settings, epoch and bookkeeping."""
        return self._group(group, "hc")

    def broker_bindings(self, group: str) -> str:
        """With ``broker``: normal channels bound to the group -> last group_add ms (so a
        binding past group_expiry is removed even after the group's own keys expired)."""
        return self._group(group, "bb")

    def group_keys(self, group: str) -> list[str]:
        """The six keys of one group, in the order the membership scripts take them."""
        return [
            self.group(group),
            self.group_nodes(group),
            self.group_presence_nodes(group),
            self.group_presence(group),
            self.group_queues(group),
            self.group_queue_capacity(group),
        ]

    # -- one normal channel ---------------------------------------------------------------

    def queue(self, channel: str) -> str:
        return f"{self.prefix}:{{c.{channel}}}:q"

    def inflight(self, channel: str, run: str) -> str:
        return f"{self.prefix}:{{c.{channel}}}:i.{run}"

    def channel_groups(self, channel: str) -> str:
        """The groups of a normal channel (a node's channels are in :meth:`node_channels`)."""
        return f"{self.prefix}:{{c.{channel}}}:g"

    # -- one node -------------------------------------------------------------------------

    def inbox(self, token: str) -> str:
        return f"{self.prefix}:{{n.{token}}}:in"

    def armed(self, token: str) -> str:
        """The node's inbox reader waits for its bell (set by ARM_INBOX, deleted by writers)."""
        return f"{self.prefix}:{{n.{token}}}:armed"

    def bell(self, token: str) -> str:
        """The pub/sub channel (not a key) that wakes the node's armed inbox reader; same hash
        tag as the inbox, so on a cluster it is a shard channel of the inbox's slot."""
        return f"{self.prefix}:{{n.{token}}}:bell"

    def full(self, token: str) -> str:
        return f"{self.prefix}:{{n.{token}}}:full"

    def node_channels(self, token: str) -> str:
        return f"{self.prefix}:{{n.{token}}}:c"

    def tombstone(self, token: str) -> str:
        return f"{self.prefix}:{{n.{token}}}:pruned"

    def live(self, token: str) -> str:
        return f"{self.prefix}:{{n.{token}}}:live"

    def pruning(self, token: str) -> str:
        return f"{self.prefix}:{{n.{token}}}:cp"

    def master_mark(self, index: int) -> str:
        return f"{self.prefix}:{{m.{index}}}:seen"

    def noted_groups(self, index: int, token: str) -> str:
        """A node's groups on master ``index`` (cluster only; same tag as that master's mark)."""
        return f"{self.prefix}:{{m.{index}}}:g.{token}"

    # -- the node table -------------------------------------------------------------------

    @property
    def nodes(self) -> str:
        return f"{self.prefix}:{{x}}:nodes"

    @property
    def node_info(self) -> str:
        return f"{self.prefix}:{{x}}:ni"

    @property
    def node_ids(self) -> str:
        return f"{self.prefix}:{{x}}:nid"

    @property
    def token_ids(self) -> str:
        return f"{self.prefix}:{{x}}:tid"

    @property
    def flush(self) -> str:
        return f"{self.prefix}:{{x}}:flush"

    @property
    def broker_names(self) -> str:
        """With ``broker``: ``q:<queue>`` / ``x:<exchange>`` names declared, for flush()."""
        return f"{self.prefix}:{{x}}:broker"

    def table_keys(self) -> list[str]:
        """P:{x}:nodes, ni, nid, tid: the keys every node-table script takes first."""
        return [self.nodes, self.node_info, self.node_ids, self.token_ids]

    def foreign_node_keys(self) -> list[str]:
        """Node zsets of other layouts on this prefix (see :data:`FOREIGN_NODE_KEYS`)."""
        return [template.format(prefix=self.prefix) for template in FOREIGN_NODE_KEYS]

    # -- other ----------------------------------------------------------------------------

    def bucket(self, key: str) -> str:
        return f"{self.prefix}:{{r.{key}}}:b"

    def owns(self, key: bytes) -> bool:
        """Whether a key SCAN found under :meth:`scan_pattern` is this prefix's (not a longer one's).

        The first '{' ends the prefix (see the module docstring), so a key of prefix "p:q"
        ("p:q:{...}") never passes for prefix "p".
        """
        head = self.prefix.encode() + b":{"
        return key.startswith(head) and b"{" not in key[len(head) :]

    def scan_pattern(self) -> str:
        """SCAN MATCH pattern for every key of this prefix (glob characters escaped)."""
        escaped = "".join("\\" + c if c in "*?[]\\" else c for c in self.prefix)
        return escaped + ":{*"
