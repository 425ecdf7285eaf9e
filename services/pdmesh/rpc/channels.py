"""Client channels between pdmesh services, with HTTP/2 keepalive so a lost peer is noticed.

A crashed peer resets its connections at once, but a hung one (SIGSTOP, a half-open connection
after a network fault) keeps TCP open and goes silent. Keepalive pings need the peer's gRPC
threads to answer, so an unanswered ping fails every call on that connection with UNAVAILABLE
within KEEPALIVE_TIME_MS + KEEPALIVE_TIMEOUT_MS, instead of a stream that waits forever.
"""

from __future__ import annotations

import grpc

from pdmesh import tracing
from pdmesh.rpc.cluster_auth import TLS_NAME, ClusterCredentials

KEEPALIVE_TIME_MS = 1000
KEEPALIVE_TIMEOUT_MS = 1000

CLIENT_OPTIONS = (
    ("grpc.keepalive_time_ms", KEEPALIVE_TIME_MS),
    ("grpc.keepalive_timeout_ms", KEEPALIVE_TIMEOUT_MS),
    # gRPC core (1.85 here) times out a keepalive ping by this one, default 60 s, whatever
    # keepalive_timeout_ms says: without it a SIGSTOPped worker held its streams for a minute.
    ("grpc.http2.ping_timeout_ms", KEEPALIVE_TIMEOUT_MS),
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.http2.max_pings_without_data", 0),
)

# What a server must allow for clients that ping this often (gRPC's default would answer
# frequent pings with GOAWAY "too_many_pings").
SERVER_OPTIONS = (
    ("grpc.http2.min_ping_interval_without_data_ms", KEEPALIVE_TIME_MS // 2),
    ("grpc.http2.max_ping_strikes", 0),
    ("grpc.keepalive_permit_without_calls", 1),
)


def internal_channel(address: str, credentials: ClusterCredentials) -> grpc.aio.Channel:
    """An aio channel to another pdmesh service that presents this process's cluster credential:
    its certificate under mutual TLS, else the cluster secret on every unary call. Streaming calls
    pass `credentials.metadata()` themselves: an aio interceptor on a stream proxies every message
    through an extra layer, and the token stream is the hot path."""
    interceptors = [_Metadata(credentials.metadata())] if credentials.secret or tracing.enabled() else []
    tls = credentials.channel_credentials()
    if tls is None:
        return grpc.aio.insecure_channel(address, options=CLIENT_OPTIONS, interceptors=interceptors)
    options = (*CLIENT_OPTIONS, ("grpc.ssl_target_name_override", TLS_NAME))
    return grpc.aio.secure_channel(address, tls, options=options, interceptors=interceptors)


class _Metadata(grpc.aio.UnaryUnaryClientInterceptor):
    """Adds fixed metadata (the cluster secret) to every unary call on a channel."""

    def __init__(self, extra: tuple[tuple[str, str], ...]):
        self.extra = extra

    def _details(self, details: grpc.aio.ClientCallDetails) -> grpc.aio.ClientCallDetails:
        metadata = grpc.aio.Metadata(*(details.metadata or ()), *tracing.inject(self.extra))
        return grpc.aio.ClientCallDetails(details.method, details.timeout, metadata, details.credentials,
                                          details.wait_for_ready)

    async def intercept_unary_unary(self, continuation, details, request):
        return await continuation(self._details(details), request)
