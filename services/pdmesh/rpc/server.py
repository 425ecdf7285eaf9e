"""Build the grpc.aio server every pdmesh service runs: health, reflection, error mapping, shutdown.

    async def main():
        server = build_server([ServiceSpec(add_SchedulerServicer_to_server, servicer,
                                           "pdmesh.v1.Scheduler")], port=50051)
        await serve(server, grace_s=10)

    run(main())   # on uvloop

Every server answers `grpc.health.v1.Health` (overall "" plus one entry per service) and server
reflection (v1alpha) for its services, health and reflection, so `grpcurl -plaintext HOST:PORT list`
works without proto files. `ErrorInterceptor` runs outermost, so it also sees what inner
interceptors raise from inside handlers.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass
from types import ModuleType
from typing import Any, Callable, Coroutine, NamedTuple, Sequence, TypeVar

import grpc
import uvloop
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_health.v1.health import aio as health_aio
from grpc_reflection.v1alpha import reflection

from pdmesh import tracing
from pdmesh.rpc.channels import SERVER_OPTIONS
from pdmesh.rpc.errors import ErrorInterceptor
from pdmesh.rpc.signals import wait_for_stop_signal

logger = logging.getLogger(__name__)

T = TypeVar("T")
# gRPC sets SO_REUSEPORT by default, so a second server on a busy port would silently share it
# (and its traffic) instead of failing; pdmesh wants one process per port.
DEFAULT_OPTIONS: tuple[tuple[str, Any], ...] = (("grpc.so_reuseport", 0), *SERVER_OPTIONS)
SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


class ServiceSpec(NamedTuple):
    """One service to serve: the generated `add_*Servicer_to_server`, the servicer, the full name."""

    add_to_server: Callable[[Any, grpc.aio.Server], None]
    servicer: Any
    name: str  # e.g. "pdmesh.v1.Scheduler", for health and reflection


def service_name(pb2_module: ModuleType, service: str) -> str:
    """Full name of `service` as declared in a generated `*_pb2` module (no typos in names)."""
    return pb2_module.DESCRIPTOR.services_by_name[service].full_name


@dataclass
class RpcServer:
    """A built, bound server plus its health servicer; `start()` it, `stop()` it."""

    server: grpc.aio.Server
    health: health_aio.HealthServicer
    address: str
    port: int  # the bound port; differs from the requested one when that was 0
    service_names: tuple[str, ...]

    async def start(self, serving: bool = True) -> None:
        """Start serving RPCs; health reports SERVING, or NOT_SERVING until `set_serving(True)`."""
        await self.server.start()
        await self.set_serving(serving)
        logger.info("serving %s on %s", ", ".join(self.service_names), self.address)

    async def set_serving(self, serving: bool, name: str | None = None) -> None:
        """Set the health of one service, or (name None) of the server and all its services."""
        names = [name] if name is not None else ["", *self.service_names]
        for each in names:
            await self.health.set(each, SERVING if serving else NOT_SERVING)

    async def stop(self, grace: float | None = 5.0, drain_s: float = 0.0) -> None:
        """Graceful shutdown: every health entry goes NOT_SERVING for good, then, after `drain_s`
        (time for load balancers to notice), new RPCs are refused and running ones get `grace`
        seconds to finish before they are cancelled."""
        await self.health.enter_graceful_shutdown()
        if drain_s > 0:
            await asyncio.sleep(drain_s)
        await self.server.stop(grace)
        logger.info("stopped serving on %s", self.address)

    async def wait_for_termination(self) -> None:
        """Block until the server has stopped."""
        await self.server.wait_for_termination()


def build_server(
    services: Sequence[ServiceSpec],
    *,
    port: int = 0,
    host: str = "127.0.0.1",
    interceptors: Sequence[grpc.aio.ServerInterceptor] = (),
    options: Sequence[tuple[str, Any]] = (),
    credentials: grpc.ServerCredentials | None = None,
) -> RpcServer:
    """Create and bind (not start) a grpc.aio server for `services`; call it inside the event loop.

    `port=0` picks a free port (see `RpcServer.port`); a busy port raises OSError. `interceptors`
    run inside the error interceptor. `options` (channel args) add to and override
    DEFAULT_OPTIONS. Plain `(add_fn, servicer, name)` tuples work as `ServiceSpec`s. With
    `credentials` the port speaks TLS.
    """
    merged = {**dict(DEFAULT_OPTIONS), **dict(options)}
    tracing_interceptors = [tracing.TracingInterceptor()] if tracing.enabled() else []
    server = grpc.aio.server(
        interceptors=[ErrorInterceptor(), *tracing_interceptors, *interceptors], options=list(merged.items())
    )
    specs = [ServiceSpec(*spec) for spec in services]
    for spec in specs:
        spec.add_to_server(spec.servicer, server)
    health_servicer = health_aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    names = tuple(spec.name for spec in specs)
    reflection.enable_server_reflection(
        (*names, health.SERVICE_NAME, reflection.SERVICE_NAME), server
    )
    address, bound = _bind(server, host, port, credentials)
    return RpcServer(server, health_servicer, address, bound, names)


def _bind(server: grpc.aio.Server, host: str, port: int,
          credentials: grpc.ServerCredentials | None = None) -> tuple[str, int]:
    bracketed = f"[{host}]" if ":" in host and not host.startswith("[") else host
    try:
        if credentials is None:
            bound = server.add_insecure_port(f"{bracketed}:{port}")
        else:
            bound = server.add_secure_port(f"{bracketed}:{port}", credentials)
    except RuntimeError as exc:
        raise OSError(f"cannot bind gRPC server to {bracketed}:{port}: {exc}") from exc
    if bound == 0:
        raise OSError(f"cannot bind gRPC server to {bracketed}:{port}")
    return f"{bracketed}:{bound}", bound


async def serve(server: RpcServer, grace_s: float = 5.0, drain_s: float = 0.0) -> None:
    """Start `server`, run until SIGINT or SIGTERM, then stop it gracefully (see `stop`)."""
    await server.start()
    try:
        await wait_for_stop_signal()
    finally:
        await server.stop(grace_s, drain_s)


def install_uvloop() -> None:
    """Make uvloop the event loop of every later `asyncio.run` / new loop in this process."""
    asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())


def run(main: Coroutine[Any, Any, T]) -> T:
    """Run `main` to completion on a fresh uvloop event loop and return its result."""
    return uvloop.run(main)
