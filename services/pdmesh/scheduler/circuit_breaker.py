"""Whether to route to a worker: closed (yes) until a failure opens it, then probes with
exponential backoff (tenacity's wait_exponential) until one succeeds and closes it again."""

from __future__ import annotations

from types import SimpleNamespace

from tenacity import wait_exponential

BACKOFF = wait_exponential(multiplier=0.25, min=0.25, max=8.0)


class CircuitBreaker:
    """threshold: consecutive soft failures (timeouts) that open it; a hard failure (refused
    connection, NOT_SERVING) opens it at once."""

    def __init__(self, threshold: int = 3):
        self.threshold = threshold
        self.closed = True
        self.failures = 0  # consecutive
        self.probe_at = 0.0  # open: no probe before this time

    def may_probe(self, now: float) -> bool:
        return self.closed or now >= self.probe_at

    def record_failure(self, now: float, hard: bool = True) -> bool:
        """Returns True when this failure opened a closed breaker."""
        self.failures += 1
        if self.closed and not hard and self.failures < self.threshold:
            return False
        was_closed = self.closed
        self.closed = False
        self.probe_at = now + BACKOFF(SimpleNamespace(attempt_number=self.failures))
        return was_closed

    def record_success(self) -> bool:
        """Returns True when this success closed an open breaker."""
        was_open = not self.closed
        self.closed, self.failures, self.probe_at = True, 0, 0.0
        return was_open
