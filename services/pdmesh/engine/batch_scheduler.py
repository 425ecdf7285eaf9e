"""Decides which sequences run in the next step, and owns their KV blocks.

Blocks for prompt + max_tokens are reserved when a sequence is admitted (or earlier, by a
decode worker before it asks for a prefill), so a running sequence never runs out of KV and
nothing is ever preempted. A sequence that does not fit waits, in arrival order. A sequence that
computes its prompt shares the cached blocks of its prompt's prefix (`prefix_cache`) and computes
only the rest; a finished sequence leaves its full blocks cached.
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass, field

from pdmesh.engine.block_pool import BlockPool
from pdmesh.engine.engine_config import EngineConfig
from pdmesh.engine.prefix_cache import PrefixCache
from pdmesh.engine.sequence import Sequence, SequenceStatus
from pdmesh.errors import EngineError, InvalidRequestError


@dataclass(slots=True)
class ScheduledStep:
    prefill: list[Sequence] = field(default_factory=list)  # prompts to compute this step
    imported: list[Sequence] = field(default_factory=list)  # KV computed elsewhere, to write in
    decode: list[Sequence] = field(default_factory=list)  # running sequences, one token each

    @property
    def empty(self) -> bool:
        return not (self.prefill or self.imported or self.decode)


class BatchScheduler:
    def __init__(self, pool: BlockPool, config: EngineConfig, max_model_len: int, prefix_seed: int = 0):
        self.pool = pool
        self.prefix_cache = PrefixCache(pool, prefix_seed, config.prefix_cache)
        self.config = config
        self.max_model_len = max_model_len
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.held: dict[str, Sequence] = {}  # prefill-only sequences awaiting export
        self.prefilling: list[Sequence] = []  # prompts part-way through a chunked prefill
        # request id -> (blocks reserved ahead, leading prompt tokens they hold from the prefix cache)
        self.reservations: dict[str, tuple[list[int], int]] = {}

    @property
    def num_unfinished(self) -> int:
        return len(self.waiting) + len(self.prefilling) + len(self.running)

    def reserve(self, request_id: str, num_tokens: int, prompt_ids: list[int] | None = None) -> int:
        """Reserve blocks for a request that will arrive later under the same id, sharing the cached
        blocks of its prompt's prefix. Returns the leading prompt tokens the reservation holds."""
        if request_id in self.reservations:
            raise EngineError(f"request {request_id!r} already holds a reservation")
        self.check_fits(num_tokens)
        block_ids, num_cached = self.prefix_cache.reserve(prompt_ids or [], num_tokens)
        self.reservations[request_id] = (block_ids, num_cached)
        return num_cached

    def release_reservation(self, request_id: str) -> bool:
        reservation = self.reservations.pop(request_id, None)
        if reservation is not None:
            self.pool.release(reservation[0])
        return reservation is not None

    def check_fits(self, num_tokens: int) -> None:
        """Refuse a request that could never be admitted, whatever else is running."""
        if num_tokens > self.max_model_len:
            raise InvalidRequestError(
                f"prompt + max_tokens is {num_tokens:,} tokens; max-model-len is {self.max_model_len:,}")
        need = self.pool.blocks_for_tokens(num_tokens)
        if need > self.pool.num_blocks:
            raise InvalidRequestError(
                f"request needs {need:,} KV blocks; the whole cache has {self.pool.num_blocks:,}")

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def schedule(self) -> ScheduledStep:
        """The next step: every running sequence decodes one token; prompts part-way through a
        chunked prefill take their next chunk; then waiting prompts join while the token budget and
        max_num_seqs allow. Each prefill sequence's `prefill_end` says where this step's chunk ends."""
        step = ScheduledStep(decode=list(self.running))
        chunk = self.config.prefill_chunk_tokens
        budget = min(self.config.max_num_batched_tokens, chunk or self.config.max_num_batched_tokens)
        for seq in list(self.prefilling):
            if budget <= 0:
                break
            budget -= self._plan_prefill(seq, budget, step)
        occupied = len(self.running) + len(self.prefilling)  # seats in the batch already taken
        while self.waiting and occupied < self.config.max_num_seqs:
            seq = self.waiting[0]
            computes = seq.request.kv is None
            reserved = seq.request_id in self.reservations
            hits = self.prefix_cache.lookup(seq) if computes and not reserved else []
            num_new = seq.num_prompt_tokens - len(hits) * self.pool.block_size
            if computes and chunk and budget < min(num_new, self.pool.block_size):
                break  # too little budget left this step for a useful chunk
            if computes and not chunk and step.prefill and num_new > budget:
                break  # unchunked: a long prompt runs in a step of its own
            if not self._take_blocks(seq, hits):
                break
            self.waiting.popleft()
            occupied += 1
            seq.scheduled = time.monotonic()
            if computes:
                budget -= self._plan_prefill(seq, budget if chunk else seq.num_prompt_tokens, step)
            else:
                step.imported.append(seq)
        return step

    def _plan_prefill(self, seq: Sequence, budget: int, step: ScheduledStep) -> int:
        """Put seq's next chunk (up to budget tokens) in step; it stays in `prefilling` until the
        chunk that ends its prompt. Returns the chunk's tokens."""
        num = min(seq.num_prompt_tokens - seq.num_computed_tokens, budget)
        seq.prefill_end = seq.num_computed_tokens + num
        step.prefill.append(seq)
        if seq.prefill_end < seq.num_prompt_tokens and seq not in self.prefilling:
            self.prefilling.append(seq)
        elif seq.prefill_end == seq.num_prompt_tokens and seq in self.prefilling:
            self.prefilling.remove(seq)
        return num

    def _take_blocks(self, seq: Sequence, hits: list[int]) -> bool:
        reservation = self.reservations.pop(seq.request_id, None)
        if reservation is not None:
            reserved, num_cached = reservation
            imported_from = seq.request.kv_start if seq.request.kv is not None else num_cached
            if len(reserved) < self.pool.blocks_for_tokens(seq.num_reserved_tokens) or imported_from != num_cached:
                self.pool.release(reserved)
                raise EngineError(f"request {seq.request_id!r}: its reservation ({len(reserved)} blocks, "
                                  f"{num_cached} tokens cached) does not fit it (KV from token {imported_from})")
            seq.block_ids = reserved
            seq.num_cached_tokens = seq.num_computed_tokens = num_cached
            return True
        if not self.prefix_cache.can_allocate(seq, hits):
            return False
        self.prefix_cache.allocate(seq, hits)
        return True

    def start_running(self, seq: Sequence) -> None:
        seq.status = SequenceStatus.RUNNING
        self.running.append(seq)

    def hold(self, seq: Sequence) -> None:
        seq.status = SequenceStatus.HELD
        self.held[seq.request_id] = seq

    def finish(self, seq: Sequence) -> None:
        """Remove a sequence from every queue and free its blocks (exactly once); its computed full
        blocks stay cached."""
        if seq.status is SequenceStatus.FINISHED:
            return
        if seq.status is SequenceStatus.RUNNING:
            self.running.remove(seq)
        elif seq.status is SequenceStatus.HELD:
            del self.held[seq.request_id]
        elif seq in self.prefilling:
            self.prefilling.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
        seq.status = SequenceStatus.FINISHED
        if seq.block_ids:
            self.prefix_cache.cache_computed(seq)
            self.pool.release(seq.block_ids)
            seq.block_ids = []
