"""Decode attention that reads paged KV in place (FlexAttention + block mask) equals the gather path.

On CPU this runs FlexAttention's eager reference (on CUDA the same mask runs compiled); what is
checked here is the mask: every row sees exactly its own blocks, in order, up to its length.
"""

from __future__ import annotations

import random

import pytest
import torch

from pdmesh.engine.attention import AttentionBatch, _attend_decode
from pdmesh.engine.flex_decode import FlexDecode, decode_backend_for, flex_available
from pdmesh.engine.kv_cache import KVCache, KVLayout
from pdmesh.engine.sampling_params import SamplingParams
from pdmesh.engine.sequence import EngineRequest
from support.tiny_model import hf_greedy, run_to_end

pytestmark = [pytest.mark.skipif(not flex_available(), reason="this torch has no FlexAttention"),
              pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")]


def scattered_batch(cache: KVCache, lens: list[int], seed: int) -> AttentionBatch:
    free = list(range(cache.num_blocks))
    random.Random(seed).shuffle(free)
    decode = []
    for n in lens:
        need = -(-n // cache.block_size) + 1  # one spare block, as a reservation leaves
        decode.append((free[:need], n))
        free = free[need:]
    return AttentionBatch.build(cache, [], decode)


@pytest.mark.parametrize("lens", [[1], [5, 12, 1], [4, 8, 16, 3, 9]])
def test_flex_equals_gather(lens):
    torch.manual_seed(len(lens))
    layout = KVLayout(1, 2, 8, "float32", (0, 1))
    cache = KVCache(layout, num_blocks=20, block_size=4)
    cache.kv.normal_()
    batch = scattered_batch(cache, lens, seed=len(lens))
    q = torch.randn(len(lens), 8, 8)  # [B, H, D], 4 query heads per KV head
    flex = FlexDecode(cache.num_blocks, cache.block_size, max_rows=6, device=torch.device("cpu"), compiled=False)
    mask = flex.block_mask(batch.decode_tables, batch.decode_lens)
    got = flex.attend(q, cache.kv[0], mask)
    expected = _attend_decode(q, cache.kv[0], batch)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_auto_picks_flex_on_cuda_only():
    assert decode_backend_for("auto", torch.device("cpu")) != "flex"
    assert decode_backend_for("auto", torch.device("cuda", 0)) == "flex"
    assert decode_backend_for("sdpa", torch.device("cuda", 0)) == "sdpa"


def test_engine_with_flex_decode_equals_transformers(tiny, make_engine):
    hf, _, _ = tiny
    engine = make_engine(attention_backend="flex", max_num_seqs=4, kv_cache_gib=0.0002)
    assert engine.model.decode_backend == "flex"
    ps = [[7, 100, 3, 250, 31], [9] * 11, [200, 201]]
    for i, p in enumerate(ps):
        engine.add_request(EngineRequest(str(i), p, SamplingParams(max_tokens=6, ignore_eos=True)))
    out = run_to_end(engine)
    for i, p in enumerate(ps):
        assert out[str(i)] == hf_greedy(hf, p, 6)
    assert engine.model.decode_backend == "flex"


def test_a_failing_flex_kernel_falls_back_to_sdpa_for_good(tiny, make_engine, monkeypatch):
    hf, _, _ = tiny

    def broken(self, q, kv_layer, mask):
        raise RuntimeError("triton compile failed")

    monkeypatch.setattr(FlexDecode, "attend", broken)
    engine = make_engine(attention_backend="flex", max_num_seqs=4)
    prompt = [7, 100, 3, 250, 31]
    engine.add_request(EngineRequest("r", prompt, SamplingParams(max_tokens=6, ignore_eos=True)))
    assert run_to_end(engine)["r"] == hf_greedy(hf, prompt, 6)
    assert engine.model.decode_backend == "sdpa"
