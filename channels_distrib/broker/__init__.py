"""RabbitMQ as the message broker (``CONFIG["broker"] = "amqp://..."``, the ``rabbitmq`` extra).

Imported only when ``broker`` is configured. Every user message travels through RabbitMQ:

- direct sends to a process-local channel go to its node's queue (``<prefix>.node.<token>``);
- group sends go to one direct exchange (``<prefix>.groups``) with the group as routing key;
  a node's queue is bound with exactly the groups it has members in, so it gets a group
  message once and nodes without members never see it;
- named (normal) channels are queues of their own (``<prefix>.chan.<channel>``) with a
  length limit, ``x-overflow: reject-publish`` and a per-message TTL;
- presence diffs go to the same exchange with the routing key ``p:<group>``, bound while a
  node has presence members in the group; notes of memberships another process changed go
  into the node's queue. Nothing travels through the nodes' Redis inboxes.

Redis keeps the registry, presence state, room history and the names of the queues and
exchanges this prefix declared, for ``flush()``.

Modules: :mod:`.connection` (one AMQP connection per event loop, reconnecting),
:mod:`.client` (the sending side and named-channel receivers, used by the layer),
:mod:`.node_queue` (a node's queue, its consumer and its bindings, owned by the node).
"""

from __future__ import annotations

from .client import BrokerClient
from .node_queue import NodeQueue

__all__ = ["BrokerClient", "NodeQueue"]
