"""Per-connection rate limits: a token bucket for inbound frames."""

from __future__ import annotations

import time
from collections.abc import Callable

from django.core.exceptions import ImproperlyConfigured

__all__ = ["TokenBucket"]


class TokenBucket:
    """A token bucket: ``burst`` tokens, refilled at ``rate`` tokens per second."""

    def __init__(
        self, rate: float, burst: int, clock: Callable[[], float] = time.monotonic
    ) -> None:
        if rate <= 0 or burst < 1:
            raise ImproperlyConfigured(
                f"rate_limit must be (rate > 0, burst >= 1), e.g. (5.0, 10); got ({rate}, {burst})"
            )
        self.rate = float(rate)
        self.burst = int(burst)
        self._clock = clock
        self._tokens = float(burst)
        self._stamp = clock()

    def take(self) -> bool:
        """Take one token; False (and nothing taken) when the bucket is empty."""
        now = self._clock()
        self._tokens = min(self.burst, self._tokens + (now - self._stamp) * self.rate)
        self._stamp = now
        if self._tokens >= 1.0:
            self._tokens -= 1.0
            return True
        return False
