"""SmolLM2-135M-Instruct through our engine equals transformers (float32, same GGUF) token for token."""

from __future__ import annotations

import pytest
import torch

from pdmesh.engine.checkpoint import load_checkpoint
from pdmesh.engine.engine_config import EngineConfig
from pdmesh.engine.llm_engine import LLMEngine
from pdmesh.engine.sampling_params import SamplingParams
from pdmesh.engine.sequence import EngineRequest
from support.tiny_model import run_to_end
from support.greedy_prompts import CHATS, greedy_prompt_ids

NEW_TOKENS = 24


@pytest.fixture(scope="module")
def smollm2(smollm2_path):
    checkpoint = load_checkpoint(smollm2_path, log=lambda _: None)
    return checkpoint


def prompts(tokenizer) -> list[list[int]]:
    return greedy_prompt_ids(tokenizer)


def hf_reference(hf_model, prompt: list[int]) -> list[int]:
    # An explicit attention mask: chat prompts contain <|im_end|> (id 2), which is also the pad id,
    # and generate() would otherwise mask those prompt tokens out as padding.
    ids = torch.tensor([prompt])
    with torch.no_grad():
        out = hf_model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=NEW_TOKENS,
                                do_sample=False, eos_token_id=None, pad_token_id=2)
    return out[0, len(prompt):].tolist()


def test_greedy_equals_transformers(smollm2, hf_smollm2_model):
    engine = LLMEngine(smollm2.config, smollm2.weights, EngineConfig(kv_cache_gib=0.05, max_model_len=512))
    ps = prompts(smollm2.tokenizer)
    for i, p in enumerate(ps):  # all at once: also checks that batching keeps each stream exact
        engine.add_request(EngineRequest(str(i), p, SamplingParams(max_tokens=NEW_TOKENS, ignore_eos=True)))
    ours = run_to_end(engine)
    for i, p in enumerate(ps):
        assert ours[str(i)] == hf_reference(hf_smollm2_model, p), f"prompt {i} differs"
    assert engine.num_free_blocks == engine.num_total_blocks


def test_paris_then_eos(smollm2):
    engine = LLMEngine(smollm2.config, smollm2.weights, EngineConfig(kv_cache_gib=0.05, max_model_len=512))
    prompt = smollm2.tokenizer.apply_chat_template(CHATS[0])
    engine.add_request(EngineRequest("r", prompt, SamplingParams(max_tokens=40)))
    tokens = run_to_end(engine)["r"]
    assert tokens[-1] in smollm2.config.eos_token_ids
    assert smollm2.tokenizer.decode(tokens, skip_special_tokens=True) == "The capital of France is Paris."
