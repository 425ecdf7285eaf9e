"""A mesh started service by service (not through `pdmesh serve`), so tests can kill, stop,
drain and restart single processes. Uses a tiny random-weight Llama with SmolLM2's tokenizer
so that chaos tests run fast and still check token-exact output."""

from __future__ import annotations

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
    config = LlamaConfig(vocab_size=49152, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096,
                         tie_word_embeddings=True, bos_token_id=1, eos_token_id=2)
    LlamaForCausalLM(config).save_pretrained(folder)
    load_checkpoint(smollm2_path, log=lambda _: None).tokenizer.save(folder)
    return folder


@dataclass
class Cluster:
    model: Path
    logs: Path
    scheduler_port: int = field(default_factory=free_port)
    procs: dict[str, subprocess.Popen] = field(default_factory=dict)

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.scheduler_port}"

    def _spawn(self, name: str, *args: str, env: dict[str, str] | None = None) -> subprocess.Popen:
        log = open(self.logs / f"{name}.log", "a")
        proc = subprocess.Popen([sys.executable, "-m", "pdmesh.cli", *args], stdout=log, stderr=subprocess.STDOUT,
                                env={**os.environ, **(env or {})})
        self.procs[name] = proc
        return proc

    def start_scheduler(self, *flags: str) -> None:
        self._spawn("scheduler", "scheduler", "--port", str(self.scheduler_port), "--model", str(self.model), *flags)

    def start_worker(self, role: str, name: str, *flags: str, env: dict[str, str] | None = None) -> None:
        self._spawn(name, role, "--scheduler", self.address, "--worker-id", name, "--model", str(self.model),
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
    """Requests from 8 client threads; records every outcome; watches scheduler health."""

    def __init__(self, cluster: Cluster, count: int = 24):
        self.cluster = cluster
        self.count = count
        self.results: dict[int, list[int] | grpc.RpcError] = {}
        self.routes: dict[int, object] = {}  # request -> its answer's Route
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
                self.routes[i] = done.route
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
