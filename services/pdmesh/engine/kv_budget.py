"""How much memory the KV pool gets.

On CPU: `--kv-cache-gib` (1 GiB when 0). On CUDA, as vLLM does: the worker may use
`--gpu-memory-utilization` of the device's memory; the weights are loaded, one forward pass of
the largest step the scheduler can form (`--max-num-batched-tokens`) measures the activation
peak, and what is left of the worker's share becomes KV blocks. An explicit `--kv-cache-gib`
wins on CUDA too. Memory outside torch's allocator (the CUDA context, NCCL buffers, ~0.5-1 GiB)
is not counted in the share; the pool must also fit what the device has free.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from pdmesh.errors import InvalidRequestError

GIB = 2**30
CPU_DEFAULT_GIB = 1.0


@dataclass(frozen=True, slots=True)
class DeviceMemory:
    """What the device says once the weights are loaded and the profile step has run (bytes)."""

    total: int
    free: int
    peak_allocated: int  # this process's high-water mark: weights + activation peak


def kv_pool_bytes(memory: DeviceMemory, utilization: float) -> int:
    """Bytes for KV blocks: the worker's share of the device less its weights and activation peak."""
    share = int(memory.total * utilization)
    kv = share - memory.peak_allocated
    if kv <= 0:
        raise InvalidRequestError(
            f"--gpu-memory-utilization {utilization} gives this worker {share / GIB:.2f} GiB of the device's "
            f"{memory.total / GIB:.2f} GiB, and weights plus activations already take "
            f"{memory.peak_allocated / GIB:.2f} GiB: no room for KV blocks", "gpu_memory_utilization")
    if kv > memory.free:
        raise InvalidRequestError(
            f"the KV pool would take {kv / GIB:.2f} GiB (--gpu-memory-utilization {utilization} of "
            f"{memory.total / GIB:.2f} GiB) but only {memory.free / GIB:.2f} GiB of the device is free (other "
            "processes use it): lower --gpu-memory-utilization", "gpu_memory_utilization")
    return kv


def measure(device: torch.device) -> DeviceMemory:
    """The device's memory now (call after the profile step); CUDA only."""
    torch.cuda.synchronize(device)
    torch.cuda.empty_cache()  # the profile step's activations, cached by the allocator, count as free
    free, total = torch.cuda.mem_get_info(device)
    return DeviceMemory(total=total, free=free, peak_allocated=torch.cuda.max_memory_allocated(device))


def reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
