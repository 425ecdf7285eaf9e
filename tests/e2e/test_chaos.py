"""Chaos under load: kill -9, SIGSTOP, drain, rolling restarts, a scheduler restart and a KV layout
mismatch refused at registration, on a mesh of separate processes (2 prefill, 2 decode workers) with a tiny random Llama.
What must hold: zero failed requests, greedy output identical to an undisturbed run, zero KV blocks
held on live workers once idle, and the scheduler SERVING throughout."""

from __future__ import annotations

import signal
import time

import grpc
import pytest

from pdmesh.gen.pdmesh.v1.registry_pb2 import RegisterRequest
from pdmesh.gen.pdmesh.v1.registry_pb2_grpc import RegistryStub
from pdmesh.gen.pdmesh.v1.worker_pb2 import KVLayout
from pdmesh.rpc.reflection_client import ReflectionClient
from support.cluster import (NEW_TOKENS, WORKER_FLAGS, Cluster, Load, prompts, scheduler_metric,
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
    load.finish(expected)
    assert detected_s < 5
    assert scheduler_metric(cluster, "pdmesh_resumed_streams_total") >= 1
    routes = list(load.routes.values())
    assert all(len(r.decode_worker_ids) == r.resumes + 1 and r.prefill_worker_id.startswith("prefill-")
               for r in routes)  # threshold 0: every prompt through a prefill worker
    moved = [r for r in routes if r.resumes]
    assert moved and all(r.decode_worker_ids[0] == victim != r.decode_worker_ids[-1] for r in moved)
    cluster.wait_blocks_free()


def test_kill_prefill_worker_with_requests_queued(cluster, expected):
    load = Load(cluster).start()
    time.sleep(0.2)  # requests are on their way to both prefill workers
    cluster.kill("prefill-a")
    load.finish(expected)
    cluster.wait_blocks_free()


def test_sigstop_decode_worker_then_it_rejoins(cluster, expected):
    load = Load(cluster).start()
    victim = wait_for_tokens(cluster, "decode")
    cluster.kill(victim, signal.SIGSTOP)
    load.finish(expected)
    cluster.kill(victim, signal.SIGCONT)
    cluster.wait_healthy({victim}, timeout_s=30)
    cluster.wait_blocks_free()  # the hung worker's abandoned streams are freed once it wakes


def test_rolling_restart_under_load_loses_nothing(cluster, expected):
    load = Load(cluster, count=24).start()
    for role, name in (("prefill", "prefill-a"), ("decode", "decode-a"), ("prefill", "prefill-b"),
                       ("decode", "decode-b")):
        cluster.kill(name, signal.SIGTERM)  # drain: finish what runs, take nothing new, exit
        assert cluster.procs[name].wait(60) == 0
        cluster.start_worker(role, name, *WORKER_FLAGS)
        cluster.wait_healthy({name})
    load.finish(expected)
    cluster.wait_blocks_free()


def test_drain_rpc_stops_new_work_and_exits(cluster, expected):
    load = Load(cluster).start()
    victim = wait_for_tokens(cluster, "decode")
    address = next(w.address for w in cluster.workers() if w.worker_id == victim)
    with ReflectionClient(address) as client:
        [response] = list(client.call("pdmesh.v1.DecodeWorker/Drain", {}))
    assert int(response.get("running", 0)) >= 1
    assert cluster.procs[victim].wait(60) == 0
    load.finish(expected)


def test_scheduler_restart(cluster, expected):
    cluster.kill("scheduler")
    cluster.procs["scheduler"].wait()
    with cluster.client(retries=0, timeout_s=5) as c:
        with pytest.raises(grpc.RpcError) as err:
            c.generate(prompt_token_ids=[5, 6], max_tokens=2)
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE  # an answer, not a hang
    cluster.start_scheduler("--local-prefill-threshold", "0")
    cluster.wait_healthy({"prefill-a", "prefill-b", "decode-a", "decode-b"}, timeout_s=30)  # re-registered
    with cluster.client() as c:
        done = c.generate(prompt_token_ids=prompts(24)[0], max_tokens=NEW_TOKENS, ignore_eos=True)
    assert list(done.token_ids) == expected[0]


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
    with grpc.insecure_channel(cluster.address) as channel:  # a bf16 worker, registering by hand
        with pytest.raises(grpc.RpcError) as err:
            RegistryStub(channel).Register(RegisterRequest(
                worker_id="prefill-x", role="prefill", address="127.0.0.1:1", engine="pdmesh",
                layout=KVLayout(num_layers=4, num_kv_heads=2, head_dim=16, dtype="bfloat16", kv_head_ids=[0, 1])),
                timeout=10)
    assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "prefill worker prefill-x cannot pair with decode worker decode-" in err.value.details()
    assert "KV dtype differs" in err.value.details() and "bfloat16" in err.value.details()
    with cluster.client() as c:  # the mesh serves on, untouched
        done = c.generate(prompt_token_ids=prompts(24)[3], max_tokens=NEW_TOKENS, ignore_eos=True)
    assert list(done.token_ids) == expected[3]
    cluster.wait_blocks_free()
