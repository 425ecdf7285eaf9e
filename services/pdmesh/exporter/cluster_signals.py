"""Cluster-level series from cluster status and each worker's recent metrics (pure: no I/O).

Per role: workers healthy / registered, restarts, hand-off p95. Prefill: the backlog in prompt
tokens and in seconds at the measured rate (for the prefill autoscaler). Per worker: KV usage
ratio, running and queued requests (for the decode autoscaler and the KV-leak alert).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Mapping

from pdmesh.config import ROLES
from pdmesh.exporter import histogram
from pdmesh.exporter.worker_metrics import WorkerMetrics
from pdmesh.exporter.worker_view import WorkerView

HANDOFF_QUANTILE = 0.95


@dataclass(frozen=True, slots=True)
class Sample:
    name: str  # a name of series.CATALOG
    labels: tuple[tuple[str, str], ...]
    value: float


def _sample(name: str, value: float, **labels: str) -> Sample:
    return Sample(name, tuple(labels.items()), float(value))


def cluster_samples(workers: list[WorkerView], deltas: Mapping[str, WorkerMetrics],
                    scheduler_restarts: int) -> list[Sample]:
    """Every cluster series for one read of cluster status; `deltas` maps worker id to what its
    counters did over the window (workers whose /metrics could not be read are missing)."""
    return [*membership(workers), *prefill_backlog(workers, deltas), *per_worker(workers),
            *handoff_p95(workers, deltas),
            _sample("pdmesh_cluster_scheduler_restarts_total", scheduler_restarts)]


def membership(workers: list[WorkerView]) -> Iterable[Sample]:
    for role in ROLES:
        of_role = [w for w in workers if w.role == role]
        yield _sample("pdmesh_cluster_workers", len(of_role), role=role)
        yield _sample("pdmesh_cluster_workers_healthy", sum(w.healthy for w in of_role), role=role)


def prefill_rate(delta: WorkerMetrics) -> float | None:
    """Prompt tokens per second of prefill compute: the time a prompt waited in the engine's queue
    is taken out, so a long queue does not read as a slow worker. Prompts prefilled in one batch
    each count the batch's whole time, so the rate errs low (and backlog seconds high)."""
    busy_s = delta.prefill_seconds - delta.engine_queue_seconds
    if delta.prefill_tokens <= 0 or busy_s <= 0:
        return None
    return delta.prefill_tokens / busy_s


def prefill_backlog(workers: list[WorkerView], deltas: Mapping[str, WorkerMetrics]) -> Iterable[Sample]:
    healthy = [w for w in workers if w.role == "prefill" and w.healthy]
    backlog = sum(w.queued_prompt_tokens for w in healthy)
    rates = [r for w in healthy if w.worker_id in deltas and (r := prefill_rate(deltas[w.worker_id])) is not None]
    yield _sample("pdmesh_cluster_prefill_backlog_tokens", backlog)
    if rates:
        yield _sample("pdmesh_cluster_prefill_throughput_tokens_per_second", sum(rates))
    if backlog == 0:
        yield _sample("pdmesh_cluster_prefill_backlog_seconds", 0.0)
    elif rates:
        yield _sample("pdmesh_cluster_prefill_backlog_seconds", backlog / sum(rates))


def per_worker(workers: list[WorkerView]) -> Iterable[Sample]:
    for w in workers:
        labels = {"role": w.role, "worker": w.worker_id}
        yield _sample("pdmesh_cluster_kv_usage_ratio", w.kv_usage_ratio, **labels)
        yield _sample("pdmesh_cluster_running_requests", w.running, **labels)
        yield _sample("pdmesh_cluster_queued_requests", w.queued, **labels)
        yield _sample("pdmesh_cluster_worker_restarts_total", w.restarts, **labels)


def handoff_p95(workers: list[WorkerView], deltas: Mapping[str, WorkerMetrics]) -> Iterable[Sample]:
    """Per role, over the window: prefill workers time the send, decode workers the receive."""
    for role in ROLES:
        merged = histogram.merge(deltas[w.worker_id].handoff_buckets for w in workers
                                 if w.role == role and w.worker_id in deltas)
        p95 = histogram.quantile(HANDOFF_QUANTILE, merged)
        if p95 is not None:
            yield _sample("pdmesh_cluster_kv_handoff_p95_seconds", p95, role=role)
