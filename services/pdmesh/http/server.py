"""The HTTP server of the OpenAI-compatible API (aiohttp), on the scheduler's own event loop.

aiohttp was measured against Starlette/FastAPI on uvicorn (tools/bench_http_stack.py): the same
or less server CPU per request, one dependency instead of three, and it runs inside an existing
loop (AppRunner + TCPSite) with no signal handling of its own.
"""

from __future__ import annotations

import ssl

from aiohttp import web

from pdmesh import tracing
from pdmesh.http.routes import OpenAIRoutes
from pdmesh.scheduler.front_door import FrontDoor
from pdmesh.scheduler.registry import WorkerRegistry


class HttpServer:
    def __init__(self, front_door: FrontDoor, registry: WorkerRegistry, host: str, port: int,
                 ssl_context: ssl.SSLContext | None = None, max_request_bytes: int = 4 * 2**20,
                 shutdown_timeout_s: float = 30.0):
        """port 0: a free one (see `port` once started)."""
        self.app = web.Application(client_max_size=max_request_bytes, middlewares=[trace_requests])
        OpenAIRoutes(front_door, registry, max_request_bytes).add_to(self.app)
        self.host, self.requested_port, self.ssl_context = host, port, ssl_context
        # handler_cancellation: a client that disconnects cancels its handler, so its decode call
        # is cancelled and its KV freed at once rather than when the next write fails.
        self.runner = web.AppRunner(self.app, handler_cancellation=True, access_log=None,
                                    shutdown_timeout=shutdown_timeout_s)
        self.port = 0

    async def start(self) -> None:
        await self.runner.setup()
        site = web.TCPSite(self.runner, self.host, self.requested_port, ssl_context=self.ssl_context)
        await site.start()
        self.port = self.runner.addresses[0][1]

    async def stop(self) -> None:
        """Stop accepting, let running requests finish (up to shutdown_timeout_s), close."""
        await self.runner.cleanup()

    def url(self, host: str) -> str:
        scheme = "https" if self.ssl_context else "http"
        host = f"[{host}]" if ":" in host else host
        return f"{scheme}://{host}:{self.port}"


@web.middleware
async def trace_requests(request: web.Request, handler) -> web.StreamResponse:
    """With tracing on, each API call is a server span parented on its `traceparent` header (like
    every gRPC call); the front door's tokenize and admission spans and the decode call nest in it."""
    if not tracing.enabled() or request.path == "/health":
        return await handler(request)
    with tracing.server_span(f"{request.method} {request.path}", request.headers):
        return await handler(request)
