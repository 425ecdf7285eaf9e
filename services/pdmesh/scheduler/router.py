"""Picks the workers for a request: the decode worker with room for its blocks, the prefill
worker with the least queued prompt tokens."""

from __future__ import annotations

from pdmesh.errors import ResourceExhaustedError, UnavailableError
from pdmesh.scheduler.registry import WorkerInfo, WorkerRegistry


def blocks_for(num_tokens: int, block_size: int) -> int:
    return -(-num_tokens // max(1, block_size))


class Assignment:
    """A request counted against its workers until their own load reports include it.

    Counted from routing until the first token: by then the decode worker holds the request's
    reservation and the prefill is done, so the next heartbeats show them.
    """

    def __init__(self, decode: WorkerInfo, prefill: WorkerInfo | None, num_prompt_tokens: int, num_tokens: int):
        self.decode, self.prefill = decode, prefill
        self.blocks = blocks_for(num_tokens, decode.load.block_size)
        self.prompt_tokens = num_prompt_tokens if prefill is not None else 0
        self.open = True
        decode.pending_requests += 1
        decode.pending_blocks += self.blocks
        if prefill is not None:
            prefill.pending_prompt_tokens += self.prompt_tokens

    def settle(self) -> None:
        if not self.open:
            return
        self.open = False
        self.decode.pending_requests -= 1
        self.decode.pending_blocks -= self.blocks
        if self.prefill is not None:
            self.prefill.pending_prompt_tokens -= self.prompt_tokens


class Router:
    def __init__(self, registry: WorkerRegistry):
        self.registry = registry

    def pick_decode(self, num_tokens: int, exclude: frozenset[str] = frozenset()) -> WorkerInfo:
        """The decode worker with the most free blocks (after what we already sent it) that fits."""
        candidates = [w for w in self.registry.routable("decode") if w.worker_id not in exclude]
        if not candidates:
            raise UnavailableError("no healthy decode worker is registered")
        fits = [w for w in candidates if free_blocks(w) >= blocks_for(num_tokens, w.load.block_size)]
        if not fits:
            best = max(free_blocks(w) for w in candidates)
            raise ResourceExhaustedError(
                f"no decode worker has room for {num_tokens:,} tokens of KV now "
                f"(most free: {best:,} blocks)", retry_after_s=1.0)
        return max(fits, key=lambda w: (free_blocks(w), -w.load.running - w.pending_requests))

    def pick_prefill(self, exclude: frozenset[str] = frozenset()) -> WorkerInfo:
        candidates = [w for w in self.registry.routable("prefill") if w.worker_id not in exclude]
        if not candidates:
            raise UnavailableError("no healthy prefill worker is registered")
        return min(candidates, key=lambda w: w.load.queued_prompt_tokens + w.pending_prompt_tokens)


def free_blocks(worker: WorkerInfo) -> int:
    return worker.load.kv_blocks_free - worker.pending_blocks
