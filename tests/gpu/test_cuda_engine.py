"""The native engine on a GPU: token-exact in float32, bfloat16 by default, KV pool sized from
--gpu-memory-utilization, a tensor-parallel group of one over NCCL, KV moved through the host
when both workers share the GPU."""

from __future__ import annotations

import multiprocessing as mp

import pytest
import torch

from pdmesh.engine.default_model import DEFAULT_MODEL_FILE, resolve_cache_dir
from pdmesh.engine.engine_config import EngineConfig
from pdmesh.engine.kv_cache import KVLayout
from pdmesh.engine.llm_engine import LLMEngine
from pdmesh.engine.model import LlamaModel
from pdmesh.engine.sampling_params import SamplingParams
from pdmesh.engine.sequence import EngineRequest
from pdmesh.engine.tensor_parallel import TPGroup
from pdmesh.engine.tp_engine import TPDriver, make_tp_engine
from pdmesh.engine.process_group import serve_store
from pdmesh.kvtransfer.channel import RECEIVER_RANK, SENDER_RANK, KVChannel, connect_store
from support.gpu import hf_greedy
from support.tiny_model import run_to_end

pytestmark = pytest.mark.gpu
PROMPTS = [[7, 100, 3, 250, 31, 18, 200, 9], [9] * 23, [200, 201], list(range(40, 90))]
FP32 = dict(dtype="float32", kv_cache_gib=0.01, block_size=16, max_num_seqs=8)


def greedy(n: int) -> SamplingParams:
    return SamplingParams(max_tokens=n, ignore_eos=True)


@pytest.mark.parametrize("backend", ["sdpa", "flex"])
def test_greedy_equals_transformers_in_float32(small, device, backend):
    hf, config, weights = small
    engine = LLMEngine(config, weights, EngineConfig(device=str(device), attention_backend=backend, **FP32))
    assert engine.cache.kv.device.type == device.type and engine.model.embed.device.type == device.type
    for i, p in enumerate(PROMPTS):  # one batch: prefill together, then decode together
        engine.add_request(EngineRequest(str(i), p, greedy(16)))
    out = run_to_end(engine)
    for i, p in enumerate(PROMPTS):
        assert out[str(i)] == hf_greedy(hf, p, 16), f"prompt {i}"
    assert engine.model.decode_backend == backend  # flex did not fall back
    assert engine.num_free_blocks == engine.num_total_blocks


def test_bfloat16_is_the_default_on_cuda(small, device):
    _, config, weights = small
    engine = LLMEngine(config, weights, EngineConfig(device=str(device), kv_cache_gib=0.01))
    expected = "bfloat16" if device.type == "cuda" else "float32"
    assert engine.layout.dtype == expected and engine.cache.kv.dtype == getattr(torch, expected)
    assert engine.layout.device == device.type
    engine.add_request(EngineRequest("r", PROMPTS[0], greedy(12)))
    tokens = run_to_end(engine)["r"]
    assert len(tokens) == 12 and all(0 <= t < config.vocab_size for t in tokens)


def test_seeded_sampling_repeats_on_the_device(small, device):
    _, config, weights = small
    engine = LLMEngine(config, weights, EngineConfig(device=str(device), **FP32))
    params = SamplingParams(max_tokens=10, temperature=0.8, top_p=0.9, top_k=50, seed=11, ignore_eos=True)
    runs = []
    for i in range(2):
        engine.add_request(EngineRequest(f"s{i}", PROMPTS[1], params))
        runs.append(run_to_end(engine)[f"s{i}"])
    assert runs[0] == runs[1]


def test_kv_pool_is_sized_from_gpu_memory_utilization(small, device):
    if device.type != "cuda":
        pytest.skip("GPU memory sizing needs CUDA")
    _, config, weights = small
    total = torch.cuda.mem_get_info(device)[1]
    engine = LLMEngine(config, weights, EngineConfig(device=str(device), gpu_memory_utilization=0.05,
                                                     max_num_batched_tokens=512))
    pool = engine.cache.kv.numel() * engine.cache.kv.element_size()
    assert 0.03 * total < pool < 0.05 * total
    engine.add_request(EngineRequest("r", PROMPTS[0], greedy(4)))
    assert len(run_to_end(engine)["r"]) == 4


def test_smollm2_greedy_equals_transformers_on_cuda(device, hf_smollm2_model_on_device):
    from pdmesh.engine.checkpoint import load_checkpoint

    hf, path = hf_smollm2_model_on_device
    checkpoint = load_checkpoint(path, log=lambda _: None)
    engine = LLMEngine(checkpoint.config, checkpoint.weights,
                       EngineConfig(device=str(device), dtype="float32", kv_cache_gib=0.2, max_model_len=512))
    prompt = checkpoint.tokenizer.encode("The quick brown fox")
    engine.add_request(EngineRequest("r", prompt, greedy(24)))
    assert run_to_end(engine)["r"] == hf_greedy(hf, prompt, 24)


@pytest.fixture
def hf_smollm2_model_on_device(device):
    path = resolve_cache_dir() / "models" / DEFAULT_MODEL_FILE
    if not path.is_file():  # GPU machines may have no network: never download here
        pytest.skip(f"SmolLM2 GGUF not in the pdmesh cache ({path})")
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
    return model.to(device).eval(), path


def test_tp_group_of_one_over_nccl(small, device):
    """The TP code path on one GPU: commands over Gloo, all-reduce over NCCL (a group of one)."""
    hf, config, weights = small
    expected = hf_greedy(hf, PROMPTS[3], 12)
    store = serve_store("127.0.0.1", 1, 30)
    group = TPGroup(store, 0, 1, 30, device=device)
    assert (group.data is not group.pg) == (device.type == "cuda")
    shard = {n: w.to(device) for n, w in weights.items()}
    driver = TPDriver(LlamaModel(config, shard, 512, group.all_reduce), group, on_broken=pytest.fail)
    engine = LLMEngine(config, {}, EngineConfig(device=str(device), **FP32), model=driver)
    make_tp_engine(engine, group, driver)
    engine.add_request(EngineRequest("r", PROMPTS[3], greedy(12)))
    assert run_to_end(engine)["r"] == expected
    driver.stopped = True


def _send_from_gpu(port: int, device: str) -> None:
    channel = KVChannel(connect_store("127.0.0.1", port, 20), "one-gpu", SENDER_RANK, 20, "127.0.0.1",
                        torch.device(device), "gloo")
    channel.send(torch.arange(4 * 2 * 5 * 2 * 32, dtype=torch.float32, device=device).view(4, 2, 5, 2, 32), tag=0)


def test_two_workers_on_one_gpu_hand_off_through_the_host(device):
    """NCCL refuses two ranks on one device, so the pair is Gloo, staged through host memory."""
    store = serve_store("127.0.0.1", 2, 20)
    sender = mp.get_context("spawn").Process(target=_send_from_gpu, args=(store.port, str(device)), daemon=True)
    sender.start()
    channel = KVChannel(store, "one-gpu", RECEIVER_RANK, 20, "127.0.0.1", device, "gloo")
    kv = channel.recv((4, 2, 5, 2, 32), torch.float32, tag=0)
    assert torch.equal(kv, torch.arange(kv.numel(), dtype=torch.float32).view(kv.shape))
    sender.join(20)
    assert sender.exitcode == 0


def _nccl_peer(port: int) -> None:
    channel = KVChannel(connect_store("127.0.0.1", port, 30), "two-gpus", SENDER_RANK, 30, "127.0.0.1",
                        torch.device("cuda", 1), "nccl")
    channel.send(torch.full((2, 2, 7, 1, 64), 3.0, device="cuda:1"), tag=0)


def test_two_gpus_hand_off_over_nccl(device):
    if device.type != "cuda" or torch.cuda.device_count() < 2:
        pytest.skip("needs two GPUs")
    store = serve_store("127.0.0.1", 2, 30)
    sender = mp.get_context("spawn").Process(target=_nccl_peer, args=(store.port,), daemon=True)
    sender.start()
    channel = KVChannel(store, "two-gpus", RECEIVER_RANK, 30, "127.0.0.1", torch.device("cuda", 0), "nccl")
    kv = channel.recv((2, 2, 7, 1, 64), torch.float32, tag=0)
    assert kv.device == torch.device("cuda", 0) and bool((kv == 3.0).all())
    sender.join(30)
    assert sender.exitcode == 0
