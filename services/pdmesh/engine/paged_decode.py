"""Decode attention on CPU that reads each sequence's KV blocks where they lie in the pool.

The SDPA path gathers every context into a padded [B, KVH, L, D] copy in every layer
(`index_select`), then attends over the copy: from batch 16 on, the gather and the attention take
a third of a decode step here (`tools/profile_step.py`). This C++ kernel (csrc/paged_decode.cpp)
walks the block tables instead: per (sequence, KV head) it scores the query heads that share that
KV head against each key row once, softmaxes, and sums the value rows, with torch's own thread pool.
Head sizes that are a multiple of 8 (64 in SmolLM2) run on 8-float vectors with a vector exp.

It is built with pdmesh's other CPU kernels (`cpu_kernels.py`); when they cannot be built the
engine keeps the SDPA path. float32 only.
"""

from __future__ import annotations

import math

import torch

from pdmesh.engine import cpu_kernels


def paged_available() -> bool:
    return cpu_kernels.available()


def paged_attend(q: torch.Tensor, kv_layer: torch.Tensor, tables: torch.Tensor, lens: torch.Tensor,
                 block_size: int) -> torch.Tensor:
    """q: [B, H, D]; kv_layer: [2, slots, KVH, D]; tables: [B, max blocks]; lens: [B]. Returns [B, H*D]."""
    with cpu_kernels.profiled("pdmesh::paged_decode"):  # named in profiles (tools/profile_step.py)
        return cpu_kernels.load().paged_decode(q, kv_layer, tables, lens, block_size, 1.0 / math.sqrt(q.shape[-1]))
