"""--device resolution, the dtype that goes with it, and sizing the KV pool from GPU memory."""

from __future__ import annotations

import pytest
import torch

from pdmesh.engine import device as device_module
from pdmesh.engine.device import auto_device, memory_used_bytes, rank_device, resolve_device, resolve_dtype
from pdmesh.engine.engine_config import EngineConfig
from pdmesh.engine.kv_budget import GIB, DeviceMemory, kv_pool_bytes
from pdmesh.engine.sampling_params import SamplingParams
from pdmesh.engine.sequence import EngineRequest
from pdmesh.errors import InvalidRequestError
from support.tiny_model import hf_greedy, run_to_end


@pytest.fixture
def no_cuda(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)


@pytest.fixture
def two_gpus(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(device_module, "auto_device", auto_device)  # the suite's conftest pins it to cpu


def test_default_is_cpu_without_cuda(no_cuda):
    assert resolve_device("") == torch.device("cpu")
    assert resolve_device("cpu") == torch.device("cpu")


@pytest.mark.parametrize("name", ["cuda", "cuda:0", "cuda:3"])
def test_cuda_without_cuda_stops_at_once_naming_the_flag(no_cuda, name):
    with pytest.raises(InvalidRequestError, match=f"--device {name}: CUDA is not available on this machine") as err:
        resolve_device(name)
    assert err.value.field == "device"


def test_default_is_cuda_when_available(two_gpus):
    assert resolve_device("") == torch.device("cuda", 0)
    assert resolve_device("cuda:1") == torch.device("cuda", 1)


def test_a_group_needs_one_gpu_per_rank(two_gpus):
    assert resolve_device("cuda:0", num_ranks=2) == torch.device("cuda", 0)
    with pytest.raises(InvalidRequestError, match=r"needs cuda:1..cuda:2 \(one per rank\); this machine has 2"):
        resolve_device("cuda:1", num_ranks=2)
    with pytest.raises(InvalidRequestError, match="needs cuda:2; this machine has 2"):
        resolve_device("cuda:2")


def test_rank_devices_follow_the_base():
    assert rank_device(torch.device("cuda", 2), 1) == torch.device("cuda", 3)
    assert rank_device(torch.device("cpu"), 3) == torch.device("cpu")


def test_auto_dtype_is_bfloat16_on_cuda_only():
    assert resolve_dtype("", torch.device("cpu")) == "float32"
    assert resolve_dtype("", torch.device("cuda", 0)) == "bfloat16"
    assert resolve_dtype("float32", torch.device("cuda", 0)) == "float32"
    assert memory_used_bytes(torch.device("cpu")) == 0


@pytest.mark.parametrize("fields,flag", [(dict(device="gpu"), "device"), (dict(device="cuda:x"), "device"),
                                         (dict(gpu_memory_utilization=0.0), "gpu_memory_utilization"),
                                         (dict(gpu_memory_utilization=1.5), "gpu_memory_utilization"),
                                         (dict(attention_backend="xformers"), "attention_backend")])
def test_config_refuses_bad_device_settings(fields, flag):
    with pytest.raises(InvalidRequestError) as err:
        EngineConfig(**fields)
    assert err.value.field == flag


def test_config_accepts_every_device_form():
    for name in ("", "cpu", "cuda", "cuda:7"):
        assert EngineConfig(device=name).device == name


def test_kv_pool_is_the_share_left_after_weights_and_activations():
    memory = DeviceMemory(total=100 * GIB, free=80 * GIB, peak_allocated=10 * GIB)
    assert kv_pool_bytes(memory, 0.5) == 40 * GIB


def test_kv_pool_with_no_room_names_the_flag():
    memory = DeviceMemory(total=100 * GIB, free=80 * GIB, peak_allocated=30 * GIB)
    with pytest.raises(InvalidRequestError, match="--gpu-memory-utilization 0.2 gives this worker 20.00 GiB") as err:
        kv_pool_bytes(memory, 0.2)
    assert err.value.field == "gpu_memory_utilization"


def test_kv_pool_larger_than_free_memory_is_refused():
    memory = DeviceMemory(total=100 * GIB, free=20 * GIB, peak_allocated=10 * GIB)
    with pytest.raises(InvalidRequestError, match="only 20.00 GiB of the device is free"):
        kv_pool_bytes(memory, 0.9)


def test_engine_on_cpu_keeps_float32_and_its_kv_size(make_engine):
    engine = make_engine()
    assert engine.device == torch.device("cpu")
    assert engine.layout.dtype == "float32" and engine.layout.device == "cpu" and engine.layout.device_id == ""
    assert engine.cache.kv.device.type == "cpu"
    default = make_engine(kv_cache_gib=0)  # 0: 1 GiB on CPU, as before
    assert default.num_total_blocks * 4 * 2 * 2 * 2 * 8 * 4 == pytest.approx(GIB, rel=1e-3)


def test_profile_step_runs_and_leaves_the_engine_exact(tiny, make_engine):
    """The step that measures the activation peak on CUDA is device-generic; here it runs on CPU."""
    hf, _, _ = tiny
    engine = make_engine(max_num_batched_tokens=300, max_model_len=128, max_num_seqs=4)
    engine.profile_step()  # 300 tokens in sequences of at most 127, into a throwaway cache
    prompt = [5, 77, 190, 3, 41, 300, 12]
    engine.add_request(EngineRequest("r", prompt, SamplingParams(max_tokens=8, ignore_eos=True)))
    assert run_to_end(engine)["r"] == hf_greedy(hf, prompt, 8)
