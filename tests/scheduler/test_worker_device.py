"""Each worker's device and GPU memory travel from its engine to cluster status."""

from __future__ import annotations

import asyncio

from pdmesh.config import WorkerConfig
from pdmesh.engine.async_engine import AsyncEngine
from pdmesh.engine.engine_config import EngineConfig
from pdmesh.engine.llm_engine import LLMEngine
from pdmesh.gen.pdmesh.v1 import registry_pb2, worker_pb2
from pdmesh.scheduler.registry import WorkerRegistry
from pdmesh.scheduler.service import RegistryServicer, load_from_pb
from pdmesh.worker.runtime import WorkerState
from support.tiny_model import tiny_llama


def test_a_cpu_worker_reports_its_device_and_no_gpu_memory():
    _, config, weights = tiny_llama()
    engine = AsyncEngine(LLMEngine(config, weights, EngineConfig(block_size=4, kv_cache_gib=0.001)), own_thread=False)
    state = WorkerState(WorkerConfig(), engine, "127.0.0.1:1")
    assert state.register_request().device == "cpu"
    assert state.register_request().layout.device == "cpu"
    assert state.load().gpu_memory_used_bytes == 0


def test_the_registry_keeps_what_a_gpu_worker_reports():
    registry = WorkerRegistry(heartbeat_timeout_s=3.0)

    async def on_change():
        pass

    servicer = RegistryServicer(registry, 1.0, on_change)
    load = worker_pb2.WorkerLoad(kv_blocks_total=10, block_size=16, gpu_memory_used_bytes=7 * 2**30)
    request = registry_pb2.RegisterRequest(worker_id="d", role="decode", address="h:1", tp_size=1, load=load,
                                           device="cuda:1")
    asyncio.run(servicer.Register(request, None))
    info = registry.workers["d"]
    assert info.device == "cuda:1" and info.load.gpu_memory_used_bytes == 7 * 2**30
    assert load_from_pb(worker_pb2.WorkerLoad()).gpu_memory_used_bytes == 0
    asyncio.run(servicer.Register(registry_pb2.RegisterRequest(worker_id="old", role="decode", address="h:2"), None))
    assert registry.workers["old"].device == "cpu"  # a worker that predates devices
