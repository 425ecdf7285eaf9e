"""Tensor-parallel workers in a real mesh: SmolLM2 prefilled by a TP=3 group, decoded at TP=1;
and a killed follower rank takes its whole group out of routing while requests complete."""

from __future__ import annotations

import os
import signal
import time

import pytest

from support.cluster import WORKER_FLAGS, Cluster, Load
from support.mesh import engine_greedy, start_mesh

CHAT = [{"role": "user", "content": "What is the capital of France?"}]


@pytest.fixture(scope="module")
def tp_mesh(tmp_path_factory, smollm2_path):
    log = tmp_path_factory.mktemp("tp_mesh") / "serve.log"
    mesh = start_mesh(log, "--prefill-tp", "3", "--decode-tp", "1", "--kv-cache-gib", "0.1",
                      "--max-model-len", "1024", "--local-prefill-threshold", "0")
    yield mesh
    assert mesh.stop() == 0
    assert len(mesh.children) >= 5  # scheduler, decode, 3 prefill ranks
    assert not mesh.leftovers()


def test_smollm2_prefill_tp3_decode_tp1_equals_engine_alone(tp_mesh, reference_engine):
    _, tokenizer = reference_engine
    prefill = tp_mesh.workers("prefill")[0]
    assert prefill.tp_size == 3
    assert [list(r.kv_head_ids) for r in prefill.ranks] == [[0], [1], [2]]
    assert len({r.pid for r in prefill.ranks}) == 3
    for messages in (CHAT, [{"role": "user", "content": "Write a haiku about the sea."}]):
        expected_tokens = engine_greedy(reference_engine, tokenizer.apply_chat_template(messages), 32)
        with tp_mesh.client() as client:
            done = client.generate(messages=messages, max_tokens=32)
        assert list(done.token_ids) == expected_tokens
    assert "Paris" in tokenizer.decode(engine_greedy(reference_engine, tokenizer.apply_chat_template(CHAT), 32))


@pytest.fixture
def tp_cluster(tiny_model, tmp_path):
    c = Cluster(tiny_model, tmp_path)
    c.start_scheduler("--local-prefill-threshold", "0")
    c.start_worker("prefill", "prefill-tp2", "--tp", "2", *WORKER_FLAGS)
    c.start_worker("prefill", "prefill-tp1", *WORKER_FLAGS)
    c.start_worker("decode", "decode-tp2", "--tp", "2", *WORKER_FLAGS)
    c.start_worker("decode", "decode-tp1", *WORKER_FLAGS)
    c.wait_healthy({"prefill-tp2", "prefill-tp1", "decode-tp2", "decode-tp1"})
    yield c
    c.stop_all()


def test_killed_follower_rank_takes_its_group_out(tp_cluster, expected):
    group = next(w for w in tp_cluster.workers() if w.worker_id == "decode-tp2")
    follower_pid = next(r.pid for r in group.ranks if r.rank == 1)
    load = Load(tp_cluster).start()
    time.sleep(1.0)
    os.kill(follower_pid, signal.SIGKILL)
    tp_cluster.wait_until(lambda: not next(w for w in tp_cluster.workers() if w.worker_id == "decode-tp2").healthy,
                          10, "the TP group to leave routing")
    load.finish(expected)  # every request completes elsewhere, token-exact
    assert tp_cluster.procs["decode-tp2"].wait(10) == 3  # rank 0 exited when its group broke
    tp_cluster.wait_until(lambda: not any(os.path.exists(f"/proc/{r.pid}") for r in group.ranks), 10,
                          "every rank of the broken group gone")
