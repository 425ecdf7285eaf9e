"""The prefix cache on a real mesh (SmolLM2; 1 prefill worker, 2 decode workers): chats sharing a
system prompt and a multi-turn conversation stream the same greedy tokens as an engine with the
cache off, the prefill worker's hit counters rise in cluster status and in Prometheus alike, and
every block is free afterwards while cached blocks stay indexed. Last, the decode worker holding a
shared prefix is killed while a stream that shares it runs there: the stream resumes on the other
worker with the same tokens, the prefix is served again, and nothing stays held.
"""

from __future__ import annotations

import os
import signal
import time

import pytest

from pdmesh.engine.checkpoint import load_checkpoint
from pdmesh.engine.engine_config import EngineConfig
from pdmesh.engine.llm_engine import LLMEngine
from support.mesh import engine_greedy
from support.metrics import metric
from support.serve_chaos import scheduler_metrics_address, wait_back, wait_until

SYSTEM = ("You are the help desk of a bicycle shop. Answer in one sentence. Prices are in euros, "
          "repairs take two days, and the shop is closed on Mondays. Never promise discounts.")
QUESTIONS = ["Can you fix a flat tyre?", "Are you open on Monday?", "How long does a repair take?"]
MAX_TOKENS = 16


@pytest.fixture(scope="module")
def cache_off(smollm2_path):
    """SmolLM2 in-process with the prefix cache off: the tokens the mesh must reproduce."""
    checkpoint = load_checkpoint(smollm2_path, log=lambda _: None)
    engine = LLMEngine(checkpoint.config, checkpoint.weights,
                       EngineConfig(kv_cache_gib=0.1, max_model_len=2048, prefix_cache=False))
    return engine, checkpoint.tokenizer


def prefill_hits(mesh) -> tuple[int, int]:
    (worker,) = mesh.workers("prefill")
    return worker.prefix_cache_queried_tokens, worker.prefix_cache_hit_tokens


def prefill_tokens_computed(mesh) -> float:
    (worker,) = mesh.workers("prefill")
    return metric(worker.metrics_address, "pdmesh_prefill_tokens_total")


def test_shared_system_prompt_and_multi_turn(mesh, cache_off):
    _, tokenizer = cache_off

    def greedy(prompt_ids: list[int]) -> list[int]:
        return engine_greedy(cache_off, prompt_ids, MAX_TOKENS)
    queried_before, hits_before = prefill_hits(mesh)
    computed_before = prefill_tokens_computed(mesh)
    chats = [[{"role": "system", "content": SYSTEM}, {"role": "user", "content": q}] for q in QUESTIONS]
    with mesh.client() as client:
        for chat in chats:
            done = client.generate(messages=chat, max_tokens=MAX_TOKENS)
            assert list(done.token_ids) == greedy(tokenizer.apply_chat_template(chat))
        conversation = chats[0] + [{"role": "assistant", "content": done.text}]
        for question in QUESTIONS[1:]:
            conversation = conversation + [{"role": "user", "content": question}]
            done = client.generate(messages=conversation, max_tokens=MAX_TOKENS)
            assert list(done.token_ids) == greedy(tokenizer.apply_chat_template(conversation))
            conversation = conversation + [{"role": "assistant", "content": done.text}]
    system_blocks = len(tokenizer.apply_chat_template(chats[0][:1])) // 16
    time.sleep(1.5)  # one heartbeat: the counters reach the scheduler
    queried, hits = prefill_hits(mesh)
    # Every prompt after the first shares at least the system prompt's full blocks.
    assert hits - hits_before >= (len(chats) + 1) * system_blocks * 16 > 0
    assert hits - hits_before < queried - queried_before
    # The prefill rate counts computed tokens only (pdmesh advise reads it as the worker's speed).
    assert prefill_tokens_computed(mesh) - computed_before == (queried - queried_before) - (hits - hits_before)
    (prefill,) = mesh.workers("prefill")
    assert metric(prefill.metrics_address, "pdmesh_prefix_cache_hits_total") == prefill.prefix_cache_hit_tokens
    assert metric(prefill.metrics_address, "pdmesh_prefix_cache_queries_total") == prefill.prefix_cache_queried_tokens
    workers = mesh.wait_all_blocks_free()
    assert all(w.kv_blocks_free == w.kv_blocks_total for w in workers), workers
    assert prefill.kv_blocks_cached >= system_blocks


ROUTED_SYSTEM = ("You are a librarian. Recommend exactly one book per answer, with its author, and say "
                 "nothing about films. Keep every answer under twenty words, please.")


def test_decode_routing_follows_the_cached_prefix_and_receives_only_the_rest(mesh, cache_off):
    """While the decode worker holding a prefix runs a stream (so the other has more free blocks and
    would be picked on room alone), a prompt with that prefix still goes to the holder, and its
    hand-off carries only the KV after the cached blocks; a prompt without it goes to the roomier
    worker."""
    _, tokenizer = cache_off

    def chat(question: str, system: str = ROUTED_SYSTEM) -> list[dict]:
        return [{"role": "system", "content": system}, {"role": "user", "content": question}]
    earlier = [chat("A book about the sea?"), chat("A long list of books, please.")]
    with mesh.client() as client:
        holder = client.generate(messages=earlier[0], max_tokens=4).route.decode_worker_ids[0]
        time.sleep(1.5)  # a heartbeat carries the holder's cached block hashes
        stream = client.stream(messages=earlier[1], max_tokens=400, ignore_eos=True)
        first = next(iter(stream))
        time.sleep(1.5)  # a heartbeat shows the stream's blocks in use on its worker
        received = handoff_bytes(mesh, holder)
        try:
            shared = client.generate(messages=chat("A book about trains?"), max_tokens=4)
            received = handoff_bytes(mesh, holder) - received
            unshared = client.generate(messages=chat("Name a river.", "You are a geographer."), max_tokens=4)
        finally:
            stream.close()
    assert first.token_ids
    assert shared.route.decode_worker_ids[0] == holder
    assert unshared.route.decode_worker_ids[0] != holder
    prompt = tokenizer.apply_chat_template(chat("A book about trains?"))
    cached = max(common_prefix(prompt, tokenizer.apply_chat_template(c)) for c in earlier)
    cached = min(cached, len(prompt) - 1) // 16 * 16
    assert cached >= 32
    assert received == PER_TOKEN * (len(prompt) - cached)
    assert all(w.kv_blocks_free == w.kv_blocks_total for w in mesh.wait_all_blocks_free())


PER_TOKEN = 30 * 2 * 3 * 64 * 4  # KV bytes of one SmolLM2 token: layers x (k, v) x kv heads x head dim x float32


def handoff_bytes(mesh, worker_id: str) -> float:
    (worker,) = [w for w in mesh.workers("decode") if w.worker_id == worker_id]
    return metric(worker.metrics_address, "pdmesh_kv_handoff_bytes_total")


def common_prefix(a: list[int], b: list[int]) -> int:
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


CHAOS_SYSTEM = ("You are a ferry timetable assistant. Give departure times in 24-hour format, name the "
                "pier, and add that tickets are sold on board only. Be brief and friendly.")


def test_killing_the_worker_that_holds_a_shared_prefix_loses_nothing(mesh, cache_off):
    """Runs last in this module: it kills a decode worker of the session's mesh and waits until
    serve has it back."""
    _, tokenizer = cache_off

    def chat(question: str) -> list[dict]:
        return [{"role": "system", "content": CHAOS_SYSTEM}, {"role": "user", "content": question}]
    long_chat, again = chat("List every departure today, one per line."), chat("When is the last ferry?")
    resumed_before = metric(scheduler_metrics_address(mesh), "pdmesh_resumed_streams_total")
    with mesh.client(timeout_s=300, retries=0) as client:
        client.generate(messages=chat("When is the first ferry?"), max_tokens=4)  # the prefix is cached now
        time.sleep(1.5)  # a heartbeat carries the cached block hashes to the scheduler
        stream = client.stream(messages=long_chat, max_tokens=120, ignore_eos=True)
        chunks = [next(iter(stream))]
        victim = wait_until(lambda: next((w for w in mesh.workers("decode") if w.running), None), 30,
                            "the decode worker running the stream")
        assert victim.kv_blocks_cached >= 2  # it holds the shared system prompt's blocks
        os.kill(victim.ranks[0].pid, signal.SIGKILL)
        killed_at = time.monotonic()
        chunks += list(stream)
        served_again = client.generate(messages=again, max_tokens=MAX_TOKENS)
    route = chunks[-1].route
    assert route.decode_worker_ids[0] == victim.worker_id and len(route.decode_worker_ids) == 2, route  # moved
    assert metric(scheduler_metrics_address(mesh), "pdmesh_resumed_streams_total") == resumed_before + 1
    tokens = [t for c in chunks for t in c.token_ids]
    assert tokens == engine_greedy(cache_off, tokenizer.apply_chat_template(long_chat), 120, ignore_eos=True)
    assert list(served_again.token_ids) == engine_greedy(cache_off, tokenizer.apply_chat_template(again), MAX_TOKENS)
    wait_back(mesh, victim.worker_id, victim.restarts + 1, killed_at, timeout_s=120)
    workers = mesh.wait_all_blocks_free(30)
    assert len(workers) == 3 and all(w.healthy for w in workers), workers
    assert all(w.kv_blocks_free == w.kv_blocks_total and w.running == 0 for w in workers), workers
