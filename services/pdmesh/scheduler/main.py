"""Runs the scheduler process: client API, registry, health that tracks worker membership."""

from __future__ import annotations

import asyncio
import logging
import ssl
from pathlib import Path

import grpc

from pdmesh import metrics, tracing
from pdmesh.config import SchedulerConfig
from pdmesh.engine.checkpoint import load_model_metadata
from pdmesh.gen.pdmesh.v1 import registry_pb2, registry_pb2_grpc, scheduler_pb2, scheduler_pb2_grpc
from pdmesh.errors import InvalidRequestError
from pdmesh.http.server import HttpServer
from pdmesh.rpc.auth_interceptor import ClusterAuthInterceptor
from pdmesh.rpc.cluster_auth import ClusterCredentials
from pdmesh.rpc.server import ServiceSpec, build_server, service_name
from pdmesh.rpc.signals import wait_for_stop_signal
from pdmesh.scheduler.admission import AdmissionConfig, AdmissionQueue
from pdmesh.scheduler.admission_control import AdmissionControl
from pdmesh.scheduler.dispatcher import Dispatcher
from pdmesh.scheduler.front_door import FrontDoor
from pdmesh.scheduler.health_prober import HealthProber
from pdmesh.scheduler.registry import WorkerRegistry
from pdmesh.scheduler.request_spec import Caps, ModelInfo
from pdmesh.scheduler.tenants import TenantDirectory, load_tenants_file
from pdmesh.scheduler.router import Router
from pdmesh.scheduler.service import RegistryServicer, SchedulerServicer
from pdmesh.scheduler.stream import MeshStream, WorkerClients

log = logging.getLogger(__name__)
SCHEDULER = service_name(scheduler_pb2, "Scheduler")


def load_model_info(config: SchedulerConfig) -> ModelInfo:
    """The served model's shapes and tokenizer; the scheduler loads no weights."""
    meta = load_model_metadata(config.model, log=log.info)
    model_len = meta.config.max_position_embeddings
    max_model_len = min(config.max_model_len or model_len, model_len)
    return ModelInfo(meta.config.name, meta.config, meta.tokenizer, max_model_len)


def client_port_options(config: SchedulerConfig) -> list[tuple[str, int]]:
    """Transport limits of the client port: request size, calls per connection."""
    return [("grpc.max_receive_message_length", config.max_request_bytes),
            ("grpc.max_concurrent_streams", config.max_streams_per_connection)]


def client_port_credentials(config: SchedulerConfig) -> grpc.ServerCredentials | None:
    if not config.tls_cert:
        return None
    try:
        pair = (Path(config.tls_key).read_bytes(), Path(config.tls_cert).read_bytes())
    except OSError as exc:
        raise InvalidRequestError(f"TLS on the client port: {exc}", "tls_cert") from exc
    return grpc.ssl_server_credentials([pair])


def client_port_ssl_context(config: SchedulerConfig) -> ssl.SSLContext | None:
    """The HTTP port speaks TLS exactly when the gRPC client port does, with the same pair."""
    if not config.tls_cert:
        return None
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    try:
        context.load_cert_chain(config.tls_cert, config.tls_key)
    except (OSError, ssl.SSLError) as exc:
        raise InvalidRequestError(f"TLS on the HTTP port: {exc}", "tls_cert") from exc
    return context


def build_front_door(config: SchedulerConfig, model: ModelInfo, registry: WorkerRegistry,
                     credentials: ClusterCredentials) -> tuple[FrontDoor, Dispatcher]:
    """Caps, tenants, the admission queue and the mesh stream behind every client protocol."""
    caps = Caps.resolve(model.max_model_len, config.max_prompt_tokens, config.max_output_tokens,
                        config.default_max_tokens, config.max_stop_strings, config.max_stop_string_chars)
    tenants = TenantDirectory(load_tenants_file(config.tenants_file) if config.tenants_file else [],
                              cluster_secret=config.security.cluster_secret)
    queue = AdmissionQueue(AdmissionConfig(config.max_queued_requests, config.max_queued_tokens))
    router = Router(registry)
    dispatcher = Dispatcher(queue, router, config.prefill_threshold())
    stream = MeshStream(model, registry, router, WorkerClients(credentials), config.prefill_threshold())
    front_door = FrontDoor(model, caps, AdmissionControl(tenants, dispatcher), stream, config.client_stall_timeout_s)
    return front_door, dispatcher


def build_http_server(config: SchedulerConfig, front_door: FrontDoor, registry: WorkerRegistry) -> HttpServer | None:
    if config.http_port == -1:
        return None
    return HttpServer(front_door, registry, config.listen.host, config.http_port,
                      ssl_context=client_port_ssl_context(config), max_request_bytes=config.max_request_bytes)


async def run_scheduler(config: SchedulerConfig) -> None:
    config.security.require()
    tracing.setup("pdmesh-scheduler", config.otlp_endpoint)
    credentials = ClusterCredentials(config.security.cluster_secret, config.security.tls_dir, "scheduler")
    model = load_model_info(config)
    registry = WorkerRegistry(config.heartbeat_timeout_s, needs_prefill=not config.colocated)
    front_door, dispatcher = build_front_door(config, model, registry, credentials)
    http = build_http_server(config, front_door, registry)
    server = None

    async def refresh_health() -> None:
        # SERVING only while every role the mode needs has a routable worker (decode alone when
        # colocated): a client load balancer then never sends traffic to a scheduler that can only fail it.
        if server is not None:
            await server.set_serving(registry.can_serve(), SCHEDULER)
            await server.set_serving(registry.can_serve(), "")

    registry_servicer = RegistryServicer(registry, config.heartbeat_interval_s, refresh_health)
    # Two faces, two ports: clients reach only the Scheduler service; worker membership is internal.
    server = build_server([ServiceSpec(scheduler_pb2_grpc.add_SchedulerServicer_to_server,
                                       SchedulerServicer(front_door, registry, config.restarts), SCHEDULER)],
                          port=config.listen.port, host=config.listen.host, options=client_port_options(config),
                          credentials=client_port_credentials(config))
    internal = build_server([ServiceSpec(registry_pb2_grpc.add_RegistryServicer_to_server, registry_servicer,
                                         service_name(registry_pb2, "Registry"))],
                            port=config.internal_port, host=config.listen.host,
                            interceptors=[ClusterAuthInterceptor(credentials)],
                            credentials=credentials.server_credentials())
    metrics_port = metrics.serve_metrics(config.listen.metrics_port, config.listen.host)
    await server.start(serving=False)
    await internal.start()
    if http is not None:
        await http.start()
    http_line = f"  openai http: {http.url(config.listen.advertised_host())}/v1\n" if http is not None else ""
    print(f"pdmesh scheduler serving {model.name} on {config.listen.dial(server.port)} (internal "
          f"{config.listen.dial(internal.port)}, metrics :{metrics_port})\n{http_line}"
          f"  caps: {front_door.caps.describe()}\n"
          f"  queue: max-queued-requests {config.max_queued_requests:,}, max-queued-tokens "
          f"{config.max_queued_tokens:,}; tenants: {', '.join(front_door.admission.tenants.tenants)}", flush=True)
    tasks = [asyncio.create_task(_watch_health(refresh_health)), asyncio.create_task(dispatcher.run_forever()),
             asyncio.create_task(HealthProber(registry, credentials).run_forever())]
    await wait_for_stop_signal()
    front_door.accepting = False
    for task in tasks:
        task.cancel()
    await asyncio.gather(server.stop(grace=30.0), *([http.stop()] if http is not None else []))
    await internal.stop(grace=1.0)
    tracing.shutdown()


async def _watch_health(refresh) -> None:
    while True:
        await refresh()
        await asyncio.sleep(0.5)
