"""Which device an engine runs on, resolved in one place, and what a device reports.

`--device` is `cpu`, `cuda` or `cuda:N`; unset, it is `cuda` when CUDA is available, else `cpu`.
The flag's form is checked when the config is built (any machine, the scheduler's too); whether
CUDA is there is checked only here, in the process that will use the device. A tensor-parallel
group of a worker on `cuda:B` puts rank i on `cuda:B+i`.
"""

from __future__ import annotations

import torch

from pdmesh.engine.engine_config import AUTO_DEVICE, AUTO_DTYPE, check_device_name
from pdmesh.errors import InvalidRequestError

KINDS = ("cpu", "cuda")  # device kinds this engine runs on and moves KV between


def resolve_device(name: str, num_ranks: int = 1) -> torch.device:
    """The device of rank 0 for `--device name`; `num_ranks` ranks need that many GPUs from there.
    Raises InvalidRequestError naming --device when CUDA is asked for and absent."""
    check_device_name(name)
    if name == AUTO_DEVICE:
        return auto_device()
    if name == "cpu":
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise InvalidRequestError(f"--device {name}: CUDA is not available on this machine ({_why_no_cuda()}); "
                                  "use --device cpu", "device")
    index = int(name.partition(":")[2] or 0)
    count = torch.cuda.device_count()
    if index + num_ranks > count:
        wanted = f"cuda:{index}" if num_ranks == 1 else f"cuda:{index}..cuda:{index + num_ranks - 1} (one per rank)"
        raise InvalidRequestError(f"--device {name}: this worker needs {wanted}; this machine has {count} CUDA "
                                  f"device(s)", "device")
    return torch.device("cuda", index)


def auto_device() -> torch.device:
    """--device unset: cuda when CUDA is available, else cpu."""
    return torch.device("cuda", 0) if torch.cuda.is_available() else torch.device("cpu")


def _why_no_cuda() -> str:
    if torch.version.cuda is None:
        return f"torch {torch.__version__} is built without CUDA"
    return "no CUDA device is visible"


def rank_device(device: torch.device, rank: int) -> torch.device:
    """Rank `rank`'s device in a group whose rank 0 runs on `device`: one GPU per rank."""
    if device.type != "cuda":
        return device
    return torch.device("cuda", (device.index or 0) + rank)


def resolve_dtype(name: str, device: torch.device) -> str:
    """--dtype unset: bfloat16 on CUDA, float32 (the token-exact mode) on CPU."""
    if name != AUTO_DTYPE:
        return name
    return "bfloat16" if device.type == "cuda" else "float32"


def place_weights(weights: dict[str, torch.Tensor], dtype: str, device: torch.device) -> dict[str, torch.Tensor]:
    """Every weight in `dtype` on `device` (cast first: half the bytes cross to a GPU in bfloat16)."""
    torch_dtype = getattr(torch, dtype)
    return {name: w.to(torch_dtype).to(device) for name, w in weights.items()}


def use_device(device: torch.device) -> None:
    """Make `device` this thread's current CUDA device (NCCL and new streams use it); no-op on CPU."""
    if device.type == "cuda":
        torch.cuda.set_device(device)


def memory_used_bytes(device: torch.device) -> int:
    """Bytes this process holds on `device` (CUDA's caching allocator, reserved); 0 on CPU."""
    if device.type != "cuda":
        return 0
    return int(torch.cuda.memory_reserved(device))


def device_uuid(device: torch.device) -> str:
    """The GPU's UUID (two workers on one GPU share it; NCCL cannot join them); '' on CPU."""
    if device.type != "cuda":
        return ""
    return str(torch.cuda.get_device_properties(device).uuid)
