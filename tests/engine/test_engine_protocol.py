"""pdmesh's own engine through the worker interface (engine_protocol.Engine) and nothing else:
what a worker may call, with plain dataclasses in and out."""

from __future__ import annotations

import asyncio
import dataclasses
import inspect

import pytest

from pdmesh.engine.async_engine import AsyncEngine
from pdmesh.engine.engine_protocol import Engine, EngineLoad, KVFingerprint
from pdmesh.engine.sampling_params import SamplingParams
from pdmesh.engine.sequence import EngineRequest
from pdmesh.errors import InvalidRequestError


@pytest.fixture
def engine(make_engine):
    engine = AsyncEngine(make_engine())  # its own step thread
    yield engine
    engine.stop()
    engine.close()


def test_implements_every_method_of_the_interface(engine):
    for name, member in inspect.getmembers(Engine, inspect.isfunction):
        if not name.startswith("_"):
            assert callable(getattr(engine, name)), name
    for name in ("kind", "model_name", "layout", "follower_pids"):
        assert hasattr(engine, name), name
    assert engine.kind == "pdmesh" and engine.follower_pids == ()


def test_load_and_fingerprint_are_plain_dataclasses(engine):
    load = engine.load()
    assert isinstance(load, EngineLoad) and load.free_blocks == load.total_blocks > 0 and load.running == 0
    fingerprint = engine.fingerprint()
    assert isinstance(fingerprint, KVFingerprint) and fingerprint.mismatch(fingerprint) is None
    other_kind = dataclasses.replace(fingerprint, engine_kind="vllm")
    assert fingerprint.mismatch(other_kind) == "engine kind is vllm there, pdmesh here"
    other_dtype = dataclasses.replace(fingerprint, layout=dataclasses.replace(fingerprint.layout, dtype="bfloat16"))
    assert "dtype is bfloat16 on the sender, float32 here" in fingerprint.mismatch(other_dtype)


def test_prefill_export_and_release_then_decode_elsewhere(engine, make_engine):
    """The hand-off a worker drives: prefill here, export, import into another engine, generate."""
    async def main():
        params = SamplingParams(max_tokens=6, ignore_eos=True)
        first = await engine.prefill(EngineRequest("p", [5, 6, 7, 8], params))
        kv = engine.export_kv("p")
        assert engine.load().free_blocks < engine.load().total_blocks  # held until released
        assert engine.release_held("p") > 0
        assert engine.load().free_blocks == engine.load().total_blocks
        other = AsyncEngine(make_engine())
        try:
            other.reserve("p", 4 + 6)
            request = EngineRequest("p", [5, 6, 7, 8], params, kv=kv, first_token=first.token_ids[0])
            tokens = [t async for o in other.generate(request) for t in o.token_ids]
            other.release_reservation("p")
            assert other.load().free_blocks == other.load().total_blocks
        finally:
            other.stop()
        alone = [t async for o in engine.generate(EngineRequest("a", [5, 6, 7, 8], params)) for t in o.token_ids]
        return tokens, alone
    handed_off, alone = asyncio.run(main())
    assert handed_off == alone


def test_validate_refuses_what_can_never_run(engine):
    with pytest.raises(InvalidRequestError, match="max-model-len"):
        engine.validate(list(range(5)), 10_000)
