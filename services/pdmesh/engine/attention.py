"""Attention over the paged KV cache for one engine step.

A step's tokens are flat: first the prompts being prefilled (each attends causally to itself),
then one token per decoding sequence (each attends to its whole context, gathered from its blocks).
The gather indices and masks are built once per step and reused by every layer.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from pdmesh.engine.kv_cache import KVCache


@dataclass(slots=True)
class AttentionBatch:
    """Where each token of a step writes its K/V and what each query attends to."""

    prefill_lens: list[int]  # prompt length of each prefilling sequence, in flat order
    write_slots: torch.Tensor  # [T] cache slot of every token
    num_decode: int = 0
    decode_len: int = 0  # longest decode context this step (L)
    decode_slots: torch.Tensor | None = None  # [B * L] slots to gather, padded
    decode_mask: torch.Tensor | None = None  # [B, 1, 1, L] True where a slot is real; None: no padding

    @staticmethod
    def build(cache: KVCache, prefill: list[tuple[list[int], int]],
              decode: list[tuple[list[int], int]]) -> "AttentionBatch":
        """prefill: (block_ids, prompt_len) per sequence; decode: (block_ids, context_len incl. the new token)."""
        write = [cache.slots(blocks, 0, n) for blocks, n in prefill]
        write += [cache.slots(blocks, n - 1, n) for blocks, n in decode]
        batch = AttentionBatch(prefill_lens=[n for _, n in prefill], write_slots=torch.cat(write))
        if decode:
            batch._add_decode(cache.block_size, decode)
        return batch

    def _add_decode(self, block_size: int, decode: list[tuple[list[int], int]]) -> None:
        lens = torch.tensor([n for _, n in decode])
        max_len = int(lens.max())
        max_blocks = -(-max_len // block_size)
        tables = torch.zeros(len(decode), max_blocks, dtype=torch.long)
        for row, (blocks, _) in enumerate(decode):
            used = blocks[:max_blocks]
            tables[row, :len(used)] = torch.tensor(used, dtype=torch.long)
        positions = torch.arange(max_len)
        slots = tables[:, positions // block_size] * block_size + positions % block_size  # [B, L]
        self.num_decode, self.decode_len = len(decode), max_len
        self.decode_slots = slots.reshape(-1)
        if bool((lens != max_len).any()):
            self.decode_mask = (positions.unsqueeze(0) < lens.unsqueeze(1))[:, None, None, :]


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kv_layer: torch.Tensor,
           batch: AttentionBatch) -> torch.Tensor:
    """q: [T, H, D]; k, v: [T, KVH, D]; kv_layer: [2, slots, KVH, D] (written in place). Returns [T, H*D]."""
    kv_layer[0].index_copy_(0, batch.write_slots, k)
    kv_layer[1].index_copy_(0, batch.write_slots, v)
    outputs = []
    start = 0
    for n in batch.prefill_lens:
        qi, ki, vi = (t[start:start + n].transpose(0, 1).unsqueeze(0) for t in (q, k, v))  # [1, heads, n, D]
        out = F.scaled_dot_product_attention(qi, ki, vi, is_causal=True, enable_gqa=True)
        outputs.append(out[0].transpose(0, 1).reshape(n, -1))
        start += n
    if batch.num_decode:
        outputs.append(_attend_decode(q[start:], kv_layer, batch))
    return outputs[0] if len(outputs) == 1 else torch.cat(outputs)


def _attend_decode(q: torch.Tensor, kv_layer: torch.Tensor, batch: AttentionBatch) -> torch.Tensor:
    b, length = batch.num_decode, batch.decode_len
    kvh, d = kv_layer.shape[-2:]
    kv = kv_layer.index_select(1, batch.decode_slots).view(2, b, length, kvh, d).transpose(2, 3)  # [2, B, KVH, L, D]
    k, v = kv[0], kv[1]
    out = F.scaled_dot_product_attention(q.unsqueeze(2), k, v, attn_mask=batch.decode_mask,
                                         enable_gqa=True)  # [B, H, 1, D]
    return out.reshape(b, -1)
