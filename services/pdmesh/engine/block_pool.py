"""Fixed-size KV blocks: a free list with exact counts.

A block holds the K and V of `block_size` consecutive tokens of one sequence in every layer.
Blocks are handed out whole and returned whole; the pool never shares a block between
sequences (no prefix caching yet), so a block is either free or owned by one sequence.
"""

from __future__ import annotations

from collections import deque

from pdmesh.errors import EngineError, ResourceExhaustedError


class BlockPool:
    """Owns the ids 0..num_blocks-1 and which of them are free."""

    def __init__(self, num_blocks: int, block_size: int):
        if num_blocks <= 0 or block_size <= 0:
            raise ValueError(f"need positive num_blocks and block_size, got {num_blocks}, {block_size}")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self._free: deque[int] = deque(range(num_blocks))
        self._used: set[int] = set()

    @property
    def num_free_blocks(self) -> int:
        return len(self._free)

    def blocks_for_tokens(self, num_tokens: int) -> int:
        """How many blocks `num_tokens` tokens occupy."""
        return -(-num_tokens // self.block_size)

    def can_reserve(self, num_tokens: int) -> bool:
        return self.blocks_for_tokens(num_tokens) <= len(self._free)

    def reserve(self, num_tokens: int) -> list[int]:
        """Take the blocks for `num_tokens` tokens, or raise without taking any."""
        need = self.blocks_for_tokens(num_tokens)
        if need > len(self._free):
            raise ResourceExhaustedError(
                f"KV cache full: {num_tokens:,} tokens need {need:,} blocks; "
                f"{len(self._free):,} of {self.num_blocks:,} are free")
        block_ids = [self._free.popleft() for _ in range(need)]
        self._used.update(block_ids)
        return block_ids

    def release(self, block_ids: list[int]) -> None:
        """Return blocks to the free list; releasing a free or unknown block is a bug."""
        for block_id in block_ids:
            if block_id not in self._used:
                raise EngineError(f"block {block_id} released twice or never reserved")
            self._used.remove(block_id)
            self._free.append(block_id)
