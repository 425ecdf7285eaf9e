"""Session fixtures: the real SmolLM2 GGUF, and transformers' own reading of it as the reference.

transformers is slow to import and to load the model (~10 s), so each reference is built once per
session and shared by every test file that asks for it.

Tests marked `gpu` run where CUDA is available and are skipped elsewhere ("CUDA is not
available"); PDMESH_GPU_TEST_DEVICE=cpu runs them on the CPU instead, to check the tests
themselves on a machine without a GPU. Every other test is the CPU suite wherever it runs: an
unset --device means cpu in it (in this process and in the services it starts), where a GPU
machine would otherwise move its engines to CUDA in bfloat16. GPU tests name their device.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from support.gpu import GPU_TEST_DEVICE, NO_CUDA


def pytest_configure(config):
    os.environ.setdefault("PDMESH_DEVICE", "cpu")  # services started by tests (flags win over it)


@pytest.fixture(scope="session", autouse=True)
def cpu_unless_named():
    import torch

    from pdmesh.engine import device

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(device, "auto_device", lambda: torch.device("cpu"))
        yield


def pytest_collection_modifyitems(config, items):
    import torch

    if GPU_TEST_DEVICE == "cpu" or torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason=NO_CUDA)
    for item in items:
        if item.get_closest_marker("gpu") is not None:
            item.add_marker(skip)


def pytest_terminal_summary(terminalreporter):
    skipped = [r for r in terminalreporter.stats.get("skipped", []) if NO_CUDA in str(r.longrepr)]
    if skipped:
        terminalreporter.write_line(f"{len(skipped)} test(s) marked gpu skipped: {NO_CUDA} "
                                    "(tools/gpu_check.sh runs them on a GPU machine)")

from pdmesh.engine.default_model import ensure_default_model

# Every scheduler a test starts serves its OpenAI HTTP API on a free port, not the default 8000,
# so meshes of concurrent tests (and of other checkouts on this machine) never collide there.
os.environ.setdefault("PDMESH_HTTP_PORT", "0")


@pytest.fixture(scope="session")
def smollm2_path() -> Path:
    """The SmolLM2-135M-Instruct Q4_1 GGUF in the pdmesh cache (downloaded on first use)."""
    return ensure_default_model()


@pytest.fixture(scope="session")
def hf_smollm2_tokenizer(smollm2_path):
    """transformers' tokenizer built from the same GGUF: the reference for token ids."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(smollm2_path.parent, gguf_file=smollm2_path.name)


@pytest.fixture(scope="session")
def hf_smollm2_model(smollm2_path):
    """transformers' float32 model from the same GGUF: the reference for weights and config."""
    import torch
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(smollm2_path.parent, gguf_file=smollm2_path.name,
                                                dtype=torch.float32)
