"""The scheduler's view of its workers: who they are, their load, and whether to route to them.

A worker is routable while it heartbeats (within heartbeat_timeout_s), says it is serving, and
has not been marked down by a failed call. Between heartbeats the scheduler counts what it has
sent a worker itself (pending), so a burst does not pile onto one worker.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from pdmesh.errors import InvalidRequestError, NotFoundError


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


@dataclass(slots=True)
class WorkerInfo:
    worker_id: str
    role: str
    address: str
    tp_size: int = 1
    metrics_address: str = ""
    load: WorkerLoad = field(default_factory=WorkerLoad)
    last_heartbeat: float = field(default_factory=time.monotonic)
    down_until: float = 0.0  # routed around until then after a failed call
    pending_requests: int = 0
    pending_blocks: int = 0
    pending_prompt_tokens: int = 0

    def age(self, now: float) -> float:
        return now - self.last_heartbeat


class WorkerRegistry:
    def __init__(self, heartbeat_timeout_s: float):
        self.heartbeat_timeout_s = heartbeat_timeout_s
        self.workers: dict[str, WorkerInfo] = {}

    def register(self, worker_id: str, role: str, address: str, tp_size: int, load: WorkerLoad,
                 metrics_address: str = "") -> WorkerInfo:
        if role not in ("prefill", "decode"):
            raise InvalidRequestError(f"role must be prefill or decode, got {role!r}", "role")
        if not worker_id or not address:
            raise InvalidRequestError("worker_id and address are required", "worker_id")
        info = WorkerInfo(worker_id, role, address, tp_size or 1, metrics_address, load)
        old = self.workers.get(worker_id)
        if old is not None:  # a re-registration keeps what this scheduler has in flight there
            info.pending_requests, info.pending_blocks = old.pending_requests, old.pending_blocks
            info.pending_prompt_tokens = old.pending_prompt_tokens
        self.workers[worker_id] = info
        return info

    def heartbeat(self, worker_id: str, load: WorkerLoad) -> None:
        info = self.workers.get(worker_id)
        if info is None:
            raise NotFoundError(f"worker {worker_id!r} is not registered")
        info.load = load
        info.last_heartbeat = time.monotonic()

    def healthy(self, info: WorkerInfo, now: float | None = None) -> bool:
        now = time.monotonic() if now is None else now
        return (info.age(now) <= self.heartbeat_timeout_s and info.load.state == "serving"
                and now >= info.down_until)

    def routable(self, role: str) -> list[WorkerInfo]:
        now = time.monotonic()
        return [w for w in self.workers.values() if w.role == role and self.healthy(w, now)]

    def mark_down(self, worker_id: str, seconds: float) -> None:
        info = self.workers.get(worker_id)
        if info is not None:
            info.down_until = time.monotonic() + seconds

    def has_both_roles(self) -> bool:
        return bool(self.routable("prefill")) and bool(self.routable("decode"))
