"""The scheduler's view of its workers: who they are, their load, and whether to route to them.

A worker is routable while it heartbeats (within heartbeat_timeout_s), says it is serving, and
has not been marked down by a failed call. Between heartbeats the scheduler counts what it has
sent a worker itself (pending), so a burst does not pile onto one worker.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

from pdmesh import metrics
from pdmesh.errors import InvalidRequestError, NotFoundError
from pdmesh.scheduler.circuit_breaker import CircuitBreaker
from pdmesh.scheduler.pairing import Pairing, check_pairing

log = logging.getLogger(__name__)


@dataclass(slots=True)
class WorkerLoad:
    running: int = 0
    queued: int = 0
    queued_prompt_tokens: int = 0
    kv_blocks_free: int = 0
    kv_blocks_total: int = 0
    block_size: int = 16
    state: str = "serving"
    requests_total: int = 0
    gpu_memory_used_bytes: int = 0
    kv_blocks_cached: int = 0
    prefix_cache_queried_tokens: int = 0
    prefix_cache_hit_tokens: int = 0
    cached_block_hashes: frozenset[int] = frozenset()  # its most recently used cached blocks


@dataclass(slots=True)
class WorkerInfo:
    worker_id: str
    role: str
    address: str
    tp_size: int = 1
    metrics_address: str = ""
    ranks: list = field(default_factory=list)  # (rank, pid, kv head ids) of its TP group
    restarts: int = 0  # times its supervisor restarted it
    pairing: Pairing = field(default_factory=Pairing)  # model, engine kind, KV layout
    device: str = "cpu"  # its engine's device (rank 0's): "cpu" or "cuda:N"
    load: WorkerLoad = field(default_factory=WorkerLoad)
    last_heartbeat: float = field(default_factory=time.monotonic)
    breaker: CircuitBreaker = field(default_factory=CircuitBreaker)
    last_ok: float = field(default_factory=time.monotonic)  # last heartbeat or successful probe
    pending_requests: int = 0
    pending_blocks: int = 0
    pending_prompt_tokens: int = 0
    awaiting_heartbeat: list = field(default_factory=list)  # Assignments started, not yet reported

    def age(self, now: float) -> float:
        return now - self.last_heartbeat


HEARTBEAT_SKEW_S = 0.005


class WorkerRegistry:
    def __init__(self, heartbeat_timeout_s: float, needs_prefill: bool = True):
        self.heartbeat_timeout_s = heartbeat_timeout_s
        self.needs_prefill = needs_prefill  # False in colocated mode: decode workers prefill every prompt
        self.workers: dict[str, WorkerInfo] = {}

    def register(self, worker_id: str, role: str, address: str, tp_size: int, load: WorkerLoad,
                 metrics_address: str = "", ranks: list | None = None, restarts: int = 0,
                 pairing: Pairing = Pairing(), device: str = "cpu") -> WorkerInfo:
        """Add or update a worker; PairingError if it cannot pair with a live worker of the other role."""
        if role not in ("prefill", "decode"):
            raise InvalidRequestError(f"role must be prefill or decode, got {role!r}", "role")
        if not worker_id or not address:
            raise InvalidRequestError("worker_id and address are required", "worker_id")
        now = time.monotonic()
        check_pairing(worker_id, role, pairing, [
            (w.worker_id, w.role, w.pairing) for w in self.workers.values()
            if w.role != role and w.worker_id != worker_id and w.age(now) <= self.heartbeat_timeout_s])
        info = self.workers.get(worker_id)
        if info is None:
            info = self.workers[worker_id] = WorkerInfo(worker_id, role, address)
        elif not info.breaker.closed:  # back after a failure (a restart, a healed link)
            metrics.WORKER_STATE_CHANGES.labels(state="up").inc()
            log.info("worker %s (%s) registered again and rejoined routing", worker_id, address)
        # Updated in place: requests in flight hold this object and settle against it.
        info.role, info.address, info.tp_size, info.metrics_address = role, address, tp_size or 1, metrics_address
        info.ranks = list(ranks or [])
        info.restarts, info.device = restarts, device
        info.pairing = pairing
        info.breaker = CircuitBreaker()  # a (re)started worker starts trusted
        self._report(info, load)
        return info

    def heartbeat(self, worker_id: str, load: WorkerLoad) -> None:
        info = self.workers.get(worker_id)
        if info is None:
            raise NotFoundError(f"worker {worker_id!r} is not registered")
        self._report(info, load)

    def _report(self, info: WorkerInfo, load: WorkerLoad) -> None:
        now = time.monotonic()
        info.load = load
        info.last_heartbeat = info.last_ok = now
        # The snapshot was taken a moment before it arrived; requests started well before now are in it.
        reported = [a for a in info.awaiting_heartbeat if a.started_at < now - HEARTBEAT_SKEW_S]
        info.awaiting_heartbeat = [a for a in info.awaiting_heartbeat if a not in reported]
        for assignment in reported:
            assignment.settle()

    def healthy(self, info: WorkerInfo, now: float | None = None) -> bool:
        now = time.monotonic() if now is None else now
        return info.age(now) <= self.heartbeat_timeout_s and info.load.state == "serving" and info.breaker.closed

    def routable(self, role: str) -> list[WorkerInfo]:
        now = time.monotonic()
        return [w for w in self.workers.values() if w.role == role and self.healthy(w, now)]

    def report_failure(self, info: WorkerInfo, why: str, hard: bool = True) -> None:
        """A failed probe or call: the worker leaves routing until a probe succeeds. A soft failure
        (a slow answer from a busy machine) counts only when it repeats."""
        now = time.monotonic()
        if info.breaker.record_failure(now, hard):
            metrics.WORKER_STATE_CHANGES.labels(state="down").inc()
            metrics.DETECTION_SECONDS.observe(now - info.last_ok)
            log.warning("worker %s (%s) left routing: %s", info.worker_id, info.address, why)

    def report_success(self, info: WorkerInfo) -> None:
        info.last_ok = time.monotonic()
        if info.breaker.record_success():
            metrics.WORKER_STATE_CHANGES.labels(state="up").inc()
            log.info("worker %s (%s) rejoined routing", info.worker_id, info.address)

    def can_serve(self) -> bool:
        """A routable decode worker, and a routable prefill worker unless the mesh is colocated."""
        return bool(self.routable("decode")) and (not self.needs_prefill or bool(self.routable("prefill")))
