"""One entry point for model files: the default model, a GGUF file, or a Hugging Face folder."""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from pdmesh.engine.default_model import ensure_default_model, resolve_cache_dir
from pdmesh.engine.gguf_checkpoint import open_gguf, read_gguf
from pdmesh.engine.hf_checkpoint import model_config_from_hf, read_config_json, read_hf_folder, read_tensor_names
from pdmesh.engine.model_config import ModelConfig
from pdmesh.engine.tokenizer import Tokenizer
from pdmesh.engine.weight_cache import CONFIG_FILE, WeightCache, config_from_json
from pdmesh.errors import CheckpointError

Log = Callable[[str], None]


@dataclass
class Checkpoint:
    """Everything the engine needs from a model file: shapes, float32 HF-named weights, tokenizer."""

    config: ModelConfig
    weights: dict[str, torch.Tensor]
    tokenizer: Tokenizer
    path: Path


def load_checkpoint(path: str | Path | None, cache_dir: str | Path | None = None, log: Log = print) -> Checkpoint:
    """Load `path`: None -> the default SmolLM2 model, `*.gguf` -> GGUF (dequantized once and
    cached), a folder with config.json -> Hugging Face. Every failure is one CheckpointError whose
    message starts with the path."""
    root = resolve_cache_dir(cache_dir)
    if path is None:
        path = ensure_default_model(root, log)
    path = Path(path).expanduser()
    try:
        if path.is_dir():
            checkpoint = _load_hf(path, log)
        elif path.is_file():
            checkpoint = _load_gguf(path, WeightCache(root), log)
        else:
            raise CheckpointError("no such file or directory")
        check_weights(checkpoint.config, checkpoint.weights)
    except (CheckpointError, OSError) as exc:
        message = str(exc)
        raise CheckpointError(message if message.startswith(str(path)) else f"{path}: {message}") from exc
    return checkpoint


@dataclass
class ModelMetadata:
    """What a service that runs no model needs (the scheduler): shapes, limits and the tokenizer."""

    config: ModelConfig
    tokenizer: Tokenizer
    path: Path


def load_model_metadata(path: str | Path | None, cache_dir: str | Path | None = None,
                        log: Log = print) -> ModelMetadata:
    """The model's config and tokenizer without its weights: from an HF folder's config.json and
    safetensors headers, or from a GGUF file's converted cache entry (a GGUF file not converted
    yet is converted once here, so the workers that load it next find it cached)."""
    root = resolve_cache_dir(cache_dir)
    source = Path(path).expanduser() if path is not None else ensure_default_model(root, log)
    try:
        if source.is_dir():
            config_json = read_config_json(source)
            weights = dict.fromkeys(read_tensor_names(source))
            return ModelMetadata(model_config_from_hf(config_json, weights, source),
                                 Tokenizer.from_hf_folder(source), source)
        if source.is_file():
            entry = WeightCache(root).entry_dir(source)
            if not (entry / CONFIG_FILE).is_file():
                load_checkpoint(source, root, log)
            return ModelMetadata(config_from_json((entry / CONFIG_FILE).read_text()),
                                 Tokenizer.from_hf_folder(entry), source)
        raise CheckpointError("no such file or directory")
    except (CheckpointError, OSError, ValueError) as exc:
        message = str(exc)
        raise CheckpointError(message if message.startswith(str(source)) else f"{source}: {message}") from exc


def _load_hf(path: Path, log: Log) -> Checkpoint:
    if not (path / "config.json").is_file():
        raise CheckpointError("folder has no config.json (expected a Hugging Face model folder)")
    config, weights = read_hf_folder(path, log)
    return Checkpoint(config, weights, Tokenizer.from_hf_folder(path), path)


def _load_gguf(path: Path, cache: WeightCache, log: Log) -> Checkpoint:
    start = time.perf_counter()
    cached = cache.load(path)
    if cached is not None:
        entry = cache.entry_dir(path)
        config, weights = cached
        log(f"loaded cached weights for {path.name} from {entry} in {time.perf_counter() - start:.1f}s")
        return Checkpoint(config, weights, Tokenizer.from_hf_folder(entry), path)
    log(f"reading {path} ({path.stat().st_size / 2**20:.0f} MiB) ...")
    reader = open_gguf(path)
    config, weights = read_gguf(reader, name=path.stem, log=log)
    tokenizer = Tokenizer.from_gguf(reader)
    try:
        entry = cache.store(path, config, weights, extra=tokenizer.save)
        log(f"cached dequantized weights in {entry}")
    except OSError as exc:  # a read-only or full cache only costs the next load some time
        log(f"could not cache dequantized weights: {exc}")
    return Checkpoint(config, weights, tokenizer, path)


def expected_shapes(config: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Name -> shape of every tensor a checkpoint with this config must hold."""
    h, kv, q = config.hidden_size, config.kv_size, config.q_size
    shapes = {"model.embed_tokens.weight": (config.vocab_size, h), "model.norm.weight": (h,)}
    if not config.tie_word_embeddings:
        shapes["lm_head.weight"] = (config.vocab_size, h)
    for i in range(config.num_layers):
        layer = f"model.layers.{i}"
        shapes.update({
            f"{layer}.self_attn.q_proj.weight": (q, h),
            f"{layer}.self_attn.k_proj.weight": (kv, h),
            f"{layer}.self_attn.v_proj.weight": (kv, h),
            f"{layer}.self_attn.o_proj.weight": (h, q),
            f"{layer}.mlp.gate_proj.weight": (config.intermediate_size, h),
            f"{layer}.mlp.up_proj.weight": (config.intermediate_size, h),
            f"{layer}.mlp.down_proj.weight": (h, config.intermediate_size),
            f"{layer}.input_layernorm.weight": (h,),
            f"{layer}.post_attention_layernorm.weight": (h,),
        })
    return shapes


def check_weights(config: ModelConfig, weights: dict[str, torch.Tensor]) -> None:
    """Raise CheckpointError naming the first missing or misshapen tensor."""
    for name, shape in expected_shapes(config).items():
        if name not in weights:
            raise CheckpointError(f"missing tensor {name}")
        if tuple(weights[name].shape) != shape:
            raise CheckpointError(f"tensor {name} has shape {tuple(weights[name].shape)}, config implies {shape}")
