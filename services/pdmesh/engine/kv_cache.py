"""Paged KV storage for all layers, and moving one sequence's KV in and out of it."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from pdmesh.errors import EngineError


@dataclass(frozen=True, slots=True)
class KVLayout:
    """What a KV tensor holds; sent with every hand-off and checked on both ends.

    kv_head_ids are the model's KV heads this cache (one tensor-parallel rank) stores, in order.
    device is where the KV lives ("cpu" or "cuda"), device_id the GPU's UUID: KV moves between two
    GPUs over NCCL, and through the host when either end is a CPU or both share one GPU.
    """

    num_layers: int
    num_kv_heads: int  # KV heads of the whole model
    head_dim: int
    dtype: str  # torch dtype name, e.g. "float32"
    kv_head_ids: tuple[int, ...]
    # Under tensor parallelism: the KV heads each rank of the group stores (rank order).
    rank_kv_heads: tuple[tuple[int, ...], ...] = ()
    device: str = "cpu"
    device_id: str = ""

    def mismatch(self, other: "KVLayout") -> str | None:
        """Why other's KV cannot be placed into a cache of this layout, or None if it can.

        Heads may differ (tensor-parallel shards): the caller takes the heads it owns. Device kinds
        may differ too (the KV then travels through the host), but each must be one KV moves between.
        """
        for layout, side in ((other, "the sender"), (self, "here")):
            if layout.device not in DEVICE_KINDS:
                return f"KV layout mismatch: device is {layout.device!r} on {side}; KV moves between {DEVICE_KINDS}"
        for name in ("num_layers", "num_kv_heads", "head_dim", "dtype"):
            mine, theirs = getattr(self, name), getattr(other, name)
            if mine != theirs:
                return f"KV layout mismatch: {name} is {theirs} on the sender, {mine} here"
        missing = set(self.kv_head_ids) - set(other.kv_head_ids)
        if missing:
            return f"KV layout mismatch: sender lacks KV heads {sorted(missing)}"
        return None


DEVICE_KINDS = ("cpu", "cuda")


def torch_dtype(name: str) -> torch.dtype:
    dtype = getattr(torch, name, None)
    if not isinstance(dtype, torch.dtype):
        raise EngineError(f"unknown dtype {name!r}")
    return dtype


class KVCache:
    """kv: [num_layers, 2 (k, v), num_blocks * block_size (slots), local kv heads, head_dim]."""

    def __init__(self, layout: KVLayout, num_blocks: int, block_size: int, device: torch.device | str = "cpu"):
        self.layout = layout
        self.block_size = block_size
        self.num_blocks = num_blocks
        self.kv = torch.zeros(layout.num_layers, 2, num_blocks * block_size,
                              len(layout.kv_head_ids), layout.head_dim, dtype=torch_dtype(layout.dtype), device=device)

    @staticmethod
    def bytes_per_block(layout: KVLayout, block_size: int) -> int:
        itemsize = torch.empty(0, dtype=torch_dtype(layout.dtype)).element_size()
        return layout.num_layers * 2 * block_size * len(layout.kv_head_ids) * layout.head_dim * itemsize

    def slots(self, block_ids: list[int], start: int, end: int) -> torch.Tensor:
        """Slot indices of token positions [start, end) of a sequence with this block table."""
        positions = torch.arange(start, end)
        table = torch.tensor(block_ids, dtype=torch.long)
        return table[positions // self.block_size] * self.block_size + positions % self.block_size

    def export(self, block_ids: list[int], num_tokens: int, start: int = 0) -> torch.Tensor:
        """[num_layers, 2, num_tokens - start, local kv heads, head_dim]: a copy of one sequence's KV
        of positions [start, num_tokens), on the cache's device."""
        return self.kv[:, :, self.slots(block_ids, start, num_tokens).to(self.kv.device)]

    def import_(self, block_ids: list[int], kv: torch.Tensor, start: int = 0) -> None:
        """Write a sequence's KV of positions [start, start + tokens) ([L, 2, tokens, local heads, D],
        on any device) into its blocks."""
        expected = (self.kv.shape[0], 2, kv.shape[2], *self.kv.shape[3:])
        if tuple(kv.shape) != expected or kv.dtype != self.kv.dtype:
            raise EngineError(f"KV import of shape {tuple(kv.shape)} {kv.dtype} does not fit "
                              f"{expected} {self.kv.dtype}")
        if start + kv.shape[2] > len(block_ids) * self.block_size:
            raise EngineError(f"KV of {start + kv.shape[2]} tokens does not fit {len(block_ids)} blocks")
        self.kv[:, :, self.slots(block_ids, start, start + kv.shape[2]).to(self.kv.device)] = kv.to(self.kv.device)
