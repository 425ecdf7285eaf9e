"""Turns the last position's logits of each sequence into its next token.

Seeded sampling draws each token from a generator seeded by (seed, index of the token in the
output), not from a stream that runs across steps. The token at a given output index is then the
same wherever it is computed: in one engine or another, alone or in a batch, or after a stream is
resumed on another worker. Everything runs on the logits' device (the generator too); only the
chosen token ids come back to the host.
"""

from __future__ import annotations

import torch

from pdmesh.engine.sampling_params import SamplingParams

_MASK64 = (1 << 63) - 1


def token_seed(seed: int, output_index: int) -> int:
    """A 63-bit seed for one token, mixed so nearby (seed, index) pairs are far apart."""
    x = (seed * 0x9E3779B97F4A7C15 + output_index * 0xBF58476D1CE4E5B9) & ((1 << 64) - 1)
    x ^= x >> 31
    x = (x * 0x94D049BB133111EB) & ((1 << 64) - 1)
    return (x ^ (x >> 29)) & _MASK64


def sample(logits: torch.Tensor, params: list[SamplingParams], output_indices: list[int]) -> list[int]:
    """Pick one token per row. logits: [B, V] float on any device; params and output_indices: one per row."""
    tokens = logits.argmax(dim=-1).tolist()  # the step's one device-to-host sync
    for row, p in enumerate(params):
        if not p.greedy:
            tokens[row] = _sample_row(logits[row], p, output_indices[row])
    return tokens


def _sample_row(logits: torch.Tensor, p: SamplingParams, output_index: int) -> int:
    logits = logits.float() / p.temperature  # [V]
    if p.top_k and p.top_k < logits.numel():
        kth = torch.topk(logits, p.top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    if p.top_p < 1.0:
        probs = _top_p(probs, p.top_p)
    generator = None
    if p.seed is not None:
        generator = torch.Generator(device=logits.device).manual_seed(token_seed(p.seed, output_index))
    return int(torch.multinomial(probs, 1, generator=generator))


def _top_p(probs: torch.Tensor, top_p: float) -> torch.Tensor:
    """Keep the smallest set of most likely tokens whose mass reaches top_p."""
    sorted_probs, order = probs.sort(descending=True)
    mass_before = sorted_probs.cumsum(0) - sorted_probs
    sorted_probs = sorted_probs.masked_fill(mass_before >= top_p, 0.0)
    kept = torch.zeros_like(probs).scatter_(0, order, sorted_probs)
    return kept / kept.sum()
