"""A stand-in model that emits tokens without computing anything, for load tests of the mesh.

`--engine echo` runs the real engine (block pool, batching, KV hand-off) around this model: the
next token is the successor of the last input token (ids below FIRST_ID, where special tokens
live, are skipped), so streams never end on EOS and cost almost no CPU. Output text is
meaningless by design; anything measured with it must say so.
"""

from __future__ import annotations

import dataclasses
import time

import torch

from pdmesh.engine.attention import AttentionBatch
from pdmesh.engine.kv_cache import KVCache
from pdmesh.engine.model_config import ModelConfig

FIRST_ID = 32


def echo_config(config: ModelConfig) -> ModelConfig:
    """The checkpoint's vocabulary and context with a one-layer, one-head KV shape (tiny KV)."""
    return dataclasses.replace(config, hidden_size=1, intermediate_size=1, num_layers=1, num_heads=1,
                               num_kv_heads=1, head_dim=1, rope_scaling=None, name=f"{config.name} (echo)")


class EchoModel:
    """step_delay_s: time each forward pass takes, to stand in for a model's step time in tests."""

    def __init__(self, config: ModelConfig, step_delay_s: float = 0.0):
        self.config = config
        self.step_delay_s = step_delay_s

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, batch: AttentionBatch,
                cache: KVCache, logit_rows: torch.Tensor) -> torch.Tensor:
        if self.step_delay_s:
            time.sleep(self.step_delay_s)
        last = input_ids[logit_rows]  # [N]
        span = self.config.vocab_size - FIRST_ID
        following = FIRST_ID + (last - FIRST_ID + 1).remainder(span)
        logits = torch.zeros(len(logit_rows), self.config.vocab_size)
        logits[torch.arange(len(logit_rows)), following] = 1.0
        return logits
