"""Session fixtures: the real SmolLM2 GGUF, and transformers' own reading of it as the reference.

transformers is slow to import and to load the model (~10 s), so each reference is built once per
session and shared by every test file that asks for it.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

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
