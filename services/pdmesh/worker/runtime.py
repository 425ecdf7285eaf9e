"""Start-up shared by prefill and decode workers: CPU placement, the engine, load reports."""

from __future__ import annotations

import asyncio
import logging
import os
from dataclasses import replace

import torch

from pdmesh import metrics
from pdmesh.config import CpuPlacement, WorkerConfig
from pdmesh.engine.async_engine import AsyncEngine
from pdmesh.engine.checkpoint import load_checkpoint
from pdmesh.engine.echo_model import EchoModel, echo_config
from pdmesh.engine.llm_engine import LLMEngine
from pdmesh.gen.pdmesh.v1 import registry_pb2, worker_pb2
from pdmesh.worker.convert import layout_to_pb

log = logging.getLogger(__name__)


def apply_cpu_placement(cpu: CpuPlacement) -> None:
    if cpu.threads:
        torch.set_num_threads(cpu.threads)
    if cpu.nice:
        os.nice(cpu.nice)  # relative to the parent: serve starts every worker from nice 0


def group_threads(config: WorkerConfig) -> CpuPlacement:
    """Each rank's share: a tensor-parallel group splits the worker's threads among its ranks."""
    if config.tp == 1:
        return config.cpu
    return replace(config.cpu, threads=max(1, (config.cpu.threads or os.cpu_count() or 1) // config.tp))


def start_engine(config: WorkerConfig, log_level: str = "INFO"):
    """(AsyncEngine stepped by the caller, the tensor-parallel group or None)."""
    apply_cpu_placement(group_threads(config))
    checkpoint = load_checkpoint(config.model, log=log.info)
    group = None
    if config.tp > 1:
        from pdmesh.worker.tensor_parallel_group import start_tp_group

        group = start_tp_group(config, checkpoint, log_level)
        engine = group.engine
    elif config.engine_kind == "echo":
        model_config = echo_config(checkpoint.config)
        engine = LLMEngine(model_config, {}, config.engine, model=EchoModel(model_config, config.echo_step_ms / 1000))
    else:
        engine = LLMEngine(checkpoint.config, checkpoint.weights, config.engine)
    log.info("%s worker: %s, %d KV blocks of %d tokens, %d threads, nice %d", config.role,
             engine.model_config.name, engine.num_total_blocks, config.engine.block_size,
             torch.get_num_threads(), os.nice(0))
    return AsyncEngine(engine, own_thread=False), group  # the worker steps it on the main thread


class WorkerState:
    """What a worker reports on every heartbeat; also keeps its Prometheus gauges current."""

    def __init__(self, config: WorkerConfig, engine: AsyncEngine, address: str, follower_pids: list[int]):
        self.config = config
        self.engine = engine
        self.address = address
        self.follower_pids = follower_pids
        self.worker_id = config.worker_id or f"{config.role}-{address}"
        self.queued_prompt_tokens = 0
        self.requests_total = 0
        self.draining = False
        self.drain_requested = asyncio.Event()
        self.metrics_address = ""

    def request_drain(self) -> int:
        """Take no new work from now on; the worker exits once what runs is done. Returns running."""
        self.draining = True
        self.drain_requested.set()
        running, _ = self.engine.engine.load()
        return running

    def load(self) -> worker_pb2.WorkerLoad:
        engine = self.engine.engine
        running, waiting = engine.load()
        free, total = engine.num_free_blocks, engine.num_total_blocks
        metrics.RUNNING.set(running)
        metrics.QUEUED.set(waiting)
        metrics.KV_BLOCKS_FREE.set(free)
        metrics.KV_BLOCKS_TOTAL.set(total)
        return worker_pb2.WorkerLoad(running=running, queued=waiting, queued_prompt_tokens=self.queued_prompt_tokens,
                                     kv_blocks_free=free, kv_blocks_total=total, block_size=engine.config.block_size,
                                     state="draining" if self.draining else "serving",
                                     requests_total=self.requests_total)

    def tp_ranks(self) -> list[worker_pb2.TPRank]:
        pids = [os.getpid(), *self.follower_pids]
        heads = self.engine.engine.layout.rank_kv_heads or (self.engine.engine.layout.kv_head_ids,)
        return [worker_pb2.TPRank(rank=r, pid=pid, kv_head_ids=list(h)) for r, (pid, h) in enumerate(zip(pids, heads))]

    def register_request(self) -> registry_pb2.RegisterRequest:
        return registry_pb2.RegisterRequest(worker_id=self.worker_id, role=self.config.role, address=self.address,
                                            model=self.engine.engine.model_config.name, tp_size=self.config.tp,
                                            tp_ranks=self.tp_ranks(),
                                            layout=layout_to_pb(self.engine.engine.layout),
                                            metrics_address=self.metrics_address, restarts=self.config.restarts,
                                            engine=self.config.engine_kind)
