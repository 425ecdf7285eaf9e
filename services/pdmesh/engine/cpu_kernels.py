"""pdmesh's C++ kernels for CPU decoding, built once per machine with torch's extension builder.

- `paged_decode` (csrc/paged_decode.cpp): decode attention over the paged KV pool, reading each
  sequence's blocks in place (`paged_decode.py`).
- `skinny_linear` (csrc/skinny_linear.cpp): the linears of a small decode batch, streaming each
  weight once, with the same sum for a row whatever the batch (`linear.py`).

They are compiled with g++ and ninja on first use (about a minute) and cached under
~/.cache/pdmesh/torch_extensions (PDMESH_EXTENSIONS_DIR overrides), in a folder per torch version
and CPU; torch's builder rebuilds when a source changes. When they cannot be built the engine keeps
its plain PyTorch paths and says why once. `python -m pdmesh.engine.cpu_kernels` builds them now
(tools/run_tests.sh does).
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import threading
from pathlib import Path

import torch

log = logging.getLogger(__name__)

CSRC = Path(__file__).parent / "csrc"
SOURCES = [CSRC / name for name in ("bindings.cpp", "paged_decode.cpp", "skinny_linear.cpp")]
NAME = "pdmesh_cpu_kernels"
# -march=native: the build is per machine (its folder is keyed by the CPU's features); no
# -ffast-math: only errno is given up, and multiply-adds may fuse (-std=c++17 would forbid it).
CFLAGS = ["-O3", "-fopenmp", "-march=native", "-fno-math-errno", "-ffp-contract=fast"]
_lock = threading.Lock()
_module = None
_failure: str | None = None


def extensions_dir() -> Path:
    return Path(os.environ.get("PDMESH_EXTENSIONS_DIR") or Path.home() / ".cache" / "pdmesh" / "torch_extensions")


def load():
    """The compiled kernel module, or None with the reason in `failure()` when it cannot be built here."""
    global _module, _failure
    if _module is not None:  # the hot path: every linear of a small batch asks
        return _module
    with _lock:
        if _module is None and _failure is None:
            try:
                from torch.utils.cpp_extension import load as build

                folder = extensions_dir() / f"torch-{torch.__version__}-{_cpu_key()}"
                folder.mkdir(parents=True, exist_ok=True)
                if not (folder / f"{NAME}.so").exists():
                    log.info("building pdmesh's CPU kernels in %s (once per machine, about a minute)", folder)
                _module = build(NAME, [str(s) for s in SOURCES], build_directory=str(folder),
                                extra_cflags=CFLAGS, extra_ldflags=["-fopenmp"], verbose=False)
            except Exception as exc:  # no compiler, no ninja, a build error: PyTorch's paths still serve
                _failure = f"{type(exc).__name__}: {str(exc).strip().splitlines()[-1] if str(exc).strip() else ''}"
                log.warning("pdmesh's CPU kernels could not be built (%s); decode attention gathers each "
                            "context for SDPA and small batches use oneDNN's linears instead", _failure)
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


def profiled(name: str):
    """A torch.profiler range named `name` around a kernel call while a profiler records (so
    tools/profile_step.py can tell the kernels apart), and nothing otherwise: a range costs about
    17 us, and a decode step calls the kernels some 150 times."""
    return torch.profiler.record_function(name) if torch._C._autograd._profiler_enabled() else contextlib.nullcontext()


def failure() -> str | None:
    return _failure


def available() -> bool:
    return load() is not None


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if load() is None:
        raise SystemExit(f"pdmesh's CPU kernels could not be built: {failure()}")
    print(f"pdmesh's CPU kernels: {load().__file__}")
