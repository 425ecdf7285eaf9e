"""Tensor parallelism in-process: ranks are threads joined by real Gloo groups over a TCPStore.

Greedy tokens with TP equal TP=1 token for token, on a tiny random Llama with 8 heads and 4 KV
heads, and a prefill group of TP in {1, 2, 4} hands its KV to a decode group of TP in {1, 2}.
"""

from __future__ import annotations

import itertools
import threading

import pytest
import torch
import torch.distributed as dist

from pdmesh.engine.engine_config import EngineConfig
from pdmesh.engine.kv_cache import KVLayout
from pdmesh.engine.llm_engine import LLMEngine
from pdmesh.engine.model import LlamaModel
from pdmesh.engine.sampling_params import SamplingParams
from pdmesh.engine.sequence import EngineRequest
from pdmesh.engine.tensor_parallel import TPGroup, check_tp_size, kv_heads_of, shard_weights
from pdmesh.engine.tp_engine import TPDriver, follow, make_tp_engine
from pdmesh.errors import InvalidRequestError
from support.tiny_model import run_to_end, tiny_llama

PROMPT = [11, 57, 203, 99, 14, 300, 7, 42, 42, 128, 64]
SETTINGS = dict(block_size=4, kv_cache_gib=0.002)


@pytest.fixture(scope="module")
def model():
    _, config, weights = tiny_llama(num_kv_heads=4, seed=5)
    return config, weights


class Group:
    """A TP group: rank 0's engine here, followers on threads."""

    def __init__(self, config, weights, size: int):
        self.size = size
        self.broken: list[Exception] = []
        if size == 1:
            self.engine = LLMEngine(config, weights, EngineConfig(**SETTINGS))
            return
        self.store = dist.TCPStore("127.0.0.1", 0, size, is_master=True, wait_for_workers=False)
        self.followers = [threading.Thread(target=follower, args=(self.store.port, r, size, config, weights),
                                           daemon=True) for r in range(1, size)]
        for t in self.followers:
            t.start()
        group = TPGroup(self.store, 0, size, 30)
        shard = shard_weights(weights, config, 0, size)
        self.driver = TPDriver(LlamaModel(config, shard, 512, group.all_reduce), group, self.broken.append)
        self.engine = LLMEngine(config, {}, EngineConfig(**SETTINGS), kv_head_ids=kv_heads_of(config, 0, size),
                                model=self.driver)
        make_tp_engine(self.engine, group, self.driver)

    def close(self):
        if self.size > 1:
            self.driver.shutdown()
            for t in self.followers:
                t.join(10)


def follower(port: int, rank: int, size: int, config, weights) -> None:
    group = TPGroup(dist.TCPStore("127.0.0.1", port, size, is_master=False), rank, size, 30)
    shard = shard_weights(weights, config, rank, size)
    layout = KVLayout(config.num_layers, config.num_kv_heads, config.head_dim, "float32",
                      kv_heads_of(config, rank, size))
    with torch.inference_mode():
        follow(group, LlamaModel(config, shard, 512, group.all_reduce), layout)


def make_group(config, weights, size) -> Group:
    return Group(config, weights, size)


def greedy(engine, prompt=PROMPT, n=16) -> list[int]:
    engine.add_request(EngineRequest("r", prompt, SamplingParams(max_tokens=n, ignore_eos=True)))
    return run_to_end(engine)["r"]


@pytest.mark.parametrize("size", [2, 4])
def test_greedy_with_tp_equals_tp1(model, size):
    config, weights = model
    expected = greedy(LLMEngine(config, weights, EngineConfig(**SETTINGS)))
    group = make_group(config, weights, size)
    try:
        assert greedy(group.engine) == expected
        assert group.engine.num_free_blocks == group.engine.num_total_blocks
        assert not group.broken
    finally:
        group.close()


def test_profile_step_runs_on_every_rank(model):
    """The step that sizes a GPU's KV pool runs through the group before its cache exists."""
    config, weights = model
    expected = greedy(LLMEngine(config, weights, EngineConfig(**SETTINGS)))
    group = make_group(config, weights, 2)
    try:
        group.engine.profile_step()
        assert greedy(group.engine) == expected
        assert not group.broken
    finally:
        group.close()


@pytest.mark.parametrize("prefill_tp,decode_tp", list(itertools.product([1, 2, 4], [1, 2])))
def test_handoff_between_tp_sizes(model, prefill_tp, decode_tp):
    config, weights = model
    expected = greedy(LLMEngine(config, weights, EngineConfig(**SETTINGS)))
    prefill, decode = make_group(config, weights, prefill_tp), make_group(config, weights, decode_tp)
    try:
        prefill.engine.add_request(EngineRequest("r", PROMPT, SamplingParams(max_tokens=16, ignore_eos=True),
                                                 prefill_only=True))
        [first] = prefill.engine.step()
        kv = prefill.engine.export_kv("r")
        assert kv.shape == (2, 2, len(PROMPT), 4, 8)  # the whole model's KV heads, gathered
        assert prefill.engine.release_held("r")
        decode.engine.add_request(EngineRequest("r", PROMPT, SamplingParams(max_tokens=16, ignore_eos=True),
                                                kv=kv, first_token=first.token_ids[0]))
        assert run_to_end(decode.engine)["r"] == expected  # the first token, then the rest
        assert decode.engine.num_free_blocks == decode.engine.num_total_blocks
    finally:
        prefill.close()
        decode.close()


def test_tp_sizes_that_cannot_split_the_heads_are_refused():
    from pdmesh.engine.model_config import ModelConfig

    smollm = ModelConfig(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_layers=30, num_heads=9,
                         num_kv_heads=3, head_dim=64, max_position_embeddings=8192)
    check_tp_size(smollm, 3)
    check_tp_size(smollm, 9)  # 3 KV heads, each on 3 ranks
    with pytest.raises(InvalidRequestError, match="tp 2 does not divide the model's 9 attention heads"):
        check_tp_size(smollm, 2)
    odd = ModelConfig(vocab_size=10, hidden_size=768, intermediate_size=1536, num_layers=2, num_heads=12,
                      num_kv_heads=4, head_dim=64, max_position_embeddings=64)
    with pytest.raises(InvalidRequestError, match="tp 6 cannot split or evenly replicate the model's 4 KV heads"):
        check_tp_size(odd, 6)
    assert [kv_heads_of(smollm, r, 3) for r in range(3)] == [(0,), (1,), (2,)]
    assert [kv_heads_of(smollm, r, 9) for r in range(9)] == [(0,)] * 3 + [(1,)] * 3 + [(2,)] * 3


def test_prefix_cache_under_tp(model):
    """Rank 0 decides what is cached (block tables, and the cached prefix's slots in the step's batch
    it broadcasts); each follower attends over its own heads of the same shared blocks."""
    config, weights = model
    second = PROMPT[:8] + [5, 6, 7]  # shares PROMPT's first 2 blocks
    reference = LLMEngine(config, weights, EngineConfig(**SETTINGS, prefix_cache=False))
    expected = [greedy(reference, PROMPT), greedy(reference, second)]
    group = make_group(config, weights, 2)
    try:
        assert [greedy(group.engine, PROMPT), greedy(group.engine, second)] == expected
        assert group.engine.prefix_cache_stats() == (len(PROMPT) + len(second), 8)
        assert group.engine.num_free_blocks == group.engine.num_total_blocks
        assert not group.broken
    finally:
        group.close()
