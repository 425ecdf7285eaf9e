"""The prefix cache: which full blocks of a prompt are cached already, sharing them with a new
sequence, and indexing a sequence's computed full blocks so later prompts can share them.

A prompt always keeps at least one token to compute: its logits give the first output token. So a
prompt of exactly k full blocks shares at most k - 1 of them.
"""

from __future__ import annotations

from pdmesh.engine.block_pool import BlockPool
from pdmesh.engine.prefix_hash import block_hashes
from pdmesh.engine.sequence import Sequence
from pdmesh.errors import ResourceExhaustedError


class PrefixCache:
    """enabled=False (--no-prefix-cache): nothing is looked up or indexed; blocks are still
    allocated through here, so both modes share one admission path."""

    def __init__(self, pool: BlockPool, seed: int, enabled: bool = True):
        self.pool = pool
        self.seed = seed
        self.enabled = enabled
        self.num_queried_tokens = 0  # prompt tokens looked up (sequences admitted to compute)
        self.num_hit_tokens = 0  # of those, tokens whose KV came from the cache

    def lookup(self, seq: Sequence) -> list[int]:
        """The cached blocks holding the longest prefix of seq's prompt (never its last token)."""
        if not self.enabled:
            return []
        limit = (seq.num_prompt_tokens - 1) // self.pool.block_size
        self._hash(seq, limit * self.pool.block_size)
        return self.pool.match(seq.block_hashes[:limit])

    def can_allocate(self, seq: Sequence, hits: list[int]) -> bool:
        """Whether seq's blocks fit: shared hits count once, and a free hit stops being free."""
        fresh = self.pool.blocks_for_tokens(seq.num_reserved_tokens) - len(hits)
        return fresh + self.pool.num_evictable(hits) <= self.pool.num_free_blocks

    def allocate(self, seq: Sequence, hits: list[int]) -> None:
        """Give seq the shared hits, then fresh blocks for the rest of prompt + max_tokens. Call
        can_allocate first; counts the lookup in the hit statistics."""
        seq.block_ids = self._take(hits, seq.num_reserved_tokens, seq.num_prompt_tokens)
        seq.num_cached_tokens = seq.num_computed_tokens = len(hits) * self.pool.block_size

    def reserve(self, prompt_ids: list[int], num_tokens: int) -> tuple[list[int], int]:
        """Blocks for a request whose KV comes later from elsewhere: the cached blocks of its prompt's
        prefix, shared, then fresh ones up to num_tokens. Returns (blocks, leading prompt tokens they
        hold already); raises ResourceExhaustedError without taking any."""
        hits = []
        if self.enabled and prompt_ids:
            usable = (len(prompt_ids) - 1) // self.pool.block_size * self.pool.block_size
            hits = self.pool.match(block_hashes(prompt_ids[:usable], self.pool.block_size, self.seed))
        need = self.pool.blocks_for_tokens(num_tokens) - len(hits) + self.pool.num_evictable(hits)
        if need > self.pool.num_free_blocks:
            raise ResourceExhaustedError(
                f"KV cache full: {num_tokens:,} tokens need {need:,} more blocks; "
                f"{self.pool.num_free_blocks:,} of {self.pool.num_blocks:,} are free")
        return self._take(hits, num_tokens, len(prompt_ids)), len(hits) * self.pool.block_size

    def _take(self, hits: list[int], num_tokens: int, num_prompt_tokens: int) -> list[int]:
        self.pool.share(hits)  # before reserving, so the fresh blocks never evict a hit
        num_cached = len(hits) * self.pool.block_size
        if self.enabled:
            self.num_queried_tokens += num_prompt_tokens
            self.num_hit_tokens += num_cached
        return hits + self.pool.reserve(num_tokens - num_cached)

    def cache_computed(self, seq: Sequence) -> None:
        """Index every full block of seq whose KV is computed (a block cached already stays as is)."""
        if not self.enabled:
            return
        num_full = seq.num_computed_tokens // self.pool.block_size
        self._hash(seq, num_full * self.pool.block_size)
        for block_id, block_hash in zip(seq.block_ids[:num_full], seq.block_hashes[:num_full]):
            self.pool.register(block_id, block_hash)

    def _hash(self, seq: Sequence, num_tokens: int) -> None:
        if len(seq.block_hashes) < num_tokens // self.pool.block_size:
            seq.block_hashes = block_hashes(seq.token_ids[:num_tokens], self.pool.block_size, self.seed,
                                            seq.block_hashes)
