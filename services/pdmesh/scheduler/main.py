"""Runs the scheduler process: client API, registry, health that tracks worker membership."""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path

import grpc

from pdmesh import metrics, tracing
from pdmesh.config import SchedulerConfig
from pdmesh.engine.checkpoint import load_model_metadata
from pdmesh.gen.pdmesh.v1 import registry_pb2, registry_pb2_grpc, scheduler_pb2, scheduler_pb2_grpc
from pdmesh.errors import InvalidRequestError
from pdmesh.rpc.auth_interceptor import ClusterAuthInterceptor
from pdmesh.rpc.cluster_auth import ClusterCredentials
from pdmesh.rpc.server import ServiceSpec, build_server, service_name
from pdmesh.rpc.signals import wait_for_stop_signal
from pdmesh.scheduler.admission import AdmissionConfig, AdmissionQueue
from pdmesh.scheduler.admission_control import AdmissionControl
from pdmesh.scheduler.dispatcher import Dispatcher
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


async def run_scheduler(config: SchedulerConfig) -> None:
    config.security.require()
    tracing.setup("pdmesh-scheduler", config.otlp_endpoint)
    credentials = ClusterCredentials(config.security.cluster_secret, config.security.tls_dir, "scheduler")
    model = load_model_info(config)
    caps = Caps.resolve(model.max_model_len, config.max_prompt_tokens, config.max_output_tokens,
                        config.default_max_tokens, config.max_stop_strings, config.max_stop_string_chars)
    tenants = TenantDirectory(load_tenants_file(config.tenants_file) if config.tenants_file else [],
                              cluster_secret=config.security.cluster_secret)
    registry = WorkerRegistry(config.heartbeat_timeout_s)
    queue = AdmissionQueue(AdmissionConfig(config.max_queued_requests, config.max_queued_tokens))
    router = Router(registry)
    dispatcher = Dispatcher(queue, router, config.local_prefill_threshold)
    stream = MeshStream(model, registry, router, WorkerClients(credentials), config.local_prefill_threshold)
    scheduler = SchedulerServicer(model, caps, registry, AdmissionControl(tenants, dispatcher), stream,
                                  config.restarts, config.client_stall_timeout_s)
    server = None

    async def refresh_health() -> None:
        # SERVING only while both roles have a routable worker: a client load balancer then
        # never sends traffic to a scheduler that can only fail it.
        if server is not None:
            await server.set_serving(registry.has_both_roles(), SCHEDULER)
            await server.set_serving(registry.has_both_roles(), "")

    registry_servicer = RegistryServicer(registry, config.heartbeat_interval_s, refresh_health)
    # Two faces, two ports: clients reach only the Scheduler service; worker membership is internal.
    server = build_server([ServiceSpec(scheduler_pb2_grpc.add_SchedulerServicer_to_server, scheduler, SCHEDULER)],
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
    print(f"pdmesh scheduler serving {model.name} on {config.listen.dial(server.port)} (internal "
          f"{config.listen.dial(internal.port)}, metrics :{metrics_port})\n"
          f"  caps: {caps.describe()}\n"
          f"  queue: max-queued-requests {config.max_queued_requests:,}, max-queued-tokens "
          f"{config.max_queued_tokens:,}; tenants: {', '.join(tenants.tenants)}", flush=True)
    watcher = asyncio.create_task(_watch_health(refresh_health))
    dispatching = asyncio.create_task(dispatcher.run_forever())
    probing = asyncio.create_task(HealthProber(registry, credentials).run_forever())
    await wait_for_stop_signal()
    scheduler.accepting = False
    watcher.cancel()
    dispatching.cancel()
    probing.cancel()
    await server.stop(grace=30.0)
    await internal.stop(grace=1.0)
    tracing.shutdown()


async def _watch_health(refresh) -> None:
    while True:
        await refresh()
        await asyncio.sleep(0.5)
