"""A frozen linear layer on the fastest CPU kernel: oneDNN with its weights prepacked.

On this CPU, oneDNN with weights reordered ahead of time ("prepacked") runs the skinny GEMMs of a
decode batch up to 2x faster than a plain matmul, and a single row faster too (the linears of a
batch-1 SmolLM2 step: 37 ms packed against 56.5 ms plain, tools/profile_step.py). Weights the
reorder does not take (GPU, bf16 without AVX-512) and inputs that are not 2-D run plain. The
private mkldnn ops are safe to use because torch is pinned.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

# The reorder is tuned for a batch size; 16 served 1..200 rows well in our measurements.
_PACK_BATCH_HINT = 16


def _mkldnn_available() -> bool:
    return torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")


def _packable(dtype: torch.dtype) -> bool:
    # oneDNN's bf16 kernels need AVX-512 (or AVX-NE-CONVERT); on a plain AVX2 CPU the reorder
    # raises, so bf16 weights there stay plain.
    return dtype == torch.float32 or (dtype == torch.bfloat16 and torch.ops.mkldnn._is_mkldnn_bf16_supported())


class FrozenLinear:
    """y = x @ weight.T (+ bias) for inference; weight: [out_features, in_features]."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None = None, prepack: bool = True):
        self.weight = weight.contiguous()
        self.bias = None if bias is None else bias.contiguous()
        self.out_features, self.in_features = weight.shape
        self.packed = None
        if prepack and weight.device.type == "cpu" and _mkldnn_available() and _packable(weight.dtype):
            self.packed = torch.ops.mkldnn._reorder_linear_weight(self.weight, _PACK_BATCH_HINT)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.packed is not None and x.dim() == 2:
            return torch.ops.mkldnn._linear_pointwise(x, self.packed, self.bias, "none", [], "")
        return F.linear(x, self.weight, self.bias)
