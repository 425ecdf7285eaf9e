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
from pdmesh.engine.checkpoint import load_checkpoint, load_model_metadata
from pdmesh.engine import kv_budget
from pdmesh.engine.device import resolve_device, resolve_dtype
from pdmesh.engine.echo_model import EchoModel, echo_config
from pdmesh.engine.engine_protocol import Engine, EngineLoad
from pdmesh.engine.llm_engine import LLMEngine
from pdmesh.engine.vllm_model_folder import ensure_vllm_folder
from pdmesh.gen.pdmesh.v1 import registry_pb2, worker_pb2
from pdmesh.worker.convert import layout_to_pb

log = logging.getLogger(__name__)


def apply_cpu_placement(cpu: CpuPlacement) -> None:
    if cpu.cpu_ids():
        os.sched_setaffinity(0, cpu.cpu_ids())
    if cpu.threads:
        torch.set_num_threads(cpu.threads)
    if cpu.nice:
        os.nice(cpu.nice)  # relative to the parent: serve starts every worker from nice 0


def group_threads(config: WorkerConfig) -> CpuPlacement:
    """Each rank's share: a tensor-parallel group splits the worker's threads among its ranks."""
    if config.tp == 1:
        return config.cpu
    return replace(config.cpu, threads=max(1, (config.cpu.threads or os.cpu_count() or 1) // config.tp))


def start_engine(config: WorkerConfig, log_level: str = "INFO") -> Engine:
    """The worker's engine, behind the worker interface; the worker steps it on its main thread."""
    if config.engine_kind == "vllm":
        return _log_started(config, start_vllm_engine(config))
    if config.engine_kind == "pdmesh":
        resolve_device(config.engine.device, num_ranks=config.tp)  # --device cuda without CUDA: stop now
    apply_cpu_placement(group_threads(config))
    checkpoint = load_checkpoint(config.model, log=log.info)
    if config.tp > 1:
        from pdmesh.worker.tensor_parallel_group import start_tp_group

        group = start_tp_group(config, checkpoint, log_level)
        engine = AsyncEngine(group.engine, own_thread=False, follower_pids=tuple(group.follower_pids()),
                             on_close=group.stop)
    elif config.engine_kind == "echo":
        model_config = echo_config(checkpoint.config)
        engine = AsyncEngine(LLMEngine(model_config, {}, replace(config.engine, device="cpu"),  # no model: no GPU
                                       model=EchoModel(model_config, config.echo_step_ms / 1000)),
                             own_thread=False, kind="echo")
    else:
        engine = AsyncEngine(LLMEngine(checkpoint.config, checkpoint.weights, config.engine), own_thread=False)
    return _log_started(config, engine)


def start_vllm_engine(config: WorkerConfig) -> Engine:
    """vLLM in this process (its EngineCore in a child), on an HF folder of the model. Its OpenMP
    threads are pinned to --cpus; the worker's own process is not (it only serves gRPC)."""
    from pdmesh.engine.vllm_engine import VllmEngine
    from pdmesh.engine.vllm_settings import VllmSettings, require_vllm

    require_vllm()  # before any conversion: a missing package is the first thing to say
    if config.cpu.nice:
        os.nice(config.cpu.nice)
    model = load_model_metadata(config.model, log=log.info).config
    settings = VllmSettings(
        model_dir=str(ensure_vllm_folder(config.model, log=log.info)), role=config.role,
        max_model_len=min(config.engine.max_model_len or model.max_position_embeddings, model.max_position_embeddings),
        kv_cache_bytes=int((config.engine.kv_cache_gib or kv_budget.CPU_DEFAULT_GIB) * kv_budget.GIB),
        max_num_seqs=config.engine.max_num_seqs, cpus=config.cpu.cpus,
        # vLLM always chunks prefill, by its step's token budget
        max_num_batched_tokens=config.engine.prefill_chunk_tokens or config.engine.max_num_batched_tokens,
        dtype=resolve_dtype(config.engine.dtype, torch.device("cuda" if torch.cuda.is_available() else "cpu")),
        side_channel_host=config.listen.advertised_host(), side_channel_port=config.kv_side_channel_port,
        kv_lease_s=max(1, round(config.held_kv_ttl_s)), eos_token_ids=model.eos_token_ids,
        prefix_cache=config.engine.prefix_cache)
    return VllmEngine(settings, model)


def _log_started(config: WorkerConfig, engine: Engine) -> Engine:
    load = engine.load()
    chunk = config.engine.prefill_chunk_tokens
    log.info("%s worker: %s (%s engine) on %s, %d KV blocks of %d tokens, %d threads, nice %d, OpenMP waits %s, "
             "prefills %s", config.role, engine.model_name, engine.kind, engine.device, load.total_blocks,
             load.block_size, torch.get_num_threads(), os.nice(0), os.environ.get("OMP_WAIT_POLICY", "unset").lower(),
             f"in chunks of {chunk} tokens" if chunk else "whole prompts")
    return engine


class WorkerState:
    """What a worker reports on every heartbeat; also keeps its Prometheus gauges current."""

    def __init__(self, config: WorkerConfig, engine: Engine, address: str):
        self.config = config
        self.engine = engine
        self.address = address
        self.worker_id = config.worker_id or f"{config.role}-{address}"
        self.queued_prompt_tokens = 0
        self.requests_total = 0
        self.draining = False
        self.drain_requested = asyncio.Event()
        self.metrics_address = ""
        self._busy_reported = 0.0
        self._prefix_counted = (0, 0)  # prefix cache (queried, hit) tokens already in the counters

    def request_drain(self) -> int:
        """Take no new work from now on; the worker exits once what runs is done. Returns running."""
        self.draining = True
        self.drain_requested.set()
        return self.engine.load().running

    def load(self) -> worker_pb2.WorkerLoad:
        load = self.engine.load()
        metrics.RUNNING.set(load.running)
        metrics.QUEUED.set(load.waiting)
        metrics.KV_BLOCKS_FREE.set(load.free_blocks)
        metrics.KV_BLOCKS_TOTAL.set(load.total_blocks)
        metrics.ENGINE_BUSY.inc(max(0.0, load.busy_seconds - self._busy_reported))
        self._busy_reported = max(self._busy_reported, load.busy_seconds)
        metrics.KV_BLOCKS_CACHED.set(load.cached_blocks)
        self._count_prefix_cache(load)
        return worker_pb2.WorkerLoad(running=load.running, queued=load.waiting,
                                     queued_prompt_tokens=self.queued_prompt_tokens, kv_blocks_free=load.free_blocks,
                                     kv_blocks_total=load.total_blocks, block_size=load.block_size,
                                     state="draining" if self.draining else "serving",
                                     requests_total=self.requests_total,
                                     gpu_memory_used_bytes=load.gpu_memory_used_bytes,
                                     kv_blocks_cached=load.cached_blocks,
                                     prefix_cache_queried_tokens=load.prefix_queried_tokens,
                                     prefix_cache_hit_tokens=load.prefix_hit_tokens,
                                     cached_block_hashes=load.cached_block_hashes)

    def _count_prefix_cache(self, load: EngineLoad) -> None:
        """Move the Prometheus counters by what the engine counted since the last report."""
        metrics.PREFIX_CACHE_QUERIES.inc(load.prefix_queried_tokens - self._prefix_counted[0])
        metrics.PREFIX_CACHE_HITS.inc(load.prefix_hit_tokens - self._prefix_counted[1])
        self._prefix_counted = (load.prefix_queried_tokens, load.prefix_hit_tokens)

    def tp_ranks(self) -> list[worker_pb2.TPRank]:
        pids = [os.getpid(), *self.engine.follower_pids]
        heads = self.engine.layout.rank_kv_heads or (self.engine.layout.kv_head_ids,)
        return [worker_pb2.TPRank(rank=r, pid=pid, kv_head_ids=list(h)) for r, (pid, h) in enumerate(zip(pids, heads))]

    def register_request(self) -> registry_pb2.RegisterRequest:
        return registry_pb2.RegisterRequest(worker_id=self.worker_id, role=self.config.role, address=self.address,
                                            model=self.engine.model_name, tp_size=self.config.tp,
                                            tp_ranks=self.tp_ranks(),
                                            layout=layout_to_pb(self.engine.layout),
                                            metrics_address=self.metrics_address, restarts=self.config.restarts,
                                            engine=self.engine.kind, device=str(self.engine.device))
