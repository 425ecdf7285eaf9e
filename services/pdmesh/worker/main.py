"""Runs one prefill or decode worker process until SIGTERM, then drains it."""

from __future__ import annotations

import asyncio
import ctypes
import logging
import signal
import threading

import uvloop

from pdmesh import faults, metrics, tracing
from pdmesh.config import WorkerConfig
from pdmesh.decode.kv_receiver import KVReceiver
from pdmesh.decode.service import DecodeWorkerServicer
from pdmesh.decode.stream import DecodeStream, PrefillClients
from pdmesh.engine.engine_protocol import Engine
from pdmesh.gen.pdmesh.v1 import decode_pb2, decode_pb2_grpc, prefill_pb2, prefill_pb2_grpc
from pdmesh.prefill.kv_sender import KVSender
from pdmesh.prefill.service import PrefillWorkerServicer
from pdmesh.rpc.auth_interceptor import ClusterAuthInterceptor
from pdmesh.rpc.cluster_auth import ClusterCredentials
from pdmesh.rpc.server import ServiceSpec, build_server, service_name
from pdmesh.worker.registration import Registration
from pdmesh.worker.runtime import WorkerState, start_engine

log = logging.getLogger(__name__)


def run_worker(config: WorkerConfig, grace_s: float = 30.0) -> None:
    """The engine steps on this (main) thread; gRPC, registration and draining run on an asyncio
    loop in a second thread. SIGINT/SIGTERM start the drain; the engine stops after it."""
    config.security.require()
    faults.install(faults.parse(config.faults))
    tracing.setup(f"pdmesh-{config.role}", config.otlp_endpoint)
    engine = start_engine(config, logging.getLevelName(logging.getLogger().level))
    stop = _StopSignal()
    server_thread = threading.Thread(target=_serve_then_stop, args=(config, engine, stop, grace_s), name="rpc")
    server_thread.start()
    stop.install()
    engine.run_here()
    server_thread.join()
    engine.close()
    tracing.shutdown()


class _StopSignal:
    """A signal on the main thread becomes an asyncio event on the server thread's loop."""

    def __init__(self):
        self.loop: asyncio.AbstractEventLoop | None = None
        self.event: asyncio.Event | None = None
        self.ready = threading.Event()

    def install(self) -> None:
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, self._on_signal)

    def _on_signal(self, signum, frame) -> None:
        self.ready.wait(timeout=30)
        if self.loop is not None:
            self.loop.call_soon_threadsafe(self.event.set)


def _serve_then_stop(config: WorkerConfig, engine: Engine, stop: _StopSignal, grace_s: float) -> None:
    _name_os_thread(b"pdmesh-rpc")  # tells it apart from the engine's OpenMP threads in top and /proc
    try:
        uvloop.run(_serve(config, engine, stop, grace_s))
    except Exception:
        log.exception("worker server failed")
    finally:
        engine.stop()  # ends run_here() on the main thread


def _name_os_thread(name: bytes) -> None:
    PR_SET_NAME = 15
    ctypes.CDLL(None).prctl(PR_SET_NAME, ctypes.c_char_p(name[:15]), 0, 0, 0)


async def _serve(config: WorkerConfig, engine: Engine, stop: _StopSignal, grace_s: float) -> None:
    stop.loop, stop.event = asyncio.get_running_loop(), asyncio.Event()
    stop.ready.set()
    state = WorkerState(config, engine, "")
    listen = config.listen
    host = listen.advertised_host()
    credentials = ClusterCredentials(config.security.cluster_secret, config.security.tls_dir, config.role)
    background = []
    if config.role == "prefill":
        sender = KVSender(engine, host, config.kv_timeout_s, config.held_kv_ttl_s)
        spec = ServiceSpec(prefill_pb2_grpc.add_PrefillWorkerServicer_to_server, PrefillWorkerServicer(state, sender),
                           service_name(prefill_pb2, "PrefillWorker"))
        background.append(sender.expire_forever())
    else:
        clients = PrefillClients(credentials)
        receiver = KVReceiver("", host, engine.layout, config.kv_timeout_s, engine.device)
        spec = ServiceSpec(decode_pb2_grpc.add_DecodeWorkerServicer_to_server,
                           DecodeWorkerServicer(state, DecodeStream(engine, receiver, clients, config.prefill_timeout_s)),
                           service_name(decode_pb2, "DecodeWorker"))
    server = build_server([spec], port=listen.port, host=listen.host, interceptors=[ClusterAuthInterceptor(credentials)],
                          credentials=credentials.server_credentials())
    state.address = listen.dial(server.port)
    state.worker_id = config.worker_id or f"{config.role}-{state.address}"
    if config.role == "decode":
        receiver.worker_id = state.worker_id
    metrics_port = metrics.serve_metrics(listen.metrics_port, listen.host)
    state.metrics_address = listen.dial(metrics_port) if metrics_port else ""
    registration = Registration(config.scheduler_address, credentials, state.register_request, state.load,
                                config.heartbeat_interval_s)
    await server.start()
    tasks = [asyncio.create_task(c) for c in (registration.run(), *background)]
    print(f"pdmesh {config.role} worker {state.worker_id} serving on {state.address} "
          f"(metrics :{metrics_port})", flush=True)
    await _first_of(stop.event.wait(), state.drain_requested.wait())
    await _drain(state, server, grace_s, sender if config.role == "prefill" else None)
    for task in tasks:
        task.cancel()


async def _first_of(*aws) -> None:
    tasks = [asyncio.ensure_future(a) for a in aws]
    await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
    for task in tasks:
        task.cancel()


async def _drain(state: WorkerState, server, grace_s: float, sender: KVSender | None) -> None:
    """Stop taking work (health NOT_SERVING, heartbeats say draining, new calls get UNAVAILABLE),
    let running requests and unpulled prompts finish (up to grace_s), then stop serving."""
    state.draining = True
    state.load()
    await server.set_serving(False)
    loop = asyncio.get_running_loop()
    deadline = loop.time() + grace_s
    while loop.time() < deadline and (state.engine.has_work() or (sender and sender.held)):
        await asyncio.sleep(0.05)
    await server.stop(grace=1.0)
    log.info("%s stopped", state.worker_id)
