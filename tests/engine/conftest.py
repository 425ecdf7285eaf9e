"""Fixtures for engine tests."""

from __future__ import annotations

import pytest

from pdmesh.engine.engine_config import EngineConfig
from pdmesh.engine.llm_engine import LLMEngine
from support.tiny_model import tiny_llama


@pytest.fixture(scope="session")
def tiny():
    return tiny_llama()


@pytest.fixture
def make_engine(tiny):
    def make(**overrides) -> LLMEngine:
        _, config, weights = tiny
        settings = dict(block_size=4, kv_cache_gib=0.001)
        settings.update(overrides)
        return LLMEngine(config, weights, EngineConfig(**settings))
    return make


