"""A Django Channels layer on Redis that makes many ASGI servers act as one.

``channels_distrib.layers.DistributedChannelLayer`` is the ``BACKEND`` path; the names below
are re-exported for convenience. Importing this package has no side effects.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from .exceptions import ChannelFull, DistribError, MessageTooLarge, RedisUnavailable
from .types import Member, NodeInfo, NodeStats

if TYPE_CHECKING:
    from .consumers import ClientError, DistributedConsumer, DistributedMixin
    from .layers import DistributedChannelLayer

__version__ = "0.1.0"

__all__ = [
    "ChannelFull",
    "ClientError",
    "DistribError",
    "DistributedChannelLayer",
    "DistributedConsumer",
    "DistributedMixin",
    "Member",
    "MessageTooLarge",
    "NodeInfo",
    "NodeStats",
    "RedisUnavailable",
]

_LAZY = {
    "ClientError": "channels_distrib.consumers",
    "DistributedChannelLayer": "channels_distrib.layers",
    "DistributedConsumer": "channels_distrib.consumers",
    "DistributedMixin": "channels_distrib.consumers",
}


def __getattr__(name: str) -> Any:
    # Lazy, so `import channels_distrib` does not import Django's settings-dependent modules.
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'channels_distrib' has no attribute {name!r}")
    from importlib import import_module

    return getattr(import_module(module), name)
