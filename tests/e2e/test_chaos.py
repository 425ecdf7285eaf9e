"""Chaos under load: kill -9, SIGSTOP, drain, rolling restarts, a scheduler restart and a KV layout
mismatch, on a mesh of separate processes (2 prefill, 2 decode workers) with a tiny random Llama.
What must hold: zero failed requests, greedy output identical to an undisturbed run, zero KV blocks
held on live workers once idle, and the scheduler SERVING throughout."""

from __future__ import annotations

import re
import signal
import threading
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import grpc
import pytest

from pdmesh.engine.checkpoint import load_checkpoint
from pdmesh.engine.engine_config import EngineConfig
from pdmesh.engine.llm_engine import LLMEngine
from pdmesh.engine.sampling_params import SamplingParams
from pdmesh.engine.sequence import EngineRequest
from pdmesh.rpc.reflection_client import ReflectionClient
from support.cluster import Cluster, write_tiny_model

NEW_TOKENS = 160
WORKER_FLAGS = ("--kv-timeout", "3", "--held-kv-ttl", "3", "--prefill-timeout", "5")


def prompts(n: int) -> list[list[int]]:
    return [[100 + (i * 37 + j * 11) % 30000 for j in range(20 + 13 * (i % 7))] for i in range(n)]


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory, smollm2_path):
    return write_tiny_model(tmp_path_factory.mktemp("tiny_model"), smollm2_path)


@pytest.fixture(scope="module")
def expected(tiny_model):
    """Greedy tokens of each prompt from the engine alone: what every chaos run must reproduce."""
    checkpoint = load_checkpoint(tiny_model, log=lambda _: None)
    engine = LLMEngine(checkpoint.config, checkpoint.weights, EngineConfig(kv_cache_gib=0.05))
    out: dict[int, list[int]] = {}
    for i, p in enumerate(prompts(24)):
        engine.add_request(EngineRequest(str(i), p, SamplingParams(max_tokens=NEW_TOKENS, ignore_eos=True)))
    while engine.has_work():
        for o in engine.step():
            out.setdefault(int(o.request_id), []).extend(o.token_ids)
    return out


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


class Load:
    """Requests from 8 client threads; records every outcome; watches scheduler health."""

    def __init__(self, cluster: Cluster, count: int = 24):
        self.cluster = cluster
        self.count = count
        self.results: dict[int, list[int] | grpc.RpcError] = {}
        self.not_serving: list[str] = []
        self._stop = threading.Event()
        self._pool = ThreadPoolExecutor(8)
        self._watch = threading.Thread(target=self._watch_health, daemon=True)

    def start(self) -> "Load":
        self._watch.start()
        self.futures = [self._pool.submit(self._one, i) for i in range(self.count)]
        return self

    def _one(self, i: int) -> None:
        with self.cluster.client(timeout_s=120, retries=0) as c:
            try:
                done = c.generate(prompt_token_ids=prompts(24)[i], max_tokens=NEW_TOKENS, ignore_eos=True)
                self.results[i] = list(done.token_ids)
            except grpc.RpcError as exc:
                self.results[i] = exc

    def _watch_health(self) -> None:
        with ReflectionClient(self.cluster.address) as client:
            while not self._stop.is_set():
                try:
                    status = client.health(timeout_s=5)
                except grpc.RpcError as exc:
                    status = exc.code().name
                if status != "SERVING":
                    self.not_serving.append(status)
                time.sleep(0.1)

    def finish(self, expected: dict[int, list[int]]) -> None:
        for f in self.futures:
            f.result(timeout=180)
        self._stop.set()
        self._watch.join()
        failed = {i: r for i, r in self.results.items() if isinstance(r, grpc.RpcError)}
        print(f"\nchaos: sent {self.count}, failed {len(failed)}, resumed "
              f"{scheduler_metric(self.cluster, 'pdmesh_resumed_streams_total'):.0f}, retried "
              f"{scheduler_metric(self.cluster, 'pdmesh_request_retries_total'):.0f}, detection "
              f"{detection(self.cluster)}")
        assert not failed, {i: (r.code().name, r.details()) for i, r in failed.items()}
        assert {i: expected[i] for i in self.results} == self.results  # token-exact after any recovery
        assert not self.not_serving, self.not_serving


def wait_for_tokens(cluster: Cluster, role: str) -> str:
    """A worker of `role` that is running sequences right now (by heartbeat)."""
    return cluster.wait_until(lambda: next((w.worker_id for w in cluster.workers()
                                            if w.role == role and w.running > 0), None), 30, f"busy {role}")


def scheduler_metric(cluster: Cluster, name: str) -> float:
    log = (cluster.logs / "scheduler.log").read_text()
    port = re.search(r"\(metrics :(\d+)\)", log).group(1)
    body = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics").read().decode()
    return sum(float(line.split()[-1]) for line in body.splitlines() if line.startswith(name))


def detection(cluster: Cluster) -> str:
    count = scheduler_metric(cluster, "pdmesh_worker_failure_detection_seconds_count")
    total = scheduler_metric(cluster, "pdmesh_worker_failure_detection_seconds_sum")
    return f"{total / count:.2f}s mean over {count:.0f}" if count else "none"


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
    load = Load(cluster, count=8).start()
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


def test_layout_mismatch_is_refused_and_requests_fall_back(cluster, expected):
    cluster.start_worker("prefill", "prefill-bf16", "--dtype", "bfloat16", *WORKER_FLAGS)
    cluster.wait_healthy({"prefill-bf16"})
    cluster.kill("prefill-a", signal.SIGTERM)
    cluster.kill("prefill-b", signal.SIGTERM)  # only the mismatched prefill worker is left
    cluster.wait_until(lambda: {w.worker_id for w in cluster.workers() if w.role == "prefill" and w.healthy}
                       == {"prefill-bf16"}, 30)
    address = next(w.address for w in cluster.workers() if w.worker_id == "prefill-bf16")
    with ReflectionClient(address) as client:
        with pytest.raises(grpc.RpcError) as err:
            list(client.call("pdmesh.v1.PrefillWorker/Prefill", {
                "request_id": "x", "prompt_token_ids": [5, 6], "sampling": {"max_tokens": 1},
                "layout": {"num_layers": 4, "num_kv_heads": 2, "head_dim": 16, "dtype": "float32",
                           "kv_head_ids": [0, 1]}}))
    assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "dtype is bfloat16 on the sender, float32 here" in err.value.details()
    with cluster.client() as c:  # the decode worker prefills locally instead
        done = c.generate(prompt_token_ids=prompts(24)[3], max_tokens=NEW_TOKENS, ignore_eos=True)
    assert list(done.token_ids) == expected[3]
    cluster.wait_blocks_free()
