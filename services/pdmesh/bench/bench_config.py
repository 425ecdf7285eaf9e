"""Settings of `pdmesh bench` (flags, `PDMESH_<FLAG>`, `--config`, like every command)."""

from __future__ import annotations

from dataclasses import dataclass, field

from pdmesh.errors import InvalidRequestError
from pdmesh.option import option

LENGTHS = ("fixed", "uniform", "chat")
ENDPOINTS = ("completions", "chat")


@dataclass(frozen=True, slots=True)
class BenchConfig:
    target: str = field(default="127.0.0.1:50051", metadata=option(
        "what to load: HOST:PORT or grpc://HOST:PORT (pdmesh gRPC; grpcs:// for TLS), or http(s)://HOST:PORT/v1 "
        "(any OpenAI-compatible server)"))
    compare: str = field(default="", metadata=option(
        "comma-separated targets to run one after another with the same load (instead of --target); "
        "prints each one's ratio to the first"))
    model: str = field(default="", metadata=option(
        "model name for OpenAI-compatible targets (default: the first that GET /v1/models lists)"))
    endpoint: str = field(default="completions", metadata=option(
        "OpenAI endpoint: completions (prompts as token ids) or chat (prompts as words)", choices=ENDPOINTS))
    api_key: str = field(default="", metadata=option("API key sent as 'authorization: Bearer' (env PDMESH_API_KEY)"))
    tls_ca: str | None = field(default=None, metadata=option("CA certificate (PEM) to trust for grpcs:// and https://"))
    num_requests: int = field(default=100, metadata=option("requests to measure", flag="requests"))
    concurrency: int = field(default=8, metadata=option("closed loop: requests in flight at once (when --rate is 0)"))
    rate: float = field(default=0.0, metadata=option("open loop: mean arrivals per second (0: closed loop)"))
    burstiness: float = field(default=1.0, metadata=option(
        "open loop: shape of the gamma inter-arrival times (1: Poisson; below 1: burstier)"))
    lengths: str = field(default="fixed", metadata=option(
        "prompt and output lengths: fixed, uniform (--spread either way) or chat (a built-in mix of short "
        "questions, conversations, documents and code, with these means)", choices=LENGTHS))
    prompt_tokens: int = field(default=128, metadata=option("prompt length in tokens (the mean, for uniform and chat)"))
    output_tokens: int = field(default=64, metadata=option("output length in tokens (the mean, for uniform and chat)"))
    spread: float = field(default=0.5, metadata=option("uniform: lengths vary by up to this fraction either way"))
    shared_prefix: int = field(default=0, metadata=option(
        "tokens every prompt starts with (a shared system prompt; exercises prefix caching)"))
    seed: int = field(default=0, metadata=option("seed of the workload: the same seed sends the same requests"))
    temperature: float = field(default=0.0, metadata=option("sampling temperature of every request"))
    ignore_eos: bool = field(default=True, metadata=option("generate exactly the output length (ignore EOS)"))
    warmup: int = field(default=2, metadata=option("requests sent, and not counted, before the measurement"))
    timeout_s: float = field(default=300.0, metadata=option("seconds one request may take", flag="timeout"))
    slo_ttft_s: float = field(default=0.0, metadata=option(
        "goodput: a request counts only if its time to first token is at most this many seconds (0: no bound)",
        flag="slo-ttft"))
    slo_tpot_s: float = field(default=0.0, metadata=option(
        "goodput: ... and its time per output token at most this many seconds (0: no bound)", flag="slo-tpot"))
    json_path: str | None = field(default=None, metadata=option(
        "write the summary and every request's timings to this JSON file", flag="json"))
    plot_path: str | None = field(default=None, metadata=option(
        "write PNG plots (TTFT and ITL distributions, output tokens/s over time) to this file", flag="plot"))
    progress: bool = field(default=True, metadata=option("show a progress line on stderr"))

    def __post_init__(self):
        for name in ("num_requests", "concurrency", "prompt_tokens", "output_tokens"):
            if getattr(self, name) < 1:
                raise InvalidRequestError(f"{name} must be >= 1, got {getattr(self, name)}", name)
        for name in ("rate", "shared_prefix", "warmup", "slo_ttft_s", "slo_tpot_s", "temperature"):
            if getattr(self, name) < 0:
                raise InvalidRequestError(f"{name} must be >= 0, got {getattr(self, name)}", name)
        if self.burstiness <= 0 or self.timeout_s <= 0:
            raise InvalidRequestError("burstiness and timeout must be > 0", "burstiness")
        if not 0 <= self.spread < 1:
            raise InvalidRequestError(f"spread must be in [0, 1), got {self.spread}", "spread")

    def targets(self) -> list[str]:
        """The targets to run, in order: --compare's list, else --target alone."""
        listed = [t.strip() for t in self.compare.split(",") if t.strip()]
        return listed or [self.target]
