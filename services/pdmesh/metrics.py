"""Prometheus metrics of every pdmesh service (each process serves its own /metrics port).

Names follow Prometheus conventions: a `pdmesh_` prefix, base units (seconds, bytes), `_total` on
counters. A service only moves the metrics of its role; the rest stay at zero.
"""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram, start_http_server

_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75, 1, 1.5, 2, 3, 5, 10, 20, 60)

# scheduler: the client's view
TIME_TO_FIRST_TOKEN = Histogram("pdmesh_time_to_first_token_seconds",
                                "Time from request arrival to its first token", buckets=_LATENCY_BUCKETS)
INTER_TOKEN_LATENCY = Histogram("pdmesh_inter_token_latency_seconds",
                                "Time between consecutive tokens of a stream", buckets=_LATENCY_BUCKETS)
E2E_LATENCY = Histogram("pdmesh_e2e_request_latency_seconds",
                        "Time from request arrival to its last token", buckets=_LATENCY_BUCKETS)
QUEUE_TIME = Histogram("pdmesh_queue_time_seconds",
                       "Time a request waited in the scheduler's admission queue", buckets=_LATENCY_BUCKETS)
REQUESTS = Counter("pdmesh_requests_total", "Finished requests by outcome", ["outcome"])
PROMPT_TOKENS = Counter("pdmesh_prompt_tokens_total", "Prompt tokens of admitted requests")
GENERATION_TOKENS = Counter("pdmesh_generation_tokens_total", "Tokens streamed to clients")

REJECTIONS = Counter("pdmesh_rejections_total", "Requests refused by the scheduler, by reason", ["reason"])
QUEUE_DEPTH = Gauge("pdmesh_queue_depth", "Requests in the admission queue, by priority", ["priority"])
ADMITTED_TOKENS = Counter("pdmesh_admitted_tokens_total", "prompt + max_tokens of admitted requests")
REJECTED_TOKENS = Counter("pdmesh_rejected_tokens_total", "prompt + max_tokens of refused requests")

WORKER_STATE_CHANGES = Counter("pdmesh_worker_state_changes_total",
                               "Workers leaving (down) or rejoining (up) the routing set", ["state"])
DETECTION_SECONDS = Histogram("pdmesh_worker_failure_detection_seconds",
                              "From a worker's last sign of life to its leaving routing",
                              buckets=(0.1, 0.25, 0.5, 1, 1.5, 2, 3, 5, 10, 30))
RETRIES = Counter("pdmesh_request_retries_total",
                  "Requests sent again elsewhere before their first token, by the failed role", ["role"])
RESUMED_STREAMS = Counter("pdmesh_resumed_streams_total",
                          "Streams resumed on another decode worker after tokens had been sent")

# every service
RUNNING = Gauge("pdmesh_requests_running", "Requests running")
QUEUED = Gauge("pdmesh_requests_queued", "Requests waiting")

# workers
ENGINE_QUEUE_TIME = Histogram("pdmesh_engine_queue_time_seconds",
                              "Time a request waited in a worker's engine for KV blocks and a batch slot",
                              buckets=_LATENCY_BUCKETS)
ENGINE_BUSY = Counter("pdmesh_engine_busy_seconds_total",
                      "Seconds the worker's engine spent computing steps (its rate: the share of time busy); "
                      "updated at each heartbeat")
KV_BLOCKS_FREE = Gauge("pdmesh_kv_blocks_free", "Free KV cache blocks")
KV_BLOCKS_TOTAL = Gauge("pdmesh_kv_blocks_total", "All KV cache blocks")
KV_BLOCKS_CACHED = Gauge("pdmesh_kv_blocks_cached", "KV blocks the prefix cache indexes (in use or free)")
PREFIX_CACHE_QUERIES = Counter("pdmesh_prefix_cache_queries",
                               "Prompt tokens looked up in the prefix cache (as vLLM's prefix_cache_queries)")
PREFIX_CACHE_HITS = Counter("pdmesh_prefix_cache_hits",
                            "Prompt tokens whose KV the prefix cache held, not computed again")
HANDOFF_BYTES = Counter("pdmesh_kv_handoff_bytes_total", "KV bytes handed from prefill to decode")
HANDOFF_SECONDS = Histogram("pdmesh_kv_handoff_seconds", "Time of one KV hand-off",
                            buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10))
HANDOFF_FAILURES = Counter("pdmesh_kv_handoff_failures_total", "KV hand-offs that failed")
KV_HANDOFF_CORRUPT = Counter("pdmesh_kv_handoff_corrupt_total",
                             "Received KV discarded and recomputed, by reason: checksum (mismatch), short "
                             "(fewer bytes than the layout calls for), timeout, lost (channel failed mid-transfer)",
                             ["reason"])
ABANDONED = Counter("pdmesh_abandoned_requests_total",
                    "Requests a service stopped working on before they finished, their KV freed at once, by "
                    "phase (queued, prefill, held, transfer, decode) and cause (cancel, deadline)",
                    ["phase", "cause"])
# A caller's deadline reaches a worker as the time left when the call was made, so the worker's
# clock for it runs late by the call's transit; the caller's cancel at its deadline then arrives
# with a little time apparently left. Within this slack it is the deadline.
DEADLINE_SLACK_S = 0.25


def abandon_cause(remaining_s: float | None) -> str:
    """ABANDONED's cause for a call that ended with `remaining_s` of its deadline left (None: none)."""
    return "deadline" if remaining_s is not None and remaining_s <= DEADLINE_SLACK_S else "cancel"


HANDOFF_HANDLES = Counter("pdmesh_kv_handoff_handles_total",
                          "Hand-offs through the engine's own KV connector (vLLM NIXL): transfer handles a decode "
                          "worker gave its engine")
PREFILL_FALLBACKS = Counter("pdmesh_prefill_fallbacks_total",
                            "Prefills moved to another prefill worker or to the decode worker, by target",
                            ["target"])
KV_RECLAIMED = Counter("pdmesh_kv_blocks_reclaimed_total",
                       "KV blocks of held prompts nobody pulled, freed after the TTL")
PREFILL_SECONDS = Histogram("pdmesh_prefill_seconds", "Time to prefill one prompt on a worker",
                            buckets=_LATENCY_BUCKETS)
PREFILL_TOKENS = Counter("pdmesh_prefill_tokens_total",
                         "Prompt tokens computed on a prefill worker, not those its prefix cache held "
                         "(with pdmesh_prefill_seconds: its rate)")


def serve_metrics(port: int, host: str = "127.0.0.1") -> int | None:
    """Serve /metrics on port (0: a free one); returns the bound port, None if port < 0 (off)."""
    if port < 0:
        return None
    server, _thread = start_http_server(port, addr=host)
    return server.server_port
