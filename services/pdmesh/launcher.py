"""`pdmesh serve`: the whole mesh on this machine as separate processes, stopped together.

The scheduler starts first (it converts the model once, so the workers find it cached), then the
workers register with it. Ready means the scheduler's health is SERVING and every worker shows
up healthy in its cluster status.
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import time

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from pdmesh.gen.pdmesh.v1 import scheduler_pb2, scheduler_pb2_grpc

# Decode keeps its pace while prefill works: prefill runs at a lower OS priority (nice 10), so the
# kernel gives decode steps the cores first; when decode is idle, prefill still gets every core.
# Measured in tools/bench_mesh.py (README, "CPU placement").
DEFAULT_PREFILL_NICE = 10
DEFAULT_DECODE_NICE = 0


def placement(args: argparse.Namespace) -> dict[str, tuple[int, int]]:
    cores = os.cpu_count() or 1
    return {"prefill": (args.prefill_threads or cores, DEFAULT_PREFILL_NICE if args.prefill_nice is None else args.prefill_nice),
            "decode": (args.decode_threads or cores, DEFAULT_DECODE_NICE if args.decode_nice is None else args.decode_nice)}


def commands(args: argparse.Namespace) -> list[tuple[str, list[str]]]:
    py = [sys.executable, "-m", "pdmesh.cli", "--log-level", args.log_level]
    model = ["--model", args.model] if args.model else []
    address = f"{args.host}:{args.port}"
    cmds = [("scheduler", py + ["scheduler", "--host", args.host, "--port", str(args.port),
                                "--metrics-port", str(args.metrics_port), "--max-model-len", str(args.max_model_len),
                                "--default-max-tokens", str(args.default_max_tokens),
                                "--max-prompt-tokens", str(args.max_prompt_tokens),
                                "--max-output-tokens", str(args.max_output_tokens),
                                "--max-queued-requests", str(args.max_queued_requests),
                                "--max-queued-tokens", str(args.max_queued_tokens),
                                "--local-prefill-threshold", str(args.local_prefill_threshold)]
             + model + (["--tenants-file", args.tenants_file] if args.tenants_file else []))]
    where = placement(args)
    for role, count, tp in (("prefill", args.prefill_workers, args.prefill_tp),
                            ("decode", args.decode_workers, args.decode_tp)):
        threads, nice = where[role]
        for i in range(count):
            cmds.append((f"{role}-{i}", py + [role, "--scheduler", address, "--host", args.host,
                                              "--worker-id", f"{role}-{i}", "--threads", str(threads),
                                              "--tp", str(tp),
                                              "--nice", str(nice), "--max-model-len", str(args.max_model_len),
                                              "--kv-cache-gib", str(args.kv_cache_gib),
                                              "--max-num-seqs", str(args.max_num_seqs), "--dtype", args.dtype,
                                              "--engine", args.engine, "--echo-step-ms", str(args.echo_step_ms),
                                              "--block-size", str(args.block_size)] + model))
    return cmds


def worker_env(name: str) -> dict[str, str]:
    """Prefill workers' idle OpenMP threads sleep instead of spinning (OMP_WAIT_POLICY=PASSIVE):
    on a shared machine their spinning took CPU from the decode steps running next to them."""
    env = dict(os.environ)
    if name.startswith("prefill"):
        env.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    return env


def wait_ready(address: str, num_workers: int, deadline: float, procs: dict[str, subprocess.Popen]) -> None:
    with grpc.insecure_channel(address) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        scheduler = scheduler_pb2_grpc.SchedulerStub(channel)
        while time.monotonic() < deadline:
            for name, proc in procs.items():
                if proc.poll() is not None:
                    raise RuntimeError(f"{name} exited with code {proc.returncode} during start-up")
            try:
                serving = health.Check(health_pb2.HealthCheckRequest(service=""), timeout=2).status
                workers = scheduler.GetClusterStatus(scheduler_pb2.GetClusterStatusRequest(), timeout=2).workers
                if serving == health_pb2.HealthCheckResponse.SERVING and sum(w.healthy for w in workers) == num_workers:
                    return
            except grpc.RpcError:
                pass
            time.sleep(0.25)
    raise TimeoutError(f"the mesh at {address} was not ready in time")


def stop_all(procs: dict[str, subprocess.Popen], timeout_s: float = 30.0) -> None:
    """SIGTERM every child (workers drain first, the scheduler last), then SIGKILL stragglers."""
    order = [n for n in procs if n != "scheduler"] + ["scheduler"]
    for name in order:
        if procs[name].poll() is None:
            procs[name].send_signal(signal.SIGTERM)
    deadline = time.monotonic() + timeout_s
    for name in order:
        try:
            procs[name].wait(max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            procs[name].kill()
            procs[name].wait()


def serve(args: argparse.Namespace) -> int:
    address = f"{args.host}:{args.port}"
    procs: dict[str, subprocess.Popen] = {}
    stop = {"signal": None}

    def on_signal(signum, _frame):
        stop["signal"] = signum
        raise KeyboardInterrupt
    signal.signal(signal.SIGTERM, on_signal)
    try:
        cmds = commands(args)
        deadline = time.monotonic() + args.ready_timeout
        name, cmd = cmds[0]
        procs[name] = subprocess.Popen(cmd)
        _wait_port(address, deadline, procs)
        for name, cmd in cmds[1:]:
            procs[name] = subprocess.Popen(cmd, env=worker_env(name))
        wait_ready(address, args.prefill_workers + args.decode_workers, deadline, procs)
        if not args.no_warmup:
            warm_up(address, _first_api_key(args.tenants_file))
        print(f"\npdmesh is ready: scheduler on {address} with {args.prefill_workers} prefill and "
              f"{args.decode_workers} decode workers", flush=True)
        print(f"  try:  grpcurl -plaintext -d '{{\"prompt\": \"What is the capital of France?\", \"max_tokens\": 32}}' "
              f"{address} pdmesh.v1.Scheduler/Generate", flush=True)
        print(f"  or:   python tools/pdmesh_debug.py --addr {address} generate 'What is the capital of France?'",
              flush=True)
        while all(p.poll() is None for p in procs.values()):
            time.sleep(0.5)
        failed = [n for n, p in procs.items() if p.poll() is not None]
        print(f"pdmesh: {', '.join(failed)} exited; stopping the mesh", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 0
    except (RuntimeError, TimeoutError) as exc:
        print(f"pdmesh serve: {exc}", file=sys.stderr)
        return 1
    finally:
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        stop_all(procs)


def _first_api_key(tenants_file: str | None) -> str | None:
    if not tenants_file:
        return None
    from pdmesh.scheduler.tenants import load_tenants_file

    keys = [key for tenant in load_tenants_file(tenants_file) for key in tenant.api_keys]
    return keys[0] if keys else None


def warm_up(address: str, api_key: str | None = None) -> None:
    """Answer one request end to end (and build the kernels' first shapes before real traffic)."""
    from pdmesh.client import PdmeshClient

    question = "What is the capital of France?"
    start = time.perf_counter()
    with PdmeshClient(address, timeout_s=120, api_key=api_key) as client:
        done = client.generate(messages=[{"role": "user", "content": question}], max_tokens=32)
    print(f"  warm-up: {question!r} -> {done.text!r} ({done.completion_tokens} tokens in "
          f"{time.perf_counter() - start:.2f}s)", flush=True)


def _wait_port(address: str, deadline: float, procs: dict[str, subprocess.Popen]) -> None:
    with grpc.insecure_channel(address) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        while time.monotonic() < deadline:
            if any(p.poll() is not None for p in procs.values()):
                raise RuntimeError("the scheduler exited during start-up")
            try:
                health.Check(health_pb2.HealthCheckRequest(service=""), timeout=2)
                return
            except grpc.RpcError:
                time.sleep(0.25)
    raise TimeoutError(f"the scheduler at {address} did not start in time")
