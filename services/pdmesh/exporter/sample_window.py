"""Each worker's cumulative metrics over the last `window_s` seconds, so rates are recent."""

from __future__ import annotations

from collections import deque

from pdmesh.exporter.worker_metrics import WorkerMetrics


class SampleWindow:
    def __init__(self, window_s: float):
        self.window_s = window_s
        self.samples: dict[str, deque[tuple[float, WorkerMetrics]]] = {}

    def add(self, worker_id: str, now: float, metrics: WorkerMetrics) -> None:
        samples = self.samples.setdefault(worker_id, deque())
        samples.append((now, metrics))
        while len(samples) > 2 and samples[1][0] <= now - self.window_s:  # keep one at or before the start
            samples.popleft()

    def delta(self, worker_id: str) -> WorkerMetrics | None:
        """Newest minus oldest sample in the window; the newest alone (everything since the worker
        started) while the window holds one sample; None for a worker never read."""
        samples = self.samples.get(worker_id)
        if not samples:
            return None
        newest = samples[-1][1]
        return newest if len(samples) == 1 else newest.minus(samples[0][1])

    def keep_only(self, worker_ids: set[str]) -> None:
        """Forget workers that left the cluster."""
        for worker_id in set(self.samples) - worker_ids:
            del self.samples[worker_id]
