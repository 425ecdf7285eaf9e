"""What one rate of the sweep measured: the client's view (bench summary) and the workers' own
(phase signals from cluster status and worker metrics). Plain data, JSON both ways, so the knee and
the verdict can be checked on recorded sweeps."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field


@dataclass(frozen=True, slots=True)
class PhaseSignals:
    prefill_workers: int
    decode_workers: int
    prefill_busy: float | None  # share of the step prefill engines spent computing, mean per worker
    decode_busy: float | None  # the same for decode engines (local prefills included)
    prefill_backlog_tokens: float  # prompt tokens queued on prefill workers, mean over polls
    prefill_backlog_s: float | None  # that backlog at the prefill rate measured in the step
    decode_batch: float  # running streams per decode worker, mean over polls
    decode_queued: float  # requests waiting in decode engines (for a batch slot or KV), mean over polls
    kv_usage: float  # highest KV usage seen on a decode worker
    handoff_p95_s: float | None  # KV hand-off time on decode workers, p95 over the step
    # CPU cores each worker's process used, mean per worker (busy is wall time in steps, which on
    # shared cores includes time the kernel gave to other processes; this is what it got)
    prefill_cores: float | None = None
    decode_cores: float | None = None


@dataclass(frozen=True, slots=True)
class SweepStep:
    rate: float  # offered, requests per second
    num_requests: int
    num_ok: int
    throughput: float  # finished requests per second
    output_tps: float  # output tokens per second
    ttft_p50_s: float | None
    ttft_p95_s: float | None
    tpot_p50_s: float | None
    signals: PhaseSignals
    failures: dict[str, int] = field(default_factory=dict)  # "STATUS: message" -> requests that failed so

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict) -> "SweepStep":
        return cls(**{**data, "signals": PhaseSignals(**data["signals"])})
