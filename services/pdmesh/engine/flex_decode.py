"""Decode attention that reads each sequence's KV blocks where they lie in the pool.

The SDPA path gathers every context into a padded [B, KVH, L, D] copy in every layer; on a GPU
that copy costs twice the bytes the attention itself reads. Here FlexAttention runs over the
whole pool as one long key sequence, and a block mask built once per step from the block tables
lets the query of sequence b visit only b's blocks (the kernel skips every other block), masking
the unused tail of its last block. This is torch's PagedAttention recipe without a logical-to-
physical conversion: the mask is written in physical block ids directly.

The batch is padded to max_num_seqs rows (empty rows visit no block and come out zero), and every
mask buffer has a fixed shape and is refilled in place, so the compiled kernel is built once per
pool size, never per step.
"""

from __future__ import annotations

import math

import torch

from pdmesh.errors import InvalidRequestError

Q_BLOCK = 128  # FlexAttention's default query tile; a decode query is one row of it
MAX_KV_TILE = 64


def flex_available() -> bool:
    try:
        from torch.nn.attention.flex_attention import BlockMask, flex_attention  # noqa: F401
    except ImportError:
        return False
    return True


def decode_backend_for(name: str, device: torch.device, dtype: str = "float32") -> str:
    """`--attention-backend`: auto is flex on CUDA (where it compiles to one fused kernel) when
    torch has it; on CPU in float32 the paged C++ kernel when it builds (`paged_decode`); else sdpa.
    paged asked for elsewhere than CPU float32 is refused."""
    from pdmesh.engine.paged_decode import paged_available

    if name == "paged" and (device.type != "cpu" or dtype != "float32"):
        raise InvalidRequestError(f"attention_backend paged runs on CPU in float32; this engine is on "
                                  f"{device.type} in {dtype}", "attention_backend")
    if name != "auto":
        return name
    if device.type == "cuda":
        return "flex" if flex_available() else "sdpa"
    return "paged" if dtype == "float32" and paged_available() else "sdpa"


class FlexDecode:
    """One step's decode attention for a pool of num_blocks blocks of block_size slots.

    compiled=False runs FlexAttention's eager reference (it materializes the scores over the
    whole pool: tests only); on CUDA it is compiled once, on first use.
    """

    def __init__(self, num_blocks: int, block_size: int, max_rows: int, device: torch.device, compiled: bool):
        from torch.nn.attention.flex_attention import flex_attention

        self.num_blocks, self.block_size, self.rows = num_blocks, block_size, max_rows
        i32 = dict(dtype=torch.int32, device=device)
        self.kv_num_blocks = torch.zeros(max_rows, 1, 1, **i32)  # blocks each row visits
        self.kv_indices = torch.zeros(max_rows, 1, 1, num_blocks, **i32)  # which, in order
        self.owner = torch.full((num_blocks,), -1, **i32)  # row that owns each block this step
        self.block_pos = torch.zeros(num_blocks, **i32)  # index of the block in its sequence
        self.lens = torch.zeros(max_rows, **i32)  # context length of each row
        self._flex = torch.compile(flex_attention, dynamic=False) if compiled else flex_attention
        # The kernel's KV tile must divide the mask's block (one KV block, 16 slots by default);
        # its own configs start at 32-128 and would all be refused.
        self._kernel_options = {"BLOCK_N": math.gcd(block_size, MAX_KV_TILE)}
        owner, block_pos, lens = self.owner, self.block_pos, self.lens

        def mask_mod(b, h, q_idx, kv_idx):
            # The block list already limits each row to its own blocks; the owner test keeps the
            # eager reference (which ignores the block list) exact as well.
            block = kv_idx // block_size
            position = block_pos[block] * block_size + kv_idx % block_size
            return (owner[block] == b) & (position < lens[b])

        self._mask_mod = mask_mod

    def block_mask(self, tables: torch.Tensor, lens: torch.Tensor):
        """tables: [B, max blocks] block ids (padded anyhow), lens: [B] context lengths; both on
        the pool's device. Refills the mask buffers and returns this step's BlockMask."""
        from torch.nn.attention.flex_attention import BlockMask

        b, width = tables.shape
        if b > self.rows:
            raise ValueError(f"decode batch of {b} rows exceeds the {self.rows} the mask was sized for")
        counts = (lens + self.block_size - 1) // self.block_size  # [B]
        index = torch.arange(width, device=tables.device)
        used = index.unsqueeze(0) < counts.unsqueeze(1)  # [B, width]
        self.kv_num_blocks.zero_()
        self.kv_num_blocks[:b, 0, 0] = counts.to(torch.int32)
        self.kv_indices[:b, 0, 0, :width] = tables.to(torch.int32)
        blocks = tables[used]
        self.owner.fill_(-1)
        self.owner[blocks] = torch.arange(b, device=tables.device).unsqueeze(1).expand(b, width)[used].to(torch.int32)
        self.block_pos[blocks] = index.unsqueeze(0).expand(b, width)[used].to(torch.int32)
        self.lens.zero_()
        self.lens[:b] = lens.to(torch.int32)
        return BlockMask.from_kv_blocks(self.kv_num_blocks, self.kv_indices, BLOCK_SIZE=(Q_BLOCK, self.block_size),
                                        mask_mod=self._mask_mod, seq_lengths=(1, self.num_blocks * self.block_size),
                                        compute_q_blocks=False)

    def attend(self, q: torch.Tensor, kv_layer: torch.Tensor, mask) -> torch.Tensor:
        """q: [B, H, D]; kv_layer: [2, slots, KVH, D]. Returns [B, H*D]."""
        b, h, d = q.shape
        rows = q.new_zeros(self.rows, h, 1, d)
        rows[:b, :, 0] = q
        k, v = (kv_layer[i].permute(1, 0, 2).unsqueeze(0) for i in (0, 1))  # [1, KVH, slots, D], no copy
        out = self._flex(rows, k, v, block_mask=mask, enable_gqa=True,
                         kernel_options=self._kernel_options)  # [rows, H, 1, D]
        return out[:b, :, 0].reshape(b, h * d)
