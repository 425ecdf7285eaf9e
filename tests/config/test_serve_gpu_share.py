"""pdmesh serve puts every worker on the one --device; on a GPU they share its memory."""

from __future__ import annotations

from dataclasses import replace

import pytest

from pdmesh.config import WorkerConfig
from pdmesh.engine.engine_config import EngineConfig
from pdmesh.serve_config import RolePlan, ServeConfig


def serve(device: str, utilization: float = 0.9) -> ServeConfig:
    engine = EngineConfig(device=device, gpu_memory_utilization=utilization)
    return ServeConfig(worker=WorkerConfig(engine=engine), prefill=RolePlan(workers=1), decode=RolePlan(workers=2))


@pytest.mark.parametrize("device", ["", "cuda", "cuda:1"])
def test_workers_on_one_gpu_split_its_memory(device):
    config = serve(device)
    shares = [config.worker_config(role, i).engine.gpu_memory_utilization
              for role, i in (("prefill", 0), ("decode", 0), ("decode", 1))]
    assert shares == pytest.approx([0.3, 0.3, 0.3])
    engine = config.worker_config("decode", 1).engine
    assert replace(engine, gpu_memory_utilization=0.9) == config.worker.engine  # nothing else changes


def test_cpu_workers_keep_the_setting():
    assert serve("cpu").worker_config("decode", 0).engine == serve("cpu").worker.engine
