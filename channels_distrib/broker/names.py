"""Names of this prefix's RabbitMQ objects, written down once (AMQP names: up to 255 bytes)."""

from __future__ import annotations


def exchange(prefix: str) -> str:
    """The direct exchange group messages are published to (routing key: the group)."""
    return f"{prefix}.groups"


def node_queue(prefix: str, token: str) -> str:
    """A node's queue: direct messages to its channels and group messages for its groups."""
    return f"{prefix}.node.{token}"


def named_queue(prefix: str, channel: str) -> str:
    """A normal channel's shared queue."""
    return f"{prefix}.chan.{channel}"


__all__ = ["exchange", "named_queue", "node_queue"]
