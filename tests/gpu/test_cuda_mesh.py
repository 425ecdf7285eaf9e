"""A prefill worker and a decode worker on the one GPU, every prompt prefilled remotely: the KV
hand-off goes through the host (NCCL refuses two ranks on one device) and the stream stays
token-exact (float32)."""

from __future__ import annotations


import pytest

from pdmesh.engine.checkpoint import load_checkpoint
from pdmesh.engine.engine_config import EngineConfig
from pdmesh.engine.llm_engine import LLMEngine
from pdmesh.engine.sampling_params import SamplingParams
from pdmesh.engine.sequence import EngineRequest
from support.mesh import handoff_bytes, start_mesh
from support.offline_model import write_offline_model
from support.tiny_model import run_to_end

pytestmark = pytest.mark.gpu
PROMPTS = [list(range(30, 70)), [120, 5, 77, 3, 99, 64, 64, 200]]
NEW_TOKENS = 12


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return write_offline_model(tmp_path_factory.mktemp("offline_model"), seed=5)


@pytest.fixture(scope="module")
def gpu_mesh(tmp_path_factory, model_dir, device):
    log = tmp_path_factory.mktemp("gpu_mesh") / "serve.log"
    mesh = start_mesh(log, "--model", str(model_dir), "--device", str(device), "--dtype", "float32",
                      "--kv-cache-gib", "0.05", "--local-prefill-threshold", "0", "--max-model-len", "512",
                      "--prefill-workers", "1", "--decode-workers", "1", "--no-warmup")
    yield mesh
    if mesh.process.poll() is None:
        assert mesh.stop() == 0, log.read_text()[-3000:]


def test_remote_prefill_on_one_gpu_is_token_exact(gpu_mesh, model_dir, device):
    checkpoint = load_checkpoint(model_dir, log=lambda _: None)
    reference = LLMEngine(checkpoint.config, checkpoint.weights,
                          EngineConfig(device=str(device), dtype="float32", kv_cache_gib=0.01))
    with gpu_mesh.client() as client:
        for i, prompt in enumerate(PROMPTS):
            reference.add_request(EngineRequest(str(i), prompt, SamplingParams(max_tokens=NEW_TOKENS, ignore_eos=True)))
            expected = run_to_end(reference)[str(i)]
            done = client.generate(prompt_token_ids=prompt, max_tokens=NEW_TOKENS, ignore_eos=True)
            assert list(done.token_ids) == expected, f"prompt {i}"
    per_token = 2 * 2 * 2 * 32 * 4  # layers x (k, v) x kv heads x head dim x float32
    assert handoff_bytes(gpu_mesh) == per_token * sum(map(len, PROMPTS))


def test_status_names_the_gpu_and_its_memory(gpu_mesh, device):
    workers = gpu_mesh.workers()
    assert sorted(w.role for w in workers) == ["decode", "prefill"]
    for w in workers:
        assert w.device == str(device)
        assert (w.gpu_memory_used_bytes > 0) == (device.type == "cuda")
    assert all(w.kv_blocks_free == w.kv_blocks_total for w in gpu_mesh.wait_all_blocks_free())
