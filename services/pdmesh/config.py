"""Settings of each service: frozen dataclasses, validated on construction. The CLI fills them."""

from __future__ import annotations

from dataclasses import dataclass, field

from pdmesh.engine.engine_config import EngineConfig
from pdmesh.errors import InvalidRequestError

ROLES = ("prefill", "decode")
ENGINES = ("pdmesh", "echo")  # echo: no model, tokens from EchoModel (load tests only)


@dataclass(frozen=True, slots=True)
class CpuPlacement:
    """Threads for the engine's math and the OS scheduling priority (nice) of the process."""

    threads: int = 0  # 0: torch's default (all cores)
    nice: int = 0

    def __post_init__(self):
        if self.threads < 0:
            raise InvalidRequestError(f"threads must be >= 0, got {self.threads}", "threads")
        if not -20 <= self.nice <= 19:
            raise InvalidRequestError(f"nice must be in [-20, 19], got {self.nice}", "nice")


@dataclass(frozen=True, slots=True)
class WorkerConfig:
    role: str
    scheduler_address: str
    model: str | None = None  # None: the default model
    host: str = "127.0.0.1"
    port: int = 0  # 0: a free port
    metrics_port: int = 0  # 0: a free port; -1: off
    worker_id: str = ""  # "": made from role, host and port
    engine: EngineConfig = field(default_factory=EngineConfig)
    engine_kind: str = "pdmesh"
    tp: int = 1  # tensor-parallel size: processes in this worker's group
    echo_step_delay_s: float = 0.0  # echo engine: seconds each step takes
    cpu: CpuPlacement = field(default_factory=CpuPlacement)
    kv_timeout_s: float = 10.0  # every wait of a KV hand-off
    held_kv_ttl_s: float = 30.0  # prefill: free a prompt's KV nobody pulled after this long
    prefill_timeout_s: float = 30.0  # decode: give up on one prefill worker after this long
    heartbeat_interval_s: float = 1.0

    def __post_init__(self):
        if self.engine_kind not in ENGINES:
            raise InvalidRequestError(f"engine must be one of {ENGINES}, got {self.engine_kind!r}", "engine")
        if self.tp < 1:
            raise InvalidRequestError(f"tp must be >= 1, got {self.tp}", "tp")
        if self.tp > 1 and self.engine_kind != "pdmesh":
            raise InvalidRequestError("tensor parallelism needs the pdmesh engine", "tp")
        if self.role not in ROLES:
            raise InvalidRequestError(f"role must be one of {ROLES}, got {self.role!r}", "role")
        for name in ("kv_timeout_s", "held_kv_ttl_s", "prefill_timeout_s", "heartbeat_interval_s"):
            if getattr(self, name) <= 0:
                raise InvalidRequestError(f"{name} must be > 0, got {getattr(self, name)}", name)


@dataclass(frozen=True, slots=True)
class SchedulerConfig:
    model: str | None = None
    host: str = "127.0.0.1"
    port: int = 50051
    metrics_port: int = 0
    max_model_len: int = 0  # 0: the model's context length
    max_prompt_tokens: int = 0  # 0: max_model_len - 1
    max_output_tokens: int = 0  # ceiling for max_tokens; 0: max_model_len - 1
    default_max_tokens: int = 256  # when a request leaves max_tokens unset (capped to fit)
    max_queued_requests: int = 1024
    max_queued_tokens: int = 4_000_000  # prompt + max_tokens of all queued requests
    tenants_file: str | None = None  # TOML: api keys -> tenants with rate limits
    local_prefill_threshold: int = 64  # prompts shorter than this prefill on the decode worker; 0: off
    heartbeat_interval_s: float = 1.0
    heartbeat_timeout_s: float = 3.0  # a worker silent this long leaves routing

    def __post_init__(self):
        for name in ("max_model_len", "max_prompt_tokens", "max_output_tokens", "max_queued_requests",
                     "max_queued_tokens"):
            if getattr(self, name) < 0:
                raise InvalidRequestError(f"{name} must be >= 0, got {getattr(self, name)}", name)
        if self.default_max_tokens < 1:
            raise InvalidRequestError(f"default_max_tokens must be >= 1, got {self.default_max_tokens}")
        if self.local_prefill_threshold < 0:
            raise InvalidRequestError("local_prefill_threshold must be >= 0", "local_prefill_threshold")
        if self.heartbeat_timeout_s <= self.heartbeat_interval_s:
            raise InvalidRequestError("heartbeat_timeout_s must exceed heartbeat_interval_s")
