"""Admission decisions per second of the pdmesh scheduler on one core, with echo workers.

    python tools/bench_admission.py [--quick] [--phases 0,1a,2a] [--client-procs 2] [--no-pin]

Workers run `--engine echo` (no model: tokens are meaningless). Goals (issue): >= 5,000
rejections/s, >= 1,000 admitted short requests/s. Meshes (127.0.0.1, each stopped in a finally):
R (queue of 0, output cap 64, a tenant at 0.001 requests/s) for rejections; L64 (prefill on the
decode worker) and L0 (via the prefill worker) for admitted requests. Phase 0 is NOT pdmesh: a
bare grpc.aio server that refuses at once, the floor of a Python gRPC rejection. Server threads
go to core 0; load generator (child processes), workers and launcher to core 1.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import multiprocessing as mp
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

TOOLS = Path(__file__).resolve().parent
sys.path[:0] = [str(TOOLS), str(TOOLS.parent / "tests")]

import grpc  # noqa: E402

from bench_common import format_table, log  # noqa: E402
from pdmesh.gen.pdmesh.v1 import scheduler_pb2, scheduler_pb2_grpc  # noqa: E402
from support.mesh import free_port, start_mesh  # noqa: E402

ENGINE_LABEL = "engine: echo (no model; tokens are meaningless)"
PROMPT = list(range(100, 108))  # 8 plain token ids
MAX_OUTPUT_TOKENS = 64
GOALS = {"reject": 5_000, "admit": 1_000}
TENANTS = '[tenants.open]\napi_keys = ["k-open"]\n[tenants.limited]\napi_keys = ["k-limited"]\nrequests_per_s = 0.001\n'
SCHED_CORE, OTHER_CORE = 0, 1
CALL_TIMEOUT_S = 30.0
BUSY = 85.0  # % of a core from which a process counts as the bottleneck
FLOOR_LIFE_S = 120.0  # the reference server exits by itself after this long


@dataclass(frozen=True)
class Counts:
    reject_n: int = 20_000  # requests per rejection phase (or max_s, whichever ends first)
    admit_n: int = 10_000
    max_s: float = 10.0
    warm_n: int = 300  # unmeasured requests per client process before each phase
    warm_s: float = 1.5
    concurrency: int = 64  # calls in flight, all client processes together
    channels: int = 4  # per client process, each its own TCP connection


QUICK = Counts(reject_n=600, admit_n=300, max_s=3.0, warm_n=50, warm_s=0.5)


# mesh: floor, R, L64 or L0; kind: reject, admit or ref; key: api key; expect: every request's outcome
Phase = collections.namedtuple("Phase", "name mesh kind key max_tokens expect")

PHASES = (
    Phase("0  ref: bare grpc.aio server, refuses at once (NOT pdmesh)", "floor", "ref", "", 1,
          "RESOURCE_EXHAUSTED/queue"),
    Phase("1a reject: queue full (max-queued-requests 0)", "R", "reject", "k-open", 1, "RESOURCE_EXHAUSTED/queue"),
    Phase("1b reject: tenant rate limit", "R", "reject", "k-limited", 1, "RESOURCE_EXHAUSTED/rate"),
    Phase(f"1c reject: max_tokens {MAX_OUTPUT_TOKENS + 1} > cap {MAX_OUTPUT_TOKENS}", "R", "reject", "k-open",
          MAX_OUTPUT_TOKENS + 1, "INVALID_ARGUMENT"),
    Phase("2a admit: 8-token prompt, max_tokens 1, local prefill", "L64", "admit", "", 1, "OK"),
    Phase("2b admit: 8-token prompt, max_tokens 4, local prefill", "L64", "admit", "", 4, "OK"),
    Phase("2c admit: 8-token prompt, max_tokens 1, via prefill worker", "L0", "admit", "", 1, "OK"),
    Phase("2d admit: 8-token prompt, max_tokens 4, via prefill worker", "L0", "admit", "", 4, "OK"),
)
MESH_FLAGS = {
    "R": ("--max-queued-requests", "0", "--max-output-tokens", str(MAX_OUTPUT_TOKENS)),
    "L64": ("--local-prefill-threshold", "64"),
    "L0": ("--local-prefill-threshold", "0"),
}
COMMON_FLAGS = ("--engine", "echo", "--prefill-workers", "1", "--decode-workers", "1", "--no-warmup",
                "--max-model-len", "512", "--kv-cache-gib", "0.01")


# -- processes: find, pin, CPU time ---------------------------------------------------------------
def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of a process, all its threads (0.0 if it is gone)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def core_ticks() -> list[tuple[int, int]]:
    """[(busy ticks, all ticks) of core 0, of core 1, ...] from /proc/stat: every process's use."""
    rows = [line.split() for line in Path("/proc/stat").read_text().splitlines() if line.startswith("cpu")]
    numbers = [[int(v) for v in row[1:9]] for row in rows[1:]]  # rows[0] sums all cores
    return [(sum(n) - n[3] - n[4], sum(n)) for n in numbers]


def cores_busy(before: list, after: list) -> list[float]:
    """% busy of each core between two core_ticks() readings."""
    return [100 * (a[0] - b[0]) / (a[1] - b[1]) if a[1] > b[1] else 0.0 for b, a in zip(before, after)]


def pin(pid: int, cores: set[int]) -> int:
    """Pin every thread of pid to cores (threads started later inherit it); returns how many."""
    tids = os.listdir(f"/proc/{pid}/task")
    for tid in tids:
        with contextlib.suppress(OSError):  # the thread ended meanwhile
            os.sched_setaffinity(int(tid), cores)
    return len(tids)


def mesh_pids(mesh) -> dict[str, int]:
    """{"scheduler", "prefill", "decode": pid} of a mesh started by `pdmesh serve`: workers from
    cluster status, the scheduler as serve's child running `pdmesh.child scheduler`."""
    with mesh.client() as client:
        found = {w.role: w.ranks[0].pid for w in client.cluster_status().workers}
    for pid in mesh.live_children():
        if b"pdmesh.child\x00scheduler" in Path(f"/proc/{pid}/cmdline").read_bytes():
            found["scheduler"] = pid
    return found


def _run_loop(coro):
    try:
        from uvloop import new_event_loop  # what pdmesh's servers run on
    except ImportError:
        new_event_loop = None
    with asyncio.Runner(loop_factory=new_event_loop) as runner:
        return runner.run(coro)


# -- the load generator (runs in child processes) -------------------------------------------------
def _outcome(exc) -> str:
    code, details = exc.code().name, exc.details() or ""
    if code == "RESOURCE_EXHAUSTED":
        return f"{code}/" + ("queue" if "max-queued" in details else "rate" if "over its rate" in details else "other")
    return code


async def _one_call(stub, request, metadata, samples: dict) -> str:
    tokens, finish = 0, ""
    try:
        async for response in stub.Generate(request, metadata=metadata, timeout=CALL_TIMEOUT_S):
            tokens += len(response.token_ids)
            finish = response.finish_reason or finish
    except grpc.aio.AioRpcError as exc:
        samples.setdefault(_outcome(exc), (exc.details() or "")[:200])
        return _outcome(exc)
    if finish and tokens == request.max_tokens:
        return "OK"
    samples.setdefault("OK/short", f"{tokens} tokens, finish_reason {finish!r}")
    return "OK/short"


async def _drive(address: str, phase: Phase, n: int, max_s: float, concurrency: int, channels: int) -> dict:
    """Send up to n requests (or for max_s) with `concurrency` in flight; counts outcomes."""
    chans = [grpc.aio.insecure_channel(address, options=[("grpc.use_local_subchannel_pool", 1)])
             for _ in range(channels)]
    stubs = [scheduler_pb2_grpc.SchedulerStub(c) for c in chans]
    request = scheduler_pb2.GenerateRequest(prompt_token_ids=PROMPT, max_tokens=phase.max_tokens)
    metadata = (("authorization", f"Bearer {phase.key}"),) if phase.key else None
    outcomes, samples, left, deadline = collections.Counter(), {}, [n], time.monotonic() + max_s

    async def lane(stub) -> None:
        while left[0] > 0 and time.monotonic() < deadline:
            left[0] -= 1
            outcomes[await _one_call(stub, request, metadata, samples)] += 1
    try:
        start, cpu0 = time.time(), time.process_time()
        await asyncio.gather(*(lane(stubs[i % channels]) for i in range(concurrency)))
        end, cpu1 = time.time(), time.process_time()
    finally:
        for chan in chans:
            await chan.close()
    return {"outcomes": dict(outcomes), "samples": samples, "start": start, "end": end, "cpu": cpu1 - cpu0}


def client_main(address, phase, n, concurrency, counts, cores, barrier, results) -> None:
    """One load-generator process: pin, warm up, wait for the others, run the phase, report."""
    if cores:
        pin(os.getpid(), cores)
    try:
        _run_loop(_drive(address, phase, counts.warm_n, counts.warm_s, concurrency, counts.channels))
        barrier.wait(timeout=60)
        results.put(_run_loop(_drive(address, phase, n, counts.max_s, concurrency, counts.channels)))
    except Exception as exc:  # report, so the parent does not wait for nothing
        barrier.abort()
        results.put({"error": f"{type(exc).__name__}: {exc}"})


# -- one phase: start clients, bracket them with CPU readings ------------------------------------
def _split(total: int, parts: int) -> list[int]:
    return [total // parts + (i < total % parts) for i in range(parts)]


def _stop_procs(procs: list, wait_s: float = 10) -> None:
    for proc in (p for p in procs if p.pid is not None):  # the started ones
        proc.join(timeout=wait_s)
        if proc.is_alive():  # it hung (or, the reference server, has served its time): ours to end
            proc.kill()
            proc.join(timeout=5)


def run_phase(address: str, phase: Phase, pids: dict[str, int], counts: Counts, args) -> dict:
    ctx, procs_n = mp.get_context("spawn"), args.client_procs
    barrier, results = ctx.Barrier(procs_n + 1), ctx.Queue()
    n = counts.admit_n if phase.kind == "admit" else counts.reject_n
    cores = {OTHER_CORE} if args.pin else None
    procs = [ctx.Process(target=client_main, args=(address, phase, part, conc, counts, cores, barrier, results),
                         daemon=True) for part, conc in zip(_split(n, procs_n), _split(counts.concurrency, procs_n))]
    try:
        for proc in procs:
            proc.start()
        try:
            barrier.wait(timeout=120)
        except threading.BrokenBarrierError:  # a client failed in its warm-up: say why
            raise RuntimeError(f"{phase.name}: client failed: {results.get(timeout=10)}") from None
        before, ticks = {role: cpu_seconds(pid) for role, pid in pids.items()}, core_ticks()
        got = [results.get(timeout=counts.max_s + CALL_TIMEOUT_S + 30) for _ in procs]
        after, busy = {role: cpu_seconds(pid) for role, pid in pids.items()}, cores_busy(ticks, core_ticks())
    finally:
        _stop_procs(procs)
    errors = [g["error"] for g in got if "error" in g]
    if errors:
        raise RuntimeError(f"{phase.name}: client failed: {errors[0]}")
    return summarize(phase, got, {role: after[role] - before[role] for role in pids}, busy)


def summarize(phase: Phase, got: list[dict], cpu: dict[str, float], busy: list[float]) -> dict:
    outcomes, samples = collections.Counter(), {}
    for g in got:
        outcomes.update(g["outcomes"])
        samples.update({k: v for k, v in g["samples"].items() if k not in samples})
    wall = max(g["end"] for g in got) - min(g["start"] for g in got)
    done = sum(outcomes.values())
    return {"phase": phase, "done": done, "wall": wall, "rate": done / wall if wall else 0.0,
            "sched_cpu": cpu["scheduler"], "client_cpu": sum(g["cpu"] for g in got),
            "workers_cpu": cpu.get("prefill", 0.0) + cpu.get("decode", 0.0), "outcomes": outcomes,
            "samples": samples, "unexpected": done - outcomes.get(phase.expect, 0), "cores_busy": busy}


# -- servers: the reference floor, and pdmesh meshes ----------------------------------------------
def floor_server(port: int, ready) -> None:
    """NOT pdmesh: a bare grpc.aio Scheduler whose Generate refuses every call at once."""
    class Refuse(scheduler_pb2_grpc.SchedulerServicer):
        async def Generate(self, request, context):
            await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, "max-queued-requests is 0 (reference)")
            yield  # an async generator, as pdmesh's Generate is

    async def serve() -> None:
        server = grpc.aio.server(options=[("grpc.so_reuseport", 0)])
        scheduler_pb2_grpc.add_SchedulerServicer_to_server(Refuse(), server)
        server.add_insecure_port(f"127.0.0.1:{port}")
        await server.start()
        ready.set()
        await asyncio.sleep(FLOOR_LIFE_S)
    _run_loop(serve())


def run_floor(counts: Counts, args, notes: list[str]) -> list[dict]:
    ctx, port = mp.get_context("spawn"), free_port()
    ready = ctx.Event()
    server = ctx.Process(target=floor_server, args=(port, ready), daemon=True)
    try:
        server.start()
        if not ready.wait(timeout=60):
            raise RuntimeError("the reference grpc.aio server did not start")
        if args.pin:
            notes.append(f"reference server pid {server.pid} ({pin(server.pid, {SCHED_CORE})} threads) -> core "
                         f"{SCHED_CORE}; load generator -> core {OTHER_CORE}")
        return [run_phase(f"127.0.0.1:{port}", PHASES[0], {"scheduler": server.pid}, counts, args)]
    finally:
        _stop_procs([server], wait_s=0)


def pin_mesh(name: str, mesh, pin_cores: bool) -> tuple[dict[str, int], str]:
    """Find a started mesh's processes and pin them; returns (pids, a line saying what was pinned)."""
    pids = mesh_pids(mesh)
    if set(pids) != {"scheduler", "prefill", "decode"}:
        raise RuntimeError(f"mesh {name}: found processes {pids}, want scheduler, prefill, decode")
    if not pin_cores:
        return pids, "not pinned (--no-pin or fewer than 2 usable cores)"
    threads = pin(pids["scheduler"], {SCHED_CORE})
    for pid in (pids["prefill"], pids["decode"], mesh.process.pid):
        pin(pid, {OTHER_CORE})
    return pids, (f"scheduler pid {pids['scheduler']} ({threads} threads) -> core {SCHED_CORE}; "
                  f"load generator, prefill + decode workers, launcher -> core {OTHER_CORE}")


def log_findings(path: Path, limit: int = 5) -> list[str]:
    """The log's size, and its ERROR / Traceback lines (expected rejections should log none)."""
    lines = path.read_text(errors="replace").splitlines()
    bad = [line for line in lines if any(word in line for word in (" ERROR ", " CRITICAL ", "Traceback"))]
    return ([f"{path.name}: {len(lines):,} log lines, {len(bad):,} of them ERROR/CRITICAL/Traceback"]
            + [f"{path.name}: {line[:240]}" for line in bad[:limit]])


def run_mesh(name: str, folder: Path, counts: Counts, args, notes: list[str]) -> list[dict]:
    tenants = ("--tenants-file", str(folder / "tenants.toml")) if name == "R" else ()
    mesh = start_mesh(folder / f"serve-{name}.log", *COMMON_FLAGS, *MESH_FLAGS[name], *tenants, timeout_s=120)
    rows = []
    try:
        pids, pinning = pin_mesh(name, mesh, args.pin)
        notes.append(f"mesh {name} ({' '.join(MESH_FLAGS[name])}): {pinning}")
        for phase in (p for p in PHASES if p.mesh == name and p.name.split()[0] in args.phases):
            log(f"phase {phase.name} ...")
            rows.append(run_phase(mesh.address, phase, pids, counts, args))
            log(f"  {rows[-1]['done']:,} requests in {rows[-1]['wall']:.2f}s")
    finally:
        notes.extend(stop_mesh(name, mesh))
    return rows


def stop_mesh(name: str, mesh) -> list[str]:
    """SIGTERM the mesh (SIGKILL its process group if it hangs); returns what was found."""
    try:
        code = mesh.stop(timeout_s=60)
    except subprocess.TimeoutExpired:
        os.killpg(mesh.process.pid, signal.SIGKILL)
        code = mesh.process.wait(10)
    found = [f"mesh {name}: pdmesh serve exited with {code} on SIGTERM"] if code else []
    left = sorted(mesh.leftovers())
    return found + [f"mesh {name}: processes left behind: {left}"][:len(left)] + log_findings(mesh.log_path)


# -- output ---------------------------------------------------------------------------------------
def bound_by(row: dict) -> str:
    """What held the rate back: processes near a full core, or a core full of other users' work."""
    pct = {k: 100 * row[f"{k}_cpu"] / row["wall"] if row["wall"] else 0.0 for k in ("sched", "client", "workers")}
    full = ["server"] * (pct["sched"] >= BUSY)
    if pct["client"] + pct["workers"] >= BUSY:  # they share core 1
        full.append("client" if pct["client"] >= pct["workers"] else "workers")
    full += [f"core {i} (other load)" for i, c in enumerate(row["cores_busy"][:2]) if c >= BUSY and not full]
    return " + ".join(full[:2]) or "none saturated"


def table_row(row: dict) -> list:
    phase, wall, done = row["phase"], row["wall"], row["done"] or 1
    ms_per, goal = 1000 * row["sched_cpu"] / done, GOALS.get(phase.kind)
    pct = lambda cpu: f"{100 * cpu / wall:.0f}%" if wall else "-"  # noqa: E731
    return [phase.name, f"{row['done']:,}", wall, f"{row['rate']:,.0f}", f"{ms_per:.3f}",
            f"{1000 / ms_per:,.0f}" if ms_per else "-", pct(row["sched_cpu"]), pct(row["client_cpu"]),
            pct(row["workers_cpu"]), "/".join(f"{c:.0f}%" for c in row["cores_busy"]), bound_by(row),
            f">= {goal:,}/s" if goal else "(reference)",
            ("met" if row["rate"] >= goal else "NOT met") if goal else "-",
            ", ".join(f"{k} {v:,}" for k, v in row["outcomes"].most_common())]


HEADERS = ("phase", "requests", "seconds", "req/s", "server CPU ms/req", "req/s per server core", "server CPU",
           "client CPU", "workers CPU", "cores busy (all procs)", "bound by", "goal", "goal met", "outcomes")


def report(rows: list[dict], notes: list[str], args, counts: Counts, elapsed: float) -> None:
    print(f"\n# pdmesh admission benchmark -- {ENGINE_LABEL}")
    print(f"machine: {os.cpu_count()} cores, load average at start {args.load_at_start}, shared with others "
          f"(timings are noisy); client: {args.client_procs} process(es) x {counts.channels} channels, "
          f"{counts.concurrency} calls in flight, grpc.aio streaming Generate; mesh log level {args.mesh_log_level}")
    print(format_table(HEADERS, [table_row(r) for r in rows]))
    print("\nServer = the pdmesh scheduler (phase 0: the reference server). CPU columns: % of one core over "
          "the phase's wall time. 'req/s per server core' = 1 / server CPU per request (the rate a whole core "
          "would allow). 'cores busy': core 0/core 1 from /proc/stat, every process on the machine; above "
          "our own use it is other users' load.")
    notes += [f"UNEXPECTED in {r['phase'].name}: {r['unexpected']:,} requests were not {r['phase'].expect}; "
              f"samples: {r['samples']}" for r in rows if r["unexpected"]]
    print("\n".join(f"- {line}" for line in notes) + f"\n\ntotal run time {elapsed:.0f}s")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="small counts: a smoke test, not a measurement")
    p.add_argument("--phases", default="0,1a,1b,1c,2a,2b,2c,2d", help="comma-separated phase ids")
    p.add_argument("--client-procs", type=int, default=1, choices=range(1, 9), help="load-generator processes")
    p.add_argument("--mesh-log-level", default="INFO", help="the mesh processes' log level (serve's default: INFO)")
    p.add_argument("--no-pin", dest="pin", action="store_false", help="leave CPU affinity alone")
    args = p.parse_args(argv)
    args.phases = set(args.phases.split(","))
    args.pin = args.pin and {SCHED_CORE, OTHER_CORE} <= os.sched_getaffinity(0)
    args.load_at_start = " ".join(f"{x:.1f}" for x in os.getloadavg())
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    counts = QUICK if args.quick else Counts()
    os.environ["PDMESH_LOG_LEVEL"] = args.mesh_log_level  # `pdmesh serve` and its children read it
    started, rows, notes = time.monotonic(), [], []
    if "0" in args.phases:
        rows += run_floor(counts, args, notes)
    with tempfile.TemporaryDirectory(prefix="bench_admission_") as tmp:
        folder = Path(tmp)
        (folder / "tenants.toml").write_text(TENANTS)
        for name in MESH_FLAGS:
            if any(p.mesh == name and p.name.split()[0] in args.phases for p in PHASES):
                rows += run_mesh(name, folder, counts, args, notes)
    report(rows, notes, args, counts, time.monotonic() - started)
    return 1 if any(r["unexpected"] for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
