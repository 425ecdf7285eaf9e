"""Chaos under load: kill -9, SIGSTOP, drain, rolling restarts, a scheduler restart and a KV layout
mismatch refused at registration, on a mesh of separate processes (2 prefill, 2 decode workers) with a tiny random Llama.
What must hold: zero failed requests, greedy output identical to an undisturbed run, zero KV blocks
held on live workers once idle, and the scheduler SERVING throughout. Each test also checks that its
disruption was hit (a stream resumed, a prefill moved, a worker left routing) so none can pass with
nothing disturbed, and records a row of the chaos table (tools/chaos_report.py)."""

from __future__ import annotations

import signal
import time

import grpc
import pytest

from pdmesh.gen.pdmesh.v1.registry_pb2 import RegisterRequest
from pdmesh.gen.pdmesh.v1.registry_pb2_grpc import RegistryStub
from pdmesh.gen.pdmesh.v1.worker_pb2 import KVLayout
from pdmesh.rpc import cluster_auth
from pdmesh.rpc.reflection_client import ReflectionClient
from support.chaos_log import record
from support.cluster import (CLUSTER_SECRET, NEW_TOKENS, WORKER_FLAGS, Cluster, Load, chaos_counters, prompts, scheduler_metric,
                             wait_for_tokens)


@pytest.fixture
def cluster(tiny_model, tmp_path):
    c = Cluster(tiny_model, tmp_path)
    c.start_scheduler("--local-prefill-threshold", "0")  # every prompt crosses a KV channel
    for name in ("prefill-a", "prefill-b"):
        c.start_worker("prefill", name, *WORKER_FLAGS)
    for name in ("decode-a", "decode-b"):
        c.start_worker("decode", name, *WORKER_FLAGS)
    c.wait_healthy({"prefill-a", "prefill-b", "decode-a", "decode-b"})
    yield c
    c.stop_all()


def test_kill_decode_worker_mid_stream(cluster, expected):
    load = Load(cluster).start()
    victim = wait_for_tokens(cluster, "decode")
    killed_at = time.monotonic()
    cluster.kill(victim)
    cluster.wait_until(lambda: not next(w for w in cluster.workers() if w.worker_id == victim).healthy, 10)
    detected_s = time.monotonic() - killed_at
    row = load.finish(expected)
    assert detected_s < 5
    assert row["resumed"] >= 1
    routes = list(load.routes.values())
    assert all(len(r.decode_worker_ids) == r.resumes + 1 and r.prefill_worker_id.startswith("prefill-")
               for r in routes)  # threshold 0: every prompt through a prefill worker
    moved = [r for r in routes if r.resumes]
    assert moved and all(r.decode_worker_ids[0] == victim != r.decode_worker_ids[-1] for r in moved)
    cluster.wait_blocks_free()
    record("kill -9 of a decode worker mid-stream", row)


def test_kill_prefill_worker_with_requests_queued(cluster, expected):
    # The router breaks a tie in the order cluster status lists workers, so on an idle mesh the
    # first request goes to the first prefill worker listed. Frozen, it holds that prefill (and any
    # later one) unanswered until the kill, so the kill always lands on a prefill in flight.
    victim = next(w.worker_id for w in cluster.workers() if w.role == "prefill")
    cluster.kill(victim, signal.SIGSTOP)
    load = Load(cluster).start()
    wait_for_tokens(cluster, "decode")  # later requests run: the first one has been sent to the victim
    cluster.kill(victim)
    row = load.finish(expected)
    assert row["fallbacks"] >= 1  # a decode worker moved a prefill off the dead worker
    cluster.wait_blocks_free()
    record("kill -9 of a prefill worker with requests queued", row)


def test_sigstop_decode_worker_then_it_rejoins(cluster, expected):
    load = Load(cluster).start()
    victim = wait_for_tokens(cluster, "decode")
    cluster.kill(victim, signal.SIGSTOP)
    row = load.finish(expected)
    assert row["resumed"] + row["retried"] >= 1  # its streams went elsewhere
    assert row["slowest_s"] < 30  # keepalive fails a hung worker's streams in ~2 s, not gRPC's 60 s default
    assert scheduler_metric(cluster, 'pdmesh_worker_state_changes_total{state="down"}') >= 1
    woken_at = time.monotonic()
    cluster.kill(victim, signal.SIGCONT)
    cluster.wait_healthy({victim}, timeout_s=30)
    rejoined_s = time.monotonic() - woken_at
    assert scheduler_metric(cluster, 'pdmesh_worker_state_changes_total{state="up"}') >= 1
    cluster.wait_blocks_free()  # the hung worker's abandoned streams are freed once it wakes
    record("SIGSTOP of a decode worker (recovery: SIGCONT to routed again)", row, rejoined_s)


def test_rolling_restart_under_load_loses_nothing(cluster, expected):
    load = Load(cluster, count=None).start()  # sends until finish(), however long the restarts take
    names = {"prefill-a", "prefill-b", "decode-a", "decode-b"}
    restart_s = []
    try:
        for role, name in (("prefill", "prefill-a"), ("decode", "decode-a"), ("prefill", "prefill-b"),
                           ("decode", "decode-b")):
            # The drain has work to finish: a prefill worker has served, a decode worker is streaming.
            cluster.wait_until(lambda: busy(worker(cluster, name)), 30, f"{name} busy")
            drained_at = time.monotonic()
            cluster.kill(name, signal.SIGTERM)  # drain: finish what runs, take nothing new, exit
            assert cluster.procs[name].wait(60) == 0
            cluster.start_worker(role, name, *WORKER_FLAGS)
            cluster.wait_healthy({name})
            restart_s.append(time.monotonic() - drained_at)
        cluster.wait_until(lambda: all(busy(worker(cluster, n)) for n in names), 30, "every new process busy")
    except BaseException:
        load.stop()
        raise
    row = load.finish(expected)
    assert scheduler_metric(cluster, 'pdmesh_worker_state_changes_total{state="down"}') >= 4  # each drained one left
    cluster.wait_blocks_free()
    record("rolling restart (SIGTERM + new process) of all 4 workers (recovery: mean per worker)", row,
           sum(restart_s) / len(restart_s))


def test_drain_rpc_stops_new_work_and_exits(cluster, expected):
    load = Load(cluster).start()
    victim = wait_for_tokens(cluster, "decode")
    address = next(w.address for w in cluster.workers() if w.worker_id == victim)
    with ReflectionClient(address, metadata=cluster_auth.metadata(CLUSTER_SECRET)) as client:
        [response] = list(client.call("pdmesh.v1.DecodeWorker/Drain", {}))
    assert int(response.get("running", 0)) >= 1
    assert cluster.procs[victim].wait(60) == 0
    row = load.finish(expected)
    cluster.wait_blocks_free()
    record("Drain RPC on a busy decode worker", row)


def test_scheduler_restart(cluster, expected):
    load = Load(cluster, count=8).start()
    wait_for_tokens(cluster, "decode")  # streams hold KV blocks on the decode workers when it dies
    cluster.kill("scheduler")
    cluster.procs["scheduler"].wait()
    cut = [r for r in load.wait().values() if isinstance(r, grpc.RpcError)]
    assert cut and all(r.code() == grpc.StatusCode.UNAVAILABLE for r in cut), cut
    with cluster.client(retries=0, timeout_s=5) as c:
        with pytest.raises(grpc.RpcError) as err:
            c.generate(prompt_token_ids=[5, 6], max_tokens=2)
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE  # an answer, not a hang
    started_at = time.monotonic()
    cluster.start_scheduler("--local-prefill-threshold", "0")
    cluster.wait_healthy({"prefill-a", "prefill-b", "decode-a", "decode-b"}, timeout_s=30)  # re-registered
    registered_s = time.monotonic() - started_at
    cluster.wait_blocks_free()  # the streams the old scheduler left were freed
    with cluster.client() as c:
        done = c.generate(prompt_token_ids=prompts(24)[0], max_tokens=NEW_TOKENS, ignore_eos=True)
    assert list(done.token_ids) == expected[0]
    cluster.wait_blocks_free()
    record("kill -9 + restart of the scheduler with streams in flight (recovery: start to all re-registered)",
           {"sent": load.count + 1, "failed": len(cut), "slowest_s": max(load.seconds.values()),
            **chaos_counters(cluster)}, registered_s)


def test_layout_mismatch_is_refused_at_registration(cluster, expected):
    # An echo-engine prefill worker: another engine kind, another KV layout. (A bf16 worker cannot
    # even start on CPUs without avx512_bf16-class support, such as this project's CI machines.)
    cluster.start_worker("prefill", "prefill-echo", "--engine", "echo", *WORKER_FLAGS)
    log = cluster.logs / "prefill-echo.log"
    refusal = cluster.wait_until(lambda: next((line for line in log.read_text().splitlines()
                                                if "refused this worker" in line), None), 60, "a refusal")
    assert "prefill worker prefill-echo cannot pair with decode worker decode-" in refusal
    assert "engine kind differs" in refusal and "engine echo" in refusal and "engine pdmesh" in refusal
    assert "prefill-echo" not in {w.worker_id for w in cluster.workers()}  # never routed to
    with grpc.insecure_channel(cluster.internal_address) as channel:  # a bf16 worker, registering by hand
        with pytest.raises(grpc.RpcError) as err:
            RegistryStub(channel).Register(RegisterRequest(
                worker_id="prefill-x", role="prefill", address="127.0.0.1:1", engine="pdmesh",
                layout=KVLayout(num_layers=4, num_kv_heads=2, head_dim=16, dtype="bfloat16", kv_head_ids=[0, 1])),
                timeout=10, metadata=cluster_auth.metadata(CLUSTER_SECRET))
    assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "prefill worker prefill-x cannot pair with decode worker decode-" in err.value.details()
    assert "KV dtype differs" in err.value.details() and "bfloat16" in err.value.details()
    with cluster.client() as c:  # the mesh serves on, untouched
        done = c.generate(prompt_token_ids=prompts(24)[3], max_tokens=NEW_TOKENS, ignore_eos=True)
    assert list(done.token_ids) == expected[3]
    cluster.wait_blocks_free()
    record("workers with a mismatched engine kind or KV layout (refused at registration)",
           {"sent": 1, "failed": 0, **chaos_counters(cluster)})


def worker(cluster: Cluster, worker_id: str):
    """The worker's entry in cluster status."""
    return next(w for w in cluster.workers() if w.worker_id == worker_id)


def busy(status) -> bool:
    return status.requests_total > 0 and (status.role == "prefill" or status.running > 0)
