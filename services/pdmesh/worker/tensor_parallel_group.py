"""Starting a worker's tensor-parallel group: rank 0 (this process) spawns the followers.

Rank 0 serves a TCPStore for the group on its own address, starts one follower process per other
rank (each gets the worker's config whole and its rank, loads the checkpoint and keeps its
shard), joins the Gloo group, and wraps its engine. If any rank fails, rank 0 exits at once: its
gRPC port closes, the scheduler takes the whole group out of routing, its requests are retried
on other workers, and a supervisor starts the whole group again; the followers see the group fail
(or their parent die) and exit too. No rank is left waiting forever.
"""

from __future__ import annotations

import atexit
import logging
import os
import subprocess
from dataclasses import dataclass

from pdmesh.child import TPFollowerSpec, spawn
from pdmesh.config import WorkerConfig
from pdmesh.engine.checkpoint import Checkpoint
from pdmesh.engine.device import place_weights, resolve_device, resolve_dtype, use_device
from pdmesh.engine.flex_decode import decode_backend_for
from pdmesh.engine.llm_engine import LLMEngine
from pdmesh.engine.model import LlamaModel
from pdmesh.engine.process_group import serve_store
from pdmesh.engine.tensor_parallel import TPGroup, check_tp_size, kv_heads_of, shard_weights
from pdmesh.engine.tp_engine import TPDriver, make_tp_engine

log = logging.getLogger(__name__)
JOIN_TIMEOUT_S = 300.0  # followers load the model before they join
OP_TIMEOUT_S = 10.0


@dataclass
class TPWorkerGroup:
    """Rank 0's engine plus what it needs to stop the group: the driver and the follower processes."""

    engine: LLMEngine
    driver: TPDriver
    followers: list[subprocess.Popen]

    def follower_pids(self) -> list[int]:
        return [p.pid for p in self.followers]

    def stop(self) -> None:
        """Tell the followers to exit, and make sure they did."""
        try:
            self.driver.shutdown()
        except Exception as exc:  # a follower already gone: it exits on its own
            log.warning("could not stop tensor-parallel followers cleanly: %s", exc)
        for proc in self.followers:
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()


def start_tp_group(config: WorkerConfig, checkpoint: Checkpoint, log_level: str) -> TPWorkerGroup:
    size = config.tp
    check_tp_size(checkpoint.config, size)
    device = resolve_device(config.engine.device, num_ranks=size)  # rank i takes the base + i
    use_device(device)
    host = config.listen.advertised_host()
    store = serve_store(host, size, JOIN_TIMEOUT_S)
    followers = [spawn("tp-follower", TPFollowerSpec(config, rank, host, store.port), log_level)
                 for rank in range(1, size)]
    atexit.register(_kill, followers)
    group = TPGroup(store, 0, size, JOIN_TIMEOUT_S, host, device=device)
    group.timeout = type(group.timeout)(seconds=OP_TIMEOUT_S)
    group.store = store  # the store must outlive the group
    model = rank_model(config, checkpoint, rank_weights(config, checkpoint, 0, device), device, group)
    driver = TPDriver(model, group, on_broken=lambda exc: _die(exc, followers))
    engine = LLMEngine(checkpoint.config, {}, config.engine, kv_head_ids=kv_heads_of(checkpoint.config, 0, size),
                       model=driver)
    make_tp_engine(engine, group, driver)
    log.info("tensor-parallel group of %d ready (follower pids %s)", size, [p.pid for p in followers])
    return TPWorkerGroup(engine, driver, followers)


def rank_weights(config: WorkerConfig, checkpoint: Checkpoint, rank: int, device) -> dict:
    """Rank `rank`'s shard of every weight, in the engine's dtype on the rank's device."""
    weights = shard_weights(checkpoint.weights, checkpoint.config, rank, config.tp)
    return place_weights(weights, resolve_dtype(config.engine.dtype, device), device)


def rank_model(config: WorkerConfig, checkpoint: Checkpoint, weights: dict, device, group: TPGroup) -> LlamaModel:
    """A rank's model over its placed shard (rank_weights), all-reducing through `group`."""
    max_len = min(config.engine.max_model_len or checkpoint.config.max_position_embeddings,
                  checkpoint.config.max_position_embeddings)
    backend = decode_backend_for(config.engine.attention_backend, device, resolve_dtype(config.engine.dtype, device))
    return LlamaModel(checkpoint.config, weights, max_len, group.all_reduce, backend, config.engine.max_num_seqs)


def _kill(followers: list[subprocess.Popen]) -> None:
    for proc in followers:
        if proc.poll() is None:
            proc.kill()


def _die(exc: Exception, followers: list[subprocess.Popen]) -> None:
    log.critical("tensor-parallel group failed (%s); exiting so the scheduler routes around this worker", exc)
    _kill(followers)
    os._exit(3)
