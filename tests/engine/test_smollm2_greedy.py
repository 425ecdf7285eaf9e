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


SYSTEM = ("You are a careful assistant for a shipping company. Answer in one short sentence, name units, "
          "and never invent tracking numbers.")
QUESTIONS = ["How heavy can a parcel be?", "Do you ship to Norway?", "What is a pallet?"]


def test_prefix_cache_keeps_greedy_tokens(smollm2):
    """Chats sharing a system prompt, then a multi-turn conversation: the same greedy tokens with
    the prefix cache on and off, the cache on hits, and every block is free afterwards."""
    def answers(engine) -> list[list[int]]:
        tokenizer, out, params = smollm2.tokenizer, [], SamplingParams(max_tokens=12)
        for i, question in enumerate(QUESTIONS):
            chat = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": question}]
            engine.add_request(EngineRequest(f"q{i}", tokenizer.apply_chat_template(chat), params))
            out.append(run_to_end(engine)[f"q{i}"])
        chat = [{"role": "system", "content": SYSTEM}]
        for turn, question in enumerate(QUESTIONS[:2]):
            chat.append({"role": "user", "content": question})
            engine.add_request(EngineRequest(f"t{turn}", tokenizer.apply_chat_template(chat), params))
            out.append(run_to_end(engine)[f"t{turn}"])
            chat.append({"role": "assistant", "content": tokenizer.decode(out[-1], skip_special_tokens=True)})
        return out

    def engine(prefix_cache: bool) -> LLMEngine:
        return LLMEngine(smollm2.config, smollm2.weights,
                         EngineConfig(kv_cache_gib=0.05, max_model_len=512, prefix_cache=prefix_cache))
    cached = engine(True)
    assert answers(cached) == answers(engine(False))
    queried, hits = cached.prefix_cache_stats()
    assert hits >= 4 * 32 and hits < queried  # every chat after the first shares >= 2 system blocks
    assert cached.num_free_blocks == cached.num_total_blocks
