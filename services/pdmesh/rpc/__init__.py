"""gRPC plumbing shared by every pdmesh service: server builder, error mapping, reflection client."""

from pdmesh.rpc.errors import ErrorInterceptor, rich_details
from pdmesh.rpc.server import RpcServer, ServiceSpec, build_server, run, serve, service_name

__all__ = [
    "ErrorInterceptor",
    "RpcServer",
    "ServiceSpec",
    "build_server",
    "rich_details",
    "run",
    "serve",
    "service_name",
]
