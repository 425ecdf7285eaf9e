"""A Cluster whose scheduler and workers each run on a host of their own (a network namespace of
a support.netns.Network, named like the service), bound to and advertising that host's address.
The test process, in the root namespace, is a client from yet another address."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from dataclasses import dataclass

from support.cluster import CLUSTER_SECRET, Cluster
from support.netns import Network


def listen_flags(address: str) -> list[str]:
    """Bind to the host's own address and tell peers to dial exactly that."""
    return ["--host", address, "--advertise-address", address]


@dataclass(kw_only=True)
class HostsCluster(Cluster):
    network: Network

    @property
    def address(self) -> str:
        return f"{self.network.address('scheduler')}:{self.scheduler_port}"

    @property
    def internal_address(self) -> str:
        return f"{self.network.address('scheduler')}:{self.internal_port}"

    def _spawn(self, name: str, *args: str, env: dict[str, str] | None = None) -> subprocess.Popen:
        log = open(self.logs / f"{name}.log", "a")
        argv = [sys.executable, "-m", "pdmesh.cli", *args, *listen_flags(self.network.address(name))]
        proc = self.network.popen(name, argv, stdout=log, stderr=subprocess.STDOUT,
                                  env={**os.environ, "PDMESH_CLUSTER_SECRET": CLUSTER_SECRET, **(env or {})})
        self.procs[name] = proc
        return proc

    def wait_idle(self, names: set[str], timeout_s: float = 30.0) -> list:
        """Until every named worker is healthy, runs nothing and has all its KV blocks free."""
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                workers = [w for w in self.workers() if w.worker_id in names]
            except Exception:  # the scheduler's link may be coming back
                workers = []
            if {w.worker_id for w in workers if _idle(w)} == names:
                return workers
            if time.monotonic() > deadline:
                raise TimeoutError(f"workers not idle after {timeout_s}s: " + "; ".join(
                    f"{w.worker_id} healthy={w.healthy} running={w.running} "
                    f"free={w.kv_blocks_free}/{w.kv_blocks_total}" for w in workers))
            time.sleep(0.2)


def _idle(worker) -> bool:
    return worker.healthy and worker.running == 0 and worker.kv_blocks_free == worker.kv_blocks_total
