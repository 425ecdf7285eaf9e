"""The skinny linear kernel (csrc/skinny_linear.cpp) equals a float64 matmul, refuses what it does
not take with a clear error, and FrozenLinear sends it exactly the small float32 batches."""

from __future__ import annotations

import pytest
import torch
from torch.profiler import ProfilerActivity, profile

from pdmesh.engine import cpu_kernels
from pdmesh.engine.linear import SKINNY_MAX_ROWS, FrozenLinear


@pytest.fixture(scope="module")
def kernels():
    module = cpu_kernels.load()
    assert module is not None, cpu_kernels.failure()
    return module


# K 576 and 1536 as in SmolLM2; 12 and 577 leave a tail after the 8-float vectors; N of 1, 5 and
# 7 rows leave tails after the blocks of 4 and 2 weight rows.
@pytest.mark.parametrize("rows", [1, 2, 3, 4, 7, 13, 16])
@pytest.mark.parametrize("n, k", [(960, 576), (576, 1536), (5, 12), (7, 577), (1, 8), (3000, 64)])
@pytest.mark.parametrize("with_bias", [False, True])
def test_equals_float64_matmul(kernels, rows, n, k, with_bias):
    gen = torch.Generator().manual_seed(rows * 1000 + n + k)
    x, w = torch.randn(rows, k, generator=gen), torch.randn(n, k, generator=gen) * 0.05
    bias = torch.randn(n, generator=gen) if with_bias else None
    want = torch.nn.functional.linear(x.double(), w.double(), None if bias is None else bias.double())
    got = kernels.skinny_linear(x, w, bias)
    assert got.shape == (rows, n) and got.dtype == torch.float32
    torch.testing.assert_close(got.double(), want, rtol=0, atol=2e-5 * k ** 0.5)


def test_no_rows_give_an_empty_result(kernels):
    """A step that prefills a chunk and scores no row runs the LM head on [0, K]."""
    assert kernels.skinny_linear(torch.randn(0, 16), torch.randn(3, 16), None).shape == (0, 3)


@pytest.mark.parametrize("k", [576, 61])
def test_a_row_gets_the_same_bits_alone_or_in_any_batch(kernels, k):
    gen = torch.Generator().manual_seed(k)
    x, w, bias = torch.randn(16, k, generator=gen), torch.randn(70, k, generator=gen), torch.randn(70, generator=gen)
    whole = kernels.skinny_linear(x, w, bias)
    for lo, hi in [(0, 1), (3, 5), (5, 12), (2, 16), (15, 16)]:
        assert torch.equal(kernels.skinny_linear(x[lo:hi], w, bias), whole[lo:hi]), (lo, hi)


def test_a_view_of_x_is_read_as_its_values(kernels):
    x, w = torch.randn(6, 64)[::3], torch.randn(16, 64)  # rows 0 and 3: not contiguous
    torch.testing.assert_close(kernels.skinny_linear(x, w, None), x @ w.T, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("x, w, message", [
    (torch.randn(257, 8), torch.randn(4, 8), "at most 256 rows of x, got 257"),
    (torch.randn(1, 8), torch.randn(4, 9), "x must be [B, K] and weight [N, K]"),
    (torch.randn(1, 8, dtype=torch.float64), torch.randn(4, 8), "float32"),
    (torch.randn(1, 8), torch.randn(8, 4).T, "the weight must be contiguous"),
])
def test_refuses_what_it_does_not_take(kernels, x, w, message):
    with pytest.raises(RuntimeError, match=message.replace("[", r"\[").replace("]", r"\]")):
        kernels.skinny_linear(x, w, None)


def _ops(linear: FrozenLinear, x: torch.Tensor) -> set[str]:
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        linear(x)
    return {e.name for e in prof.events()}


def test_frozen_linear_sends_small_float32_batches_to_the_kernel(kernels):
    w, bias = torch.randn(40, 24), torch.randn(40)
    linear = FrozenLinear(w, bias)
    for rows in range(0, SKINNY_MAX_ROWS + 3):
        x = torch.randn(rows, 24)
        torch.testing.assert_close(linear(x), torch.nn.functional.linear(x, w, bias), rtol=1e-5, atol=1e-5)
        assert ("pdmesh::skinny_linear" in _ops(linear, x)) == (rows <= SKINNY_MAX_ROWS), rows
    x16 = torch.randn(1, 24, dtype=torch.bfloat16)
    assert "pdmesh::skinny_linear" not in _ops(FrozenLinear(w.bfloat16()), x16)
