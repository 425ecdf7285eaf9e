"""Server side of cluster authentication: internal ports refuse callers that are not the mesh.

A refused call gets UNAUTHENTICATED; the service stays up and logs the refusal once per peer per
minute (a scanner making thousands of calls costs one line a minute, not a line a call).
"""

from __future__ import annotations

import logging
import time
from typing import Awaitable, Callable

import grpc
from grpc_health.v1 import health
from grpc_reflection.v1alpha import reflection

from pdmesh import metrics
from pdmesh.rpc.cluster_auth import ClusterCredentials

log = logging.getLogger(__name__)
OPEN_SERVICES = (health.SERVICE_NAME, reflection.SERVICE_NAME, "grpc.reflection.v1.ServerReflection")
LOG_EVERY_S = 60.0


class ClusterAuthInterceptor(grpc.aio.ServerInterceptor):
    def __init__(self, credentials: ClusterCredentials, clock: Callable[[], float] = time.monotonic):
        self.credentials = credentials
        self.clock = clock
        self._last_logged: dict[str, float] = {}

    async def intercept_service(self, continuation: Callable[[grpc.HandlerCallDetails], Awaitable],
                                details: grpc.HandlerCallDetails):
        service = details.method.lstrip("/").split("/", 1)[0]
        if service in OPEN_SERVICES or self.credentials.admits(details.invocation_metadata):
            return await continuation(details)
        handler = await continuation(details)
        if handler is None:
            return None
        return self._refusal(handler, details.method)

    def _refusal(self, handler: grpc.RpcMethodHandler, method: str) -> grpc.RpcMethodHandler:
        async def refuse(request, context):
            self._note(context.peer(), method)
            await context.abort(grpc.StatusCode.UNAUTHENTICATED,
                                f"{method} is internal to the mesh: send the cluster credential")

        async def refuse_stream(request, context):
            await refuse(request, context)
            yield  # pragma: no cover - never reached: abort raises

        kind = ("stream" if handler.request_streaming else "unary", "stream" if handler.response_streaming else "unary")
        factory = getattr(grpc, f"{kind[0]}_{kind[1]}_rpc_method_handler")
        return factory(refuse_stream if handler.response_streaming else refuse,
                       request_deserializer=handler.request_deserializer,
                       response_serializer=handler.response_serializer)

    def _note(self, peer: str, method: str) -> None:
        metrics.REJECTIONS.labels(reason="internal_unauthenticated").inc()
        host = peer.rsplit(":", 1)[0]
        now = self.clock()
        if now - self._last_logged.get(host, -LOG_EVERY_S) >= LOG_EVERY_S:
            self._last_logged[host] = now
            log.warning("refused %s from %s: no cluster credential (logged once a minute per peer)", method, host)
