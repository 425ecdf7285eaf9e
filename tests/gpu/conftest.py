"""Fixtures for the tests that need a GPU (marked `gpu`; tools/gpu_check.sh runs them)."""

from __future__ import annotations

import pytest
import torch

from support.gpu import GPU_TEST_DEVICE


@pytest.fixture(scope="session")
def device() -> torch.device:
    """cuda:0, or the CPU when PDMESH_GPU_TEST_DEVICE=cpu (checking the tests without a GPU)."""
    from pdmesh.engine.device import resolve_device

    return resolve_device(GPU_TEST_DEVICE)


@pytest.fixture(scope="session")
def small(device):
    """(transformers model on the device in float32, our ModelConfig, CPU float32 weights)."""
    from support.offline_model import small_llama

    hf, config, weights = small_llama(seed=3)
    return hf.to(device), config, weights

