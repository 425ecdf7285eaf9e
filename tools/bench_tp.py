"""Tensor parallelism on this machine: prefill time and hand-off time by TP size, side by side.

    python tools/bench_tp.py [--tp 3] [--prompt-tokens 1000] [--repeats 3]

SmolLM2 has 9 attention heads and 3 KV heads, so its valid TP sizes are 1, 3 and 9 (TP=2 is
refused); the default compares TP=1 with TP=3. Part 1 prefills a prompt through a real rank 0
with its followers as processes and reports the share of the time rank 0 spends in all-reduce.
Part 2 runs a real mesh (scheduler, a TP=1 and a TP=N prefill worker, a TP=1 decode worker) and
asks the decode worker directly to pull the same prompt from each: hand-off time TP=N -> 1 vs 1 -> 1.
All traffic stays on 127.0.0.1; every process started here is stopped on exit.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT / "tools"))

from bench_common import format_table  # noqa: E402


def prefill_seconds(tp: int, prompt: list[int], repeats: int) -> tuple[float, float]:
    """(median prefill seconds, share of it rank 0 spent in all-reduce) for a group of `tp`."""
    import torch

    from pdmesh.config import CpuPlacement, WorkerConfig
    from pdmesh.engine.checkpoint import load_checkpoint
    from pdmesh.engine.engine_config import EngineConfig
    from pdmesh.engine.llm_engine import LLMEngine
    from pdmesh.engine.sampling_params import SamplingParams
    from pdmesh.engine.sequence import EngineRequest
    from pdmesh.engine.tensor_parallel import TPGroup

    reduce_time = [0.0]
    original = TPGroup.all_reduce

    def timed(self, tensor):  # measurement only: rank 0's time inside all-reduce
        start = time.perf_counter()
        try:
            return original(self, tensor)
        finally:
            reduce_time[0] += time.perf_counter() - start
    TPGroup.all_reduce = timed
    checkpoint = load_checkpoint(None, log=lambda _: None)
    config = WorkerConfig(role="prefill", scheduler_address="unused", tp=tp,
                          engine=EngineConfig(kv_cache_gib=0.2, max_model_len=2048),
                          cpu=CpuPlacement(threads=max(1, 2 // tp)))
    driver = None
    if tp == 1:
        torch.set_num_threads(2)
        engine = LLMEngine(checkpoint.config, checkpoint.weights, config.engine)
    else:
        from pdmesh.worker.tensor_parallel_group import start_tp_engine
        engine, driver, _ = start_tp_engine(config, checkpoint)
    times, shares = [], []
    for i in range(repeats + 1):
        reduce_time[0] = 0.0
        engine.add_request(EngineRequest(f"p{i}", prompt, SamplingParams(max_tokens=2), prefill_only=True))
        start = time.perf_counter()
        engine.step()
        elapsed = time.perf_counter() - start
        engine.release_held(f"p{i}")
        if i:  # the first run builds kernels for new shapes
            times.append(elapsed)
            shares.append(reduce_time[0] / elapsed)
    if driver is not None:
        driver.shutdown()
    TPGroup.all_reduce = original
    return statistics.median(times), statistics.median(shares)


def handoff_seconds(tp: int, prompt: list[int], repeats: int) -> dict[int, tuple[float, float, int]]:
    """{prefill tp: (median hand-off s, median prefill s, bytes)} through a real mesh."""
    import grpc

    from pdmesh.engine.default_model import ensure_default_model
    from pdmesh.gen.pdmesh.v1 import decode_pb2, decode_pb2_grpc, worker_pb2
    from support.cluster import Cluster

    cluster = Cluster(ensure_default_model(log=lambda _: None), Path(tempfile.mkdtemp(prefix="bench_tp-")))
    try:
        cluster.start_scheduler("--max-model-len", "2048")
        sized = ("--max-model-len", "2048", "--kv-cache-gib", "0.5")
        cluster.start_worker("prefill", "prefill-tp1", *sized)
        cluster.start_worker("prefill", f"prefill-tp{tp}", "--tp", str(tp), *sized)
        cluster.start_worker("decode", "decode", *sized)
        cluster.wait_healthy({"prefill-tp1", f"prefill-tp{tp}", "decode"}, timeout_s=300)
        workers = {w.worker_id: w.address for w in cluster.workers()}
        stub = decode_pb2_grpc.DecodeWorkerStub(grpc.insecure_channel(workers["decode"]))
        results = {}
        for size in (1, tp):
            samples = []
            for i in range(repeats + 1):
                request = decode_pb2.DecodeRequest(
                    request_id=f"h{size}-{i}", prompt_token_ids=prompt, prefill_address=workers[f"prefill-tp{size}"],
                    sampling=worker_pb2.SamplingParams(max_tokens=2, ignore_eos=True))
                call = stub.Generate(request, timeout=120)
                info = next(call).prefill
                call.cancel()  # frees the request's blocks now
                time.sleep(0.2)
                if i:
                    samples.append(info)
            results[size] = (statistics.median(s.handoff_seconds for s in samples),
                             statistics.median(s.prefill_seconds for s in samples), samples[0].handoff_bytes)
        return results
    finally:
        cluster.stop_all()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tp", type=int, default=3, help="the TP size to compare with 1 (SmolLM2: 3 or 9)")
    p.add_argument("--prompt-tokens", type=int, default=1000)
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args(argv)
    prompt = [100 + (i * 7919) % 40000 for i in range(args.prompt_tokens)]
    rows = []
    for tp in (1, args.tp):
        seconds, share = prefill_seconds(tp, prompt, args.repeats)
        rows.append([f"TP={tp}", f"{seconds * 1e3:.0f}", f"{share:.0%}"])
    base = float(rows[0][1])
    for row in rows:
        row.append(f"{base / float(row[1]):.2f}x")
    print(f"\nPrefill of a {args.prompt_tokens}-token prompt, SmolLM2 fp32, 2 CPUs shared by the group's ranks "
          f"(median of {args.repeats})")
    print(format_table(["group", "prefill ms", "all-reduce share (rank 0)", "speed-up vs TP=1"], rows))
    handoff = handoff_seconds(args.tp, prompt, args.repeats)
    rows = [[f"TP={size} -> TP=1", f"{h * 1e3:.1f}", f"{pre * 1e3:.0f}", f"{h / pre:.1%}", f"{b / 1e6:.1f}"]
            for size, (h, pre, b) in handoff.items()]
    print(f"\nHand-off of the same prompt to a TP=1 decode worker (median of {args.repeats})")
    print(format_table(["pair", "hand-off ms", "prefill ms", "hand-off / prefill", "MB"], rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
