"""Reads the scheduler's cluster status and every worker's /metrics once per round, and keeps the
latest cluster series. Reads are blocking calls with deadlines, run from one thread (and a small
pool for the workers); nothing here serves requests, so no event loop is needed."""

from __future__ import annotations

import logging
import time
from concurrent.futures import ThreadPoolExecutor

import grpc

from pdmesh.client import PdmeshClient
from pdmesh.exporter.cluster_signals import Sample, cluster_samples
from pdmesh.exporter.exporter_config import ExporterConfig
from pdmesh.exporter.sample_window import SampleWindow
from pdmesh.exporter.worker_metrics import WorkerMetrics, scrape
from pdmesh.exporter.worker_view import WorkerView

log = logging.getLogger(__name__)
MAX_PARALLEL_READS = 8


class ClusterPoller:
    def __init__(self, config: ExporterConfig, client: PdmeshClient | None = None):
        self.timeout_s = min(max(config.scrape_interval_s, 1.0), 5.0)  # a round never piles onto the next
        self.client = client or PdmeshClient(config.scheduler_address, timeout_s=self.timeout_s, retries=0,
                                             cluster_secret=config.security.cluster_secret)
        self.window = SampleWindow(config.window_s)
        self.pool = ThreadPoolExecutor(MAX_PARALLEL_READS, thread_name_prefix="pdmesh-exporter-read")
        self.num_errors = {"status": 0, "metrics": 0}
        self.up = False
        self.duration_s = 0.0
        self.workers: list[WorkerView] = []
        self.cluster: list[Sample] = []  # replaced whole each round: readers never see half a round

    def poll(self) -> None:
        """One round: cluster status, then every worker's metrics, then the cluster series."""
        start = time.monotonic()
        try:
            status = self.client.cluster_status()
        except grpc.RpcError as exc:
            self.num_errors["status"] += 1
            self.up, self.cluster = False, []  # workers stay: /targets keeps their metrics scraped
            log.warning("cannot read cluster status: %s", exc.code())
        else:
            workers = [WorkerView.from_pb(w) for w in status.workers]
            deltas = self._read_workers(workers, start)
            self.up, self.workers = True, workers
            self.cluster = cluster_samples(workers, deltas, status.scheduler_restarts)
        self.duration_s = time.monotonic() - start

    def _read_workers(self, workers: list[WorkerView], now: float) -> dict[str, WorkerMetrics]:
        readable = [w for w in workers if w.metrics_address]
        for worker, metrics in zip(readable, self.pool.map(self._read_one, readable)):
            if metrics is not None:
                self.window.add(worker.worker_id, now, metrics)
        self.window.keep_only({w.worker_id for w in workers})
        return {w.worker_id: d for w in workers if (d := self.window.delta(w.worker_id)) is not None}

    def _read_one(self, worker: WorkerView) -> WorkerMetrics | None:
        try:
            return scrape(worker.metrics_address, self.timeout_s)
        except (OSError, ValueError) as exc:
            self.num_errors["metrics"] += 1
            log.warning("cannot read %s's metrics at %s: %s", worker.worker_id, worker.metrics_address, exc)
            return None

    def samples(self) -> list[Sample]:
        """The cluster series of the last round, with the exporter's own."""
        own = [Sample("pdmesh_cluster_up", (), float(self.up)),
               Sample("pdmesh_exporter_scrape_duration_seconds", (), self.duration_s)]
        own += [Sample("pdmesh_exporter_scrape_errors_total", (("target", t),), float(n))
                for t, n in self.num_errors.items()]
        return own + self.cluster

    def targets(self) -> list[dict]:
        """Every worker's /metrics as Prometheus HTTP service discovery targets."""
        return [{"targets": [w.metrics_address], "labels": {"role": w.role, "worker": w.worker_id}}
                for w in self.workers if w.metrics_address]

    def close(self) -> None:
        self.pool.shutdown(wait=False, cancel_futures=True)
        self.client.close()
