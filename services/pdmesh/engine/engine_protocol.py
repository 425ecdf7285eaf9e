"""The one interface a worker uses to drive any engine (pdmesh's own, vLLM): plain dataclasses
in and out, no engine insides. A worker never reaches past these methods.

    engine.validate(prompt_ids, max_tokens)        # refuse what can never run (caps, context)
    cached = engine.reserve(request_id, num_tokens, prompt_ids)  # decode: blocks for prompt + max_tokens,
                                                   # sharing cached prefix blocks; tokens held already
    async for out in engine.generate(request):     # stream outputs; leaving early aborts
    out = await engine.prefill(request)            # prefill only; KV held until exported/released
    kv = engine.export_kv(request_id, start)       # [layers, 2, tokens - start, kv heads, head dim]
    engine.release_held(request_id) / release_reservation(request_id) / abort(request_id)
    engine.load() -> EngineLoad                     # for heartbeats and admission
    engine.fingerprint() -> KVFingerprint           # who may hand KV to whom
    engine.device                                   # where its KV lives (torch.device; rank 0's)
    engine.run_here() / stop() / close()            # the step loop on the caller's thread
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import AsyncIterator, Protocol

import torch

from pdmesh.engine.kv_cache import KVLayout
from pdmesh.engine.sequence import EngineOutput, EngineRequest


@dataclass(frozen=True, slots=True)
class EngineLoad:
    """What an engine reports on every heartbeat."""

    running: int
    waiting: int
    free_blocks: int
    total_blocks: int
    block_size: int
    gpu_memory_used_bytes: int = 0  # what the engine holds on its GPU (rank 0); 0 on CPU
    busy_seconds: float = 0.0  # time spent in engine steps since start (its rate: the share of time busy)
    cached_blocks: int = 0  # blocks the prefix cache indexes (in use or free)
    prefix_queried_tokens: int = 0  # prompt tokens looked up in the prefix cache, since start
    prefix_hit_tokens: int = 0  # of those, tokens found there
    # The most recently used cached block hashes (bounded): what the scheduler routes by.
    cached_block_hashes: tuple[int, ...] = ()


@dataclass(frozen=True, slots=True)
class KVFingerprint:
    """What two engines must share for one to take the other's KV: the engine kind (pdmesh and
    vLLM lay KV out differently), the model, and the KV layout (layers, heads, head dim, dtype)."""

    engine_kind: str
    model: str
    layout: KVLayout

    def mismatch(self, other: "KVFingerprint") -> str | None:
        """Why `other`'s KV cannot come here (naming both sides), or None."""
        if self.engine_kind != other.engine_kind:
            return f"engine kind is {other.engine_kind} there, {self.engine_kind} here"
        if self.model != other.model:
            return f"model is {other.model} there, {self.model} here"
        return self.layout.mismatch(other.layout)


class Engine(Protocol):
    kind: str  # "pdmesh", "echo", "vllm"
    model_name: str
    layout: KVLayout
    device: torch.device  # where its KV lives (a tensor-parallel group: rank 0's)
    follower_pids: tuple[int, ...]  # the other ranks of a tensor-parallel group

    def generate(self, request: EngineRequest) -> AsyncIterator[EngineOutput]: ...
    async def prefill(self, request: EngineRequest) -> EngineOutput: ...
    def abort(self, request_id: str) -> None: ...
    def validate(self, prompt_ids: list[int], max_tokens: int) -> None: ...
    def reserve(self, request_id: str, num_tokens: int, prompt_ids: list[int] | None = None) -> int: ...
    def release_reservation(self, request_id: str) -> bool: ...
    def export_kv(self, request_id: str, start: int = 0) -> torch.Tensor: ...
    def release_held(self, request_id: str) -> int: ...
    def load(self) -> EngineLoad: ...
    def has_work(self) -> bool: ...
    def fingerprint(self) -> KVFingerprint: ...
    def run_here(self) -> None: ...
    def stop(self) -> None: ...
    def close(self) -> None: ...
