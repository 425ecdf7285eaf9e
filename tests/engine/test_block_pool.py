"""The block pool's reference counts, free list and prefix-cache index, without a model."""

from __future__ import annotations

import pytest

from pdmesh.engine.block_pool import BlockPool
from pdmesh.engine.prefix_hash import block_hashes, model_seed
from pdmesh.errors import EngineError, ResourceExhaustedError


def test_cached_blocks_count_as_free_and_come_back_by_hash():
    pool = BlockPool(4, block_size=2)
    blocks = pool.reserve(4)
    assert pool.register(blocks[0], 111) and pool.register(blocks[1], 222)
    pool.release(blocks)
    assert pool.num_free_blocks == 4 and pool.num_cached_blocks == 2
    assert pool.match([111, 222, 333]) == blocks
    assert pool.num_evictable(blocks) == 2
    pool.share(blocks)
    assert pool.num_free_blocks == 2
    pool.share(blocks[:1])  # a second reader of the first block
    pool.release(blocks)
    assert pool.num_free_blocks == 3  # the first block is still read by one sequence
    pool.release(blocks[:1])
    assert pool.num_free_blocks == 4


def test_fresh_blocks_go_first_and_eviction_is_least_recently_released():
    pool = BlockPool(4, block_size=1)
    old, new = pool.reserve(1), pool.reserve(1)
    pool.register(old[0], 1)
    pool.register(new[0], 2)
    pool.release(old)
    pool.release(new)
    taken = pool.reserve(2)  # the two never-cached blocks first
    assert set(taken).isdisjoint(old + new) and pool.num_cached_blocks == 2
    assert pool.reserve(1) == old  # then the least recently released cached block, evicted
    assert pool.num_cached_blocks == 1 and pool.match([1]) == [] and pool.match([2]) == new


def test_a_sequence_tail_is_evicted_before_its_head():
    pool = BlockPool(3, block_size=1)
    blocks = pool.reserve(3)
    for i, block in enumerate(blocks):
        pool.register(block, 10 + i)
    pool.release(blocks)
    assert pool.reserve(1) == blocks[-1:]
    assert pool.match([10, 11, 12]) == blocks[:2]


def test_misuse_is_an_error():
    pool = BlockPool(2, block_size=2)
    blocks = pool.reserve(2)
    pool.release(blocks)
    with pytest.raises(EngineError, match="released twice"):
        pool.release(blocks)
    with pytest.raises(EngineError, match="only blocks in use"):
        pool.register(blocks[0], 5)
    with pytest.raises(EngineError, match="not cached"):
        pool.share(blocks)
    with pytest.raises(ResourceExhaustedError, match="2 of 2 are free"):
        pool.reserve(6)
    assert pool.num_free_blocks == 2


def test_one_hash_indexes_one_block():
    pool = BlockPool(2, block_size=2)
    a, b = pool.reserve(2), pool.reserve(2)
    assert pool.register(a[0], 7)
    assert not pool.register(b[0], 7)  # the same content computed twice: the first copy is the cached one
    pool.release(b)
    assert pool.num_cached_blocks == 1 and pool.match([7]) == a


def test_block_hashes_chain_over_tokens_and_model():
    seed = model_seed("m")
    tokens = list(range(10))
    hashes = block_hashes(tokens, 4, seed)
    assert len(hashes) == 2  # two full blocks; the last two tokens do not fill one
    assert block_hashes(tokens[:8], 4, seed) == hashes
    assert block_hashes(tokens, 4, seed, known=hashes[:1]) == hashes
    changed = block_hashes([99] + tokens[1:], 4, seed)
    assert changed[0] != hashes[0] and changed[1] != hashes[1]  # a change reaches every later block
    assert block_hashes(tokens, 4, model_seed("other"))[0] != hashes[0]
    assert model_seed("m") == seed  # stable: the scheduler computes the same hashes
