"""A random-weight Llama folder made without any download: transformers' weights and a byte-level
tokenizer built in code. GPU machines may have no network, so the GPU tests use it (head_dim 32,
which FlexAttention's compiled kernel accepts, unlike the tiny model's 8)."""

from __future__ import annotations

import json
from pathlib import Path

BYTE_TOKENS = 256
SPECIALS = ("<s>", "</s>")  # bos 256, eos 257
VOCAB = 320


def llama_config(hidden: int = 128, heads: int = 4, kv_heads: int = 2, layers: int = 2, seed_std: float = 0.2):
    from transformers import LlamaConfig

    # A wide init (0.2, as support.cluster argues) gives varied greedy outputs with large logit gaps.
    return LlamaConfig(vocab_size=VOCAB, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                       num_attention_heads=heads, num_key_value_heads=kv_heads, max_position_embeddings=1024,
                       tie_word_embeddings=False, bos_token_id=BYTE_TOKENS, eos_token_id=BYTE_TOKENS + 1,
                       initializer_range=seed_std)


def small_llama(seed: int = 0, **shape):
    """(transformers model, our ModelConfig, HF-named float32 weights), as support.tiny_model."""
    import torch
    from transformers import LlamaForCausalLM

    from pdmesh.engine.hf_checkpoint import model_config_from_hf

    torch.manual_seed(seed)
    hf = LlamaForCausalLM(llama_config(**shape)).eval()
    weights = {k: v.detach().float().clone() for k, v in hf.state_dict().items()}
    return hf, model_config_from_hf(hf.config.to_dict(), weights, Path("small-llama")), weights


def write_offline_model(folder: Path, seed: int = 0, **shape) -> Path:
    """An HF folder (config, safetensors, tokenizer) that pdmesh and transformers both load."""
    hf, _, _ = small_llama(seed, **shape)
    hf.save_pretrained(folder)
    write_byte_tokenizer(folder)
    return folder


def write_byte_tokenizer(folder: Path) -> None:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from tokenizers.pre_tokenizers import ByteLevel

    alphabet = ByteLevel.alphabet()
    vocab = {ch: i for i, ch in enumerate(sorted(alphabet))}
    vocab.update({tok: BYTE_TOKENS + i for i, tok in enumerate(SPECIALS)})
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.add_special_tokens(list(SPECIALS))
    tokenizer.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps({"bos_token": SPECIALS[0], "eos_token": SPECIALS[1]}))
