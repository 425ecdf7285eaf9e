"""A worker's /metrics text into the counters the exporter uses, and deltas between reads."""

from __future__ import annotations

import math

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest

from pdmesh.exporter.sample_window import SampleWindow
from pdmesh.exporter.worker_metrics import WorkerMetrics, parse


def exposition(tokens: int, prefill_s: list[float], handoff_s: list[float]) -> str:
    """The text a prefill worker serves, made with the same names pdmesh.metrics declares."""
    registry = CollectorRegistry()
    Counter("pdmesh_prefill_tokens_total", "", registry=registry).inc(tokens)
    prefill = Histogram("pdmesh_prefill_seconds", "", registry=registry)
    handoff = Histogram("pdmesh_kv_handoff_seconds", "", buckets=(0.01, 0.1, 1), registry=registry)
    for s in prefill_s:
        prefill.observe(s)
    for s in handoff_s:
        handoff.observe(s)
    return generate_latest(registry).decode()


def test_parse_reads_tokens_time_and_handoff_buckets():
    metrics = parse(exposition(300, [0.5, 1.0], [0.005, 0.05, 0.05, 5.0]))
    assert metrics.prefill_tokens == 300 and metrics.prefill_seconds == 1.5 and metrics.engine_queue_seconds == 0
    assert metrics.handoff_buckets == ((0.01, 1.0), (0.1, 3.0), (1.0, 3.0), (math.inf, 4.0))


def test_the_pdmesh_metrics_module_declares_what_the_exporter_reads():
    from pdmesh import metrics  # the worker side of the contract
    text = generate_latest().decode()
    assert metrics.PREFILL_TOKENS and "pdmesh_prefill_tokens_total" in text
    for name in ("pdmesh_prefill_seconds_sum", "pdmesh_engine_queue_time_seconds_sum",
                 "pdmesh_kv_handoff_seconds_bucket"):
        assert name in text


def test_window_delta_is_newest_minus_oldest_in_the_window():
    window = SampleWindow(window_s=10)
    window.add("p", 0.0, WorkerMetrics(100, 1.0, 0.0, ((1.0, 1.0), (math.inf, 1.0))))
    assert window.delta("p").prefill_tokens == 100  # one sample: everything since the worker started
    window.add("p", 5.0, WorkerMetrics(300, 2.0, 0.5, ((1.0, 2.0), (math.inf, 3.0))))
    assert window.delta("p") == WorkerMetrics(200, 1.0, 0.5, ((1.0, 1.0), (math.inf, 2.0)))
    window.add("p", 16.0, WorkerMetrics(400, 3.0, 0.5, ((1.0, 2.0), (math.inf, 3.0))))
    assert window.delta("p").prefill_tokens == 100  # from the last sample at or before the window start (5 s)
    assert window.delta("gone") is None


def test_a_restarted_worker_counts_from_its_restart():
    window = SampleWindow(window_s=60)
    window.add("p", 0.0, WorkerMetrics(1000, 10.0))
    window.add("p", 1.0, WorkerMetrics(50, 0.5))
    assert window.delta("p") == WorkerMetrics(50, 0.5)
    window.keep_only(set())
    assert window.delta("p") is None
