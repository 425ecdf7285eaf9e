"""Cluster series from cluster status and worker deltas: membership, backlog, usage, p95, restarts."""

from __future__ import annotations

import math

import pytest

from pdmesh.exporter.cluster_signals import cluster_samples, prefill_rate
from pdmesh.exporter.series import SERIES
from pdmesh.exporter.worker_metrics import WorkerMetrics
from pdmesh.exporter.worker_view import WorkerView


def worker(worker_id, role, healthy=True, running=0, queued=0, free=100, total=100, backlog=0, restarts=0):
    return WorkerView(worker_id, role, healthy, running, queued, free, total, backlog, "", restarts)


def values(samples, name):
    return {dict(s.labels).get("worker", dict(s.labels).get("role", "")): s.value for s in samples if s.name == name}


WORKERS = [worker("p0", "prefill", backlog=3000, restarts=2), worker("p1", "prefill", backlog=1000),
           worker("p2", "prefill", healthy=False, backlog=9999),
           worker("d0", "decode", running=12, free=25, total=100), worker("d1", "decode", healthy=False)]
DELTAS = {"p0": WorkerMetrics(2000, 2.0, 1.0, ((0.1, 9.0), (math.inf, 10.0))),  # 2000 tok / 1 s busy
          "p1": WorkerMetrics(1000, 1.0, 0.0, ((0.1, 10.0), (math.inf, 10.0))),  # 1000 tok / 1 s
          "d0": WorkerMetrics(handoff_buckets=((0.1, 1.0), (math.inf, 1.0)))}


def test_every_sample_is_a_declared_series_with_its_labels():
    for sample in cluster_samples(WORKERS, DELTAS, scheduler_restarts=1):
        assert tuple(k for k, _ in sample.labels) == SERIES[sample.name].labels


def test_membership_per_role():
    samples = cluster_samples(WORKERS, DELTAS, 0)
    assert values(samples, "pdmesh_cluster_workers") == {"prefill": 3, "decode": 2}
    assert values(samples, "pdmesh_cluster_workers_healthy") == {"prefill": 2, "decode": 1}


def test_backlog_counts_healthy_prefill_workers_at_their_measured_rate():
    samples = cluster_samples(WORKERS, DELTAS, 0)
    assert values(samples, "pdmesh_cluster_prefill_backlog_tokens") == {"": 4000}
    assert values(samples, "pdmesh_cluster_prefill_throughput_tokens_per_second") == {"": 3000}
    assert values(samples, "pdmesh_cluster_prefill_backlog_seconds") == {"": pytest.approx(4000 / 3000)}


def test_backlog_seconds_absent_until_a_rate_is_measured_and_zero_without_backlog():
    assert "pdmesh_cluster_prefill_backlog_seconds" not in {s.name for s in cluster_samples(WORKERS, {}, 0)}
    idle = [worker("p0", "prefill")]
    assert values(cluster_samples(idle, {}, 0), "pdmesh_cluster_prefill_backlog_seconds") == {"": 0.0}
    assert prefill_rate(WorkerMetrics(100, 1.0, 1.0)) is None  # all of it was queue wait


def test_per_worker_usage_running_and_restarts():
    samples = cluster_samples(WORKERS, DELTAS, scheduler_restarts=4)
    assert values(samples, "pdmesh_cluster_kv_usage_ratio")["d0"] == 0.75
    assert values(samples, "pdmesh_cluster_running_requests")["d0"] == 12
    assert values(samples, "pdmesh_cluster_worker_restarts_total")["p0"] == 2
    assert values(samples, "pdmesh_cluster_scheduler_restarts_total") == {"": 4}


def test_handoff_p95_merges_the_workers_of_a_role():
    p95 = values(cluster_samples(WORKERS, DELTAS, 0), "pdmesh_cluster_kv_handoff_p95_seconds")
    assert p95["prefill"] == 0.1  # 19 of 20 hand-offs within 0.1 s; the 20th is past the last bound
    assert p95["decode"] == pytest.approx(0.095)
