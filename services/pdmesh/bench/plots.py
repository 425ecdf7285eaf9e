"""PNG plots of a benchmark (matplotlib, imported only when asked for): TTFT and ITL distributions
(CDFs) and output tokens per second over time, one line per target."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from pdmesh.bench.request_record import RequestRecord


def write_plots(path: str | Path, records: dict[str, list[RequestRecord]]) -> None:
    import matplotlib
    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    fig, (ttft, itl, rate) = plt.subplots(1, 3, figsize=(15, 4.2))
    for target, runs in records.items():
        ok = [r for r in runs if r.ok]
        _cdf(ttft, [r.ttft_s * 1e3 for r in ok if r.ttft_s is not None], target)
        _cdf(itl, [g * 1e3 for r in ok for g in r.itls_s()], target)
        times, per_s = _tokens_over_time(ok)
        rate.plot(times, per_s, label=target)
    for axis, title, xlabel in ((ttft, "time to first token", "ms"), (itl, "inter-token latency", "ms"),
                                (rate, "output tokens per second", "s since the first request")):
        axis.set_title(title)
        axis.set_xlabel(xlabel)
        axis.grid(alpha=0.3)
        axis.legend(fontsize=7)
    ttft.set_ylabel("fraction of requests")
    itl.set_ylabel("fraction of gaps")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _cdf(axis, values: list[float], label: str) -> None:
    if values:
        ordered = np.sort(values)
        axis.plot(ordered, np.arange(1, len(ordered) + 1) / len(ordered), label=label)


def _tokens_over_time(records: list[RequestRecord], bin_s: float = 0.5) -> tuple[list[float], list[float]]:
    """Chunks (about a token each) arriving per second, in bins of bin_s."""
    if not records:
        return [], []
    start = min(r.sent for r in records)
    arrivals = np.array([t - start for r in records for t in r.chunk_times])
    if arrivals.size == 0:
        return [], []
    counts, edges = np.histogram(arrivals, bins=np.arange(0.0, arrivals.max() + bin_s, bin_s))
    return list(edges[:-1]), list(counts / bin_s)
