"""Client channels between pdmesh services, with HTTP/2 keepalive so a lost peer is noticed.

A crashed peer resets its connections at once, but a hung one (SIGSTOP, a half-open connection
after a network fault) keeps TCP open and goes silent. Keepalive pings need the peer's gRPC
threads to answer, so an unanswered ping fails every call on that connection with UNAVAILABLE
within KEEPALIVE_TIME_MS + KEEPALIVE_TIMEOUT_MS, instead of a stream that waits forever.
"""

from __future__ import annotations

import grpc

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


def internal_channel(address: str) -> grpc.aio.Channel:
    """An aio channel to another pdmesh service."""
    return grpc.aio.insecure_channel(address, options=CLIENT_OPTIONS)
