import random
from collections import OrderedDict

import pytest
import torch

from pdmesh.engine.engine_config import EngineConfig
from pdmesh.engine.llm_engine import LLMEngine
from pdmesh.engine.sampling_params import SamplingParams
from pdmesh.engine.sequence import EngineRequest
from pdmesh.errors import InvalidRequestError

from support.tiny_model import hf_greedy, run_to_end, tiny_llama


def prompts(n: int, seed: int = 1) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(3, 320) for _ in range(rng.randrange(1, 40))] for _ in range(n)]


def greedy(max_tokens: int, **kw) -> SamplingParams:
    return SamplingParams(max_tokens=max_tokens, ignore_eos=True, **kw)


def test_greedy_equals_transformers(tiny, make_engine):
    hf, _, _ = tiny
    for i, prompt in enumerate(prompts(4)):
        engine = make_engine()
        engine.add_request(EngineRequest(f"r{i}", prompt, greedy(12)))
        assert run_to_end(engine)[f"r{i}"] == hf_greedy(hf, prompt, 12)


@pytest.mark.parametrize("num_kv_heads,tie", [(1, False), (8, True)])
def test_greedy_equals_transformers_other_shapes(num_kv_heads, tie):
    hf, config, weights = tiny_llama(num_kv_heads=num_kv_heads, seed=3, tie=tie)
    engine = LLMEngine(config, weights, EngineConfig(block_size=4, kv_cache_gib=0.001))
    prompt = prompts(1, seed=5)[0]
    engine.add_request(EngineRequest("r", prompt, greedy(10)))
    assert run_to_end(engine)["r"] == hf_greedy(hf, prompt, 10)


def test_mixed_batch_equals_each_alone(make_engine):
    ps = prompts(6, seed=2)
    alone = {}
    for i, p in enumerate(ps):
        engine = make_engine()
        engine.add_request(EngineRequest(str(i), p, greedy(8 + i)))
        alone.update(run_to_end(engine))
    engine = make_engine()
    for i, p in enumerate(ps[:3]):
        engine.add_request(EngineRequest(str(i), p, greedy(8 + i)))
    batched = {}
    for _ in range(2):
        for out in engine.step():
            batched.setdefault(out.request_id, []).extend(out.token_ids)
    for i, p in enumerate(ps[3:], start=3):  # join a batch that is already decoding
        engine.add_request(EngineRequest(str(i), p, greedy(8 + i)))
    for request_id, tokens in run_to_end(engine).items():
        batched.setdefault(request_id, []).extend(tokens)
    assert batched == alone


def test_scattered_blocks_equal_contiguous(make_engine):
    """Paged (blocks shuffled across the pool) equals one contiguous block per sequence."""
    p = prompts(1, seed=9)[0]
    contiguous = make_engine(block_size=512, kv_cache_gib=0.01)
    contiguous.add_request(EngineRequest("r", p, greedy(20)))
    paged = make_engine(block_size=2)
    free = list(paged.pool._free)
    random.Random(0).shuffle(free)
    paged.pool._free = OrderedDict.fromkeys(free)
    paged.add_request(EngineRequest("r", p, greedy(20)))
    assert run_to_end(paged) == run_to_end(contiguous)


def test_export_import_continues_same_tokens(make_engine):
    p = prompts(1, seed=4)[0]
    whole = make_engine()
    whole.add_request(EngineRequest("r", p, greedy(15)))
    expected = run_to_end(whole)["r"]

    prefill = make_engine()
    prefill.add_request(EngineRequest("r", p, greedy(15), prefill_only=True))
    out = prefill.step()
    assert out[0].finish_reason == "prefilled" and out[0].token_ids == expected[:1]
    kv = prefill.export_kv("r")
    assert kv.shape == (2, 2, len(p), 2, 8)
    assert prefill.release_held("r") and prefill.num_free_blocks == prefill.num_total_blocks

    decode = make_engine(block_size=8)  # another block size: the hand-off is token-contiguous
    decode.reserve("r", len(p) + 15)
    decode.add_request(EngineRequest("r", p, greedy(15), kv=kv, first_token=out[0].token_ids[0]))
    assert run_to_end(decode)["r"] == expected
    assert decode.num_free_blocks == decode.num_total_blocks


def test_blocks_return_after_finish_abort_and_error(make_engine, monkeypatch):
    engine = make_engine()
    total = engine.num_total_blocks
    for i, p in enumerate(prompts(5, seed=7)):
        engine.add_request(EngineRequest(f"r{i}", p, greedy(30)))
    engine.reserve("reserved", 10)
    engine.step()
    engine.abort("r0")
    engine.abort("r3")
    engine.step()
    assert engine.num_free_blocks < total
    original = engine.model.forward

    def broken(*args, **kwargs):
        raise RuntimeError("injected failure")
    monkeypatch.setattr(engine.model, "forward", broken)
    outputs = engine.step()
    assert {o.finish_reason for o in outputs} == {"error"}
    assert all("injected failure" in o.error for o in outputs)
    monkeypatch.setattr(engine.model, "forward", original)
    engine.add_request(EngineRequest("after", prompts(1)[0], greedy(5)))
    assert len(run_to_end(engine)["after"]) == 5
    assert engine.release_reservation("reserved")
    assert engine.num_free_blocks == total


def test_waits_for_blocks_instead_of_preempting(make_engine):
    engine = make_engine(kv_cache_gib=16 * 4 * 2 * 2 * 2 * 8 * 4 / 2**30)  # 16 blocks of 4 tokens
    assert engine.num_total_blocks == 16
    for i in range(3):
        engine.add_request(EngineRequest(str(i), [5] * 10, greedy(20)))  # 30 tokens -> 8 blocks each
    first = {out.request_id: out.token_ids for out in engine.step()}
    running, waiting = engine.load()
    assert (running, waiting) == (2, 1) and sorted(first) == ["0", "1"]
    tokens = run_to_end(engine)
    assert [len(first.get(r, [])) + len(tokens[r]) for r in "012"] == [20, 20, 20]
    assert engine.num_free_blocks == 16


def test_stop_tokens_and_length():
    hf, config, weights = tiny_llama()
    engine = LLMEngine(config, weights, EngineConfig(block_size=4, kv_cache_gib=0.001))
    p = prompts(1, seed=11)[0]
    ref = hf_greedy(hf, p, 10)
    engine.add_request(EngineRequest("stop", p, SamplingParams(max_tokens=10, stop_token_ids=(ref[3],))))
    engine.add_request(EngineRequest("len", p, greedy(4)))
    reasons = {}
    while engine.has_work():
        for out in engine.step():
            if out.finished:
                reasons[out.request_id] = out.finish_reason
    assert reasons == {"stop": "stop", "len": "length"}


def test_seeded_sampling_is_reproducible(make_engine):
    p = prompts(1, seed=12)[0]

    def run(seed, **kw):
        engine = make_engine()
        engine.add_request(EngineRequest("r", p, SamplingParams(max_tokens=16, temperature=1.0, seed=seed,
                                                                ignore_eos=True, **kw)))
        return run_to_end(engine)["r"]
    assert run(7) == run(7)
    assert run(7) != run(8)
    greedy_tokens = make_engine()
    greedy_tokens.add_request(EngineRequest("r", p, greedy(16)))
    assert run(7, top_k=1) == run_to_end(greedy_tokens)["r"]
    assert run(3, top_p=1e-6) == run(7, top_k=1)


def test_bad_requests_are_refused_before_work(make_engine):
    engine = make_engine(max_model_len=64)
    with pytest.raises(InvalidRequestError, match="prompt has 64 tokens; max-model-len is 64"):
        engine.add_request(EngineRequest("long", [5] * 64, greedy(1)))
    with pytest.raises(InvalidRequestError, match="prompt \\+ max_tokens is 70 tokens; max-model-len is 64"):
        engine.add_request(EngineRequest("sum", [5] * 60, greedy(10)))
    with pytest.raises(InvalidRequestError, match="outside the vocabulary"):
        engine.add_request(EngineRequest("vocab", [5, 320], greedy(1)))
    with pytest.raises(InvalidRequestError, match="empty"):
        engine.add_request(EngineRequest("empty", [], greedy(1)))
    with pytest.raises(InvalidRequestError, match="top_p"):
        SamplingParams(top_p=0.0)
    assert engine.num_free_blocks == engine.num_total_blocks and not engine.has_work()


def test_bfloat16_engine_runs_with_bfloat16_kv(make_engine):
    engine = make_engine(dtype="bfloat16")
    assert engine.cache.kv.dtype == torch.bfloat16 and engine.layout.dtype == "bfloat16"
    engine.add_request(EngineRequest("r", prompts(1, seed=13)[0], greedy(12)))
    tokens = run_to_end(engine)["r"]
    assert len(tokens) == 12 and all(0 <= t < 320 for t in tokens)
    assert engine.num_free_blocks == engine.num_total_blocks
