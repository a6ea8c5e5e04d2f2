"""A tests-only layer without the ``ratelimit`` extension, to check consumers refuse it."""

from __future__ import annotations

from channels_distrib.layers import DistributedChannelLayer


class NoRateLimitLayer(DistributedChannelLayer):
    """DistributedChannelLayer as a layer without shared token buckets would look."""

    extensions = [name for name in DistributedChannelLayer.extensions if name != "ratelimit"]
