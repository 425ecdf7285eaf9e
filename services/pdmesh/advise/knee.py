"""The knee of a rate sweep: the first rate where TTFT p95 has risen well above the lowest
rate's while throughput no longer follows the offered rate (pure: no I/O)."""

from __future__ import annotations

from pdmesh.advise.sweep_step import SweepStep


def throughput_gain(steps: list[SweepStep], i: int) -> float:
    """Share of the offered rate's growth from step i-1 to step i that throughput followed."""
    offered = steps[i].rate - steps[i - 1].rate
    return (steps[i].throughput - steps[i - 1].throughput) / offered if offered > 0 else 0.0


def ttft_rise(steps: list[SweepStep], i: int) -> float | None:
    base, now = steps[0].ttft_p95_s, steps[i].ttft_p95_s
    if now is None:
        return float("inf")  # nothing finished: as far past the knee as it gets
    return now / base if base else None


def find_knee(steps: list[SweepStep], rise: float, flat_gain: float) -> int | None:
    """Index of the knee step, or None when the sweep never reached it."""
    for i in range(1, len(steps)):
        grown = ttft_rise(steps, i)
        if grown is not None and grown >= rise and throughput_gain(steps, i) < flat_gain:
            return i
    return None
