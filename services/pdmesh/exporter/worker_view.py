"""A worker as cluster status reports it, converted from protobuf once."""

from __future__ import annotations

from dataclasses import dataclass

from pdmesh.gen.pdmesh.v1 import scheduler_pb2


@dataclass(frozen=True, slots=True)
class WorkerView:
    worker_id: str
    role: str
    healthy: bool
    running: int
    queued: int
    kv_blocks_free: int
    kv_blocks_total: int
    queued_prompt_tokens: int
    metrics_address: str
    restarts: int

    @classmethod
    def from_pb(cls, pb: scheduler_pb2.WorkerStatus) -> "WorkerView":
        return cls(pb.worker_id, pb.role, pb.healthy, pb.running, pb.queued, pb.kv_blocks_free, pb.kv_blocks_total,
                   pb.queued_prompt_tokens, pb.metrics_address, pb.restarts)

    @property
    def kv_usage_ratio(self) -> float:
        if self.kv_blocks_total <= 0:
            return 0.0
        return (self.kv_blocks_total - self.kv_blocks_free) / self.kv_blocks_total
