"""Every series `pdmesh exporter` serves: name, type, labels, meaning, and the vLLM series of the
same meaning where there is one (vLLM's are per engine; these are per role or per worker of the mesh).

Names follow Prometheus conventions: `pdmesh_cluster_` prefix, base units in the name (seconds,
tokens, ratio), `_total` only on counters.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class SeriesSpec:
    name: str
    kind: str  # "gauge" or "counter"
    help: str
    labels: tuple[str, ...] = ()
    vllm: str = ""  # the vLLM series with the same meaning, if any


CATALOG = (
    SeriesSpec("pdmesh_cluster_up", "gauge", "1 when the last read of the scheduler's cluster status succeeded"),
    SeriesSpec("pdmesh_cluster_workers", "gauge", "Workers registered with the scheduler", ("role",)),
    SeriesSpec("pdmesh_cluster_workers_healthy", "gauge", "Workers the scheduler routes to", ("role",)),
    SeriesSpec("pdmesh_cluster_prefill_backlog_tokens", "gauge",
               "Prompt tokens waiting to be prefilled, summed over healthy prefill workers"),
    SeriesSpec("pdmesh_cluster_prefill_throughput_tokens_per_second", "gauge",
               "Measured prefill rate of the healthy prefill workers, summed: prompt tokens per second of "
               "prefill compute (pdmesh_prefill_seconds less pdmesh_engine_queue_time_seconds) over the window",
               vllm="rate(vllm:prompt_tokens_total) while busy"),
    SeriesSpec("pdmesh_cluster_prefill_backlog_seconds", "gauge",
               "Seconds the prefill backlog takes at the measured rate (absent until a rate is measured)"),
    SeriesSpec("pdmesh_cluster_kv_usage_ratio", "gauge", "Fraction of a worker's KV blocks in use (0-1)",
               ("role", "worker"), vllm="vllm:kv_cache_usage_perc (also 0-1; formerly vllm:gpu_cache_usage_perc)"),
    SeriesSpec("pdmesh_cluster_running_requests", "gauge", "Requests running on a worker (decode: streams)",
               ("role", "worker"), vllm="vllm:num_requests_running"),
    SeriesSpec("pdmesh_cluster_queued_requests", "gauge", "Requests waiting on a worker",
               ("role", "worker"), vllm="vllm:num_requests_waiting"),
    SeriesSpec("pdmesh_cluster_kv_handoff_p95_seconds", "gauge",
               "95th percentile of KV hand-off time over the window (prefill: send, decode: receive)",
               ("role",)),
    SeriesSpec("pdmesh_cluster_worker_restarts_total", "counter",
               "Times a supervisor restarted a worker (from cluster status)", ("role", "worker")),
    SeriesSpec("pdmesh_cluster_scheduler_restarts_total", "counter", "Times a supervisor restarted the scheduler"),
    SeriesSpec("pdmesh_exporter_scrape_errors_total", "counter",
               "Failed reads by the exporter, by target (status: the scheduler; metrics: a worker)", ("target",)),
    SeriesSpec("pdmesh_exporter_scrape_duration_seconds", "gauge", "Time the last round of reads took"),
)
SERIES = {spec.name: spec for spec in CATALOG}
