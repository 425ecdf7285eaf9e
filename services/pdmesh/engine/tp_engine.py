"""A tensor-parallel engine: rank 0 runs the LLMEngine and drives; the other ranks follow.

Rank 0 owns scheduling, sampling and the block tables. Every forward pass, KV export and KV
import is a command broadcast to the followers, which run the same thing on their shard of the
weights and of the KV heads (same block ids on every rank). A KV export gathers the shards at
rank 0 into the whole model's KV, and an import scatters it, so a hand-off between groups of any
TP sizes carries the full tensor and each receiving rank keeps exactly the heads it owns.
One lock on rank 0 orders all commands (engine thread and RPC threads alike). An idle rank 0
sends a no-op every second, so followers can tell a quiet leader from a dead one.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
import time

import torch

from pdmesh.engine.kv_cache import KVCache, KVLayout, torch_dtype
from pdmesh.engine.model import LlamaModel
from pdmesh.engine.tensor_parallel import TPGroup, TPGroupError, kv_heads_of

log = logging.getLogger(__name__)
NOOP_INTERVAL_S = 1.0
NO_LOGITS = torch.empty(0, dtype=torch.long)  # followers skip the (replicated) LM head


class TPDriver:
    """Rank 0's stand-in for the model: forward() runs on every rank."""

    def __init__(self, model: LlamaModel, group: TPGroup, on_broken):
        self.model = model
        self.group = group
        self.on_broken = on_broken
        self.lock = threading.Lock()
        self.last_command = time.monotonic()
        self.stopped = False
        threading.Thread(target=self._keep_alive, name="tp-noop", daemon=True).start()

    def shutdown(self) -> None:
        """Tell the followers to exit (they also exit on their own if rank 0 vanishes)."""
        with self.lock:
            self.stopped = True
            self.command("stop")

    def command(self, *cmd) -> None:
        """Broadcast a command; the caller holds self.lock."""
        self.group.broadcast_object(cmd)
        self.last_command = time.monotonic()

    def forward(self, input_ids, positions, batch, cache, logit_rows):
        """The step's inputs are on the host: followers get them as they are."""
        with self.lock, self._fatal():
            if isinstance(cache, TPKVCache):
                self.command("step", input_ids, positions, batch)
                return self.model.forward(input_ids, positions, batch, cache.local, logit_rows)
            # The engine's profile step, before the group's cache exists: each rank uses a throwaway one.
            self.command("profile", cache.num_blocks, cache.block_size, input_ids, positions, batch)
            return self.model.forward(input_ids, positions, batch, cache, logit_rows)

    def _keep_alive(self) -> None:
        while not self.stopped:
            time.sleep(NOOP_INTERVAL_S / 2)
            if time.monotonic() - self.last_command >= NOOP_INTERVAL_S and self.lock.acquire(blocking=False):
                try:
                    if not self.stopped:
                        with self._fatal():
                            self.command("noop")
                finally:
                    self.lock.release()

    def _fatal(self):
        driver = self

        class _Guard:
            def __enter__(self):
                return self

            def __exit__(self, kind, exc, tb):
                if isinstance(exc, TPGroupError):
                    driver.on_broken(exc)
                return False
        return _Guard()


class TPKVCache:
    """Rank 0's view of the group's KV: the local shard for compute, whole-model KV for hand-offs."""

    def __init__(self, local: KVCache, driver: TPDriver, rank_heads: tuple[tuple[int, ...], ...]):
        self.local = local
        self.driver = driver
        self.rank_heads = rank_heads
        self.block_size, self.num_blocks, self.kv = local.block_size, local.num_blocks, local.kv

    def slots(self, block_ids, start, end):
        return self.local.slots(block_ids, start, end)

    def export(self, block_ids: list[int], num_tokens: int, start: int = 0) -> torch.Tensor:
        """[layers, 2, num_tokens - start, every KV head of the model, head_dim], gathered from the ranks."""
        group = self.driver.group
        with self.driver.lock, self.driver._fatal():
            self.driver.command("export", block_ids, num_tokens, start)
            shards = [self.local.export(block_ids, num_tokens, start)]
            for rank in range(1, group.size):
                shards.append(group.recv(shards[0].shape, shards[0].dtype, src=rank))
        by_head = {}
        for heads, shard in zip(self.rank_heads, shards):
            for i, head in enumerate(heads):
                by_head.setdefault(head, shard[:, :, :, i])
        return torch.stack([by_head[h] for h in sorted(by_head)], dim=3)

    def import_(self, block_ids: list[int], kv: torch.Tensor, start: int = 0) -> None:
        """Scatter the whole model's KV: each rank writes the heads it owns."""
        group = self.driver.group
        with self.driver.lock, self.driver._fatal():
            self.driver.command("import", block_ids, kv.shape[2], start)
            for rank in range(1, group.size):
                group.send(kv[:, :, :, list(self.rank_heads[rank])], dst=rank)
            self.local.import_(block_ids, kv[:, :, :, list(self.rank_heads[0])].contiguous(), start)


def rank_heads(config, size: int) -> tuple[tuple[int, ...], ...]:
    return tuple(kv_heads_of(config, r, size) for r in range(size))


def make_tp_engine(engine, group: TPGroup, driver: TPDriver) -> None:
    """Turn a rank-0 LLMEngine built on its shard into the group's engine (in place)."""
    heads = rank_heads(engine.model_config, group.size)
    engine.cache = TPKVCache(engine.cache, driver, heads)
    engine.layout = dataclasses.replace(engine.layout, kv_head_ids=tuple(range(engine.model_config.num_kv_heads)),
                                        rank_kv_heads=heads)
    with driver.lock:
        driver.command("setup", engine.cache.num_blocks, engine.cache.block_size)


def follow(group: TPGroup, model: LlamaModel, layout: KVLayout) -> None:
    """A follower rank's whole life: run rank 0's commands until "stop" (or the group fails)."""
    cache = None
    while True:
        kind, *args = group.broadcast_object()
        if kind == "setup":
            cache = KVCache(layout, args[0], args[1], model.device)
        elif kind == "step":
            input_ids, positions, batch = args
            model.forward(input_ids, positions, batch, cache, NO_LOGITS)
        elif kind == "profile":
            num_blocks, block_size, input_ids, positions, batch = args
            scratch = KVCache(layout, num_blocks, block_size, model.device)
            model.forward(input_ids, positions, batch, scratch, NO_LOGITS)
        elif kind == "export":
            block_ids, num_tokens, start = args
            group.send(cache.export(block_ids, num_tokens, start), dst=0)
        elif kind == "import":
            block_ids, num_tokens, start = args
            shape = (layout.num_layers, 2, num_tokens, len(layout.kv_head_ids), layout.head_dim)
            cache.import_(block_ids, group.recv(shape, torch_dtype(layout.dtype), src=0), start)
        elif kind == "stop":
            return
