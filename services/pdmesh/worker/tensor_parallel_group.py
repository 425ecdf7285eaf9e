"""Starting a worker's tensor-parallel group: rank 0 (this process) spawns the followers.

Rank 0 serves a TCPStore for the group, starts one follower process per other rank (each loads
the checkpoint and keeps its shard), joins the Gloo group, and wraps its engine. If any rank
fails, rank 0 exits at once: its gRPC port closes, the scheduler takes the whole group out of
routing, and its requests are retried on other workers; the followers see the group fail and
exit too. No rank is left waiting forever.
"""

from __future__ import annotations

import atexit
import logging
import os
import subprocess
import sys

import torch.distributed as dist

from pdmesh.config import WorkerConfig
from pdmesh.engine.checkpoint import Checkpoint
from pdmesh.engine.llm_engine import LLMEngine
from pdmesh.engine.model import LlamaModel
from pdmesh.engine.tensor_parallel import TPGroup, check_tp_size, kv_heads_of, shard_weights
from pdmesh.engine.tp_engine import TPDriver, make_tp_engine

log = logging.getLogger(__name__)
JOIN_TIMEOUT_S = 300.0  # followers load the model before they join
OP_TIMEOUT_S = 10.0


def start_tp_engine(config: WorkerConfig, checkpoint: Checkpoint) -> tuple[LLMEngine, TPDriver, list]:
    size = config.tp
    check_tp_size(checkpoint.config, size)
    store = dist.TCPStore(config.host, 0, size, is_master=True, wait_for_workers=False)
    followers = [_spawn_follower(config, store.port, rank) for rank in range(1, size)]
    atexit.register(_kill, followers)
    group = TPGroup(store, 0, size, JOIN_TIMEOUT_S)
    group.timeout = type(group.timeout)(seconds=OP_TIMEOUT_S)
    group.store = store  # the store must outlive the group
    weights = shard_weights({n: w.to(getattr(__import__("torch"), config.engine.dtype))
                             for n, w in checkpoint.weights.items()}, checkpoint.config, 0, size)
    max_len = min(config.engine.max_model_len or checkpoint.config.max_position_embeddings,
                  checkpoint.config.max_position_embeddings)
    model = LlamaModel(checkpoint.config, weights, max_len, all_reduce=group.all_reduce)
    driver = TPDriver(model, group, on_broken=lambda exc: _die(exc, followers))
    engine = LLMEngine(checkpoint.config, {}, config.engine, kv_head_ids=kv_heads_of(checkpoint.config, 0, size),
                       model=driver)
    make_tp_engine(engine, group, driver)
    log.info("tensor-parallel group of %d ready (follower pids %s)", size, [p.pid for p in followers])
    return engine, driver, followers


def _spawn_follower(config: WorkerConfig, store_port: int, rank: int) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "pdmesh.worker.tp_follower", "--store", f"{config.host}:{store_port}",
           "--rank", str(rank), "--tp", str(config.tp), "--dtype", config.engine.dtype,
           "--threads", str(config.cpu.threads), "--nice", str(config.cpu.nice),
           "--max-model-len", str(config.engine.max_model_len)]
    if config.model:
        cmd += ["--model", config.model]
    return subprocess.Popen(cmd)


def _kill(followers: list[subprocess.Popen]) -> None:
    for proc in followers:
        if proc.poll() is None:
            proc.kill()


def _die(exc: Exception, followers: list[subprocess.Popen]) -> None:
    log.critical("tensor-parallel group failed (%s); exiting so the scheduler routes around this worker", exc)
    _kill(followers)
    os._exit(3)
