"""Rotary position embeddings in the Hugging Face (rotate-half) layout."""

from __future__ import annotations

import math

import torch

from pdmesh.engine.model_config import ModelConfig
from pdmesh.errors import CheckpointError


def inverse_frequencies(config: ModelConfig) -> torch.Tensor:
    """[head_dim // 2] float64 angle step per position, with the checkpoint's scaling applied."""
    d = config.head_dim
    inv_freq = 1.0 / (config.rope_theta ** (torch.arange(0, d, 2, dtype=torch.int64).double() / d))
    scaling = config.rope_scaling or {}
    kind = scaling.get("rope_type", scaling.get("type", "default"))
    if kind == "default":
        return inv_freq
    if kind == "linear":
        return inv_freq / float(scaling["factor"])
    if kind == "llama3":
        return _llama3(inv_freq, scaling)
    raise CheckpointError(f"rope scaling {kind!r} is not supported (default, linear, llama3 are)")


def _llama3(inv_freq: torch.Tensor, s: dict) -> torch.Tensor:
    factor, low, high = float(s["factor"]), float(s["low_freq_factor"]), float(s["high_freq_factor"])
    old_len = float(s["original_max_position_embeddings"])
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > old_len / low, inv_freq / factor, inv_freq)
    smooth = (old_len / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = (wavelen >= old_len / high) & (wavelen <= old_len / low)
    return torch.where(medium, smoothed, scaled)


class RotaryEmbedding:
    """Precomputed cos/sin for every position up to max_positions."""

    def __init__(self, config: ModelConfig, max_positions: int, dtype: torch.dtype = torch.float32,
                 device: torch.device | str = "cpu"):
        inv_freq = inverse_frequencies(config).float()
        # Same arithmetic as transformers (float32 outer product) so greedy tokens match exactly.
        angles = torch.outer(torch.arange(max_positions, dtype=torch.float32), inv_freq)
        emb = torch.cat((angles, angles), dim=-1)  # [P, D]
        self.cos = emb.cos().to(device, dtype)
        self.sin = emb.sin().to(device, dtype)

    def angles(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(cos, sin), each [T, 1, D], for a step's positions; computed once, used by every layer."""
        return self.cos[positions].unsqueeze(1), self.sin[positions].unsqueeze(1)

    @staticmethod
    def apply(x: torch.Tensor, angles: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        """x: [T, heads, D] rotated by angles from angles()."""
        cos, sin = angles
        half = x.shape[-1] // 2
        rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
        return x * cos + rotated * sin
