"""Read a llama.cpp GGUF file as a ModelConfig and float32 weights in Hugging Face names and layout."""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Callable

import gguf
import numpy as np
import torch

from pdmesh.engine.model_config import ModelConfig
from pdmesh.errors import CheckpointError

# general.architecture -> whether llama.cpp's converter permuted the q/k rows for its rotary layout.
# Its Llama converter does (Mistral files are written by the same code); its Qwen2 converter does not.
SUPPORTED_ARCHITECTURES = {"llama": True, "mistral": True, "qwen2": False}

_GLOBAL_NAMES = {
    "token_embd": "model.embed_tokens",
    "output_norm": "model.norm",
    "output": "lm_head",
}
_LAYER_NAMES = {
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
}
# Llama 3.x files carry their rope scaling as per-frequency factors in this tensor, not as metadata.
_ROPE_FREQS = "rope_freqs.weight"
# Arrays longer than this (the vocabulary, merges) stay out of the metadata dict.
_MAX_METADATA_ARRAY = 64


def open_gguf(path: str | Path) -> gguf.GGUFReader:
    """A GGUFReader over `path`; any parse failure becomes a CheckpointError naming the file."""
    try:
        return gguf.GGUFReader(path)
    except Exception as exc:  # the reader raises ValueError, IndexError, struct.error ... on bad bytes
        raise CheckpointError(f"{path}: not a readable GGUF file ({type(exc).__name__}: {exc})") from exc


def read_metadata(reader: gguf.GGUFReader) -> dict:
    """Key -> value for every scalar and short-array metadata field."""
    meta = {}
    for key, field in reader.fields.items():
        if field.types and field.types[0] == gguf.GGUFValueType.ARRAY and len(field.data) > _MAX_METADATA_ARRAY:
            continue
        meta[key] = field.contents()
    return meta


def read_gguf(reader: gguf.GGUFReader, name: str = "model",
              log: Callable[[str], None] = print) -> tuple[ModelConfig, dict[str, torch.Tensor]]:
    """ModelConfig and float32 weights (Hugging Face names and layout) of an open GGUF file."""
    meta = read_metadata(reader)
    arch = meta.get("general.architecture")
    if arch not in SUPPORTED_ARCHITECTURES:
        raise CheckpointError(
            f"architecture {arch!r} is not supported; supported: {sorted(SUPPORTED_ARCHITECTURES)}")
    weights, rope_freqs = dequantize_tensors(reader, log)
    config = model_config_from_metadata(meta, weights, rope_freqs, name)
    if SUPPORTED_ARCHITECTURES[arch]:
        _unpermute_qk(weights, config)
    return config, weights


def dequantize_tensors(reader: gguf.GGUFReader, log: Callable[[str], None] = print
                       ) -> tuple[dict[str, torch.Tensor], np.ndarray | None]:
    """All tensors as float32 torch tensors under HF names, plus the Llama 3 rope factors if any."""
    start = time.perf_counter()
    log(f"dequantizing {len(reader.tensors)} tensors from {Path(reader.data.filename).name} ...")
    weights, rope_freqs = {}, None
    for tensor in reader.tensors:
        array = _dequantize(tensor)
        if tensor.name == _ROPE_FREQS:
            rope_freqs = array
            continue
        weights[hf_tensor_name(tensor.name)] = torch.from_numpy(array)
    log(f"dequantizing done in {time.perf_counter() - start:.1f}s")
    return weights, rope_freqs


def _dequantize(tensor) -> np.ndarray:
    # GGML lists dims fastest-first; torch wants them slowest-first, i.e. (out_features, in_features).
    shape = tuple(int(d) for d in reversed(tensor.shape))
    try:
        array = gguf.quants.dequantize(tensor.data, tensor.tensor_type)
    except NotImplementedError as exc:
        raise CheckpointError(
            f"tensor {tensor.name} has type {tensor.tensor_type.name}, which gguf cannot dequantize") from exc
    except Exception as exc:
        raise CheckpointError(f"tensor {tensor.name} ({tensor.tensor_type.name}) is corrupt: {exc}") from exc
    if array.size != math.prod(shape):
        raise CheckpointError(f"tensor {tensor.name}: {array.size} values for shape {shape}; file truncated?")
    # F32 comes back as a read-only view of the memory map; copy so the weights own their memory.
    return np.array(array.reshape(shape), dtype=np.float32, copy=True)


def hf_tensor_name(name: str) -> str:
    """`blk.3.attn_q.weight` -> `model.layers.3.self_attn.q_proj.weight`, and so on."""
    base, _, kind = name.rpartition(".")
    if kind not in ("weight", "bias"):
        raise CheckpointError(f"unexpected tensor {name}")
    if base in _GLOBAL_NAMES:
        return f"{_GLOBAL_NAMES[base]}.{kind}"
    parts = base.split(".")
    if len(parts) == 3 and parts[0] == "blk" and parts[1].isdigit() and parts[2] in _LAYER_NAMES:
        return f"model.layers.{parts[1]}.{_LAYER_NAMES[parts[2]]}.{kind}"
    raise CheckpointError(f"unexpected tensor {name}")


def _unpermute_qk(weights: dict[str, torch.Tensor], config: ModelConfig) -> None:
    """Undo the row permutation llama.cpp applies to q/k (weights and biases) for its rope layout."""
    for layer in range(config.num_layers):
        for proj, num_heads in (("q_proj", config.num_heads), ("k_proj", config.num_kv_heads)):
            for kind in ("weight", "bias"):
                key = f"model.layers.{layer}.self_attn.{proj}.{kind}"
                if key in weights:
                    weights[key] = unpermute_rows(weights[key], num_heads)


def unpermute_rows(w: torch.Tensor, num_heads: int) -> torch.Tensor:
    """Inverse of llama.cpp's `permute`: per head, interleaved (x0,y0,x1,y1..) rows back to halves."""
    rows = w.shape[0]
    # [H, 2 halves of D/2] was stored as [H, D/2 pairs, 2]; swap back.
    return (w.reshape(num_heads, rows // num_heads // 2, 2, *w.shape[1:])
            .swapaxes(1, 2).reshape(w.shape).contiguous())


def model_config_from_metadata(meta: dict, weights: dict[str, torch.Tensor],
                               rope_freqs: np.ndarray | None = None, name: str = "model") -> ModelConfig:
    """ModelConfig from GGUF metadata (`{arch}.*`, `tokenizer.ggml.*`); shapes fill what is missing."""
    arch = meta["general.architecture"]

    def key(suffix, default=None):
        return meta.get(f"{arch}.{suffix}", default)

    try:
        hidden, heads = int(key("embedding_length")), int(key("attention.head_count"))
        embed = weights["model.embed_tokens.weight"]  # [V, hidden]
        rope_theta = float(key("rope.freq_base", 10000.0))
        head_dim = int(key("attention.key_length", hidden // heads))
        config = ModelConfig(
            vocab_size=int(key("vocab_size", embed.shape[0])),
            hidden_size=hidden,
            intermediate_size=int(key("feed_forward_length")),
            num_layers=int(key("block_count")),
            num_heads=heads,
            num_kv_heads=int(key("attention.head_count_kv", heads)),
            head_dim=head_dim,
            max_position_embeddings=int(key("context_length")),
            rope_theta=rope_theta,
            rope_scaling=_rope_scaling(key, rope_freqs, rope_theta, head_dim),
            rms_norm_eps=float(key("attention.layer_norm_rms_epsilon", 1e-5)),
            tie_word_embeddings="lm_head.weight" not in weights,
            attention_bias="model.layers.0.self_attn.q_proj.bias" in weights,
            bos_token_id=meta.get("tokenizer.ggml.bos_token_id"),
            eos_token_ids=gguf_eos_token_ids(meta),
            name=name,
        )
    except (TypeError, KeyError) as exc:
        raise CheckpointError(f"GGUF metadata lacks a required {arch} field ({exc})") from exc
    return config


def gguf_eos_token_ids(meta: dict) -> tuple[int, ...]:
    """EOS plus the end-of-turn / end-of-message ids that also end a generation."""
    keys = ("tokenizer.ggml.eos_token_id", "tokenizer.ggml.eot_token_id", "tokenizer.ggml.eom_token_id")
    ids = [int(meta[k]) for k in keys if meta.get(k) is not None]
    return tuple(dict.fromkeys(ids))


def _rope_scaling(key, rope_freqs: np.ndarray | None, theta: float, head_dim: int) -> dict | None:
    kind = key("rope.scaling.type")
    if kind and kind != "none":
        scaling = {"rope_type": kind, "factor": float(key("rope.scaling.factor", 1.0))}
        if key("rope.scaling.original_context_length") is not None:
            scaling["original_max_position_embeddings"] = int(key("rope.scaling.original_context_length"))
        return scaling
    if rope_freqs is not None:
        return llama3_scaling_from_factors(rope_freqs, theta, head_dim)
    return None


def llama3_scaling_from_factors(factors: np.ndarray, theta: float, head_dim: int) -> dict:
    """Recover HF's llama3 `rope_scaling` dict from llama.cpp's per-frequency divisors.

    In the band between the two cut-offs, 1/r = 1/f + s (1 - 1/f) with s linear in 1/wavelength:
    s = L/(hi-lo) * (1/w) - lo/(hi-lo). A line fit gives two numbers for three unknowns, so we take
    low_freq_factor = 1, which every Llama 3.x release uses.
    """
    factors = np.asarray(factors, dtype=np.float64).reshape(-1)
    factor = float(factors.max())
    inv_freq = theta ** (-np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)
    wavelen = 2 * math.pi / inv_freq
    band = (factors > 1 + 1e-4) & (factors < factor - 1e-4)
    if band.sum() < 2 or factor <= 1:
        raise CheckpointError(f"cannot recover llama3 rope scaling from {_ROPE_FREQS} "
                              f"({int(band.sum())} factors between the cut-offs, need 2)")
    smooth = (1 / factors[band] - 1 / factor) / (1 - 1 / factor)
    slope, intercept = np.polyfit(1 / wavelen[band], smooth, 1)
    high = 1 - 1 / intercept
    return {
        "rope_type": "llama3",
        "factor": factor,
        "low_freq_factor": 1.0,
        "high_freq_factor": round(float(high), 4),
        "original_max_position_embeddings": int(round(-slope / intercept)),
    }
