"""`pdmesh serve`: the whole mesh on this machine as separate processes, supervised.

The model is converted once (so the children find it cached), then the scheduler starts, then the
workers register with it. Ready means the scheduler's health is SERVING and every worker shows
up healthy in its cluster status. From then on a child that exits is restarted with backoff
(`pdmesh.supervisor`) while the rest keeps serving; SIGINT or SIGTERM drains and stops them all.
Each child gets its config whole on stdin (`pdmesh.child`), with a cluster secret made here.
"""

from __future__ import annotations

import logging
import signal
import socket
import sys
import time
from dataclasses import replace
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from pdmesh.child import spawn
from pdmesh.engine.checkpoint import load_model_metadata
from pdmesh.gen.pdmesh.v1 import scheduler_pb2, scheduler_pb2_grpc
from pdmesh.rpc import cluster_auth
from pdmesh.serve_config import ServeConfig
from pdmesh.supervisor import Supervisor

log = logging.getLogger(__name__)
POLL_S = 0.2
WARMUP_QUESTION = "What is the capital of France?"


def with_concrete_ports(config: ServeConfig) -> ServeConfig:
    """Free ports for the scheduler's faces when asked for 0 (a restarted scheduler must come back
    on the same ports), and a fresh cluster secret when none was given: the mesh is closed to
    other processes by default."""
    scheduler = config.scheduler
    if scheduler.listen.port == 0:
        scheduler = replace(scheduler, listen=replace(scheduler.listen, port=_free_port(scheduler.listen.host)))
    if scheduler.internal_port == 0:
        scheduler = replace(scheduler, internal_port=_free_port(scheduler.listen.host))
    if scheduler.http_port == 0:
        scheduler = replace(scheduler, http_port=_free_port(scheduler.listen.host))
    if not scheduler.security.cluster_secret:
        scheduler = replace(scheduler, security=replace(scheduler.security, cluster_secret=cluster_auth.new_secret()))
    return replace(config, scheduler=scheduler)


def _free_port(host: str) -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def start_children(config: ServeConfig, supervisor: Supervisor, log_level: str) -> None:
    supervisor.add("scheduler", lambda n: spawn("scheduler", replace(config.scheduler, restarts=n), log_level))
    for role in ("prefill", "decode"):
        for i in range(config.plan(role).workers):
            worker = config.worker_config(role, i)
            supervisor.add(worker.worker_id, lambda n, w=worker: spawn("worker", replace(w, restarts=n), log_level))


def client_channel(config: ServeConfig) -> grpc.Channel:
    """serve's own channel to the client port, TLS when the port has it (trusting the cluster CA
    in --tls-dir when given, else the port's own certificate)."""
    scheduler = config.scheduler
    if not scheduler.tls_cert:
        return grpc.insecure_channel(config.scheduler_address())
    tls_dir = scheduler.security.tls_dir
    root = Path(tls_dir, "ca.pem") if tls_dir else Path(scheduler.tls_cert)
    return grpc.secure_channel(config.scheduler_address(), grpc.ssl_channel_credentials(root.read_bytes()))


def wait_ready(config: ServeConfig, supervisor: Supervisor, deadline: float) -> None:
    address = config.scheduler_address()
    expected = config.prefill.workers + config.decode.workers
    with client_channel(config) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        scheduler = scheduler_pb2_grpc.SchedulerStub(channel)
        while time.monotonic() < deadline:
            supervisor.poll()
            given_up = [c.name for c in supervisor.children.values() if c.given_up]
            if given_up:
                raise RuntimeError(f"{', '.join(given_up)} kept exiting during start-up")
            try:
                serving = health.Check(health_pb2.HealthCheckRequest(service=""), timeout=2).status
                status = scheduler.GetClusterStatus(scheduler_pb2.GetClusterStatusRequest(), timeout=2,
                                                    metadata=cluster_auth.metadata(config.scheduler.security.cluster_secret))
                if serving == health_pb2.HealthCheckResponse.SERVING and sum(w.healthy for w in status.workers) == expected:
                    return
            except grpc.RpcError:
                pass
            time.sleep(POLL_S)
    raise TimeoutError(f"the mesh at {address} was not ready in {config.ready_timeout_s:g}s")


def warm_up(config: ServeConfig) -> None:
    """Answer one chat request end to end (and build the kernels' first shapes before real traffic).
    It runs as the mesh itself (cluster secret), so it spends no tenant's quota; a failure is
    logged, never fatal."""
    request = scheduler_pb2.GenerateRequest(messages=[scheduler_pb2.ChatMessage(role="user", content=WARMUP_QUESTION)],
                                            max_tokens=32)
    start = time.perf_counter()
    try:
        with client_channel(config) as channel:
            chunks = list(scheduler_pb2_grpc.SchedulerStub(channel).Generate(
                request, timeout=120, metadata=cluster_auth.metadata(config.scheduler.security.cluster_secret)))
    except grpc.RpcError as exc:
        print(f"  warm-up failed ({exc.code().name}: {exc.details()}); serving anyway", flush=True)
        return
    text = "".join(c.text for c in chunks)
    print(f"  warm-up: {WARMUP_QUESTION!r} -> {text!r} ({chunks[-1].usage.completion_tokens} tokens in "
          f"{time.perf_counter() - start:.2f}s)", flush=True)


def print_ready(config: ServeConfig) -> None:
    address = config.scheduler_address()
    chat = '{"messages": [{"role": "user", "content": "What is the capital of France?"}], "max_tokens": 32}'
    workers = (f"{config.decode.workers} colocated decode workers (each prefills its own prompts)"
               if config.colocated else f"{config.prefill.workers} prefill and {config.decode.workers} decode workers")
    print(f"\npdmesh is ready: scheduler on {address} with {workers} (supervised: a worker that exits is "
          f"restarted)", flush=True)
    print(f"  try:  grpcurl -plaintext -d '{chat}' {address} pdmesh.v1.Scheduler/Generate", flush=True)
    print(f"  or:   python tools/pdmesh_debug.py --addr {address} generate 'What is the capital of France?'",
          flush=True)
    if config.scheduler.http_port != -1:
        scheme = "https" if config.scheduler.tls_cert else "http"
        url = f"{scheme}://{config.scheduler.listen.dial(config.scheduler.http_port)}/v1"
        print(f"  or:   curl {url}/chat/completions -H 'Content-Type: application/json' -d '{chat}'"
              f"   (OpenAI-compatible API at {url})", flush=True)


def check_devices(config: ServeConfig) -> None:
    """Refuse a --device this machine lacks before starting anything (every worker runs here)."""
    if config.worker.engine_kind != "pdmesh":
        return
    from pdmesh.engine.device import resolve_device

    for role in ("prefill", "decode"):
        resolve_device(config.worker.engine.device, num_ranks=config.plan(role).tp)


def serve(config: ServeConfig, log_level: str | None = None) -> int:
    log_level = log_level or logging.getLevelName(logging.getLogger().level)
    check_devices(config)
    config = with_concrete_ports(config.with_mode())
    supervisor = Supervisor(config.supervision)

    def on_signal(signum, _frame):
        raise KeyboardInterrupt
    signal.signal(signal.SIGTERM, on_signal)
    try:
        load_model_metadata(config.scheduler.model, log=log.info)  # converts a GGUF once, for all
        start_children(config, supervisor, log_level)
        wait_ready(config, supervisor, time.monotonic() + config.ready_timeout_s)
        if config.warmup:
            warm_up(config)
        print_ready(config)
        return _supervise(supervisor)
    except KeyboardInterrupt:
        return 0
    except (RuntimeError, TimeoutError) as exc:
        print(f"pdmesh serve: {exc}", file=sys.stderr)
        return 1
    finally:
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        supervisor.stop_all([n for n in supervisor.children if n != "scheduler"] + ["scheduler"])


def _supervise(supervisor: Supervisor) -> int:
    """Restart what exits; only a scheduler that keeps crashing ends the mesh."""
    while True:
        supervisor.poll()
        if supervisor.children["scheduler"].given_up:
            print("pdmesh serve: the scheduler keeps exiting; stopping the mesh", file=sys.stderr, flush=True)
            return 1
        time.sleep(POLL_S)
