"""Fixed-size KV blocks: reference counts, a free list in LRU order, and the prefix-cache index.

A block holds the K and V of `block_size` consecutive tokens in every layer. A block in use has a
reference count >= 1: the sequences that read it (a full block of a cached prompt prefix may be
shared by many). A block whose count falls to 0 is free. A free block may still be *cached*: it
keeps its content hash so a later prompt with the same prefix can take it back; it is evicted
(its hash forgotten) only when it is handed out fresh. Free counts therefore include cached
blocks, and an evicted block is never in use.

Free list order: blocks with no hash first (handed out before any cached content is evicted),
then cached blocks from least to most recently released.
"""

from __future__ import annotations

from collections import OrderedDict

from pdmesh.errors import EngineError, ResourceExhaustedError


class BlockPool:
    """Owns the ids 0..num_blocks-1: their reference counts, which are free, which are cached."""

    def __init__(self, num_blocks: int, block_size: int):
        if num_blocks <= 0 or block_size <= 0:
            raise ValueError(f"need positive num_blocks and block_size, got {num_blocks}, {block_size}")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self._free: OrderedDict[int, None] = OrderedDict.fromkeys(range(num_blocks))
        self._refs = [0] * num_blocks
        self._hash_of: dict[int, int] = {}  # block id -> content hash (cached blocks only)
        self._cached: dict[int, int] = {}  # content hash -> block id

    @property
    def num_free_blocks(self) -> int:
        """Blocks no sequence uses (cached ones included: they are evicted on demand)."""
        return len(self._free)

    @property
    def num_cached_blocks(self) -> int:
        """Blocks whose content is indexed by hash, in use or not."""
        return len(self._cached)

    def cached_hashes(self) -> list[int]:
        """Hashes of every cached block, most recently released last."""
        in_use = [h for b, h in self._hash_of.items() if b not in self._free]
        return [self._hash_of[b] for b in self._free if b in self._hash_of] + in_use

    def blocks_for_tokens(self, num_tokens: int) -> int:
        """How many blocks `num_tokens` tokens occupy."""
        return -(-num_tokens // self.block_size)

    def can_reserve(self, num_tokens: int) -> bool:
        return self.blocks_for_tokens(num_tokens) <= len(self._free)

    def reserve(self, num_tokens: int) -> list[int]:
        """Take fresh blocks for `num_tokens` tokens (evicting cached ones if need be), or raise
        without taking any."""
        need = self.blocks_for_tokens(num_tokens)
        if need > len(self._free):
            raise ResourceExhaustedError(
                f"KV cache full: {num_tokens:,} tokens need {need:,} blocks; "
                f"{len(self._free):,} of {self.num_blocks:,} are free")
        block_ids = [self._free.popitem(last=False)[0] for _ in range(need)]
        for block_id in block_ids:
            self._evict(block_id)
            self._refs[block_id] = 1
        return block_ids

    def release(self, block_ids: list[int]) -> None:
        """Drop one reference to each block; releasing a free or unknown block is a bug.
        Pass a sequence's blocks in order: its later cached blocks become the first to evict."""
        for block_id in block_ids:
            if not 0 <= block_id < self.num_blocks or self._refs[block_id] == 0:
                raise EngineError(f"block {block_id} released twice or never reserved")
        for block_id in reversed(block_ids):
            self._refs[block_id] -= 1
            if self._refs[block_id] == 0:
                self._free[block_id] = None
                if block_id not in self._hash_of:
                    self._free.move_to_end(block_id, last=False)

    # -- the prefix cache --------------------------------------------------------------------

    def match(self, hashes: list[int]) -> list[int]:
        """Cached blocks holding the longest prefix of `hashes` (a chain of block hashes)."""
        block_ids = []
        for block_hash in hashes:
            block_id = self._cached.get(block_hash)
            if block_id is None:
                break
            block_ids.append(block_id)
        return block_ids

    def num_evictable(self, block_ids: list[int]) -> int:
        """How many of these blocks are free now (sharing them takes them off the free list)."""
        return sum(1 for b in block_ids if self._refs[b] == 0)

    def share(self, block_ids: list[int]) -> None:
        """Add a reference to each cached block (taking free ones off the free list)."""
        for block_id in block_ids:
            if block_id not in self._hash_of:
                raise EngineError(f"block {block_id} is not cached; only cached blocks are shared")
            if self._refs[block_id] == 0:
                del self._free[block_id]
            self._refs[block_id] += 1

    def register(self, block_id: int, block_hash: int) -> bool:
        """Index a full, in-use block's content under its hash. False (nothing changes) when the hash
        is cached already in another block, or this block is cached under a hash already."""
        if self._refs[block_id] == 0:
            raise EngineError(f"block {block_id} is free; only blocks in use are cached")
        if block_hash in self._cached or block_id in self._hash_of:
            return False
        self._cached[block_hash] = block_id
        self._hash_of[block_id] = block_hash
        return True

    def _evict(self, block_id: int) -> None:
        block_hash = self._hash_of.pop(block_id, None)
        if block_hash is not None:
            del self._cached[block_hash]
