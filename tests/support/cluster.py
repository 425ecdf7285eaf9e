"""A mesh started service by service (not through `pdmesh serve`), so tests can kill, stop,
drain and restart single processes. Uses a tiny random-weight Llama with SmolLM2's tokenizer
so that chaos tests run fast and still check token-exact output."""

from __future__ import annotations

import itertools
import os
import re
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import grpc

from pdmesh.client import PdmeshClient
from pdmesh.rpc.reflection_client import ReflectionClient
from support.mesh import free_port


def write_tiny_model(folder: Path, smollm2_path: Path) -> Path:
    """An HF folder: random 4-layer Llama (hidden 64) over SmolLM2's 49,152-token vocabulary."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from pdmesh.engine.checkpoint import load_checkpoint

    torch.manual_seed(7)
    # At the default init std (0.02) greedy decoding repeats one token for the whole output, so a
    # resume that is one token off would still match. At 0.2 the 24 chaos prompts give 151-159
    # distinct tokens of 160 and no token more than twice in a row; the smallest top-2 logit gap
    # along those outputs is 3e-4, far above float32 noise, so batching and TP keep them exact.
    config = LlamaConfig(vocab_size=49152, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096,
                         tie_word_embeddings=True, bos_token_id=1, eos_token_id=2, initializer_range=0.2)
    LlamaForCausalLM(config).save_pretrained(folder)
    load_checkpoint(smollm2_path, log=lambda _: None).tokenizer.save(folder)
    return folder


CLUSTER_SECRET = "chaos-cluster-secret"  # every service of a Cluster shares it (PDMESH_CLUSTER_SECRET)


@dataclass
class Cluster:
    model: Path
    logs: Path
    scheduler_port: int = field(default_factory=free_port)
    internal_port: int = field(default_factory=free_port)
    procs: dict[str, subprocess.Popen] = field(default_factory=dict)

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.scheduler_port}"

    @property
    def internal_address(self) -> str:
        return f"127.0.0.1:{self.internal_port}"

    def _spawn(self, name: str, *args: str, env: dict[str, str] | None = None) -> subprocess.Popen:
        log = open(self.logs / f"{name}.log", "a")
        env = {**os.environ, "PDMESH_CLUSTER_SECRET": CLUSTER_SECRET, **(env or {})}
        proc = subprocess.Popen([sys.executable, "-m", "pdmesh.cli", *args], stdout=log, stderr=subprocess.STDOUT,
                                env=env)
        self.procs[name] = proc
        return proc

    def start_scheduler(self, *flags: str) -> None:
        self._spawn("scheduler", "scheduler", "--port", str(self.scheduler_port), "--internal-port",
                    str(self.internal_port), "--model", str(self.model), *flags)

    def start_worker(self, role: str, name: str, *flags: str, env: dict[str, str] | None = None) -> None:
        self._spawn(name, role, "--scheduler", self.internal_address, "--worker-id", name, "--model", str(self.model),
                    "--kv-cache-gib", "0.05", "--threads", "1", *flags, env=env)

    def client(self, **kwargs) -> PdmeshClient:
        return PdmeshClient(self.address, **kwargs)

    def workers(self):
        with self.client(retries=5) as c:
            return list(c.cluster_status().workers)

    def wait_until(self, predicate, timeout_s: float = 60.0, what: str = "condition"):
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            try:
                value = predicate()
                if value:
                    return value
            except Exception:  # the scheduler may be restarting
                pass
            time.sleep(0.1)
        raise TimeoutError(f"{what} not reached in {timeout_s}s")

    def wait_healthy(self, names: set[str], timeout_s: float = 60.0) -> None:
        self.wait_until(lambda: names <= {w.worker_id for w in self.workers() if w.healthy}, timeout_s,
                        f"workers {sorted(names)} healthy")

    def wait_blocks_free(self, timeout_s: float = 30.0) -> list:
        def idle():
            live = [w for w in self.workers() if w.healthy]
            return live if all(w.kv_blocks_free == w.kv_blocks_total and w.running == 0 for w in live) else None
        return self.wait_until(idle, timeout_s, "all KV blocks free")

    def kill(self, name: str, sig: int = signal.SIGKILL) -> None:
        os.kill(self.procs[name].pid, sig)

    def stop_all(self) -> None:
        for proc in self.procs.values():
            if proc.poll() is None:
                try:
                    os.kill(proc.pid, signal.SIGCONT)
                except ProcessLookupError:
                    pass
                proc.terminate()
        for proc in self.procs.values():
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


NEW_TOKENS = 160
WORKER_FLAGS = ("--kv-timeout", "3", "--held-kv-ttl", "3", "--prefill-timeout", "5")


def prompts(n: int) -> list[list[int]]:
    return [[100 + (i * 37 + j * 11) % 30000 for j in range(20 + 13 * (i % 7))] for i in range(n)]


class Load:
    """Requests from 8 client threads, the 24 prompts in turn; records every outcome; watches
    scheduler health. count: how many to send; None: keep sending until wait() or finish(), for a
    disruption that must have requests in flight however long it takes."""

    def __init__(self, cluster: Cluster, count: int | None = 24):
        self.cluster = cluster
        self.count = count
        self.results: dict[int, list[int] | grpc.RpcError] = {}
        self.seconds: dict[int, float] = {}  # each request's latency: what a disruption cost a client
        self.routes: dict[int, object] = {}  # request -> its answer's Route
        self.not_serving: list[str] = []
        self._prompts = prompts(24)
        self._next = itertools.count()  # shared by the threads: next() on it is atomic under the GIL
        self._stop_sending = threading.Event()
        self._stop = threading.Event()
        self._pool = ThreadPoolExecutor(8)
        self._watch = threading.Thread(target=self._watch_health, daemon=True)

    def start(self) -> "Load":
        self._watch.start()
        self.futures = [self._pool.submit(self._send) for _ in range(8)]
        return self

    def _send(self) -> None:
        while not self._stop_sending.is_set():
            i = next(self._next)
            if self.count is not None and i >= self.count:
                return
            self._one(i)

    def _one(self, i: int) -> None:
        started = time.monotonic()
        with self.cluster.client(timeout_s=120, retries=0) as c:
            try:
                done = c.generate(prompt_token_ids=self._prompts[i % len(self._prompts)], max_tokens=NEW_TOKENS,
                                  ignore_eos=True)
                self.results[i] = list(done.token_ids)
                self.routes[i] = done.route
            except grpc.RpcError as exc:
                self.results[i] = exc
        self.seconds[i] = time.monotonic() - started

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

    def stop(self) -> None:
        """Stop sending and watching, without waiting or checking: a failed test must not leave an
        endless load running (it went on sending into the torn-down cluster and filled the memory)."""
        self._stop_sending.set()
        self._stop.set()
        self._pool.shutdown(wait=False, cancel_futures=True)

    def wait(self) -> dict[int, list[int] | grpc.RpcError]:
        """Every request's outcome, once all are done (an endless load stops sending first); no checks."""
        if self.count is None:
            self._stop_sending.set()
        for f in self.futures:
            f.result(timeout=180)
        self._stop.set()
        self._watch.join()
        return self.results

    def finish(self, expected: dict[int, list[int]]) -> dict:
        """Checks that nothing failed and every output is token-exact; returns the counts of what
        the disruption set off (a row of the chaos table)."""
        self.wait()
        failed = {i: r for i, r in self.results.items() if isinstance(r, grpc.RpcError)}
        row = {"sent": len(self.results), "failed": len(failed), "slowest_s": max(self.seconds.values()),
               **chaos_counters(self.cluster)}
        print(f"\nchaos: {row}")
        assert not failed, {i: (r.code().name, r.details()) for i, r in failed.items()}
        # token-exact after any recovery
        assert {i: expected[i % len(self._prompts)] for i in self.results} == self.results
        assert not self.not_serving, self.not_serving
        return row


def wait_for_tokens(cluster: Cluster, role: str) -> str:
    """A worker of `role` that is running sequences right now (by heartbeat)."""
    return cluster.wait_until(lambda: next((w.worker_id for w in cluster.workers()
                                            if w.role == role and w.running > 0), None), 30, f"busy {role}")


def scheduler_metric(cluster: Cluster, name: str) -> float:
    log = (cluster.logs / "scheduler.log").read_text()
    port = re.findall(r"metrics :(\d+)\)", log)[-1]  # the log is appended to: the last start is the live one
    return read_metric(f"{cluster.address.rsplit(':', 1)[0]}:{port}", name)  # metrics share the gRPC host


def worker_metric(cluster: Cluster, role: str, name: str) -> float:
    """A metric summed over the healthy workers of `role` (a killed worker's counters die with it)."""
    return sum(read_metric(w.metrics_address, name) for w in cluster.workers() if w.role == role and w.healthy)


def read_metric(address: str, name: str) -> float:
    """The sum of a metric's samples; `name` may pin labels, as in 'x_total{state="down"}'."""
    body = urllib.request.urlopen(f"http://{address}/metrics", timeout=5).read().decode()
    keys_values = (line.rsplit(" ", 1) for line in body.splitlines() if not line.startswith("#"))
    return sum(float(v) for k, v in keys_values if k == name or k.startswith(name + "{"))


def chaos_counters(cluster: Cluster) -> dict:
    """What a disruption set off: streams resumed and requests retried by the scheduler, prefills
    the live decode workers moved elsewhere, and the scheduler's mean failure detection time."""
    return {"resumed": scheduler_metric(cluster, "pdmesh_resumed_streams_total"),
            "retried": scheduler_metric(cluster, "pdmesh_request_retries_total"),
            "fallbacks": worker_metric(cluster, "decode", "pdmesh_prefill_fallbacks_total"),
            "detection_s": detection_s(cluster)}


def detection_s(cluster: Cluster) -> float | None:
    count = scheduler_metric(cluster, "pdmesh_worker_failure_detection_seconds_count")
    total = scheduler_metric(cluster, "pdmesh_worker_failure_detection_seconds_sum")
    return total / count if count else None
