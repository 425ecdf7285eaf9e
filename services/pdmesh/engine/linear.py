"""A frozen linear layer on the fastest CPU kernel for its batch.

Decode batches of up to 8 rows (`SKINNY_MAX_ROWS`) in float32 run pdmesh's own kernel
(`cpu_kernels`, csrc/skinny_linear.cpp): a matrix-vector product that streams each weight row once
and runs near this machine's memory bandwidth, where oneDNN reached about 10 GB/s (the linears of a
batch-1 SmolLM2 step: `tools/profile_step.py`). Larger batches run oneDNN: with weights reordered
ahead of time ("prepacked") it runs the GEMMs of a decode batch up to 2x faster than a plain
matmul on this CPU (the linears of a batch-1 step took 37 ms packed against 56.5 ms plain). Weights the
reorder does not take (GPU, bf16 without AVX-512) and inputs that are not 2-D run plain. The
private mkldnn ops are safe to use because torch is pinned.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from pdmesh.engine import cpu_kernels

# The reorder is tuned for a batch size; 16 served 1..200 rows well in our measurements.
_PACK_BATCH_HINT = 16
# Up to this many rows of x take the skinny kernel. A whole SmolLM2 engine, run both ways in one
# process (an ad-hoc A/B, best of 3 each): 1.25x the tokens/s of oneDNN at 1 sequence, 1.09x at 8;
# 0.86x at 16 in an earlier build of the kernel.
SKINNY_MAX_ROWS = 8


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
        self.skinny = weight.device.type == "cpu" and weight.dtype == torch.float32
        if prepack and weight.device.type == "cpu" and _mkldnn_available() and _packable(weight.dtype):
            self.packed = torch.ops.mkldnn._reorder_linear_weight(self.weight, _PACK_BATCH_HINT)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.skinny and x.dim() == 2 and x.shape[0] <= SKINNY_MAX_ROWS and x.dtype == torch.float32:
            if (kernels := cpu_kernels.load()) is not None:
                with cpu_kernels.profiled("pdmesh::skinny_linear"):  # tools/profile_step.py's "linear"
                    return kernels.skinny_linear(x, self.weight, self.bias)
            self.skinny = False
        if self.packed is not None and x.dim() == 2:
            return torch.ops.mkldnn._linear_pointwise(x, self.packed, self.bias, "none", [], "")
        return F.linear(x, self.weight, self.bias)
