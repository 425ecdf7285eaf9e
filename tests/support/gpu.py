"""Where the tests marked `gpu` run: CUDA, or the CPU with PDMESH_GPU_TEST_DEVICE=cpu (to check
the tests themselves on a machine without a GPU)."""

from __future__ import annotations

import os

import torch

GPU_TEST_DEVICE = os.environ.get("PDMESH_GPU_TEST_DEVICE", "cuda")
NO_CUDA = "CUDA is not available"


def hf_greedy(hf, prompt: list[int], max_new_tokens: int) -> list[int]:
    """transformers' greedy tokens, on whatever device `hf` is."""
    ids = torch.tensor([prompt], device=hf.device)
    with torch.no_grad():
        out = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                          do_sample=False, eos_token_id=None, pad_token_id=0)
    return out[0, len(prompt):].tolist()
