"""Decode attention on CPU that reads each sequence's KV blocks where they lie in the pool.

The SDPA path gathers every context into a padded [B, KVH, L, D] copy in every layer
(`index_select`), then attends over the copy: from batch 16 on, the gather and the attention take
a third of a decode step here (`tools/profile_step.py`). This C++ kernel (csrc/paged_decode.cpp)
walks the block tables instead: per (sequence, KV head) it scores the query heads that share that
KV head against each key row once, softmaxes, and sums the value rows, with torch's own thread pool.
Head sizes that are a multiple of 8 (64 in SmolLM2) run on 8-float vectors with a vector exp.

It is compiled with torch's C++ extension builder (g++ and ninja) on first use and cached under
~/.cache/pdmesh/torch_extensions (PDMESH_EXTENSIONS_DIR overrides); when it cannot be built the
engine keeps the SDPA path and says why once. float32 only.
"""

from __future__ import annotations

import hashlib
import logging
import math
import os
import threading
from pathlib import Path

import torch

log = logging.getLogger(__name__)

SOURCE = Path(__file__).parent / "csrc" / "paged_decode.cpp"
# -march=native: the build is per machine (its folder is keyed by the CPU's features); no
# -ffast-math: only errno is given up, and multiply-adds may fuse (-std=c++17 would forbid it).
CFLAGS = ["-O3", "-fopenmp", "-march=native", "-fno-math-errno", "-ffp-contract=fast"]
_lock = threading.Lock()
_module = None
_failure: str | None = None


def extensions_dir() -> Path:
    return Path(os.environ.get("PDMESH_EXTENSIONS_DIR") or Path.home() / ".cache" / "pdmesh" / "torch_extensions")


def load():
    """The compiled kernel module (built once per machine and torch version), or None with the
    reason in `failure()` when it cannot be built here."""
    global _module, _failure
    with _lock:
        if _module is None and _failure is None:
            try:
                from torch.utils.cpp_extension import load as build

                folder = extensions_dir() / f"torch-{torch.__version__}-{_cpu_key()}"
                folder.mkdir(parents=True, exist_ok=True)
                if not (folder / "pdmesh_paged_decode.so").exists():
                    log.info("building the paged decode attention kernel in %s (once per machine, about a "
                             "minute)", folder)
                _module = build("pdmesh_paged_decode", [str(SOURCE)], build_directory=str(folder),
                                extra_cflags=CFLAGS, extra_ldflags=["-fopenmp"], verbose=False)
            except Exception as exc:  # no compiler, no ninja, a build error: SDPA still serves
                _failure = f"{type(exc).__name__}: {str(exc).strip().splitlines()[-1] if str(exc).strip() else ''}"
                log.warning("the paged decode attention kernel could not be built (%s); decode attention "
                            "gathers each context for SDPA instead", _failure)
        return _module


def _cpu_key() -> str:
    """A short hash of this CPU's model and feature flags: a build for one CPU never runs on another
    (a home directory shared between machines)."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        lines = []
    ident = "\n".join(sorted({line for line in lines if line.startswith(("model name", "flags"))}))
    return hashlib.sha256(ident.encode()).hexdigest()[:12]


def failure() -> str | None:
    return _failure


def paged_available() -> bool:
    return load() is not None


def paged_attend(q: torch.Tensor, kv_layer: torch.Tensor, tables: torch.Tensor, lens: torch.Tensor,
                 block_size: int) -> torch.Tensor:
    """q: [B, H, D]; kv_layer: [2, slots, KVH, D]; tables: [B, max blocks]; lens: [B]. Returns [B, H*D]."""
    with torch.profiler.record_function("pdmesh::paged_decode"):  # named in profiles (tools/profile_step.py)
        return load().paged_decode(q, kv_layer, tables, lens, block_size, 1.0 / math.sqrt(q.shape[-1]))


if __name__ == "__main__":  # python -m pdmesh.engine.paged_decode: build it now (tools/run_tests.sh does)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if load() is None:
        raise SystemExit(f"the paged decode attention kernel could not be built: {failure()}")
    print(f"paged decode attention kernel: {load().__file__}")
