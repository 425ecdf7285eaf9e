"""Which phase saturates first in a sweep, and the prefill:decode worker ratio the load wants
(pure: no I/O).

A phase is saturated at a step when its engines computed at least `busy_limit` of the time, or
work backs up in front of it: prefill's queued prompt tokens take over BACKLOG_S at its measured
rate; decode engines hold requests waiting for a batch slot, or their KV cache is nearly full.
The ratio is the work each phase needed at the knee (or the last rate), in busy worker-equivalents:
busy share x workers of that role.
"""

from __future__ import annotations

from dataclasses import dataclass

from pdmesh.advise.knee import find_knee, throughput_gain, ttft_rise
from pdmesh.advise.sweep_step import PhaseSignals, SweepStep

BACKLOG_S = 1.0
DECODE_QUEUED = 1.0
KV_LIMIT = 0.9


@dataclass(frozen=True, slots=True)
class Verdict:
    knee: int | None  # index of the knee step
    phase: str  # "prefill", "decode", "neither" or "colocated"
    at: int | None  # index of the step where that phase first saturated
    reasons: tuple[str, ...]
    demand: tuple[float, float] | None  # busy worker-equivalents (prefill, decode) at the knee or last step


def saturation(s: PhaseSignals, busy_limit: float) -> dict[str, list[str]]:
    """Why each phase counts as saturated at one step (empty lists: it does not)."""
    prefill, decode = [], []
    if s.prefill_workers:
        if s.prefill_busy is not None and s.prefill_busy >= busy_limit:
            prefill.append(f"prefill engines busy {s.prefill_busy:.0%} of the time")
        if s.prefill_backlog_s is not None and s.prefill_backlog_s >= BACKLOG_S:
            prefill.append(f"prefill backlog {s.prefill_backlog_tokens:,.0f} prompt tokens "
                           f"({s.prefill_backlog_s:.1f} s of prefill)")
    if s.decode_busy is not None and s.decode_busy >= busy_limit:
        decode.append(f"decode engines busy {s.decode_busy:.0%} of the time")
    if s.decode_queued >= DECODE_QUEUED:
        decode.append(f"{s.decode_queued:.1f} requests waiting in decode engines")
    if s.kv_usage >= KV_LIMIT:
        decode.append(f"decode KV cache {s.kv_usage:.0%} used")
    return {"prefill": prefill, "decode": decode}


def demand(s: PhaseSignals) -> tuple[float, float] | None:
    if s.prefill_busy is None or s.decode_busy is None:
        return None
    return s.prefill_busy * s.prefill_workers, s.decode_busy * s.decode_workers


def decide(steps: list[SweepStep], ttft_rise_limit: float, flat_gain: float, busy_limit: float) -> Verdict:
    knee = find_knee(steps, ttft_rise_limit, flat_gain)
    last = len(steps) - 1 if knee is None else knee
    if steps[last].signals.prefill_workers == 0:
        return Verdict(knee, "colocated", None, (), None)
    for i in range(last + 1):
        why = saturation(steps[i].signals, busy_limit)
        if why["prefill"] or why["decode"]:
            phase = _first(why, steps[i].signals)
            return Verdict(knee, phase, i, tuple(why[phase]), demand(steps[last].signals))
    return Verdict(knee, "neither", None, (), demand(steps[last].signals))


def _first(why: dict[str, list[str]], s: PhaseSignals) -> str:
    """The saturated phase; both at once: the busier one."""
    if not why["decode"]:
        return "prefill"
    if not why["prefill"]:
        return "decode"
    return "prefill" if (s.prefill_busy or 0.0) >= (s.decode_busy or 0.0) else "decode"


def ratio(prefill: float, decode: float) -> str:
    """prefill:decode as small whole numbers, e.g. 2:1 or 1:3."""
    if prefill <= 0 or decode <= 0:
        return "-"
    r = prefill / decode
    return f"{max(1, round(r))}:1" if r >= 1 else f"1:{max(1, round(1 / r))}"


def describe(verdict: Verdict, steps: list[SweepStep]) -> list[str]:
    """The verdict in words, one line each."""
    lines = [_knee_line(verdict.knee, steps)]
    if verdict.phase == "colocated":
        return lines + ["phase: this mesh is colocated (no prefill workers): its decode workers do both phases, "
                        "so the two cannot be told apart; sweep a disaggregated mesh (--prefill-workers >= 1) "
                        "to size each"]
    if verdict.phase == "neither":
        lines.append(f"saturates first: neither phase up to {steps[-1].rate:g} req/s: the limit is elsewhere "
                     "(the scheduler, the client, or cores shared with other processes)")
    else:
        lines.append(f"saturates first: {verdict.phase}, at {steps[verdict.at].rate:g} req/s: "
                     + "; ".join(verdict.reasons))
    if verdict.demand is not None:
        prefill, decode = verdict.demand
        at = steps[len(steps) - 1 if verdict.knee is None else verdict.knee].rate
        lines.append(f"ratio: the measured load wants prefill:decode workers = {ratio(prefill, decode)} "
                     f"(busy worker-equivalents at {at:g} req/s: prefill {prefill:.2f}, decode {decode:.2f})")
    if verdict.phase in ("prefill", "decode"):
        lines.append(f"advice: add {verdict.phase} workers first")
    return lines


def _knee_line(knee: int | None, steps: list[SweepStep]) -> str:
    if knee is None:
        return (f"knee: not reached up to {steps[-1].rate:g} req/s (TTFT p95 did not rise while throughput "
                "flattened); sweep higher --rates")
    rise = ttft_rise(steps, knee)
    return (f"knee: {steps[knee].rate:g} req/s: TTFT p95 x{rise:.1f} the {steps[0].rate:g} req/s value while "
            f"throughput followed {throughput_gain(steps, knee):.0%} of the added rate")
