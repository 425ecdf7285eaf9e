"""Meshes for the e2e tests, started once per session.

- `mesh`: scheduler, 1 prefill worker, 2 decode workers, SmolLM2.
- `echo_mesh`: the real scheduler and worker processes with the model replaced by EchoModel at
  20 ms a step (no compute), 64 decode KV blocks and a queue of 8, so queues fill on purpose and in
  seconds; tenants from a TOML file.
"""

from __future__ import annotations

import itertools

import pytest

from pdmesh.engine.checkpoint import load_checkpoint
from pdmesh.engine.engine_config import EngineConfig
from pdmesh.engine.llm_engine import LLMEngine
from pdmesh.engine.sampling_params import SamplingParams
from pdmesh.engine.sequence import EngineRequest
from support.cluster import NEW_TOKENS, prompts, write_tiny_model
from support.mesh import LOCAL_PREFILL_THRESHOLD, start_mesh

MAX_PROMPT_TOKENS, MAX_OUTPUT_TOKENS, MAX_MODEL_LEN = 1000, 1200, 2048


@pytest.fixture(scope="session")
def mesh(tmp_path_factory, smollm2_path):
    log = tmp_path_factory.mktemp("mesh") / "serve.log"
    mesh = start_mesh(log, "--prefill-workers", "1", "--decode-workers", "2", "--kv-cache-gib", "0.25",
                      "--max-model-len", str(MAX_MODEL_LEN), "--max-prompt-tokens", str(MAX_PROMPT_TOKENS),
                      "--max-output-tokens", str(MAX_OUTPUT_TOKENS),
                      "--local-prefill-threshold", str(LOCAL_PREFILL_THRESHOLD))
    yield mesh
    if mesh.process.poll() is None:
        assert mesh.stop() == 0, log.read_text()[-3000:]
        assert len(mesh.children) >= 4  # scheduler, prefill, 2 decode: the check below sees them
    assert not mesh.leftovers(), f"processes left behind: {mesh.leftovers()}"


ECHO_BLOCK_BYTES = 1 * 2 * 16 * 1 * 1 * 4  # layers x k/v x block tokens x kv heads x head dim x fp32
TENANTS = """
[tenants.free]
api_keys = ["k-free"]
[tenants.flood]
api_keys = ["k-flood"]
[tenants.small]
api_keys = ["k-small"]
[tenants.acme]
api_keys = ["k-acme"]
requests_per_s = 0.5
burst_s = 4
[tenants.ops]
api_keys = ["k-ops"]
admin = true
"""


@pytest.fixture(scope="session")
def echo_mesh(tmp_path_factory, smollm2_path):
    folder = tmp_path_factory.mktemp("echo_mesh")
    (folder / "tenants.toml").write_text(TENANTS)
    mesh = start_mesh(folder / "serve.log", "--engine", "echo", "--echo-step-ms", "20",
                      "--kv-cache-gib", str(64 * ECHO_BLOCK_BYTES / 2**30), "--max-model-len", "512",
                      "--max-queued-requests", "8", "--default-max-tokens", "8", "--local-prefill-threshold", "0",
                      "--tenants-file", str(folder / "tenants.toml"))
    mesh.admin_key = "k-ops"  # cluster status is admin-only once tenants are configured
    yield mesh
    assert mesh.stop() == 0
    assert not mesh.leftovers()


@pytest.fixture(scope="session")
def reference_engine(smollm2_path):
    """SmolLM2 in-process, the same code the workers run: what the mesh must reproduce."""
    checkpoint = load_checkpoint(smollm2_path, log=lambda _: None)
    engine = LLMEngine(checkpoint.config, checkpoint.weights, EngineConfig(kv_cache_gib=0.1, max_model_len=2048))
    return engine, checkpoint.tokenizer


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory, smollm2_path):
    return write_tiny_model(tmp_path_factory.mktemp("tiny_model"), smollm2_path)


@pytest.fixture(scope="session")
def expected(tiny_model):
    """Greedy tokens of each prompt from the engine alone: what every chaos run must reproduce."""
    checkpoint = load_checkpoint(tiny_model, log=lambda _: None)
    engine = LLMEngine(checkpoint.config, checkpoint.weights, EngineConfig(kv_cache_gib=0.05))
    out: dict[int, list[int]] = {}
    for i, p in enumerate(prompts(24)):
        engine.add_request(EngineRequest(str(i), p, SamplingParams(max_tokens=NEW_TOKENS, ignore_eos=True)))
    while engine.has_work():
        for o in engine.step():
            out.setdefault(int(o.request_id), []).extend(o.token_ids)
    assert_varied(out)
    return out


def assert_varied(outputs: dict[int, list[int]]) -> None:
    """"Token-identical" proves a resume exact only if a token off would change the output: so no
    output may be one token over and over, and no two prompts may give the same output."""
    distinct = {i: len(set(tokens)) for i, tokens in outputs.items()}
    assert min(distinct.values()) >= NEW_TOKENS // 2, f"distinct tokens per output: {distinct}"
    runs = {i: longest_run(tokens) for i, tokens in outputs.items()}
    assert max(runs.values()) <= 4, f"longest run of one token per output: {runs}"
    assert len({tuple(tokens) for tokens in outputs.values()}) == len(outputs), "two prompts gave one output"


def longest_run(tokens: list[int]) -> int:
    return max(len(list(group)) for _, group in itertools.groupby(tokens))
