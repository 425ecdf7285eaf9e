"""W3C trace context across every hop, with OpenTelemetry spans, exported over OTLP.

Off unless `--otlp-endpoint` is set: then no tracer provider exists, no interceptor is installed
and `span()` returns a no-op context (the cost is one flag check). When on, every RPC a service
serves becomes a server span whose parent is the caller's `traceparent` (client -> scheduler ->
decode worker -> prefill worker, KV pulls included), the served span's `traceparent` is echoed
to the caller in the response's initial metadata, internal calls carry it on, and the phases get
spans of their own (`admission`, `kv_handoff`). Errors are recorded on the span that saw them.
"""

from __future__ import annotations

import contextlib
import inspect
import logging
from typing import Any, Callable

import grpc

log = logging.getLogger(__name__)
_tracer = None  # set by setup(); None: tracing is off
TRACEPARENT = "traceparent"
UNTRACED = ("/pdmesh.v1.Registry/Heartbeat",)  # a span a second per worker would drown the traces


def setup(service_name: str, endpoint: str) -> None:
    """Turn tracing on for this process: spans batch-exported to the OTLP/gRPC `endpoint`."""
    global _tracer
    if not endpoint:
        return
    from opentelemetry import trace
    from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor

    provider = TracerProvider(resource=Resource.create({"service.name": service_name}))
    provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter(endpoint=endpoint, insecure=True),
                                                   schedule_delay_millis=500))
    trace.set_tracer_provider(provider)
    _tracer = trace.get_tracer("pdmesh")
    log.info("tracing to %s as %s", endpoint, service_name)


def enabled() -> bool:
    return _tracer is not None


def shutdown() -> None:
    """Flush what is batched (at a clean stop)."""
    if _tracer is not None:
        from opentelemetry import trace
        trace.get_tracer_provider().shutdown()


def span(name: str, **attributes: Any):
    """A child span of the current one (a no-op context when tracing is off)."""
    if _tracer is None:
        return contextlib.nullcontext(None)
    return _tracer.start_as_current_span(name, attributes=attributes or None)


def server_span(name: str, carrier: Any):
    """A server span parented on the trace context in `carrier` (HTTP headers: any mapping with
    .get); a no-op context when tracing is off."""
    if _tracer is None:
        return contextlib.nullcontext(None)
    from opentelemetry.propagate import extract
    return _server_span(name, extract(carrier))


def inject(metadata: tuple[tuple[str, str], ...] = ()) -> tuple[tuple[str, str], ...]:
    """`metadata` plus the current trace context, for an outgoing call."""
    if _tracer is None:
        return metadata
    from opentelemetry.propagate import inject as otel_inject
    carrier: dict[str, str] = {}
    otel_inject(carrier)
    return (*metadata, *carrier.items())


class TracingInterceptor(grpc.aio.ServerInterceptor):
    """Every served RPC (but health and reflection) runs inside a server span parented on the
    caller's traceparent; install it only when tracing is on."""

    async def intercept_service(self, continuation: Callable, details: grpc.HandlerCallDetails):
        handler = await continuation(details)
        if handler is None or details.method.startswith("/grpc.") or details.method in UNTRACED:
            return handler
        from opentelemetry.propagate import extract
        parent = extract(dict(details.invocation_metadata or ()))
        kind = "unary_stream" if handler.response_streaming else "unary_unary"
        behavior = getattr(handler, kind)
        if behavior is None or handler.request_streaming:
            return handler
        wrapped = _traced_stream(behavior, details.method, parent) if inspect.isasyncgenfunction(behavior) \
            else _traced_call(behavior, details.method, parent)
        return getattr(grpc, f"{kind}_rpc_method_handler")(wrapped, request_deserializer=handler.request_deserializer,
                                                           response_serializer=handler.response_serializer)


def _server_span(method: str, parent):
    from opentelemetry import trace
    return _tracer.start_as_current_span(method.lstrip("/"), context=parent, kind=trace.SpanKind.SERVER,
                                         record_exception=True, set_status_on_exception=True)


async def _echo(context) -> None:
    carrier = dict(inject())
    if TRACEPARENT in carrier:
        await context.send_initial_metadata(((TRACEPARENT, carrier[TRACEPARENT]),))


def _traced_call(behavior: Callable, method: str, parent) -> Callable:
    async def handle(request, context):
        with _server_span(method, parent):
            await _echo(context)
            return await behavior(request, context)
    return handle


def _traced_stream(behavior: Callable, method: str, parent) -> Callable:
    async def handle(request, context):
        with _server_span(method, parent):
            await _echo(context)
            async for response in behavior(request, context):
                yield response
    return handle
