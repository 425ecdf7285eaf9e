"""Entry point of the processes a parent starts: `python -m pdmesh.child`, its spec on stdin.

`pdmesh serve` starts the scheduler and every worker this way, and a tensor-parallel worker its
follower ranks: the parent writes one JSON document (`ChildSpec`) to the child's stdin, holding
the child's config whole, so no setting is re-spelled as argv and no secret shows in `ps`. A child
dies with its parent (PR_SET_PDEATHSIG), so a parent killed with SIGKILL leaves nothing behind.
"""

from __future__ import annotations

import ctypes
import json
import logging
import os
import signal
import subprocess
import sys
from dataclasses import asdict, dataclass
from typing import Any

from pdmesh import config_loader
from pdmesh.config import CpuPlacement, SchedulerConfig, WorkerConfig

PR_SET_PDEATHSIG = 1
KINDS = {"scheduler": SchedulerConfig, "worker": WorkerConfig}


@dataclass(frozen=True, slots=True)
class TPFollowerSpec:
    """Rank `rank` of the tensor-parallel group of `worker`, joining at store_host:store_port."""

    worker: WorkerConfig
    rank: int
    store_host: str
    store_port: int


def spawn(kind: str, config: Any, log_level: str = "INFO", **popen: Any) -> subprocess.Popen:
    """Start `python -m pdmesh.child` with `config` (a SchedulerConfig, WorkerConfig or
    TPFollowerSpec) and return the process."""
    proc = subprocess.Popen([sys.executable, "-m", "pdmesh.child", kind], stdin=subprocess.PIPE, **popen)
    spec = {"config": asdict(config), "log_level": log_level, "parent_pid": os.getpid()}
    proc.stdin.write(json.dumps(spec).encode())
    proc.stdin.close()
    return proc


def run_service(config: SchedulerConfig | WorkerConfig) -> None:
    """Run one service in this process until SIGTERM (used by the CLI and by `main`)."""
    if isinstance(config, WorkerConfig):
        set_openmp_env(config.cpu)
    if isinstance(config, SchedulerConfig):
        from pdmesh.rpc.server import run
        from pdmesh.scheduler.main import run_scheduler
        run(run_scheduler(config))
    else:
        from pdmesh.worker.main import run_worker
        run_worker(config)


def set_openmp_env(cpu: CpuPlacement) -> None:
    """Set the engine's OpenMP environment; it must happen before torch loads in this process."""
    if "torch" in sys.modules:
        logging.getLogger(__name__).warning("torch is loaded already: --omp-wait-policy %s has no effect here",
                                            cpu.omp_wait_policy)
    os.environ.update(cpu.openmp_env())


def _die_with_parent(parent_pid: int) -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() != parent_pid:  # the parent died before the line above
        os._exit(1)


def main(argv: list[str]) -> int:
    kind = argv[0]
    spec = json.loads(sys.stdin.read())
    _die_with_parent(spec["parent_pid"])
    logging.basicConfig(level=spec["log_level"].upper(), stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    text = json.dumps(spec["config"])
    if kind == "tp-follower":
        follower = config_loader.from_json(TPFollowerSpec, text)
        set_openmp_env(follower.worker.cpu)
        from pdmesh.worker.tp_follower import follow_group
        return follow_group(follower)
    run_service(config_loader.from_json(KINDS[kind], text))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
