"""Content hashes of full KV blocks, chained: a block's hash covers its token ids, its parent's hash
and (through the first parent) the model. Two prompts share a block hash exactly when they share
every token up to the end of that block, on the same model.

The hashes are stable across processes and machines (blake2b, not Python's salted hash()), so the
scheduler can hash a prompt itself and match it against the hashes a worker reports.
"""

from __future__ import annotations

import hashlib
from array import array

HASH_BYTES = 8  # 64-bit hashes: they travel in heartbeats and index the cache


def model_seed(model_name: str) -> int:
    """The parent hash of a prompt's first block: keeps different models' KV apart."""
    return _digest(b"pdmesh-prefix:" + model_name.encode())


def block_hashes(token_ids: list[int], block_size: int, seed: int, known: list[int] | None = None) -> list[int]:
    """The chained hash of every full block of `token_ids`. known: hashes of the first blocks,
    computed before (extended, not recomputed)."""
    hashes = list(known or [])
    parent = hashes[-1] if hashes else seed
    for start in range(len(hashes) * block_size, len(token_ids) - block_size + 1, block_size):
        parent = _digest(parent.to_bytes(HASH_BYTES, "little")
                         + array("q", token_ids[start:start + block_size]).tobytes())
        hashes.append(parent)
    return hashes


def _digest(data: bytes) -> int:
    return int.from_bytes(hashlib.blake2b(data, digest_size=HASH_BYTES).digest(), "little")
