"""The CPU paged decode attention kernel (csrc/paged_decode.cpp) equals the gather + SDPA path, and
an engine using it is token-exact; auto picks it on CPU in float32, and only there."""

from __future__ import annotations

import pytest
import torch

from pdmesh.engine.attention import _attend_decode
from pdmesh.engine.engine_config import EngineConfig
from pdmesh.engine.flex_decode import decode_backend_for
from pdmesh.engine.kv_cache import KVCache, KVLayout
from pdmesh.engine.llm_engine import LLMEngine
from pdmesh.engine.cpu_kernels import failure
from pdmesh.engine.paged_decode import paged_attend, paged_available
from pdmesh.engine.sampling_params import SamplingParams
from pdmesh.engine.sequence import EngineRequest
from pdmesh.errors import InvalidRequestError
from support.tiny_model import hf_greedy, run_to_end
from test_flex_decode import scattered_batch


def test_the_kernel_builds_here():
    assert paged_available(), failure()


# Head size 16: the vector path (groups of 4, 3 and 1 query heads); 12, and 9 heads to a KV head:
# the plain loops.
@pytest.mark.parametrize("kv_heads, heads, head_dim", [(2, 8, 16), (3, 9, 16), (4, 4, 16), (2, 8, 12), (1, 9, 16)])
@pytest.mark.parametrize("lens", [[1], [5, 12, 1], [4, 8, 16, 3, 9, 33]])
def test_paged_equals_gather(lens, kv_heads, heads, head_dim):
    torch.manual_seed(len(lens) + kv_heads)
    layout = KVLayout(1, kv_heads, head_dim, "float32", tuple(range(kv_heads)))
    cache = KVCache(layout, num_blocks=40, block_size=4)
    cache.kv.normal_()
    batch = scattered_batch(cache, lens, seed=len(lens))
    q = torch.randn(len(lens), heads, head_dim)
    got = paged_attend(q, cache.kv[0], batch.decode_tables, batch.decode_lens, cache.block_size)
    torch.testing.assert_close(got, _attend_decode(q, cache.kv[0], batch), rtol=1e-5, atol=1e-5)


# Enough work to use both threads: a sequence with all its KV heads per task (batch >= threads), or
# one KV head per task (a single long sequence); and the plain loops (head size 12) split the same way.
@pytest.mark.parametrize("lens, head_dim", [([1000], 16), ([700, 650, 3], 16), ([1000], 12), ([700, 650], 12)])
def test_paged_equals_gather_when_split_across_threads(lens, head_dim):
    torch.manual_seed(len(lens))
    layout = KVLayout(1, 3, head_dim, "float32", (0, 1, 2))
    cache = KVCache(layout, num_blocks=400, block_size=4)
    cache.kv.normal_()
    batch = scattered_batch(cache, lens, seed=len(lens))
    q = torch.randn(len(lens), 9, head_dim)
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        got = paged_attend(q, cache.kv[0], batch.decode_tables, batch.decode_lens, cache.block_size)
    finally:
        torch.set_num_threads(threads)
    torch.testing.assert_close(got, _attend_decode(q, cache.kv[0], batch), rtol=1e-5, atol=1e-5)


def test_a_length_beyond_the_block_table_is_refused_not_read():
    layout = KVLayout(1, 2, 8, "float32", (0, 1))
    cache = KVCache(layout, num_blocks=4, block_size=4)
    with pytest.raises(RuntimeError, match="context length 9 of row 0 is outside its block table"):
        paged_attend(torch.randn(1, 4, 8), cache.kv[0], torch.tensor([[0, 1]]), torch.tensor([9]), 4)


def test_engine_with_paged_decode_equals_transformers_and_sdpa(tiny, make_engine):
    hf, _, _ = tiny
    prompts = [[7, 100, 3, 250, 31], [9] * 11, [200, 201], list(range(3, 60))]
    outputs = {}
    for backend in ("paged", "sdpa"):
        engine = make_engine(attention_backend=backend, max_num_seqs=4, kv_cache_gib=0.001)
        assert engine.model.decode_backend == backend
        for i, p in enumerate(prompts):
            engine.add_request(EngineRequest(str(i), p, SamplingParams(max_tokens=12, ignore_eos=True)))
        outputs[backend] = run_to_end(engine)
        assert engine.model.decode_backend == backend  # it ran, and did not fall back
    assert outputs["paged"] == outputs["sdpa"]
    for i, p in enumerate(prompts):
        assert outputs["paged"][str(i)] == hf_greedy(hf, p, 12)


def test_auto_is_paged_on_cpu_float32_and_paged_is_refused_elsewhere(tiny):
    assert decode_backend_for("auto", torch.device("cpu"), "float32") == "paged"
    assert decode_backend_for("auto", torch.device("cpu"), "bfloat16") == "sdpa"
    _, config, weights = tiny
    with pytest.raises(InvalidRequestError, match="attention_backend paged runs on CPU in float32; this engine "
                                                  "is on cpu in bfloat16"):
        LLMEngine(config, weights, EngineConfig(attention_backend="paged", dtype="bfloat16", kv_cache_gib=0.001))
