"""Rate limiting for log lines: a flood of one kind of event is one line a second, not a storm."""

from __future__ import annotations

import time


class Throttle:
    """Says whether an event may be logged now: at most once per ``interval`` seconds."""

    __slots__ = ("_last", "interval")

    def __init__(self, interval: float = 1.0) -> None:
        self.interval = interval
        self._last = float("-inf")

    def ready(self) -> bool:
        now = time.monotonic()
        if now - self._last < self.interval:
            return False
        self._last = now
        return True
