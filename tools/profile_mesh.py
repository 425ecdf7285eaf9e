"""Where a generated token's CPU goes across the mesh's processes.

    python tools/profile_mesh.py [--streams 1,16,64] [--tokens 64]

Starts `pdmesh serve` (default model, 1 prefill and 1 decode worker, every prompt through the
prefill worker), runs N greedy streams of --tokens tokens through the scheduler from this process,
and reads each process's CPU time (/proc, user + system) before and after. The decode worker's
time is split by thread name: "main" steps the engine, OpenMP's threads compute inside its ops,
and "pdmesh-rpc" serves gRPC and the asyncio loop that streams tokens out. Prints CPU milliseconds
per generated token by process, the wall-clock throughput of the run, and what each process burns
while the mesh is idle. Prompts are 5-40 tokens, so prefill is a small share.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import tempfile
import time
from pathlib import Path

TOOLS = Path(__file__).resolve().parent
sys.path[:0] = [str(TOOLS), str(TOOLS.parent / "tests")]

from bench_common import PROMPT_TEXTS, log  # noqa: E402
from pdmesh.client import AsyncPdmeshClient  # noqa: E402
from support.mesh import descendants, start_mesh  # noqa: E402

CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def cpu_seconds(stat_path: Path) -> float:
    """user + system CPU seconds from a /proc/<pid>[/task/<tid>]/stat file (0 if it is gone)."""
    try:
        fields = stat_path.read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS  # utime, stime (fields 14, 15)


def threads_by_name(pid: int) -> dict[str, float]:
    """CPU seconds of a process's threads, by thread name (the main thread as "main")."""
    cpu: dict[str, float] = {}
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            name = "main" if int(task.name) == pid else (task / "comm").read_text().strip()
        except OSError:
            continue
        cpu[name] = cpu.get(name, 0.0) + cpu_seconds(task / "stat")
    return cpu


def label_processes(mesh) -> dict[str, int]:
    """Role -> pid for the scheduler, the decode worker and the prefill worker (rank 0 each)."""
    pids = {}
    for worker in mesh.workers():
        pids[f"{worker.role} worker"] = worker.ranks[0].pid
    for pid in descendants(mesh.process.pid):
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if b"pdmesh.child" in cmdline and b"scheduler" in cmdline:
            pids["scheduler"] = pid
    pids["pdmesh serve (supervisor)"] = mesh.process.pid
    return pids


def snapshot(pids: dict[str, int]) -> dict[str, float]:
    cpu = {}
    for role, pid in pids.items():
        if role == "decode worker":
            cpu.update({f"decode worker: {name}": seconds for name, seconds in threads_by_name(pid).items()})
        else:
            cpu[role] = cpu_seconds(Path(f"/proc/{pid}/stat"))
    cpu["client (this process)"] = sum(os.times()[:2])
    return cpu


async def run_streams(address: str, prompts: list[str], n: int, tokens: int) -> int:
    async with AsyncPdmeshClient(address) as client:
        async def one(i: int) -> int:
            count = 0
            async for chunk in client.stream(prompt=prompts[i % len(prompts)], max_tokens=tokens,
                                             ignore_eos=True, temperature=0.0):
                count += len(chunk.token_ids)
            return count
        return sum(await asyncio.gather(*(one(i) for i in range(n))))


def measure(mesh, pids: dict[str, int], n: int, tokens: int) -> dict:
    asyncio.run(run_streams(mesh.address, list(PROMPT_TEXTS), n, tokens))  # warm-up at this width
    before, start = snapshot(pids), time.perf_counter()
    generated = asyncio.run(run_streams(mesh.address, list(PROMPT_TEXTS), n, tokens))
    wall, after = time.perf_counter() - start, snapshot(pids)
    return {"tokens": generated, "wall": wall, "cpu": {k: v - before.get(k, 0.0) for k, v in after.items()}}


def measure_idle(pids: dict[str, int], seconds: float) -> dict[str, float]:
    """CPU milliseconds per second of each process while no request runs (heartbeats, load reports, polling)."""
    before = snapshot(pids)
    time.sleep(seconds)
    after = snapshot(pids)
    return {k: (v - before.get(k, 0.0)) / seconds * 1e3 for k, v in after.items()}


def print_idle(idle: dict[str, float], seconds: float) -> None:
    print(f"\n| CPU ms per second, idle ({seconds:.0f} s, no request) | |\n|---|---|")
    for role, ms in idle.items():
        if ms > 0:
            print(f"| {role} | {ms:.1f} |")


def print_table(results: dict[int, dict]) -> None:
    widths = sorted(results)
    print("| CPU ms per generated token | " + " | ".join(f"{n} streams" for n in widths) + " |")
    print("|---|" + "---|" * len(widths))
    for role in results[widths[0]]["cpu"]:
        print(f"| {role} | " + " | ".join(f"{results[n]['cpu'].get(role, 0.0) / results[n]['tokens'] * 1e3:.2f}"
                                        for n in widths) + " |")
    print("| all processes | " + " | ".join(f"{sum(results[n]['cpu'].values()) / results[n]['tokens'] * 1e3:.2f}"
                                          for n in widths) + " |")
    print("| wall ms per token (1 / throughput) | " + " | ".join(
        f"{results[n]['wall'] / results[n]['tokens'] * 1e3:.2f}" for n in widths) + " |")
    print("| throughput, tok/s | " + " | ".join(f"{results[n]['tokens'] / results[n]['wall']:.1f}"
                                              for n in widths) + " |")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--streams", default="1,16,64", help="concurrent streams, comma-separated")
    p.add_argument("--tokens", type=int, default=64, help="greedy tokens per stream")
    p.add_argument("--idle-s", type=float, default=10.0, help="seconds to measure the idle mesh's CPU (0: skip)")
    p.add_argument("--serve-flags", default="", help="extra `pdmesh serve` flags, space-separated")
    args = p.parse_args(argv)
    workdir = Path(tempfile.mkdtemp(prefix="profile_mesh-"))
    mesh = start_mesh(workdir / "serve.log", "--prefill-workers", "1", "--decode-workers", "1",
                      "--local-prefill-threshold", "0", *args.serve_flags.split())
    try:
        pids = label_processes(mesh)
        log(f"processes: {pids}")
        time.sleep(2)  # start-up's last load reports and warm-ups settle
        idle = measure_idle(pids, args.idle_s) if args.idle_s else {}
        results = {n: measure(mesh, pids, n, args.tokens) for n in (int(x) for x in args.streams.split(","))}
    finally:
        mesh.stop()
    print_table(results)
    if idle:
        print_idle(idle, args.idle_s)
    print(f"({os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f}, {args.tokens} tokens per stream; "
          f"serve log {workdir / 'serve.log'})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
