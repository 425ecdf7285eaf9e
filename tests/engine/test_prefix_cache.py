"""The prefix cache in the engine: greedy output is the same with it on and off, the hit counters
rise by exactly the shared tokens, and every block is free again (and no longer in use) after.

Tiny random Llama, block_size 4: a shared prefix of 12 tokens is 3 full blocks.
"""

from __future__ import annotations

import random

import pytest
import torch

from pdmesh.engine.sampling_params import SamplingParams
from pdmesh.engine.sequence import EngineRequest
from support.tiny_model import run_to_end

SYSTEM = [17, 250, 31, 99, 4, 8, 15, 16, 23, 42, 108, 77]  # 3 blocks of 4


def greedy(n: int) -> SamplingParams:
    return SamplingParams(max_tokens=n, ignore_eos=True)


def run(engine, prompts: dict[str, list[int]], n: int = 10, together: bool = False) -> dict[str, list[int]]:
    """Greedy tokens of each prompt: one after another (each sees the cache the last one left), or
    all added at once."""
    tokens = {}
    for request_id, prompt in prompts.items():
        engine.add_request(EngineRequest(request_id, prompt, greedy(n)))
        if not together:
            tokens.update(run_to_end(engine))
    tokens.update(run_to_end(engine))
    return tokens


def assert_idle_and_free(engine) -> None:
    assert not engine.has_work()
    assert engine.num_free_blocks == engine.num_total_blocks
    assert all(r == 0 for r in engine.pool._refs)


def test_shared_system_prompt_hits_and_matches_no_cache(make_engine):
    prompts = {f"u{i}": SYSTEM + [200 + i, 201 + i, 5] for i in range(4)}
    expected = run(make_engine(prefix_cache=False), prompts)
    engine = make_engine()
    assert run(engine, prompts) == expected
    queried, hits = engine.prefix_cache_stats()
    assert queried == sum(map(len, prompts.values()))
    assert hits == 3 * len(SYSTEM)  # every prompt after the first shares the 3 system blocks
    assert engine.num_cached_blocks > 0
    assert_idle_and_free(engine)


def test_first_output_says_how_much_of_the_prompt_came_from_the_cache(make_engine):
    engine = make_engine()
    firsts = {}
    for request_id, prompt in (("a", SYSTEM + [1, 2]), ("b", SYSTEM + [3, 4])):
        engine.add_request(EngineRequest(request_id, prompt, greedy(3)))
        outputs = []
        while engine.has_work():
            outputs += engine.step()
        firsts[request_id] = outputs[0]
        assert all(o.num_cached_tokens == 0 for o in outputs[1:])
    assert firsts["a"].num_cached_tokens == 0 and firsts["b"].num_cached_tokens == len(SYSTEM)
    assert_idle_and_free(engine)


def test_cache_off_never_hits(make_engine):
    engine = make_engine(prefix_cache=False)
    run(engine, {"a": SYSTEM + [1, 2], "b": SYSTEM + [3, 4]})
    assert engine.prefix_cache_stats() == (0, 0) and engine.num_cached_blocks == 0
    assert_idle_and_free(engine)


def test_multi_turn_reuses_the_previous_answer(make_engine):
    """Turn 2's prompt is turn 1's prompt + its answer + a new message: its blocks include KV that
    turn 1 computed while decoding."""
    def conversation(engine) -> list[list[int]]:
        history, answers = list(SYSTEM) + [9, 10], []
        for turn in range(3):
            answer = run(engine, {f"t{turn}": history}, n=9)[f"t{turn}"]
            answers.append(answer)
            history = history + answer + [60 + turn, 61 + turn, 62 + turn]
        return answers
    expected = conversation(make_engine(prefix_cache=False))
    engine = make_engine()
    assert conversation(engine) == expected
    _, hits = engine.prefix_cache_stats()
    # Turn 1 (14 + 9 tokens, 22 computed) leaves 5 full blocks; turn 2's prompt (26) shares them.
    assert hits >= 5 * 4 + 7 * 4
    assert_idle_and_free(engine)


@pytest.mark.parametrize("where,shared_blocks", [(11, 2), (12, 3)])
def test_a_difference_at_a_block_edge(make_engine, where, shared_blocks):
    """where=11: the prompts differ in the last token of block 3 (2 blocks shared); where=12: in
    the first token after it (3 blocks shared)."""
    first = SYSTEM + [70, 71, 72, 73, 74]
    second = list(first)
    second[where] = 300
    prompts = {"first": first, "second": second}
    expected = run(make_engine(prefix_cache=False), prompts)
    engine = make_engine()
    assert run(engine, prompts) == expected
    assert engine.prefix_cache_stats() == (2 * len(first), shared_blocks * 4)
    assert_idle_and_free(engine)


def test_a_whole_cached_prompt_still_computes_its_last_token(make_engine):
    prompt = SYSTEM[:8]  # exactly 2 blocks
    engine = make_engine()
    first = run(engine, {"a": prompt})
    assert run(engine, {"b": prompt}) == {"b": first["a"]}
    assert engine.prefix_cache_stats() == (16, 4)  # the second block's last token is recomputed
    assert_idle_and_free(engine)


def test_same_prefix_in_one_step_and_in_later_steps(make_engine):
    prompts = {f"r{i}": SYSTEM + [i + 1] * (i + 1) for i in range(6)}
    expected = run(make_engine(prefix_cache=False), prompts, together=True)
    engine = make_engine(max_num_batched_tokens=40)  # the later prompts join in later steps
    assert run(engine, prompts, together=True) == expected
    assert engine.prefix_cache_stats()[1] > 0
    assert_idle_and_free(engine)


def test_prefill_from_cache_hands_off_the_same_kv(make_engine):
    """A prefill-only request that hit the cache exports the whole prompt's KV, equal to a full
    computation, and a decode engine continues it token for token."""
    prompt = SYSTEM + [5, 6, 7]
    expected = run(make_engine(prefix_cache=False), {"r": prompt}, n=12)["r"]
    full = make_engine(prefix_cache=False)
    full.add_request(EngineRequest("r", prompt, greedy(12), prefill_only=True))
    full.step()
    prefill = make_engine()
    run(prefill, {"warm": SYSTEM + [1]})
    prefill.add_request(EngineRequest("r", prompt, greedy(12), prefill_only=True))
    first = prefill.step()[0]
    assert prefill.prefix_cache_stats()[1] == 12
    kv = prefill.export_kv("r")
    torch.testing.assert_close(kv, full.export_kv("r"))
    assert prefill.release_held("r")
    decode = make_engine()
    decode.reserve("r", len(prompt) + 12)
    decode.add_request(EngineRequest("r", prompt, greedy(12), kv=kv, first_token=first.token_ids[0]))
    assert run_to_end(decode)["r"] == expected
    for engine in (prefill, decode):
        assert_idle_and_free(engine)


def test_eviction_under_pressure(make_engine):
    """A pool of 16 blocks: cached prefixes fill it, then a large request evicts them; the cache
    keeps serving correct tokens and never hands out a block in use."""
    engine = make_engine(kv_cache_gib=16 * 4 * 2 * 2 * 2 * 8 * 4 / 2**30)
    reference = make_engine(prefix_cache=False)
    assert engine.num_total_blocks == 16
    prompts = {f"p{i}": [i + 3] * 13 for i in range(4)}  # 3 full blocks each after its run
    assert run(engine, prompts, n=2) == run(reference, prompts, n=2)
    assert engine.num_cached_blocks == 12 and engine.num_free_blocks == 16
    big = {"big": list(range(3, 40))}  # 37 + 10 tokens: 12 blocks, the 4 uncached and 8 evicted
    assert run(engine, big) == run(reference, big)
    assert engine.num_cached_blocks == 4 + 11  # 4 survivors, and big's 46 computed tokens
    again = {"again": [6] * 13}  # p3 was released last: its blocks survive
    assert run(engine, again, n=2) == run(reference, again, n=2)
    assert engine.prefix_cache_stats()[1] == 12
    assert_idle_and_free(engine)


def test_no_leak_after_a_long_mixed_run(make_engine):
    """Shared and unshared prompts, aborts, prefill-only requests released and exported, waiting
    for blocks: afterwards every block is free, none in use, and outputs match the cache off."""
    rng = random.Random(4)
    heads = [SYSTEM, SYSTEM[:8] + [90, 91, 92, 93], [rng.randrange(3, 320) for _ in range(9)]]
    prompts = {f"r{i}": rng.choice(heads) + [rng.randrange(3, 320) for _ in range(rng.randrange(1, 9))]
               for i in range(40)}
    expected = {}
    for i in range(0, 40, 5):
        expected.update(run(make_engine(prefix_cache=False), dict(list(prompts.items())[i:i + 5]), together=True))
    engine = make_engine(kv_cache_gib=40 * 4 * 2 * 2 * 2 * 8 * 4 / 2**30)  # 40 blocks: requests wait
    got = {}
    for i in range(0, 40, 5):
        batch = dict(list(prompts.items())[i:i + 5])
        got.update(run(engine, batch, together=True))
        engine.add_request(EngineRequest(f"held{i}", batch[f"r{i}"], greedy(4), prefill_only=True))
        engine.add_request(EngineRequest(f"gone{i}", batch[f"r{i + 1}"], greedy(30)))
        engine.step()
        engine.abort(f"gone{i}")
        run_to_end(engine)
        if i % 10:
            engine.export_kv(f"held{i}")
        assert engine.release_held(f"held{i}")
    assert got == expected
    queried, hits = engine.prefix_cache_stats()
    assert 0 < hits < queried
    assert_idle_and_free(engine)


def test_hand_off_carries_only_what_the_decode_engine_lacks(make_engine):
    """The decode engine's reservation shares the prefix blocks it has cached; the prefill engine
    exports the rest only, and decoding continues token for token."""
    prompt = SYSTEM + [5, 6, 7]
    expected = run(make_engine(prefix_cache=False), {"r": prompt}, n=12)["r"]
    decode = make_engine()
    run(decode, {"earlier": SYSTEM + [1]})
    cached = decode.reserve("r", len(prompt) + 12, prompt)
    assert cached == 12 and decode.prefix_cache_stats()[1] == 12
    prefill = make_engine()
    prefill.add_request(EngineRequest("r", prompt, greedy(12), prefill_only=True))
    first = prefill.step()[0]
    kv = prefill.export_kv("r", start=cached)
    assert kv.shape[2] == len(prompt) - cached
    assert prefill.release_held("r")
    decode.add_request(EngineRequest("r", prompt, greedy(12), kv=kv, kv_start=cached, first_token=first.token_ids[0]))
    assert run_to_end(decode)["r"] == expected
    for engine in (prefill, decode):
        assert_idle_and_free(engine)


def test_kv_that_does_not_start_where_the_reservation_ends_is_refused(make_engine):
    prompt = SYSTEM + [5, 6, 7]
    engine = make_engine()
    run(engine, {"earlier": SYSTEM + [1]})
    assert engine.reserve("r", len(prompt) + 4, prompt) == 12
    kv = torch.zeros(2, 2, len(prompt), 2, 8)  # the whole prompt: would overwrite shared blocks
    engine.add_request(EngineRequest("r", prompt, greedy(4), kv=kv, first_token=5))
    with pytest.raises(Exception, match="does not fit it"):
        engine.step()
    engine.abort("r")
    run_to_end(engine)
    assert_idle_and_free(engine)
