"""Read a Hugging Face model folder (config.json + *.safetensors) as a ModelConfig and float32 weights."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Callable

import torch
from safetensors.torch import load_file

from pdmesh.engine.model_config import ModelConfig
from pdmesh.errors import CheckpointError

SUPPORTED_ARCHITECTURES = ("LlamaForCausalLM", "Qwen2ForCausalLM", "MistralForCausalLM")
INDEX_FILE = "model.safetensors.index.json"


def read_hf_folder(path: Path, log: Callable[[str], None] = print
                   ) -> tuple[ModelConfig, dict[str, torch.Tensor]]:
    """ModelConfig and float32 weights (names as the files spell them) of an HF folder."""
    config_json = read_config_json(path)
    weights = read_safetensors(path, log)
    config = model_config_from_hf(config_json, weights, path)
    window = config_json.get("sliding_window")
    if window and config_json.get("use_sliding_window", True) and window < config.max_position_embeddings:
        log(f"note: sliding_window={window} is not implemented; past {window} tokens "
            "attention covers the whole context, unlike the reference model")
    return config, weights


def read_config_json(path: Path) -> dict:
    """config.json, checked for a supported architecture."""
    try:
        config = json.loads((path / "config.json").read_text())
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"cannot read config.json ({exc})") from exc
    architectures = config.get("architectures") or []
    if not any(arch in SUPPORTED_ARCHITECTURES for arch in architectures):
        raise CheckpointError(f"architecture {architectures} is not supported; "
                              f"supported: {list(SUPPORTED_ARCHITECTURES)}")
    return config


def read_safetensors(path: Path, log: Callable[[str], None] = print) -> dict[str, torch.Tensor]:
    """All tensors of the folder's safetensors file(s), as float32."""
    files = _safetensors_files(path)
    log(f"reading {len(files)} safetensors file(s) from {path} ...")
    weights = {}
    for file in files:
        try:
            shard = load_file(file)
        except Exception as exc:  # safetensors raises SafetensorError / OSError on bad files
            raise CheckpointError(f"{file.name}: not a readable safetensors file ({exc})") from exc
        weights.update((name, t.to(torch.float32)) for name, t in shard.items())
    return weights


def read_tensor_names(path: Path) -> set[str]:
    """Names of the folder's tensors, read from the safetensors headers alone."""
    from safetensors import safe_open

    names = set()
    for file in _safetensors_files(path):
        try:
            with safe_open(file, framework="pt") as f:
                names.update(f.keys())
        except Exception as exc:
            raise CheckpointError(f"{file.name}: not a readable safetensors file ({exc})") from exc
    return names


def _safetensors_files(path: Path) -> list[Path]:
    index = path / INDEX_FILE
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (OSError, ValueError, KeyError) as exc:
            raise CheckpointError(f"{INDEX_FILE} is unreadable ({exc})") from exc
        files = [path / name for name in sorted(set(weight_map.values()))]
        missing = [f.name for f in files if not f.is_file()]
        if missing:
            raise CheckpointError(f"{INDEX_FILE} lists missing shards: {missing}")
        return files
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise CheckpointError("no *.safetensors files (PyTorch .bin checkpoints are not supported)")
    return files


def model_config_from_hf(config: dict, weights: dict[str, torch.Tensor], path: Path) -> ModelConfig:
    """ModelConfig from a transformers config.json (4.x `rope_scaling` or 5.x `rope_parameters`)."""
    rope = config.get("rope_parameters") or config.get("rope_scaling") or {}
    rope_theta = float(config.get("rope_theta") or rope.get("rope_theta") or 10000.0)
    scaling = {k: v for k, v in rope.items() if k != "rope_theta"}
    rope_type = scaling.get("rope_type", scaling.get("type"))
    try:
        heads = int(config["num_attention_heads"])
        return ModelConfig(
            vocab_size=int(config["vocab_size"]),
            hidden_size=int(config["hidden_size"]),
            intermediate_size=int(config["intermediate_size"]),
            num_layers=int(config["num_hidden_layers"]),
            num_heads=heads,
            num_kv_heads=int(config.get("num_key_value_heads") or heads),
            head_dim=int(config.get("head_dim") or config["hidden_size"] // heads),
            max_position_embeddings=int(config["max_position_embeddings"]),
            rope_theta=rope_theta,
            rope_scaling=scaling if rope_type not in (None, "default") else None,
            rms_norm_eps=float(config.get("rms_norm_eps", 1e-6)),
            # Tied checkpoints usually omit lm_head; trust either signal.
            tie_word_embeddings=bool(config.get("tie_word_embeddings", False)) or "lm_head.weight" not in weights,
            attention_bias="model.layers.0.self_attn.q_proj.bias" in weights,
            bos_token_id=config.get("bos_token_id"),
            eos_token_ids=hf_eos_token_ids(config, path),
            name=path.name,
        )
    except (KeyError, TypeError, ValueError) as exc:
        raise CheckpointError(f"config.json lacks or garbles a required field ({exc!r})") from exc


def hf_eos_token_ids(config: dict, path: Path) -> tuple[int, ...]:
    """Stop ids from config.json and generation_config.json (which often lists end-of-turn too)."""
    ids = []
    generation = path / "generation_config.json"
    sources = [config]
    if generation.is_file():
        try:
            sources.append(json.loads(generation.read_text()))
        except (OSError, ValueError):
            pass  # optional file; config.json still names the EOS
    for source in sources:
        eos = source.get("eos_token_id")
        ids.extend(eos if isinstance(eos, list) else [eos] if eos is not None else [])
    return tuple(dict.fromkeys(int(i) for i in ids))
