"""Quantiles match PromQL's histogram_quantile on the same buckets."""

from __future__ import annotations

import math

from pdmesh.exporter.histogram import merge, quantile

INF = math.inf


def test_interpolates_inside_the_bucket_of_the_rank():
    buckets = ((0.1, 0.0), (0.2, 50.0), (0.4, 100.0), (INF, 100.0))
    assert quantile(0.5, buckets) == 0.2  # rank 50 ends the (0.1, 0.2] bucket
    assert math.isclose(quantile(0.75, buckets), 0.3)  # halfway through (0.2, 0.4]
    assert math.isclose(quantile(0.25, buckets), 0.15)


def test_first_bucket_starts_at_zero_and_inf_bucket_answers_the_highest_bound():
    assert math.isclose(quantile(0.5, ((1.0, 10.0), (INF, 10.0))), 0.5)
    assert quantile(0.95, ((1.0, 1.0), (2.0, 2.0), (INF, 10.0))) == 2.0


def test_empty_histograms_have_no_quantile():
    assert quantile(0.95, ()) is None
    assert quantile(0.95, ((1.0, 0.0), (INF, 0.0))) is None


def test_merge_sums_counts_per_bound():
    assert merge([((1.0, 1.0), (INF, 2.0)), ((1.0, 3.0), (INF, 3.0))]) == ((1.0, 4.0), (INF, 5.0))
