"""A tiny random-weight Llama, built with transformers so it doubles as the reference, and engine helpers."""

from __future__ import annotations

import torch

from pdmesh.engine.llm_engine import LLMEngine
from pdmesh.engine.model_config import ModelConfig


def tiny_llama(num_kv_heads: int = 2, seed: int = 0, tie: bool = False):
    """(transformers model, our ModelConfig, HF-named float32 weights)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    hf_config = LlamaConfig(vocab_size=320, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                            num_attention_heads=8, num_key_value_heads=num_kv_heads, max_position_embeddings=512,
                            rope_theta=10000.0, tie_word_embeddings=tie, eos_token_id=2, bos_token_id=1)
    hf = LlamaForCausalLM(hf_config).eval()
    config = ModelConfig(vocab_size=320, hidden_size=64, intermediate_size=128, num_layers=2, num_heads=8,
                         num_kv_heads=num_kv_heads, head_dim=8, max_position_embeddings=512,
                         rope_theta=10000.0, tie_word_embeddings=tie, eos_token_ids=(2,), bos_token_id=1)
    weights = {k: v.detach().float().clone() for k, v in hf.state_dict().items()}
    return hf, config, weights


def hf_greedy(hf, prompt: list[int], max_new_tokens: int) -> list[int]:
    with torch.no_grad():
        out = hf.generate(torch.tensor([prompt]), max_new_tokens=max_new_tokens, do_sample=False,
                          eos_token_id=None, pad_token_id=0)
    return out[0, len(prompt):].tolist()


def run_to_end(engine: LLMEngine) -> dict[str, list[int]]:
    """Step until idle; token ids per request id."""
    tokens: dict[str, list[int]] = {}
    while engine.has_work():
        for out in engine.step():
            tokens.setdefault(out.request_id, []).extend(out.token_ids)
    return tokens
