"""`pdmesh serve`'s own settings: how many workers of each role, and how it supervises them.

The scheduler's and the workers' settings are `SchedulerConfig` and `WorkerConfig`; serve
composes the three and gives each child its part whole.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field, replace

from pdmesh.config import CpuPlacement, SchedulerConfig, WorkerConfig
from pdmesh.engine.engine_config import EngineConfig
from pdmesh.errors import InvalidRequestError
from pdmesh.option import group, option

# Decode keeps its pace while prefill works: prefill runs at a lower OS priority (nice 10), so the
# kernel gives decode steps the cores first; when decode is idle, prefill still gets every core.
# Measured in tools/bench_mesh.py (README, "CPU placement").
DEFAULT_NICE = {"prefill": 10, "decode": 0}


@dataclass(frozen=True, slots=True)
class RolePlan:
    """The workers of one role that serve starts (flags `--prefill-*`, `--decode-*`)."""

    workers: int = field(default=1, metadata=option(
        "{role} workers to run (prefill 0: colocated mode, each decode worker prefills its own prompts)"))
    tp: int = field(default=1, metadata=option("tensor-parallel size of each {role} worker"))
    threads: int = field(default=0, metadata=option("torch threads of each {role} worker (0: all cores)"))
    nice: int | None = field(default=None, metadata=option(
        "OS priority increment of {role} workers (unset: prefill 10, decode 0)"))
    cpus: str = field(default="", metadata=option("CPU ids of each {role} worker's engine, e.g. 0-1 (empty: all)"))

    def __post_init__(self):
        if self.workers < 0 or self.tp < 1 or self.threads < 0:
            raise InvalidRequestError("workers must be >= 0, tp >= 1 and threads >= 0")
        CpuPlacement(cpus=self.cpus)  # refuses a malformed CPU list


@dataclass(frozen=True, slots=True)
class SupervisionConfig:
    """A child that exits is started again after a backoff that doubles per crash (1 s to 30 s);
    after max_crashes within crash_window_s serve gives up on that child and says so."""

    restart_backoff_s: float = field(default=1.0, metadata=option(
        "seconds before the first restart of a child that exited; doubles per crash", flag="restart-backoff"))
    restart_backoff_max_s: float = field(default=30.0, metadata=option(
        "longest restart delay, seconds", flag="restart-backoff-max"))
    max_crashes: int = field(default=5, metadata=option("crashes within --crash-window that end restarts"))
    crash_window_s: float = field(default=120.0, metadata=option(
        "seconds over which crashes are counted", flag="crash-window"))

    def __post_init__(self):
        if self.restart_backoff_s <= 0 or self.restart_backoff_max_s < self.restart_backoff_s:
            raise InvalidRequestError("restart-backoff must be > 0 and at most restart-backoff-max")
        if self.max_crashes < 1 or self.crash_window_s <= 0:
            raise InvalidRequestError("max-crashes must be >= 1 and crash-window > 0")


@dataclass(frozen=True, slots=True)
class ServeConfig:
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    worker: WorkerConfig = field(default_factory=WorkerConfig)  # the template of every worker
    prefill: RolePlan = field(default_factory=RolePlan, metadata=group("prefill-"))
    decode: RolePlan = field(default_factory=RolePlan, metadata=group("decode-"))
    supervision: SupervisionConfig = field(default_factory=SupervisionConfig, metadata=group())
    ready_timeout_s: float = field(default=600.0, metadata=option(
        "seconds to wait for every service at start", flag="ready-timeout"))
    warmup: bool = field(default=True, metadata=option("answer one warm-up request once ready"))

    def __post_init__(self):
        for role in ("prefill", "decode"):  # each worker's own config would refuse it, later
            replace(self.worker, role=role, tp=self.plan(role).tp)
        if self.decode.workers < 1:
            raise InvalidRequestError("decode-workers must be >= 1: decode workers serve every stream",
                                      "decode_workers")
        if self.scheduler.colocated and self.prefill.workers:
            raise InvalidRequestError(f"--colocated uses no prefill workers; got --prefill-workers "
                                      f"{self.prefill.workers} (set it to 0)", "prefill_workers")

    @property
    def colocated(self) -> bool:
        """No prefill workers: each decode worker prefills the prompts it serves."""
        return self.prefill.workers == 0

    def with_mode(self) -> "ServeConfig":
        """This config with the scheduler told it is colocated when serve runs no prefill workers."""
        return replace(self, scheduler=replace(self.scheduler, colocated=self.colocated))

    def scheduler_address(self) -> str:
        return self.scheduler.listen.dial(self.scheduler.listen.port)

    def plan(self, role: str) -> RolePlan:
        return self.prefill if role == "prefill" else self.decode

    def worker_config(self, role: str, index: int) -> WorkerConfig:
        """The config of worker `index` of `role`: the template, placed and named."""
        plan = self.plan(role)
        nice = DEFAULT_NICE[role] if plan.nice is None else plan.nice
        listen = replace(self.worker.listen, host=self.scheduler.listen.host, port=0, metrics_port=0,
                         advertise_address=self.scheduler.listen.advertise_address)
        return replace(self.worker, role=role, worker_id=f"{role}-{index}", engine=self._engine_share(),
                       scheduler_address=self.scheduler.internal_address(), listen=listen, tp=plan.tp,
                       cpu=replace(self.worker.cpu, threads=plan.threads or os.cpu_count() or 1, nice=nice,
                                   cpus=plan.cpus),
                       security=self.scheduler.security)


    def _engine_share(self) -> EngineConfig:
        """Every worker runs on the one --device given: on a GPU they share it, so each may use
        its share of --gpu-memory-utilization (unused on CPU)."""
        engine = self.worker.engine
        if engine.device == "cpu":
            return engine
        workers = self.prefill.workers + self.decode.workers
        return replace(engine, gpu_memory_utilization=engine.gpu_memory_utilization / workers)


# Worker flags that serve sets per child rather than taking from its own command line.
SERVE_SKIPS_WORKER_FLAGS = {"port", "metrics-port", "advertise-address", "host", "worker-id", "scheduler",
                            "threads", "nice", "tp", "cpus"}
