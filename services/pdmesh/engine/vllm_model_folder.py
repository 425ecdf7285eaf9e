"""A Hugging Face model folder for vLLM, which loads no GGUF of ours: built once from pdmesh's
converted cache entry (float32 HF-named safetensors + tokenizer) and kept in the cache.

Layout: `<cache>/hf/<entry name>/{config.json, model.safetensors, tokenizer*.json,
generation_config.json}`; model.safetensors is a hard link to the entry's weights when the
file system allows (no second copy of the weights).
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Callable

from pdmesh.engine.checkpoint import load_checkpoint
from pdmesh.engine.default_model import ensure_default_model, resolve_cache_dir
from pdmesh.engine.model_config import ModelConfig
from pdmesh.engine.weight_cache import CONFIG_FILE, WEIGHTS_FILE, WeightCache, config_from_json

COPIED_FILES = ("tokenizer.json", "tokenizer_config.json", "generation_config.json")


def hf_config(config: ModelConfig) -> dict:
    """config.json of `config` as transformers and vLLM read it."""
    qwen2 = config.attention_bias  # of our architectures only Qwen2 has q/k/v biases
    fields = {
        "architectures": ["Qwen2ForCausalLM" if qwen2 else "LlamaForCausalLM"],
        "model_type": "qwen2" if qwen2 else "llama",
        "vocab_size": config.vocab_size, "hidden_size": config.hidden_size,
        "intermediate_size": config.intermediate_size, "num_hidden_layers": config.num_layers,
        "num_attention_heads": config.num_heads, "num_key_value_heads": config.num_kv_heads,
        "head_dim": config.head_dim, "max_position_embeddings": config.max_position_embeddings,
        "rope_theta": config.rope_theta, "rms_norm_eps": config.rms_norm_eps,
        "tie_word_embeddings": config.tie_word_embeddings, "hidden_act": "silu",
        "bos_token_id": config.bos_token_id, "torch_dtype": "float32",
        "eos_token_id": list(config.eos_token_ids) if len(config.eos_token_ids) != 1 else config.eos_token_ids[0],
    }
    if not qwen2:
        fields.update(attention_bias=False, mlp_bias=False)
    if config.rope_scaling:
        fields["rope_scaling"] = config.rope_scaling
    return fields


def ensure_vllm_folder(model: str | Path | None, cache_dir: str | Path | None = None,
                       log: Callable[[str], None] = print) -> Path:
    """A folder vLLM loads for `model` (None: the default SmolLM2; a folder: itself)."""
    root = resolve_cache_dir(cache_dir)
    source = Path(model).expanduser() if model is not None else ensure_default_model(root, log)
    if source.is_dir():
        return source
    entry = WeightCache(root).entry_dir(source)
    if not (entry / CONFIG_FILE).is_file():
        load_checkpoint(source, root, log)  # converts the GGUF into its cache entry once
    target = root / "hf" / entry.name
    if (target / "config.json").is_file():
        return target
    _publish(entry, target)
    log(f"wrote a Hugging Face folder for vLLM at {target}")
    return target


def _publish(entry: Path, target: Path) -> None:
    """Write the folder beside `target`, then rename it into place: readers see all or nothing."""
    tmp = target.with_name(f".{target.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        config = config_from_json((entry / CONFIG_FILE).read_text())
        (tmp / "config.json").write_text(json.dumps(hf_config(config), indent=2))
        _link_or_copy(entry / WEIGHTS_FILE, tmp / "model.safetensors")
        for name in COPIED_FILES:
            if (entry / name).is_file():
                shutil.copyfile(entry / name, tmp / name)
        os.rename(tmp, target)
    except OSError:
        if not (target / "config.json").is_file():  # another process may have published it first
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _link_or_copy(source: Path, target: Path) -> None:
    try:
        os.link(source, target)
    except OSError:
        shutil.copyfile(source, target)
