"""Quantiles of Prometheus histograms, computed the way PromQL's histogram_quantile does."""

from __future__ import annotations

import math
from typing import Iterable

from pdmesh.exporter.worker_metrics import Buckets


def merge(bucket_sets: Iterable[Buckets]) -> Buckets:
    """Sum histograms that share bucket bounds (the same metric from several workers)."""
    total: dict[float, float] = {}
    for buckets in bucket_sets:
        for le, count in buckets:
            total[le] = total.get(le, 0.0) + count
    return tuple(sorted(total.items()))


def quantile(q: float, buckets: Buckets) -> float | None:
    """The q-quantile of cumulative `buckets`, interpolated linearly inside its bucket; None when
    the histogram is empty. A rank in the +Inf bucket answers the highest finite bound."""
    if not buckets or not math.isinf(buckets[-1][0]) or buckets[-1][1] <= 0:
        return None
    rank = q * buckets[-1][1]
    lower, below = 0.0, 0.0
    for le, count in buckets:
        if count >= rank:
            if math.isinf(le):
                return lower
            inside = count - below
            return le if inside <= 0 else lower + (le - lower) * (rank - below) / inside
        lower, below = le, count
    return lower
