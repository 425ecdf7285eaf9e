"""Attention over the paged KV cache for one engine step.

A step's tokens are flat: first the prompts being prefilled (each attends causally to itself, and
to the KV of its cached prefix when the prefix cache held one), then one token per decoding
sequence (each attends to its whole context in its blocks).
A step's batch is built on the host (a tensor-parallel rank 0 broadcasts it as is), moved to the
model's device once, and reused by every layer. Decode attention either gathers each context into
a padded tensor for SDPA (the reference the others are tested against), or reads the blocks where
they lie: `paged_decode` on CPU (the default there in float32) and `flex_decode.FlexDecode` on
CUDA, which the model sets as `decode_attention` for the step.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Callable

import torch
import torch.nn.functional as F

from pdmesh.engine.kv_cache import KVCache


@dataclass(slots=True)
class AttentionBatch:
    """Where each token of a step writes its K/V and what each query attends to."""

    prefill_lens: list[int]  # tokens computed this step of each prefilling sequence, in flat order
    write_slots: torch.Tensor  # [T] cache slot of every token
    # Per prefilling sequence, its leading prompt tokens already in the cache (empty: none anywhere),
    # and the slots of those cached tokens, sequence after sequence ([sum of prefill_cached]).
    prefill_cached: list[int] = field(default_factory=list)
    prefill_context_slots: torch.Tensor | None = None
    num_decode: int = 0
    decode_len: int = 0  # longest decode context this step (L)
    decode_slots: torch.Tensor | None = None  # [B * L] slots to gather, padded
    decode_mask: torch.Tensor | None = None  # [B, 1, 1, L] True where a slot is real; None: no padding
    decode_tables: torch.Tensor | None = None  # [B, max blocks] block ids of each decoding sequence
    decode_lens: torch.Tensor | None = None  # [B] context length of each decoding sequence
    # Set by the model for one step when decode reads blocks in place: (q [B, H, D], kv_layer) -> [B, H*D].
    decode_attention: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None

    @staticmethod
    def build(cache: KVCache, prefill: list[tuple[list[int], int]],
              decode: list[tuple[list[int], int]]) -> "AttentionBatch":
        """prefill: (block_ids, cached prompt tokens, prompt_len) per sequence; decode: (block_ids,
        context_len incl. the new token)."""
        write = [cache.slots(blocks, cached, n) for blocks, cached, n in prefill]
        write += [cache.slots(blocks, n - 1, n) for blocks, n in decode]
        batch = AttentionBatch(prefill_lens=[n - cached for _, cached, n in prefill], write_slots=torch.cat(write))
        context = [cache.slots(blocks, 0, cached) for blocks, cached, _ in prefill if cached]
        if context:
            batch.prefill_cached = [cached for _, cached, _ in prefill]
            batch.prefill_context_slots = torch.cat(context)
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
        self.decode_tables, self.decode_lens = tables, lens
        if bool((lens != max_len).any()):
            self.decode_mask = (positions.unsqueeze(0) < lens.unsqueeze(1))[:, None, None, :]

    def to(self, device: torch.device) -> "AttentionBatch":
        """This batch with its tensors on `device` (itself when they are there already)."""
        if self.write_slots.device == device:
            return self
        moved = {name: getattr(self, name).to(device) for name in
                 ("write_slots", "prefill_context_slots", "decode_slots", "decode_mask", "decode_tables",
                  "decode_lens")
                 if getattr(self, name) is not None}
        return replace(self, **moved)


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kv_layer: torch.Tensor,
           batch: AttentionBatch) -> torch.Tensor:
    """q: [T, H, D]; k, v: [T, KVH, D]; kv_layer: [2, slots, KVH, D] (written in place). Returns [T, H*D]."""
    kv_layer[0].index_copy_(0, batch.write_slots, k)
    kv_layer[1].index_copy_(0, batch.write_slots, v)
    outputs = []
    start = context_start = 0
    for i, n in enumerate(batch.prefill_lens):
        qi, ki, vi = (t[start:start + n].transpose(0, 1).unsqueeze(0) for t in (q, k, v))  # [1, heads, n, D]
        cached = batch.prefill_cached[i] if batch.prefill_cached else 0
        if cached:
            slots = batch.prefill_context_slots[context_start:context_start + cached]
            out = _attend_after_prefix(qi, ki, vi, kv_layer.index_select(1, slots))
            context_start += cached
        else:
            out = F.scaled_dot_product_attention(qi, ki, vi, is_causal=True, enable_gqa=True)
        outputs.append(out[0].transpose(0, 1).reshape(n, -1))
        start += n
    if batch.num_decode:
        decode = batch.decode_attention or (lambda q_, kv_: _attend_decode(q_, kv_, batch))
        outputs.append(decode(q[start:], kv_layer))
    return outputs[0] if len(outputs) == 1 else torch.cat(outputs)


def _attend_after_prefix(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, past: torch.Tensor) -> torch.Tensor:
    """q, k, v: [1, heads, n, D] of the new tokens; past: [2, cached, KVH, D], the cached prefix's KV.
    New token i (position cached + i) attends to every cached token and to new tokens 0..i."""
    cached, n = past.shape[1], q.shape[2]
    k = torch.cat([past[0].transpose(0, 1).unsqueeze(0), k], dim=2)  # [1, KVH, cached + n, D]
    v = torch.cat([past[1].transpose(0, 1).unsqueeze(0), v], dim=2)
    mask = torch.ones(n, cached + n, dtype=torch.bool, device=q.device).tril(diagonal=cached)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)


def _attend_decode(q: torch.Tensor, kv_layer: torch.Tensor, batch: AttentionBatch) -> torch.Tensor:
    b, length = batch.num_decode, batch.decode_len
    kvh, d = kv_layer.shape[-2:]
    kv = kv_layer.index_select(1, batch.decode_slots).view(2, b, length, kvh, d).transpose(2, 3)  # [2, B, KVH, L, D]
    k, v = kv[0], kv[1]
    out = F.scaled_dot_product_attention(q.unsqueeze(2), k, v, attn_mask=batch.decode_mask,
                                         enable_gqa=True)  # [B, H, 1, D]
    return out.reshape(b, -1)
