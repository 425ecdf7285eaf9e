"""Every exit frees both sides at once, per phase: a client that cancels or runs out of time while
its request is queued, prefilling, mid-transfer or decoding; a prefill worker whose decode side
vanished; a decode worker whose prefill side vanished. Each asserts that both workers' KV blocks
are free within 1 s (not after the held-KV TTL, here 30 s) and that the exit was counted.

Echo-engine workers (the real engine around a model that costs no CPU) make each phase last as
long as the test needs: --echo-step-ms slows a prefill, PDMESH_FAULTS=kv_delay_ms stalls a
transfer. Workers heartbeat every 0.2 s, so the scheduler's cluster status is at most that stale.
"""

from __future__ import annotations

import re
import time

import grpc
import pytest

from pdmesh.gen.pdmesh.v1 import scheduler_pb2, scheduler_pb2_grpc
from support.cluster import Cluster
from support.metrics import metric

HEARTBEAT_S = 0.2
FREE_WITHIN_S = 1.0
PROMPT = list(range(100, 120))
ECHO_BLOCK_BYTES = 1 * 2 * 16 * 1 * 1 * 4  # one layer, k/v, 16 tokens, one head of dim 1, fp32
SLOW_PREFILL = ("--echo-step-ms", "800")
STALLED_TRANSFER = {"PDMESH_FAULTS": "kv_delay_ms=3000"}


@pytest.fixture
def start(tiny_model, tmp_path):
    clusters = []

    def start(prefill_flags=(), prefill_env=None, decode_flags=()) -> Cluster:
        c = Cluster(tiny_model, tmp_path)
        c.start_scheduler("--local-prefill-threshold", "0", "--heartbeat-interval", str(HEARTBEAT_S),
                          "--heartbeat-timeout", "1")
        c.start_worker("prefill", "prefill-a", "--engine", "echo", *prefill_flags, env=prefill_env)
        c.start_worker("decode", "decode-a", "--engine", "echo", "--echo-step-ms", "50", *decode_flags)
        c.wait_healthy({"prefill-a", "decode-a"})
        clusters.append(c)
        return c
    yield start
    for c in clusters:
        c.stop_all()


def generate(c: Cluster, max_tokens: int, timeout_s: float = 60.0):
    """A raw Generate call (so the test can cancel it) and its channel."""
    channel = grpc.insecure_channel(c.address)
    request = scheduler_pb2.GenerateRequest(prompt_token_ids=PROMPT, max_tokens=max_tokens, ignore_eos=True)
    return channel, scheduler_pb2_grpc.SchedulerStub(channel).Generate(request, timeout=timeout_s)


def run_out(call) -> grpc.StatusCode | None:
    try:
        for _ in call:
            pass
    except grpc.RpcError as exc:
        return exc.code()
    return None


def worker(c: Cluster, name: str):
    return next(w for w in c.workers() if w.worker_id == name)


def exits(c: Cluster, name: str, phase: str, cause: str | None = None) -> float:
    address = scheduler_metrics(c) if name == "scheduler" else worker(c, name).metrics_address
    labels = {"phase": phase} if cause is None else {"phase": phase, "cause": cause}
    return metric(address, "pdmesh_abandoned_requests_total", **labels)


def scheduler_metrics(c: Cluster) -> str:
    port = re.findall(r"metrics :(\d+)\)", (c.logs / "scheduler.log").read_text())[-1]
    return f"127.0.0.1:{port}"


def assert_freed(c: Cluster, since: float, names=("prefill-a", "decode-a")) -> None:
    """Every named worker reports all KV blocks free within FREE_WITHIN_S of `since` (plus one
    heartbeat for the report to arrive)."""
    while True:
        workers = [w for w in c.workers() if w.worker_id in names]
        if all(w.kv_blocks_free == w.kv_blocks_total and w.running == 0 for w in workers):
            break
        assert time.monotonic() - since < 5, workers
        time.sleep(0.02)
    took = time.monotonic() - since
    print(f"freed in {took:.2f}s")
    assert took <= FREE_WITHIN_S + HEARTBEAT_S, f"blocks freed only after {took:.2f}s"


def cancel_at(c: Cluster, after_s: float, max_tokens: int = 8) -> float:
    channel, call = generate(c, max_tokens)
    time.sleep(after_s)
    call.cancel()
    cancelled = time.monotonic()
    assert run_out(call) == grpc.StatusCode.CANCELLED
    channel.close()
    return cancelled


def deadline_at(c: Cluster, after_s: float, max_tokens: int = 8) -> float:
    channel, call = generate(c, max_tokens, timeout_s=after_s)
    assert run_out(call) == grpc.StatusCode.DEADLINE_EXCEEDED
    channel.close()
    return time.monotonic()


def test_cancel_and_deadline_while_queued(start):
    # 64 blocks of decode KV: one request of 20 + 1,004 tokens fills them; the next one queues.
    c = start(decode_flags=("--kv-cache-gib", str(64 * ECHO_BLOCK_BYTES / 2**30)))
    channel, hog = generate(c, max_tokens=1004)
    c.wait_until(lambda: worker(c, "decode-a").running == 1, 10, "the hog running")
    cancel_at(c, 0.5)
    deadline_at(c, 0.8)
    assert exits(c, "scheduler", "queued", "cancel") == 1
    assert exits(c, "scheduler", "queued", "deadline") == 1
    hog.cancel()
    cancelled = time.monotonic()
    assert run_out(hog) == grpc.StatusCode.CANCELLED
    channel.close()
    assert_freed(c, cancelled)
    assert exits(c, "decode-a", "decode", "cancel") == 1


@pytest.mark.parametrize("phase, flags, env, at_s", [
    ("prefill", SLOW_PREFILL, None, 0.4),
    ("transfer", (), STALLED_TRANSFER, 1.0),
    ("decode", (), None, 1.0),
])
def test_cancel_and_deadline_free_both_workers(start, phase, flags, env, at_s):
    c = start(prefill_flags=flags, prefill_env=env)
    max_tokens = 200 if phase == "decode" else 8  # 50 ms a token: decoding for 10 s
    assert_freed(c, cancel_at(c, at_s, max_tokens))
    assert_freed(c, deadline_at(c, at_s, max_tokens))
    assert exits(c, "decode-a", phase, "cancel") == 1
    assert exits(c, "decode-a", phase, "deadline") == 1
    if phase != "decode":  # the prefill worker saw its caller go, too
        assert exits(c, "prefill-a", phase) + exits(c, "prefill-a", "held") >= 2


def test_prefill_worker_frees_kv_when_its_decode_worker_vanishes(start):
    c = start(prefill_env=STALLED_TRANSFER)
    channel, call = generate(c, max_tokens=8)
    time.sleep(1.0)  # the prompt's KV is held on prefill-a; the transfer is stalled
    assert worker(c, "prefill-a").kv_blocks_free < worker(c, "prefill-a").kv_blocks_total
    c.kill("decode-a")
    killed = time.monotonic()
    assert_freed(c, killed, names=("prefill-a",))
    assert exits(c, "prefill-a", "transfer") + exits(c, "prefill-a", "held") >= 1
    call.cancel()
    channel.close()


@pytest.mark.parametrize("phase, flags, env, at_s, counted", [
    ("prefill", SLOW_PREFILL, None, 0.4, ("pdmesh_prefill_fallbacks_total", {"target": "local"})),
    ("transfer", (), STALLED_TRANSFER, 1.0, ("pdmesh_kv_handoff_corrupt_total", {"reason": "lost"})),
])
def test_decode_worker_recomputes_when_its_prefill_worker_vanishes(start, phase, flags, env, at_s, counted):
    c = start(prefill_flags=flags, prefill_env=env)
    decode = worker(c, "decode-a")
    channel, call = generate(c, max_tokens=8)
    time.sleep(at_s)
    c.kill("prefill-a")
    chunks = list(call)
    done = time.monotonic()
    channel.close()
    tokens = [t for chunk in chunks for t in chunk.token_ids]
    assert tokens == list(range(PROMPT[-1] + 1, PROMPT[-1] + 9))  # echo: each token the next id
    route = chunks[-1].route
    assert route.prefill_worker_id == "" and route.prefill_fallbacks == 1
    assert route.kv_recomputes == (1 if phase == "transfer" else 0)
    name, labels = counted
    assert metric(decode.metrics_address, name, **labels) == 1
    assert_freed(c, done, names=("decode-a",))
