"""Colocated mode on the real model: `pdmesh serve --prefill-workers 0` runs decode workers alone,
each prefilling the prompts it serves, long ones included, in chunks of 64 tokens
(`--prefill-chunk-tokens`); the text equals the engine alone."""

from __future__ import annotations

import pytest

from support.mesh import engine_greedy, handoff_bytes, start_mesh

COLORS = ("red", "green", "blue", "yellow", "purple")
# About 300 tokens: far over the default local-prefill threshold (64), and a question to answer.
LONG_CHAT = [{"role": "user", "content": " ".join(f"Box {i} is {COLORS[i % 5]}." for i in range(50))
              + " Which color is box 12? Then list every color once."}]


@pytest.fixture(scope="module")
def colocated(tmp_path_factory, smollm2_path):
    log = tmp_path_factory.mktemp("colocated") / "serve.log"
    mesh = start_mesh(log, "--prefill-workers", "0", "--decode-workers", "1", "--kv-cache-gib", "0.1",
                      "--max-model-len", "2048", "--prefill-chunk-tokens", "64")
    yield mesh
    assert mesh.stop() == 0, log.read_text()[-3000:]
    assert not mesh.leftovers(), f"processes left behind: {mesh.leftovers()}"


def test_ready_and_warm_up_without_a_prefill_worker(colocated):
    log = colocated.log_path.read_text()
    assert "1 colocated decode workers" in log and "warm-up: 'What is the capital of France?'" in log
    assert "prefills in chunks of 64 tokens" in log
    assert "Paris" in log.split("warm-up:")[1].splitlines()[0]
    with colocated.client() as client:
        status = client.cluster_status()
    assert status.colocated and [w.role for w in status.workers] == ["decode"] and status.workers[0].healthy


def test_long_prompt_is_prefilled_by_its_decode_worker_token_exact(colocated, reference_engine):
    before = handoff_bytes(colocated)
    _, tokenizer = reference_engine
    prompt_ids = tokenizer.apply_chat_template(LONG_CHAT)
    assert len(prompt_ids) > 250
    with colocated.client() as client:
        done = client.generate(messages=LONG_CHAT, max_tokens=32)
    assert list(done.token_ids) == engine_greedy(reference_engine, prompt_ids, 32)
    assert len(set(done.token_ids)) > 8, done.text  # a varied answer: one token off would show
    assert done.route.prefill_worker_id == "" and list(done.route.decode_worker_ids) == ["decode-0"]
    assert handoff_bytes(colocated) == before == 0  # no KV ever crossed a channel
