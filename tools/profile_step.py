"""Where a decode step's time goes: pdmesh's engine (default model, fp32, this process's threads)
stepped with batches of decoding sequences under torch.profiler, op time grouped by kind.

    python tools/profile_step.py [--batches 1,16,64] [--steps 20] [--context 100] [--top 0]
                                 [--attention-backend auto|sdpa|paged]

For each batch size it prints the wall time of a step, the CPU time inside torch ops by kind
(linear layers with the LM head, attention, gathers and cache writes, norms, RoPE, element-wise,
sampling) and what is left: Python and dispatch between ops. Self times of the ops are summed, so
the kinds add up to the ops' total. --top N also lists the N costliest ops by name.

The "memory floor" row is the time a step would take if it did nothing but read, once, every weight
and the KV of its batch at this machine's memory bandwidth (measured here as a float32 sum over
256 MB with the same threads): the bound a decode step cannot beat in float32.
"""

from __future__ import annotations

import argparse
import collections
import sys
import time
from pathlib import Path

TOOLS = Path(__file__).resolve().parent
sys.path[:0] = [str(TOOLS)]

import torch  # noqa: E402
from torch.profiler import ProfilerActivity, profile  # noqa: E402

from bench_common import log  # noqa: E402

# (kind, substrings of an op's name), matched in order; the first match wins.
KINDS = (
    ("linear", ("mkldnn::_linear_pointwise", "pdmesh::skinny_linear", "aten::addmm", "aten::mm", "aten::linear", "aten::matmul")),
    ("attention", ("scaled_dot_product", "_flash_attention", "aten::bmm", "aten::baddbmm", "aten::_softmax",
                   "pdmesh::paged_decode")),
    ("kv gather/write", ("aten::index_select", "aten::index_copy", "aten::index", "aten::gather")),
    ("norm", ("aten::rsqrt", "aten::pow", "aten::mean")),
    ("sampling", ("aten::argmax", "aten::_local_scalar_dense", "aten::item")),
    ("copies", ("aten::copy_", "aten::cat", "aten::to", "aten::_to_copy", "aten::contiguous", "aten::clone")),
    ("element-wise", ("aten::mul", "aten::add", "aten::silu", "aten::neg", "aten::sub", "aten::div")),
)


def kind_of(name: str) -> str:
    for kind, parts in KINDS:
        if any(part in name for part in parts):
            return kind
    return "other ops"


def build_engine(attention_backend: str = "auto"):
    """The engine, and the bytes of its weights (each tensor once: a tied LM head is the embedding)."""
    from pdmesh.engine.checkpoint import load_checkpoint
    from pdmesh.engine.engine_config import EngineConfig
    from pdmesh.engine.llm_engine import LLMEngine
    ck = load_checkpoint(None, log=log)
    weight_bytes = sum(t.numel() * t.element_size() for t in {id(t): t for t in ck.weights.values()}.values())
    engine = LLMEngine(ck.config, ck.weights, EngineConfig(kv_cache_gib=1.0, max_num_seqs=256,
                                                           attention_backend=attention_backend))
    log(f"decode attention: {engine.model.decode_backend}")
    return engine, weight_bytes


def memory_bandwidth() -> float:
    """Bytes/s of a float32 sum over 256 MB with this process's torch threads, best of 5."""
    x = torch.ones(64 * 2**20)
    x.sum()
    best = float("inf")
    for _ in range(5):
        start = time.perf_counter()
        x.sum()
        best = min(best, time.perf_counter() - start)
    return x.numel() * x.element_size() / best


def kv_bytes_per_token(engine) -> int:
    from pdmesh.engine.kv_cache import torch_dtype
    layout = engine.cache.layout
    return layout.num_layers * 2 * layout.num_kv_heads * layout.head_dim * torch_dtype(layout.dtype).itemsize


def start_batch(engine, batch: int, context: int, tag: str, steps: int) -> None:
    """`batch` sequences with `context`-token prompts, prefilled, so each further step decodes them all."""
    from pdmesh.engine.sampling_params import SamplingParams
    from pdmesh.engine.sequence import EngineRequest
    params = SamplingParams(max_tokens=2 * steps + 8, ignore_eos=True)  # warm-up, timed and profiled steps
    for i in range(batch):
        prompt = [(1000 + 7 * i + j) % 40_000 + 20 for j in range(context)]
        engine.add_request(EngineRequest(f"{tag}-{i}", prompt, params))
    for _ in range(batch + 10):  # prefill steps; a batch the KV cache cannot hold never fills
        if len(engine.scheduler.running) == batch:
            return
        engine.step()
    raise RuntimeError(f"{batch} sequences of {context} tokens did not all start (KV cache too small?)")


def profile_batch(engine, batch: int, steps: int, context: int) -> dict:
    start_batch(engine, batch, context, f"b{batch}", steps)
    for _ in range(3):  # warm-up: allocator, oneDNN primitives
        engine.step()
    wall = time.perf_counter()
    for _ in range(steps):
        engine.step()
    plain_s = (time.perf_counter() - wall) / steps
    # Each sequence's mean context over the timed steps: its prompt, the prefill's token, 3 warm-up.
    kv_read = batch * (context + 4 + steps / 2) * kv_bytes_per_token(engine)
    with profile(activities=[ProfilerActivity.CPU], record_shapes=False) as prof:
        for _ in range(steps):
            engine.step()
    for request_id in list(engine._sequences):
        engine.abort(request_id)
    engine.step()
    by_kind, by_name = collections.Counter(), collections.Counter()
    for event in prof.key_averages():
        if event.key.startswith("ProfilerStep") or event.self_cpu_time_total <= 0:
            continue
        by_kind[kind_of(event.key)] += event.self_cpu_time_total / 1e6 / steps
        by_name[event.key] += event.self_cpu_time_total / 1e6 / steps
    return {"step_s": plain_s, "kinds": by_kind, "names": by_name, "kv_read": kv_read}


def print_table(results: dict[int, dict], top: int, weight_bytes: int, bandwidth: float) -> None:
    batches = sorted(results)
    kinds = [k for k, _ in KINDS] + ["other ops"]
    print("| ms per decode step | " + " | ".join(f"batch {b}" for b in batches) + " |")
    print("|---|" + "---|" * len(batches))
    rows = [("step (wall, unprofiled)", [results[b]["step_s"] for b in batches])]
    rows += [(f"  {k}", [results[b]["kinds"][k] for b in batches]) for k in kinds]
    rows.append(("  Python and dispatch (wall - ops)",
                 [results[b]["step_s"] - sum(results[b]["kinds"].values()) for b in batches]))
    rows.append(("memory floor (weights + KV / bandwidth)",
                 [(weight_bytes + results[b]["kv_read"]) / bandwidth for b in batches]))
    for label, values in rows:
        print(f"| {label} | " + " | ".join(f"{v * 1e3:.2f}" for v in values) + " |")
    print("| tokens/s | " + " | ".join(f"{b / results[b]['step_s']:.0f}" for b in batches) + " |")
    for b in batches if top else ():
        print(f"\nbatch {b}: the {top} costliest ops (ms per step)")
        for name, seconds in results[b]["names"].most_common(top):
            print(f"  {seconds * 1e3:7.2f}  {name}")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batches", default="1,16,64", help="decoding sequences per step, comma-separated")
    p.add_argument("--steps", type=int, default=20, help="steps timed (and then profiled) per batch size")
    p.add_argument("--context", type=int, default=100, help="prompt tokens of each sequence")
    p.add_argument("--top", type=int, default=0, help="also list this many costliest ops by name")
    p.add_argument("--attention-backend", default="auto", help="the engine's --attention-backend (default auto)")
    args = p.parse_args(argv)
    torch.set_grad_enabled(False)
    engine, weight_bytes = build_engine(args.attention_backend)
    bandwidth = memory_bandwidth()
    results = {b: profile_batch(engine, b, args.steps, args.context)
               for b in (int(x) for x in args.batches.split(","))}
    print_table(results, args.top, weight_bytes, bandwidth)
    print(f"({torch.get_num_threads()} torch threads, context {args.context} tokens, {args.steps} steps each; "
          "op times are the profiled run's, the wall time the unprofiled one's; memory floor: weights "
          f"{weight_bytes / 1e6:.0f} MB and the batch's KV, read once per step at {bandwidth / 1e9:.1f} GB/s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
