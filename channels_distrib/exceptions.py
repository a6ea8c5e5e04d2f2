"""Exceptions raised by channels_distrib.

Channels' own ``ChannelFull`` and ``MessageTooLarge`` are raised as they are, and bad
names or messages raise ``TypeError`` as channels does. The library's own tree::

    DistribError
    ├── RedisUnavailable      a send could not reach Redis within ``retry_timeout``
    └── BrokerUnavailable     RabbitMQ (``broker``) unreachable, or a confirm was lost

Configuration mistakes raise ``django.core.exceptions.ImproperlyConfigured``.
"""

from __future__ import annotations

from channels.exceptions import ChannelFull, MessageTooLarge

from .masking import scrub

__all__ = [
    "BrokerUnavailable",
    "ChannelFull",
    "DistribError",
    "MessageTooLarge",
    "RedisUnavailable",
]


class DistribError(Exception):
    """Root of the exceptions this library defines."""


class RedisUnavailable(DistribError, ConnectionError):
    """Redis could not be reached within ``retry_timeout``; nothing was sent.

    Also a ``ConnectionError``, so code that already catches connection trouble keeps working.
    """

    def __init__(self, address: str, waited: float, cause: BaseException | None = None) -> None:
        self.address = address
        self.waited = waited
        detail = f": {cause}" if cause is not None else ""
        # A cause from redis-py may quote a URL; its credentials never reach the message.
        super().__init__(scrub(f"Redis at {address} unreachable for {waited:.1f} s{detail}"))


class BrokerUnavailable(DistribError, ConnectionError):
    """RabbitMQ (the ``broker`` option) could not be reached within ``retry_timeout``, or the
    connection broke before the broker confirmed a message.

    In the second case the message may or may not have been queued; it is never published
    again (at most once). Also a ``ConnectionError``, like :class:`RedisUnavailable`.
    """

    def __init__(self, address: str, waited: float, cause: BaseException | None = None) -> None:
        self.address = address
        self.waited = waited
        detail = f": {cause}" if cause is not None else ""
        super().__init__(scrub(f"RabbitMQ at {address} unreachable for {waited:.1f} s{detail}"))
