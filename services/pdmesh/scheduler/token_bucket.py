"""A token bucket that may go into debt, so one request larger than the burst still runs once."""

from __future__ import annotations

import time
from typing import Callable


class TokenBucket:
    """rate units per second, holding at most burst. A take of `cost` needs min(cost, burst) in the
    bucket; the whole cost is then subtracted, so a take larger than the burst leaves a debt that
    is repaid over time instead of never fitting."""

    def __init__(self, rate: float, burst: float, clock: Callable[[], float] = time.monotonic):
        self.rate = rate
        self.burst = burst
        self.clock = clock
        self.level = burst
        self.updated = clock()

    def _refill(self) -> None:
        now = self.clock()
        self.level = min(self.burst, self.level + (now - self.updated) * self.rate)
        self.updated = now

    def try_take(self, cost: float) -> float:
        """0.0 if taken; otherwise seconds until a take could succeed."""
        self._refill()
        needed = min(cost, self.burst)
        if self.level < needed:
            return (needed - self.level) / self.rate + 1e-3
        self.level -= cost
        return 0.0

    def give_back(self, amount: float) -> None:
        self._refill()
        self.level = min(self.burst, self.level + amount)
