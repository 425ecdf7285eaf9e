"""Llama-family decoder (Llama 2/3, SmolLM, Qwen2, Mistral) over a flat batch of tokens.

Weights arrive in Hugging Face names and layout. q/k/v and gate/up are fused into one matrix
each, so a layer runs three large GEMMs instead of seven. Under tensor parallelism the caller
passes this rank's shards (column-parallel q/k/v/gate/up, row-parallel o/down) and an all-reduce.
The model runs on the device its weights are on; each step's inputs arrive on the host and move
there once.
"""

from __future__ import annotations

import logging
from dataclasses import replace
from typing import Callable

import torch
import torch.nn.functional as F

from pdmesh.engine.attention import AttentionBatch, attend
from pdmesh.engine.flex_decode import FlexDecode
from pdmesh.engine.kv_cache import KVCache
from pdmesh.engine.linear import FrozenLinear
from pdmesh.engine.model_config import ModelConfig
from pdmesh.engine.paged_decode import paged_attend, paged_available
from pdmesh.engine.rope import RotaryEmbedding
from pdmesh.errors import CheckpointError

AllReduce = Callable[[torch.Tensor], torch.Tensor]
log = logging.getLogger(__name__)
DECODE_BACKENDS = ("sdpa", "flex", "paged")


class DecoderLayer:
    def __init__(self, w: dict[str, torch.Tensor], prefix: str, config: ModelConfig,
                 all_reduce: AllReduce | None):
        a, m = prefix + "self_attn.", prefix + "mlp."
        q, k, v = (w[f"{a}{n}_proj.weight"] for n in "qkv")
        self.num_heads = q.shape[0] // config.head_dim
        self.num_kv_heads = k.shape[0] // config.head_dim
        self.q_size, self.kv_size = q.shape[0], k.shape[0]
        bias = None
        if config.attention_bias:
            bias = torch.cat([w[f"{a}{n}_proj.bias"] for n in "qkv"])
        self.qkv = FrozenLinear(torch.cat([q, k, v]), bias)
        self.o = FrozenLinear(w[a + "o_proj.weight"])
        self.gate_up = FrozenLinear(torch.cat([w[m + "gate_proj.weight"], w[m + "up_proj.weight"]]))
        self.down = FrozenLinear(w[m + "down_proj.weight"])
        self.input_norm = w[prefix + "input_layernorm.weight"]
        self.post_norm = w[prefix + "post_attention_layernorm.weight"]
        self.eps = config.rms_norm_eps
        self.head_dim = config.head_dim
        self.all_reduce = all_reduce

    def __call__(self, x: torch.Tensor, angles: tuple[torch.Tensor, torch.Tensor],
                 kv_layer: torch.Tensor, batch: AttentionBatch) -> torch.Tensor:
        t, d = x.shape[0], self.head_dim
        qkv = self.qkv(rms_norm(x, self.input_norm, self.eps))  # [T, q + 2 kv]
        # q and k rotate together: one set of RoPE ops per layer instead of two.
        qk = RotaryEmbedding.apply(qkv[:, :self.q_size + self.kv_size].reshape(t, -1, d), angles)
        q, k = qk.split([self.num_heads, self.num_kv_heads], dim=1)
        v = qkv[:, self.q_size + self.kv_size:]
        attn = self.o(attend(q, k, v.view(t, self.num_kv_heads, d), kv_layer, batch))
        x = x + self._reduce(attn)
        gate, up = self.gate_up(rms_norm(x, self.post_norm, self.eps)).chunk(2, dim=-1)
        return x + self._reduce(self.down(F.silu(gate) * up))

    def _reduce(self, partial: torch.Tensor) -> torch.Tensor:
        return partial if self.all_reduce is None else self.all_reduce(partial)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    # transformers' LlamaRMSNorm arithmetic (in float32, then back), kept identical for token-exact
    # greedy output; for float32 inputs the casts are no-ops.
    x32 = x.float()
    return weight * (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)


class LlamaModel:
    """Runs one engine step: embeds tokens, runs every layer, returns logits for chosen rows."""

    def __init__(self, config: ModelConfig, weights: dict[str, torch.Tensor], max_positions: int,
                 all_reduce: AllReduce | None = None, decode_backend: str = "sdpa", max_num_seqs: int = 64):
        """weights: HF-named, already in the dtype and on the device to run on.
        decode_backend: "sdpa" (gather each context), "flex" (read blocks in place; compiled on CUDA,
        and replaced by sdpa for good if it fails) or "paged" (read blocks in place with the CPU C++
        kernel; sdpa when it cannot be built)."""
        if decode_backend not in DECODE_BACKENDS:
            raise ValueError(f"decode_backend must be one of {DECODE_BACKENDS}, got {decode_backend!r}")
        missing = [n for n in ("model.embed_tokens.weight", "model.norm.weight") if n not in weights]
        if missing:
            raise CheckpointError(f"checkpoint lacks tensors {missing}")
        self.config = config
        self.embed = weights["model.embed_tokens.weight"]  # [V, H]
        head = weights.get("lm_head.weight", self.embed if config.tie_word_embeddings else None)
        if head is None:
            raise CheckpointError("checkpoint has no lm_head.weight and does not tie embeddings")
        self.lm_head = FrozenLinear(head)
        self.norm = weights["model.norm.weight"]
        self.layers = [DecoderLayer(weights, f"model.layers.{i}.", config, all_reduce)
                       for i in range(config.num_layers)]
        self.device = self.embed.device
        self.rope = RotaryEmbedding(config, max_positions, dtype=self.embed.dtype, device=self.device)
        self.decode_backend = decode_backend
        self.max_num_seqs = max_num_seqs
        self._flex: FlexDecode | None = None

    @property
    def num_local_kv_heads(self) -> int:
        return self.layers[0].num_kv_heads

    @torch.inference_mode()
    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, batch: AttentionBatch,
                cache: KVCache, logit_rows: torch.Tensor) -> torch.Tensor:
        """input_ids, positions: [T]; logit_rows: [N] rows of T to score (any device). Returns logits
        [N, V] on the model's device."""
        input_ids, positions, logit_rows = (t.to(self.device) for t in (input_ids, positions, logit_rows))
        batch = batch.to(self.device)
        if self.decode_backend == "flex" and batch.num_decode:
            try:
                return self._forward(input_ids, positions, self._with_flex(batch, cache), cache, logit_rows)
            except Exception as exc:  # an inductor or Triton failure: the exact path still serves
                log.warning("flex decode attention failed (%s: %s); using sdpa from now on", type(exc).__name__, exc)
                self.decode_backend, self._flex = "sdpa", None
        if self.decode_backend == "paged" and batch.num_decode:
            if paged_available():
                return self._forward(input_ids, positions, self._with_paged(batch, cache), cache, logit_rows)
            self.decode_backend = "sdpa"  # asked for, but it could not be built here (logged once)
        return self._forward(input_ids, positions, batch, cache, logit_rows)

    @staticmethod
    def _with_paged(batch: AttentionBatch, cache: KVCache) -> AttentionBatch:
        tables, lens, block_size = batch.decode_tables, batch.decode_lens, cache.block_size
        return replace(batch, decode_attention=lambda q, kv_layer: paged_attend(q, kv_layer, tables, lens, block_size))

    def _with_flex(self, batch: AttentionBatch, cache: KVCache) -> AttentionBatch:
        if self._flex is None or self._flex.num_blocks != cache.num_blocks:
            self._flex = FlexDecode(cache.num_blocks, cache.block_size, self.max_num_seqs, self.device,
                                    compiled=self.device.type == "cuda")
        flex = self._flex
        mask = flex.block_mask(batch.decode_tables, batch.decode_lens)
        return replace(batch, decode_attention=lambda q, kv_layer: flex.attend(q, kv_layer, mask))

    def _forward(self, input_ids: torch.Tensor, positions: torch.Tensor, batch: AttentionBatch,
                 cache: KVCache, logit_rows: torch.Tensor) -> torch.Tensor:
        x = self.embed[input_ids]  # [T, H]
        angles = self.rope.angles(positions)
        for layer, kv_layer in zip(self.layers, cache.kv):
            x = layer(x, angles, kv_layer, batch)
        x = rms_norm(x[logit_rows], self.norm, self.config.rms_norm_eps)
        return self.lm_head(x)
