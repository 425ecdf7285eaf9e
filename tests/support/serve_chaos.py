"""Helpers for failure tests through `pdmesh serve` itself: metrics by address, the scheduler's
metrics port from serve's log, killing one child of the supervised mesh, chaos table rows."""

from __future__ import annotations

import re
import time

from support.mesh import Mesh


def scheduler_metrics_address(mesh: Mesh) -> str:
    """The current scheduler's metrics address (the last one serve's log names: it may have restarted)."""
    port = re.findall(r"pdmesh scheduler serving .* metrics :(\d+)\)", mesh.log_path.read_text())[-1]
    return f"127.0.0.1:{port}"


def worker(mesh: Mesh, worker_id: str):
    return next(w for w in mesh.workers() if w.worker_id == worker_id)


def wait_until(predicate, timeout_s: float, what: str):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            value = predicate()
        except Exception:  # the scheduler may be restarting
            value = None
        if value:
            return value
        time.sleep(0.1)
    raise TimeoutError(f"{what} not reached in {timeout_s}s")


def wait_back(mesh: Mesh, worker_id: str, restarts: int, killed_at: float, timeout_s: float = 60.0) -> float:
    """Seconds from the kill (`killed_at`, monotonic) until `worker_id` is healthy again after its
    `restarts`-th restart; fails past timeout_s from the kill."""
    wait_until(lambda: (w := worker(mesh, worker_id)).healthy and w.restarts >= restarts,
               killed_at + timeout_s - time.monotonic(), f"{worker_id} back after restart {restarts}")
    return time.monotonic() - killed_at
