"""pdmesh bench's pure parts: seeded workloads, arrival processes, the summary's arithmetic, the table."""

from __future__ import annotations

import statistics

import pytest

from pdmesh.bench.bench_config import BenchConfig
from pdmesh.bench.report import table
from pdmesh.bench.request_record import OK, RequestRecord
from pdmesh.bench.summary import summarize
from pdmesh.bench.workload import make_workload
from pdmesh.errors import InvalidRequestError


def test_same_seed_same_requests_and_shared_prefix():
    config = BenchConfig(lengths="uniform", prompt_tokens=40, output_tokens=20, shared_prefix=8, seed=7)
    first, again = make_workload(config, 50), make_workload(config, 50)
    assert first == again and first != make_workload(BenchConfig(lengths="uniform", seed=8), 50)
    assert all(r.prompt_ids[:8] == first[0].prompt_ids[:8] for r in first)
    assert all(20 <= len(r.prompt_ids) <= 60 and 10 <= r.output_tokens <= 30 for r in first)


def test_chat_mix_means_follow_the_flags():
    requests = make_workload(BenchConfig(lengths="chat", prompt_tokens=200, output_tokens=100), 4000)
    assert statistics.mean(len(r.prompt_ids) for r in requests) == pytest.approx(200, rel=0.08)
    assert statistics.mean(r.output_tokens for r in requests) == pytest.approx(100, rel=0.08)
    assert max(len(r.prompt_ids) for r in requests) > 600  # documents are in the mix


@pytest.mark.parametrize("burstiness", [1.0, 0.25])
def test_open_loop_arrivals_have_the_asked_rate(burstiness):
    requests = make_workload(BenchConfig(rate=50.0, burstiness=burstiness), 4000)
    gaps = [b.send_at_s - a.send_at_s for a, b in zip(requests, requests[1:])]
    assert statistics.mean(gaps) == pytest.approx(1 / 50, rel=0.1)
    cv = statistics.stdev(gaps) / statistics.mean(gaps)  # gamma: 1/sqrt(shape)
    assert cv == pytest.approx(burstiness ** -0.5, rel=0.15)
    assert all(r.send_at_s == 0 for r in make_workload(BenchConfig(), 5))  # closed loop


def record(index, sent, chunks, end, tokens, status=OK):
    return RequestRecord(index, sent, list(chunks), end, 10, tokens, status)


def test_summary_numbers():
    records = [record(0, 0.0, [0.1, 0.2, 0.3], 0.3, 3), record(1, 0.0, [0.5, 0.6, 0.7], 0.7, 3),
               record(2, 0.5, [], 1.0, 0, "RESOURCE_EXHAUSTED")]
    s = summarize("t", records, slo_ttft_s=0.2)
    assert s.duration_s == 1.0 and s.num_ok == 2 and s.statuses == {OK: 2, "RESOURCE_EXHAUSTED": 1}
    assert s.request_throughput == 2.0 and s.output_throughput == 6.0 and s.total_throughput == 26.0
    assert s.goodput == 1.0  # only the first met TTFT <= 0.2 s
    assert s.ttft.p50 == pytest.approx(0.3) and s.tpot.mean == pytest.approx(0.1)
    assert s.itl.p99 == pytest.approx(0.1)
    text = table([s, summarize("u", records[:1])], "heading")
    assert "ratio 2/1" in text and "x0.33" in text  # TTFT p50: 0.1 s against 0.3 s and "RESOURCE_EXHAUSTED 1" in text


def test_config_checks():
    with pytest.raises(InvalidRequestError):
        BenchConfig(concurrency=0)
    with pytest.raises(InvalidRequestError):
        BenchConfig(spread=1.0)
    assert BenchConfig(compare="a:1, http://b/v1").targets() == ["a:1", "http://b/v1"]
