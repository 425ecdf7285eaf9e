"""One real mesh for the e2e tests: scheduler, 1 prefill worker, 2 decode workers, SmolLM2."""

from __future__ import annotations

import pytest

from pdmesh.engine.checkpoint import load_checkpoint
from pdmesh.engine.engine_config import EngineConfig
from pdmesh.engine.llm_engine import LLMEngine
from support.mesh import LOCAL_PREFILL_THRESHOLD, processes_mentioning, start_mesh




@pytest.fixture(scope="session")
def mesh(tmp_path_factory, smollm2_path):
    log = tmp_path_factory.mktemp("mesh") / "serve.log"
    mesh = start_mesh(log, "--prefill-workers", "1", "--decode-workers", "2", "--kv-cache-gib", "0.25",
                      "--max-model-len", "2048", "--local-prefill-threshold", str(LOCAL_PREFILL_THRESHOLD))
    yield mesh
    if mesh.process.poll() is None:
        assert mesh.stop() == 0, log.read_text()[-3000:]
    leftovers = processes_mentioning(mesh.address)
    assert not leftovers, f"processes left behind: {leftovers}"


@pytest.fixture(scope="session")
def reference_engine(smollm2_path):
    """SmolLM2 in-process, the same code the workers run: what the mesh must reproduce."""
    checkpoint = load_checkpoint(smollm2_path, log=lambda _: None)
    engine = LLMEngine(checkpoint.config, checkpoint.weights, EngineConfig(kv_cache_gib=0.1, max_model_len=2048))
    return engine, checkpoint.tokenizer
