"""Checkpoint loading: GGUF against transformers' own GGUF loading, the weight cache, HF folders,
and the errors bad inputs must give."""

from __future__ import annotations

import json
import math
import os
import time

import gguf
import numpy as np
import pytest
import torch

from pdmesh.engine.checkpoint import load_checkpoint
from pdmesh.engine.gguf_checkpoint import llama3_scaling_from_factors, unpermute_rows
from pdmesh.engine.weight_cache import WeightCache
from pdmesh.errors import CheckpointError

LAYER0 = "model.layers.0"
COMPARED = ["model.embed_tokens.weight", "model.norm.weight"] + [
    f"{LAYER0}.{name}.weight" for name in (
        "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
        "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj", "input_layernorm", "post_attention_layernorm")]


@pytest.fixture(scope="module")
def gguf_loads(smollm2_path, tmp_path_factory):
    """The real GGUF loaded twice through a fresh cache: (first, second, log lines, seconds each)."""
    cache_dir = tmp_path_factory.mktemp("cache")
    lines, seconds, loads = [], [], []
    for _ in range(2):
        start = time.perf_counter()
        loads.append(load_checkpoint(smollm2_path, cache_dir=cache_dir, log=lines.append))
        seconds.append(time.perf_counter() - start)
    return loads[0], loads[1], lines, seconds, cache_dir


def test_gguf_weights_match_transformers(gguf_loads, hf_smollm2_model):
    first, _, _, _, _ = gguf_loads
    reference = hf_smollm2_model.state_dict()
    for name in COMPARED:
        assert first.weights[name].dtype == torch.float32
        torch.testing.assert_close(first.weights[name], reference[name], rtol=0, atol=1e-6, msg=name)
    assert set(first.weights) == set(reference) - {"lm_head.weight"}  # tied: no separate lm_head


def test_gguf_config(gguf_loads, hf_smollm2_model):
    config, hf = gguf_loads[0].config, hf_smollm2_model.config
    assert (config.num_layers, config.num_heads, config.num_kv_heads) == (30, 9, 3)
    assert (config.hidden_size, config.intermediate_size, config.head_dim) == (576, 1536, 64)
    assert (config.vocab_size, config.max_position_embeddings) == (49152, 8192)
    assert config.tie_word_embeddings and not config.attention_bias and config.rope_scaling is None
    assert config.rope_theta == hf.rope_parameters["rope_theta"] == 100000.0
    assert config.rms_norm_eps == pytest.approx(hf.rms_norm_eps)
    assert (config.bos_token_id, config.eos_token_ids) == (1, (2,))


def test_second_load_uses_cache(gguf_loads, smollm2_path):
    first, second, lines, seconds, cache_dir = gguf_loads
    entry = WeightCache(cache_dir).entry_dir(smollm2_path)
    assert (entry / "weights.safetensors").is_file()
    assert any(line.startswith("dequantizing 272 tensors") for line in lines)
    assert any(line.startswith("loaded cached weights") for line in lines)
    assert seconds[1] < seconds[0]
    assert second.config == first.config
    assert second.tokenizer.apply_chat_template([{"role": "user", "content": "hi"}]) == \
        first.tokenizer.apply_chat_template([{"role": "user", "content": "hi"}])
    for name in COMPARED:
        assert torch.equal(first.weights[name], second.weights[name])


def _tiny_model(arch: str):
    from transformers import (LlamaConfig, LlamaForCausalLM, MistralConfig, MistralForCausalLM,
                              Qwen2Config, Qwen2ForCausalLM)

    shape = dict(vocab_size=49152, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                 bos_token_id=1, eos_token_id=2)
    torch.manual_seed(0)
    if arch == "llama":
        rope = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
                "high_freq_factor": 4.0, "original_max_position_embeddings": 64}
        return LlamaForCausalLM(LlamaConfig(**shape, rope_parameters=rope, tie_word_embeddings=False))
    if arch == "qwen2":
        return Qwen2ForCausalLM(Qwen2Config(**shape, tie_word_embeddings=True))
    return MistralForCausalLM(MistralConfig(**shape, tie_word_embeddings=False))


@pytest.mark.parametrize("arch", ["llama", "qwen2", "mistral"])
def test_hf_folder_round_trip(arch, tmp_path, hf_smollm2_tokenizer):
    model = _tiny_model(arch)
    # The llama one is sharded, to read through model.safetensors.index.json.
    model.save_pretrained(tmp_path, max_shard_size="5MB" if arch == "llama" else "1GB")
    hf_smollm2_tokenizer.save_pretrained(tmp_path)
    checkpoint = load_checkpoint(tmp_path, log=lambda _: None)

    reference = {k: v for k, v in model.state_dict().items()
                 if not (model.config.tie_word_embeddings and k == "lm_head.weight")}
    assert set(checkpoint.weights) == set(reference)
    for name, tensor in reference.items():
        assert torch.equal(checkpoint.weights[name], tensor), name

    config = checkpoint.config
    assert (config.num_layers, config.num_heads, config.num_kv_heads, config.head_dim) == (2, 4, 2, 16)
    assert config.tie_word_embeddings == model.config.tie_word_embeddings
    assert config.attention_bias == (arch == "qwen2")
    assert config.eos_token_ids == (2,) and config.name == tmp_path.name
    if arch == "llama":
        assert config.rope_theta == 500000.0
        assert config.rope_scaling == {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                       "high_freq_factor": 4.0, "original_max_position_embeddings": 64}
    assert checkpoint.tokenizer.encode("Hello 12345") == hf_smollm2_tokenizer.encode("Hello 12345")


def _llama_cpp_rope_factors(theta, dim, factor, high, orig):
    """What llama.cpp's converter writes as rope_freqs.weight for HF's llama3 rope (low factor 1)."""
    out = []
    for freq in 1.0 / theta ** (np.arange(0, dim, 2) / dim):
        wavelen = 2 * math.pi / freq
        if wavelen < orig / high:
            out.append(1.0)
        elif wavelen > orig:
            out.append(factor)
        else:
            smooth = (orig / wavelen - 1) / (high - 1)
            out.append(1 / ((1 - smooth) / factor + smooth))
    return np.array(out, dtype=np.float32)


@pytest.mark.parametrize("dim, factor", [(128, 8.0), (64, 32.0)], ids=["llama3.1", "llama3.2"])
def test_llama3_rope_scaling_recovered(dim, factor):
    factors = _llama_cpp_rope_factors(500000.0, dim, factor, 4.0, 8192)
    assert llama3_scaling_from_factors(factors, 500000.0, dim) == {
        "rope_type": "llama3", "factor": factor, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8192}


def test_unpermute_inverts_llama_cpp_permute():
    # llama.cpp's convert_hf_to_gguf.py LlamaModel.permute, for 3 heads of dim 8.
    w = torch.randn(24, 5)
    permuted = w.reshape(3, 2, 4, 5).swapaxes(1, 2).reshape(24, 5)
    assert torch.equal(unpermute_rows(permuted, 3), w)
    bias = torch.randn(24)
    assert torch.equal(unpermute_rows(bias.reshape(3, 2, 4).swapaxes(1, 2).reshape(24), 3), bias)


# bad inputs


def _assert_checkpoint_error(path, tmp_path, *fragments):
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(path, cache_dir=tmp_path / "cache", log=lambda _: None)
    message = str(info.value)
    assert str(path) in message
    for fragment in fragments:
        assert fragment in message, message


def test_missing_path(tmp_path):
    _assert_checkpoint_error(tmp_path / "absent.gguf", tmp_path, "no such file")


def test_truncated_gguf(smollm2_path, tmp_path):
    path = tmp_path / "truncated.gguf"
    with open(smollm2_path, "rb") as src:
        path.write_bytes(src.read(1000))
    _assert_checkpoint_error(path, tmp_path, "not a readable GGUF")


def test_random_bytes(tmp_path):
    path = tmp_path / "random.gguf"
    path.write_bytes(os.urandom(4096))
    _assert_checkpoint_error(path, tmp_path, "not a readable GGUF")


def test_unsupported_architecture_folder(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"architectures": ["GPT2LMHeadModel"]}))
    _assert_checkpoint_error(tmp_path, tmp_path, "GPT2LMHeadModel")


def test_folder_without_config(tmp_path):
    _assert_checkpoint_error(tmp_path, tmp_path, "config.json")


def test_unsupported_tensor_type(tmp_path):
    path = tmp_path / "int.gguf"
    writer = gguf.GGUFWriter(path, "llama")
    writer.add_tensor("token_embd.weight", np.zeros((4, 8), dtype=np.int32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    _assert_checkpoint_error(path, tmp_path, "token_embd.weight", "I32")


def test_unsupported_gguf_architecture(tmp_path):
    path = tmp_path / "gpt2.gguf"
    writer = gguf.GGUFWriter(path, "gpt2")
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.close()
    _assert_checkpoint_error(path, tmp_path, "'gpt2'")
