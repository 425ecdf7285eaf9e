"""Chunked prefill (`--prefill-chunk-tokens`): a long prompt is computed a chunk per step while the
running streams keep decoding, and every output is the same as with whole-prompt prefill.

Tiny random Llama, block_size 4, so chunks of 8 or 9 tokens cross block boundaries both aligned and
not.
"""

from __future__ import annotations

import random

import pytest
import torch

from pdmesh.engine.engine_config import EngineConfig
from pdmesh.engine.sampling_params import SamplingParams
from pdmesh.engine.sequence import EngineRequest
from pdmesh.errors import InvalidRequestError
from support.tiny_model import hf_greedy, run_to_end

rng = random.Random(5)
PROMPTS = {f"p{i}": [rng.randrange(3, 320) for _ in range(n)] for i, n in enumerate((5, 37, 90, 13, 64, 150))}


def greedy(n: int) -> SamplingParams:
    return SamplingParams(max_tokens=n, ignore_eos=True)


def add_all(engine, prompts: dict[str, list[int]], n: int = 8) -> None:
    for request_id, prompt in prompts.items():
        engine.add_request(EngineRequest(request_id, prompt, greedy(n)))


def assert_idle_and_free(engine) -> None:
    assert not engine.has_work()
    assert not engine.scheduler.prefilling
    assert engine.num_free_blocks == engine.num_total_blocks
    assert all(r == 0 for r in engine.pool._refs)


@pytest.mark.parametrize("chunk", [8, 9, 64])
@pytest.mark.parametrize("prefix_cache", [False, True])
def test_chunked_outputs_equal_whole_prompt_prefill_and_transformers(make_engine, tiny, chunk, prefix_cache):
    hf, _, _ = tiny
    whole = make_engine(kv_cache_gib=0.01, prefix_cache=prefix_cache)
    add_all(whole, PROMPTS)
    expected = run_to_end(whole)
    engine = make_engine(kv_cache_gib=0.01, prefix_cache=prefix_cache, prefill_chunk_tokens=chunk)
    add_all(engine, PROMPTS)
    assert run_to_end(engine) == expected
    assert expected["p5"] == hf_greedy(hf, PROMPTS["p5"], 8)  # the 150-token prompt, chunked 3-19 times
    assert engine.num_steps > whole.num_steps  # the prompts really were split
    assert_idle_and_free(engine)


def test_running_streams_decode_between_the_chunks_of_a_long_prompt(make_engine):
    """A stream that is already decoding gets a token in every step while a 150-token prompt is
    prefilled 16 tokens at a time; whole-prompt prefill would compute it in one step."""
    engine = make_engine(kv_cache_gib=0.01, prefill_chunk_tokens=16)
    engine.add_request(EngineRequest("stream", PROMPTS["p0"], greedy(40)))
    engine.step()  # the stream's prompt and first token
    engine.add_request(EngineRequest("long", PROMPTS["p5"], greedy(4)))
    steps_before_long_token = 0
    while True:
        outputs = {o.request_id: o for o in engine.step()}
        if "long" in outputs:
            break
        steps_before_long_token += 1
        assert outputs["stream"].token_ids, "the running stream missed a step while the long prompt prefilled"
    assert steps_before_long_token == 150 // 16  # 10 chunks: 9 without a token, the 10th samples it
    run_to_end(engine)
    assert_idle_and_free(engine)


def test_a_prompt_aborted_mid_prefill_frees_its_blocks(make_engine):
    engine = make_engine(kv_cache_gib=0.01, prefill_chunk_tokens=16)
    engine.add_request(EngineRequest("long", PROMPTS["p5"], greedy(4)))
    engine.step()
    engine.step()
    assert engine.scheduler.prefilling and engine.num_free_blocks < engine.num_total_blocks
    engine.abort("long")
    outputs = run_to_end(engine)
    assert outputs == {"long": []}
    assert_idle_and_free(engine)


def test_prefill_only_kv_is_the_same_when_chunked(make_engine):
    """A prefill worker's export (the KV it hands off) does not depend on the chunking."""
    exports = []
    for chunk in (0, 16):
        engine = make_engine(kv_cache_gib=0.01, prefill_chunk_tokens=chunk)
        engine.add_request(EngineRequest("r", PROMPTS["p4"], greedy(4), prefill_only=True))
        first = run_to_end(engine)["r"]
        exports.append((first, engine.export_kv("r")))
        engine.release_held("r")
        assert_idle_and_free(engine)
    (first_a, kv_a), (first_b, kv_b) = exports
    assert first_a == first_b
    torch.testing.assert_close(kv_a, kv_b, rtol=1e-5, atol=1e-5)


def test_a_chunk_smaller_than_a_block_is_refused():
    with pytest.raises(InvalidRequestError, match="prefill_chunk_tokens must be 0 .off. or at least block_size "
                                                  r"\(16\), got 8"):
        EngineConfig(prefill_chunk_tokens=8)
