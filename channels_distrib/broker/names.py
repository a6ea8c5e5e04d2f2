"""Names of this prefix's RabbitMQ objects, written down once (AMQP names: up to 255 bytes)."""

from __future__ import annotations


def exchange(prefix: str) -> str:
    """The direct exchange group messages are published to (routing key: the group)."""
    return f"{prefix}.groups"


def presence_key(group: str) -> str:
    """The routing key of a group's presence diffs on the exchange: a node's queue is bound
    with it while the node has presence members in the group. ``:`` is never part of a group
    name, so it cannot meet a group's own routing key."""
    return f"p:{group}"


def node_queue(prefix: str, token: str) -> str:
    """A node's queue: direct messages to its channels and group messages for its groups."""
    return f"{prefix}.node.{token}"


def named_queue(prefix: str, channel: str) -> str:
    """A normal channel's shared queue."""
    return f"{prefix}.chan.{channel}"


__all__ = ["exchange", "named_queue", "node_queue", "presence_key"]
