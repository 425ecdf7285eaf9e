"""Dequantized GGUF weights kept on disk as safetensors, so only the first load pays for dequantizing.

Layout: `<cache>/dequantized/<key>/{weights.safetensors, model_config.json, ...}` where the key hashes
the source file's absolute path, size and mtime: a replaced or edited file gets a fresh entry.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import Callable

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from pdmesh.engine.model_config import ModelConfig

# Bump when the conversion changes (names, layout, config fields) so stale entries are not reused.
CACHE_FORMAT = 1
WEIGHTS_FILE = "weights.safetensors"
CONFIG_FILE = "model_config.json"


class WeightCache:
    """Entries keyed by a source file's identity; each entry is written whole or not at all."""

    def __init__(self, root: Path):
        self.root = Path(root) / "dequantized"

    def entry_dir(self, source: Path) -> Path:
        """Folder holding the entry for `source` (which may not exist yet)."""
        source = Path(source).resolve()
        stat = source.stat()
        ident = f"v{CACHE_FORMAT}|{source}|{stat.st_size}|{stat.st_mtime_ns}"
        return self.root / f"{source.stem}-{hashlib.sha256(ident.encode()).hexdigest()[:16]}"

    def load(self, source: Path) -> tuple[ModelConfig, dict[str, torch.Tensor]] | None:
        """The cached (config, weights) for `source`, or None on a miss or an unreadable entry."""
        entry = self.entry_dir(source)
        try:
            config = config_from_json((entry / CONFIG_FILE).read_text())
            weights = load_file(entry / WEIGHTS_FILE)
        except (OSError, ValueError, TypeError, SafetensorError):
            return None
        return config, weights

    def store(self, source: Path, config: ModelConfig, weights: dict[str, torch.Tensor],
              extra: Callable[[Path], None] | None = None) -> Path:
        """Write an entry for `source`; `extra(folder)` may add files (the tokenizer) before publishing."""
        entry = self.entry_dir(source)
        tmp = entry.with_name(f".{entry.name}.tmp-{os.getpid()}")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        _discard(entry)  # an entry we are asked to replace failed to load: it is damaged
        try:
            save_file(weights, tmp / WEIGHTS_FILE)
            (tmp / CONFIG_FILE).write_text(config_to_json(config))
            if extra is not None:
                extra(tmp)
            # A directory rename is atomic: readers see the old state or the whole entry.
            os.rename(tmp, entry)
        except OSError:
            if not entry.is_dir():  # another process may have published the same entry first
                raise
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        return entry


def _discard(entry: Path) -> None:
    if entry.is_dir():
        # Move aside first so a concurrent reader never sees a half-deleted entry.
        stale = entry.with_name(f".{entry.name}.stale-{os.getpid()}")
        os.rename(entry, stale)
        shutil.rmtree(stale, ignore_errors=True)


def config_to_json(config: ModelConfig) -> str:
    """ModelConfig as a JSON document."""
    return json.dumps(dataclasses.asdict(config), indent=2)


def config_from_json(text: str) -> ModelConfig:
    """Inverse of config_to_json."""
    fields = json.loads(text)
    fields["eos_token_ids"] = tuple(fields["eos_token_ids"])
    return ModelConfig(**fields)
