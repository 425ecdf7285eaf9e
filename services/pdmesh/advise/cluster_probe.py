"""The workers' own view of a sweep step: cluster status read every `poll_s` (prefill backlog,
decode batch and queue, KV usage) and each worker's /metrics at the start and end of the step
(engine busy time, prefill rate, hand-off times), reduced to `PhaseSignals`."""

from __future__ import annotations

import asyncio
import time
from statistics import mean

from pdmesh.advise.sweep_step import PhaseSignals
from pdmesh.client import PdmeshClient
from pdmesh.exporter import histogram
from pdmesh.exporter.cluster_signals import prefill_rate
from pdmesh.exporter.worker_metrics import WorkerMetrics, scrape
from pdmesh.exporter.worker_view import WorkerView

SCRAPE_TIMEOUT_S = 5.0


class ClusterProbe:
    def __init__(self, client: PdmeshClient, poll_s: float):
        self.client, self.poll_s = client, poll_s

    def workers(self) -> list[WorkerView]:
        """Every registered worker, healthy or not: one that missed heartbeats under load is still
        part of the mesh being sized."""
        return [WorkerView.from_pb(w) for w in self.client.cluster_status().workers]

    async def watch(self, done: asyncio.Event) -> PhaseSignals:
        """Signals from now until `done` is set."""
        workers = await asyncio.to_thread(self.workers)
        before = await asyncio.to_thread(_scrape_all, workers)
        start = time.monotonic()
        polls: list[list[WorkerView]] = []
        while not done.is_set():
            polls.append(await asyncio.to_thread(self.workers))
            try:
                await asyncio.wait_for(done.wait(), self.poll_s)
            except asyncio.TimeoutError:
                pass
        seconds = time.monotonic() - start
        after = await asyncio.to_thread(_scrape_all, workers)
        deltas = {w: after[w].minus(before[w]) for w in before if w in after}
        return signals(workers, polls or [workers], deltas, seconds)


def _scrape_all(workers: list[WorkerView]) -> dict[str, WorkerMetrics]:
    """Each readable worker's metrics; one that does not answer is left out of the busy shares."""
    read = {}
    for w in (w for w in workers if w.metrics_address):
        try:
            read[w.worker_id] = scrape(w.metrics_address, SCRAPE_TIMEOUT_S)
        except (OSError, ValueError):
            continue
    return read


def signals(workers: list[WorkerView], polls: list[list[WorkerView]], deltas: dict[str, WorkerMetrics],
            seconds: float) -> PhaseSignals:
    prefill = [w.worker_id for w in workers if w.role == "prefill"]
    decode = [w.worker_id for w in workers if w.role == "decode"]
    backlog = mean(sum(w.queued_prompt_tokens for w in poll if w.role == "prefill") for poll in polls)
    rates = [r for w in prefill if w in deltas and (r := prefill_rate(deltas[w])) is not None]
    handoff = histogram.merge(deltas[w].handoff_buckets for w in decode if w in deltas)
    return PhaseSignals(
        len(prefill), len(decode), _busy(prefill, deltas, seconds), _busy(decode, deltas, seconds), backlog,
        0.0 if not backlog else (backlog / sum(rates) if rates else None),
        mean(sum(w.running for w in poll if w.role == "decode") for poll in polls) / max(1, len(decode)),
        mean(sum(w.queued for w in poll if w.role == "decode") for poll in polls),
        max((w.kv_usage_ratio for poll in polls for w in poll if w.role == "decode"), default=0.0),
        histogram.quantile(0.95, handoff), _cores(prefill, deltas, seconds), _cores(decode, deltas, seconds))


def _busy(worker_ids: list[str], deltas: dict[str, WorkerMetrics], seconds: float) -> float | None:
    """Mean share of the step the workers' engines spent computing."""
    shares = [deltas[w].busy_seconds / seconds for w in worker_ids if w in deltas and seconds > 0]
    return min(1.0, mean(shares)) if shares else None


def _cores(worker_ids: list[str], deltas: dict[str, WorkerMetrics], seconds: float) -> float | None:
    """Mean CPU cores the workers' processes used over the step."""
    used = [deltas[w].cpu_seconds / seconds for w in worker_ids if w in deltas and seconds > 0]
    return mean(used) if used else None
