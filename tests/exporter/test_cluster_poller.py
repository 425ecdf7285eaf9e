"""One round of the exporter: status read, series built, the scheduler being away."""

from __future__ import annotations

import grpc

from pdmesh.exporter.cluster_poller import ClusterPoller
from pdmesh.exporter.exporter_config import ExporterConfig
from pdmesh.gen.pdmesh.v1 import scheduler_pb2


class Unavailable(grpc.RpcError):
    def code(self):
        return grpc.StatusCode.UNAVAILABLE


class FakeClient:
    def __init__(self):
        self.status: scheduler_pb2.ClusterStatus | Exception = scheduler_pb2.ClusterStatus(workers=[
            scheduler_pb2.WorkerStatus(worker_id="decode-0", role="decode", healthy=True, running=2,
                                       kv_blocks_free=30, kv_blocks_total=40, metrics_address="127.0.0.1:1")])

    def cluster_status(self):
        if isinstance(self.status, Exception):
            raise self.status
        return self.status

    def close(self):
        pass


def by_name(poller):
    return {(s.name, s.labels): s.value for s in poller.samples()}


def test_a_round_builds_cluster_series_and_counts_unreadable_workers():
    poller = ClusterPoller(ExporterConfig(scrape_interval_s=1.0), client=FakeClient())
    poller.poll()  # nothing listens on 127.0.0.1:1: the worker's metrics cannot be read
    samples = by_name(poller)
    assert samples[("pdmesh_cluster_up", ())] == 1.0
    assert samples[("pdmesh_cluster_kv_usage_ratio", (("role", "decode"), ("worker", "decode-0")))] == 0.25
    assert samples[("pdmesh_exporter_scrape_errors_total", (("target", "metrics"),))] == 1.0
    assert poller.targets() == [{"targets": ["127.0.0.1:1"], "labels": {"role": "decode", "worker": "decode-0"}}]
    poller.close()


def test_scheduler_away_clears_cluster_series_but_keeps_worker_targets():
    client = FakeClient()
    poller = ClusterPoller(ExporterConfig(scrape_interval_s=1.0), client=client)
    poller.poll()
    client.status = Unavailable()
    poller.poll()
    samples = by_name(poller)
    assert samples[("pdmesh_cluster_up", ())] == 0.0
    assert samples[("pdmesh_exporter_scrape_errors_total", (("target", "status"),))] == 1.0
    assert not any(name.startswith("pdmesh_cluster_kv") for name, _ in samples)
    assert poller.targets()  # Prometheus keeps scraping the workers while the scheduler is away
    poller.close()
