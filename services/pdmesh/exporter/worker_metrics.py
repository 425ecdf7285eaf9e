"""One worker's /metrics, read over HTTP and reduced to the cumulative values the exporter needs."""

from __future__ import annotations

import math
import urllib.request
from dataclasses import dataclass

from prometheus_client.parser import text_string_to_metric_families

Buckets = tuple[tuple[float, float], ...]  # (upper bound, cumulative count), ascending, +Inf last


@dataclass(frozen=True, slots=True)
class WorkerMetrics:
    """Cumulative counters of one worker since it started."""

    prefill_tokens: float = 0.0  # pdmesh_prefill_tokens_total
    prefill_seconds: float = 0.0  # pdmesh_prefill_seconds_sum: queue wait + compute, per prompt
    engine_queue_seconds: float = 0.0  # pdmesh_engine_queue_time_seconds_sum: the wait part
    handoff_buckets: Buckets = ()  # pdmesh_kv_handoff_seconds_bucket
    busy_seconds: float = 0.0  # pdmesh_engine_busy_seconds_total: time in engine steps
    cpu_seconds: float = 0.0  # process_cpu_seconds_total: CPU the worker's process used, every thread

    def minus(self, earlier: "WorkerMetrics") -> "WorkerMetrics":
        """What happened between `earlier` and this sample; a counter that went down means the
        worker restarted, and then everything since the restart is this sample itself."""
        if self._went_down_from(earlier):
            return self
        old = dict(earlier.handoff_buckets)
        return WorkerMetrics(self.prefill_tokens - earlier.prefill_tokens,
                             self.prefill_seconds - earlier.prefill_seconds,
                             self.engine_queue_seconds - earlier.engine_queue_seconds,
                             tuple((le, count - old.get(le, 0.0)) for le, count in self.handoff_buckets),
                             self.busy_seconds - earlier.busy_seconds, self.cpu_seconds - earlier.cpu_seconds)

    def _went_down_from(self, earlier: "WorkerMetrics") -> bool:
        old = dict(earlier.handoff_buckets)
        return (self.prefill_tokens < earlier.prefill_tokens or self.prefill_seconds < earlier.prefill_seconds
                or self.busy_seconds < earlier.busy_seconds or self.cpu_seconds < earlier.cpu_seconds
                or any(count < old.get(le, 0.0) for le, count in self.handoff_buckets))


def parse(text: str) -> WorkerMetrics:
    """WorkerMetrics from a Prometheus text exposition."""
    values: dict[str, float] = {}
    buckets: list[tuple[float, float]] = []
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == "pdmesh_kv_handoff_seconds_bucket":
                buckets.append((float(sample.labels["le"]), sample.value))
            else:
                values[sample.name] = sample.value
    buckets.sort(key=lambda b: b[0])
    return WorkerMetrics(values.get("pdmesh_prefill_tokens_total", 0.0), values.get("pdmesh_prefill_seconds_sum", 0.0),
                         values.get("pdmesh_engine_queue_time_seconds_sum", 0.0),
                         tuple(b for b in buckets if not math.isnan(b[0])),
                         values.get("pdmesh_engine_busy_seconds_total", 0.0),
                         values.get("process_cpu_seconds_total", 0.0))


def scrape(address: str, timeout_s: float) -> WorkerMetrics:
    """GET http://address/metrics and parse it; raises OSError (URLError included) on failure."""
    with urllib.request.urlopen(f"http://{address}/metrics", timeout=timeout_s) as response:
        return parse(response.read().decode())
