"""Settings of `pdmesh advise`: the sweep and the knee. The load itself (target, lengths, SLOs,
seed) is `pdmesh bench`'s, with the same flags (`BenchConfig`)."""

from __future__ import annotations

from dataclasses import dataclass, field

from pdmesh.bench.bench_config import BenchConfig
from pdmesh.errors import InvalidRequestError
from pdmesh.option import option

# bench flags advise sets itself per step, or has no use for
ADVISE_SKIPS_BENCH_FLAGS = {"compare", "concurrency", "rate", "requests", "json", "plot", "endpoint", "progress",
                            "slo-ttft", "slo-tpot"}


@dataclass(frozen=True, slots=True)
class AdviseConfig:
    bench: BenchConfig = field(default_factory=BenchConfig)  # the load at each step, rate set per step
    rates: str = field(default="0.25,0.5,1,2,4", metadata=option(
        "request rates to sweep, per second, in order (open loop, Poisson); the sweep stops at the knee"))
    step_s: float = field(default=20.0, metadata=option(
        "seconds of arrivals at each rate (requests = rate x this, at least 4)", flag="step"))
    ttft_rise: float = field(default=2.0, metadata=option(
        "knee: TTFT p95 at least this many times the first rate's ..."))
    flat_gain: float = field(default=0.5, metadata=option(
        "... while throughput grows by less than this share of the offered rate's growth"))
    busy_limit: float = field(default=0.85, metadata=option(
        "a phase is saturated when its workers are busy this share of the time (or its queue backs up)"))
    poll_s: float = field(default=0.5, metadata=option("seconds between reads of cluster status during a step",
                                                       flag="poll"))
    json_path: str | None = field(default=None, metadata=option(
        "write every step (client latencies and worker signals) to this JSON file", flag="json"))

    def __post_init__(self):
        rates = self.rate_list()
        if not rates or any(r <= 0 for r in rates) or rates != sorted(rates):
            raise InvalidRequestError(f"rates must be positive and ascending, got {self.rates!r}", "rates")
        if self.step_s <= 0 or self.poll_s <= 0 or self.ttft_rise <= 1 or not 0 < self.busy_limit <= 1:
            raise InvalidRequestError("step and poll must be > 0, ttft-rise > 1, busy-limit in (0, 1]", "step")

    def rate_list(self) -> list[float]:
        try:
            return [float(r) for r in self.rates.split(",") if r.strip()]
        except ValueError as exc:
            raise InvalidRequestError(f"rates: {exc}", "rates") from exc

    def requests_at(self, rate: float) -> int:
        return max(4, round(rate * self.step_s))
