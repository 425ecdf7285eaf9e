"""A run's records reduced to the numbers a benchmark reports: latency percentiles (TTFT, TPOT,
ITL, end to end), request and token throughput, goodput against the SLOs, errors by status."""

from __future__ import annotations

from collections import Counter
from dataclasses import asdict, dataclass

import numpy as np

from pdmesh.bench.request_record import RequestRecord

PERCENTILES = (50, 95, 99)


@dataclass(frozen=True, slots=True)
class Latency:
    """Seconds: mean and percentiles (None when nothing was measured)."""

    mean: float | None
    p50: float | None
    p95: float | None
    p99: float | None

    @staticmethod
    def of(values: list[float]) -> "Latency":
        if not values:
            return Latency(None, None, None, None)
        p50, p95, p99 = (float(v) for v in np.percentile(values, PERCENTILES))
        return Latency(float(np.mean(values)), p50, p95, p99)


@dataclass(frozen=True, slots=True)
class Summary:
    target: str
    num_requests: int
    num_ok: int
    statuses: dict[str, int]
    duration_s: float
    request_throughput: float  # finished OK requests per second
    output_throughput: float  # output tokens per second
    total_throughput: float  # prompt + output tokens per second
    goodput: float  # requests per second that met every SLO
    ttft: Latency
    tpot: Latency
    itl: Latency
    e2e: Latency

    def to_json(self) -> dict:
        return asdict(self)


def summarize(target: str, records: list[RequestRecord], slo_ttft_s: float = 0.0,
              slo_tpot_s: float = 0.0) -> Summary:
    ok = [r for r in records if r.ok]
    duration = max(r.end for r in records) - min(r.sent for r in records) if records else 0.0
    per_s = 1.0 / duration if duration > 0 else 0.0
    output = sum(r.output_tokens for r in ok)
    prompt = sum(r.prompt_tokens for r in ok)
    good = [r for r in ok if _meets(r, slo_ttft_s, slo_tpot_s)]
    return Summary(
        target, len(records), len(ok), dict(Counter(r.status for r in records)), duration, len(ok) * per_s,
        output * per_s, (output + prompt) * per_s, len(good) * per_s,
        Latency.of([r.ttft_s for r in ok if r.ttft_s is not None]),
        Latency.of([r.tpot_s for r in ok if r.tpot_s is not None]),
        Latency.of([gap for r in ok for gap in r.itls_s()]),
        Latency.of([r.e2e_s for r in ok]))


def _meets(record: RequestRecord, slo_ttft_s: float, slo_tpot_s: float) -> bool:
    if slo_ttft_s and (record.ttft_s is None or record.ttft_s > slo_ttft_s):
        return False
    if slo_tpot_s and record.tpot_s is not None and record.tpot_s > slo_tpot_s:
        return False
    return True
