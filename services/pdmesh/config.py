"""Settings of each service: layered frozen dataclasses, validated on construction.

`SchedulerConfig` and `WorkerConfig` are what one service process needs; `ServeConfig` composes
them for `pdmesh serve`, which hands each child its config whole (`config_loader.to_json`).
Fields with `option(...)` metadata are the flags; `config_loader` reads them from the command
line, `PDMESH_<FLAG>` and `--config FILE`.
"""

from __future__ import annotations

import socket
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Mapping

from pdmesh import faults
from pdmesh.engine.engine_config import MAX_MODEL_LEN_OPTION, EngineConfig
from pdmesh.errors import InvalidRequestError
from pdmesh.option import group, option

ROLES = ("prefill", "decode")
ENGINES = ("pdmesh", "echo", "vllm")  # echo: no model, tokens from EchoModel (load tests only)
WILDCARD_HOSTS = ("0.0.0.0", "::", "")
SECRET_ENV = "PDMESH_CLUSTER_SECRET"
DEFAULT_HTTP_PORT = 8000  # the OpenAI-compatible API's usual port (vLLM, SGLang)
COLOCATED_THRESHOLD = 2**62  # longer than any prompt: the decode worker prefills them all
MODEL_OPTION = option("GGUF file or Hugging Face folder (default: SmolLM2-135M-Instruct)")
OTLP_OPTION = option("host:port of an OTLP/gRPC collector: export trace spans there (unset: tracing off)")


@dataclass(frozen=True, slots=True)
class Listen:
    """Where a service binds, and what its peers dial (which differ behind NAT, in containers,
    or when binding every interface)."""

    host: str = field(default="127.0.0.1", metadata=option("address to bind (0.0.0.0: every interface)"))
    port: int = field(default=0, metadata=option("gRPC port (0: a free one)"))
    advertise_address: str = field(default="", metadata=option(
        "host name or address peers dial to reach this service (default: the bind address, or this "
        "host's name when binding every interface)"))
    metrics_port: int = field(default=0, metadata=option("Prometheus port (0: a free one, -1: off)"))

    def __post_init__(self):
        for name in ("port", "metrics_port"):
            if not -1 <= getattr(self, name) <= 65535:
                raise InvalidRequestError(f"{name} must be in [-1, 65535], got {getattr(self, name)}", name)

    def advertised_host(self) -> str:
        if self.advertise_address:
            return self.advertise_address
        if self.host in WILDCARD_HOSTS:
            return socket.getfqdn()
        return self.host

    def dial(self, port: int) -> str:
        """host:port that peers use to reach `port` of this service."""
        host = self.advertised_host()
        return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


@dataclass(frozen=True, slots=True)
class Security:
    """How the mesh's own processes authenticate each other on internal ports (every internal
    RPC, always): mutual TLS when `tls_dir` holds certificates, else the cluster secret."""

    cluster_secret_file: str | None = field(default=None, metadata=option(
        "file holding the cluster secret that internal RPCs carry (or env PDMESH_CLUSTER_SECRET; "
        "pdmesh serve makes one when neither is given)"))
    tls_dir: str | None = field(default=None, metadata=option(
        "folder with ca.pem and this role's <role>.pem/<role>-key.pem (pdmesh certs DIR): mutual TLS "
        "on internal ports"))
    cluster_secret: str = ""  # read from the file or the environment; never a flag (ps would show it)

    def with_secret(self, env: Mapping[str, str]) -> "Security":
        """This config with the secret read from cluster_secret_file or PDMESH_CLUSTER_SECRET."""
        if self.cluster_secret:
            return self
        secret = env.get(SECRET_ENV, "")
        if self.cluster_secret_file:
            try:
                secret = Path(self.cluster_secret_file).read_text().strip()
            except OSError as exc:
                raise InvalidRequestError(f"cannot read cluster secret file: {exc}", "cluster_secret_file") from exc
            if not secret:
                raise InvalidRequestError(f"cluster secret file {self.cluster_secret_file} is empty",
                                          "cluster_secret_file")
        return replace(self, cluster_secret=secret)

    def require(self) -> None:
        """Internal ports are never open: refuse to start without a credential."""
        if not self.cluster_secret and not self.tls_dir:
            raise InvalidRequestError(
                "internal RPCs need a credential: --cluster-secret-file, PDMESH_CLUSTER_SECRET or --tls-dir "
                "(pdmesh serve makes a secret for its own children)", "cluster_secret_file")


# OpenMP threads that spin between ops hold both cores of a small machine while the scheduler,
# the prefill worker and gRPC wait for them: the mesh decoded 16 streams 1.3-1.4x faster with passive waits
# (tools/profile_mesh.py, README "Where the time goes").
OMP_WAIT_POLICIES = ("passive", "active")


@dataclass(frozen=True, slots=True)
class CpuPlacement:
    """Threads for the engine's math, the CPUs it computes on, and the OS scheduling priority (nice)."""

    threads: int = field(default=0, metadata=option("torch threads of the whole worker (0: all cores)"))
    nice: int = field(default=0, metadata=option("OS scheduling priority increment"))
    cpus: str = field(default="", metadata=option(
        "CPU ids the engine computes on, e.g. 0-1 or 1 (empty: every core); vLLM pins its OpenMP threads there"))
    omp_wait_policy: str = field(default="passive", metadata=option(
        "how the engine's OpenMP threads wait between ops: passive (sleep, leaving the cores to the mesh's "
        "other processes) or active (spin)", choices=OMP_WAIT_POLICIES))

    def __post_init__(self):
        self.cpu_ids()  # refuses a malformed list now, not in the worker
        if self.omp_wait_policy not in OMP_WAIT_POLICIES:
            raise InvalidRequestError(f"omp-wait-policy must be one of {', '.join(OMP_WAIT_POLICIES)}, "
                                      f"got {self.omp_wait_policy!r}", "omp_wait_policy")
        if self.threads < 0:
            raise InvalidRequestError(f"threads must be >= 0, got {self.threads}", "threads")
        if not -20 <= self.nice <= 19:
            raise InvalidRequestError(f"nice must be in [-20, 19], got {self.nice}", "nice")

    def openmp_env(self) -> dict[str, str]:
        """Environment for the engine's OpenMP runtime; it reads it once, when torch loads."""
        return {"OMP_WAIT_POLICY": self.omp_wait_policy.upper()}

    def cpu_ids(self) -> tuple[int, ...]:
        """The CPU ids `cpus` names ("0-2,5" -> 0, 1, 2, 5); empty when it names none."""
        ids: list[int] = []
        try:
            for part in filter(None, (p.strip() for p in self.cpus.split(","))):
                first, _, last = part.partition("-")
                ids += range(int(first), int(last or first) + 1)
        except ValueError:
            raise InvalidRequestError(f"cpus must look like 0-3 or 0,2, got {self.cpus!r}", "cpus") from None
        return tuple(sorted(set(ids)))


@dataclass(frozen=True, slots=True)
class WorkerConfig:
    role: str = "decode"  # set by the command (pdmesh prefill | decode)
    scheduler_address: str = field(default="127.0.0.1:50051", metadata=option(
        "host:port of the scheduler to register with", flag="scheduler"))
    model: str | None = field(default=None, metadata=MODEL_OPTION)
    listen: Listen = field(default_factory=Listen, metadata=group())
    worker_id: str = field(default="", metadata=option("unique id (default: made from role and address)"))
    engine: EngineConfig = field(default_factory=EngineConfig, metadata=group())
    engine_kind: str = field(default="pdmesh", metadata=option(
        "engine to run (vllm: vLLM in-process, the vllm extra; echo: tokens without a model, for load tests only)",
        flag="engine", choices=ENGINES))
    echo_step_ms: float = field(default=0.0, metadata=option("echo engine: milliseconds each step takes"))
    tp: int = field(default=1, metadata=option("tensor-parallel size: processes in this worker's group"))
    cpu: CpuPlacement = field(default_factory=CpuPlacement, metadata=group())
    kv_timeout_s: float = field(default=10.0, metadata=option(
        "seconds any wait of a KV hand-off may take", flag="kv-timeout"))
    held_kv_ttl_s: float = field(default=30.0, metadata=option(
        "prefill: free a prompt's KV nobody pulled after this many seconds (vllm: the NIXL lease)",
        flag="held-kv-ttl"))
    kv_side_channel_port: int = field(default=0, metadata=option(
        "vllm: port of this worker's NIXL side channel (0: a free one)"))
    prefill_timeout_s: float = field(default=30.0, metadata=option(
        "decode: seconds to wait for one prefill worker before trying the next", flag="prefill-timeout"))
    faults: str = field(default="", metadata=option(
        "fault injection for tests and drills, e.g. kv_corrupt=0.5,kv_delay_ms=3000 (off unless set; "
        "README, Failure handling)"))
    heartbeat_interval_s: float = 1.0  # until the scheduler says otherwise at registration
    security: Security = field(default_factory=Security, metadata=group())
    otlp_endpoint: str = field(default="", metadata=OTLP_OPTION)
    restarts: int = 0  # times a supervisor restarted this worker (reported in cluster status)

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
        if not 0 <= self.kv_side_channel_port <= 65535:
            raise InvalidRequestError(f"kv_side_channel_port must be in [0, 65535], got {self.kv_side_channel_port}",
                                      "kv_side_channel_port")
        if self.echo_step_ms < 0:
            raise InvalidRequestError(f"echo_step_ms must be >= 0, got {self.echo_step_ms}", "echo_step_ms")
        faults.parse(self.faults)  # a bad spec stops the worker at start


@dataclass(frozen=True, slots=True)
class SchedulerConfig:
    model: str | None = field(default=None, metadata=MODEL_OPTION)
    listen: Listen = field(default_factory=lambda: Listen(port=50051), metadata=group())
    max_model_len: int = field(default=0, metadata=MAX_MODEL_LEN_OPTION)
    max_prompt_tokens: int = field(default=0, metadata=option("longest prompt (0: max-model-len - 1)"))
    max_output_tokens: int = field(default=0, metadata=option("ceiling for max_tokens (0: max-model-len - 1)"))
    default_max_tokens: int = field(default=256, metadata=option("max_tokens when a request sets none"))
    max_queued_requests: int = field(default=1024, metadata=option("admission queue bound, requests"))
    max_queued_tokens: int = field(default=4_000_000, metadata=option(
        "admission queue bound, prompt + max_tokens summed"))
    tenants_file: str | None = field(default=None, metadata=option(
        "TOML file of tenants: API keys and rate limits"))
    local_prefill_threshold: int = field(default=64, metadata=option(
        "prompts shorter than this are prefilled on the decode worker (0: never; 64 measured best on CPU)"))
    colocated: bool = field(default=False, metadata=option(
        "colocated mode: the decode worker that serves a prompt prefills it too, whatever its length; no prefill "
        "workers are used or needed (pdmesh serve --prefill-workers 0 sets it)"))
    heartbeat_interval_s: float = field(default=1.0, metadata=option(
        "seconds between a worker's heartbeats", flag="heartbeat-interval"))
    heartbeat_timeout_s: float = field(default=3.0, metadata=option(
        "a worker silent this many seconds leaves routing", flag="heartbeat-timeout"))
    internal_port: int = field(default=50052, metadata=option(
        "port of the internal face (worker membership), for workers' --scheduler (0: a free one)"))
    http_port: int = field(default=DEFAULT_HTTP_PORT, metadata=option(
        "port of the OpenAI-compatible HTTP API beside the gRPC client port, same TLS and tenants "
        "(0: a free one, -1: off)"))
    security: Security = field(default_factory=Security, metadata=group())
    tls_cert: str | None = field(default=None, metadata=option("PEM certificate for TLS on the client port"))
    tls_key: str | None = field(default=None, metadata=option("PEM private key for TLS on the client port"))
    max_stop_strings: int = field(default=16, metadata=option("most stop strings one request may carry"))
    max_stop_string_chars: int = field(default=256, metadata=option("longest stop string, in characters"))
    max_request_bytes: int = field(default=4 * 2**20, metadata=option(
        "largest request message the client port accepts, bytes (larger: RESOURCE_EXHAUSTED)"))
    max_streams_per_connection: int = field(default=256, metadata=option(
        "concurrent calls one client connection may open (HTTP/2 max_concurrent_streams)"))
    otlp_endpoint: str = field(default="", metadata=OTLP_OPTION)
    client_stall_timeout_s: float = field(default=30.0, metadata=option(
        "a client that reads nothing of its stream for this many seconds is cancelled (its KV freed)",
        flag="client-stall-timeout"))
    restarts: int = 0  # times a supervisor restarted the scheduler

    def __post_init__(self):
        for name in ("max_model_len", "max_prompt_tokens", "max_output_tokens", "max_queued_requests",
                     "max_queued_tokens"):
            if getattr(self, name) < 0:
                raise InvalidRequestError(f"{name} must be >= 0, got {getattr(self, name)}", name)
        if self.default_max_tokens < 1:
            raise InvalidRequestError(f"default_max_tokens must be >= 1, got {self.default_max_tokens}")
        if self.local_prefill_threshold < 0:
            raise InvalidRequestError("local_prefill_threshold must be >= 0", "local_prefill_threshold")
        if not -1 <= self.http_port <= 65535:
            raise InvalidRequestError(f"http_port must be in [-1, 65535], got {self.http_port}", "http_port")
        if self.heartbeat_timeout_s <= self.heartbeat_interval_s:
            raise InvalidRequestError("heartbeat_timeout_s must exceed heartbeat_interval_s")
        for name in ("max_stop_strings", "max_stop_string_chars", "max_request_bytes", "max_streams_per_connection"):
            if getattr(self, name) < 1:
                raise InvalidRequestError(f"{name} must be >= 1, got {getattr(self, name)}", name)
        if bool(self.tls_cert) != bool(self.tls_key):
            raise InvalidRequestError("--tls-cert and --tls-key go together", "tls_cert")

    def prefill_threshold(self) -> int:
        """Prompts shorter than this are prefilled on their decode worker: every prompt when colocated."""
        return COLOCATED_THRESHOLD if self.colocated else self.local_prefill_threshold

    def internal_address(self) -> str:
        """What workers dial for membership (their --scheduler)."""
        return self.listen.dial(self.internal_port)
