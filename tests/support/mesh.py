"""Start a real mesh (`pdmesh serve`: scheduler + workers as processes) on free 127.0.0.1 ports."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

from pdmesh.client import PdmeshClient
from pdmesh.engine.sampling_params import SamplingParams
from pdmesh.engine.sequence import EngineRequest

# The e2e mesh prefills prompts shorter than this on the decode worker itself.
LOCAL_PREFILL_THRESHOLD = 8


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def descendants(pid: int) -> set[int]:
    """Every living process below `pid` (serve's scheduler, workers and their TP ranks)."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            ppid = int(stat.rsplit(")", 1)[1].split()[1])
            children.setdefault(ppid, []).append(int(entry.name))
    found, todo = set(), [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            if child not in found:
                found.add(child)
                todo.append(child)
    return found


def alive(pids: set[int]) -> set[int]:
    """The pids of `pids` that still run (zombies count as gone)."""
    living = set()
    for pid in pids:
        try:
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if state != "Z":
            living.add(pid)
    return living


@dataclass
class Mesh:
    address: str
    process: subprocess.Popen
    log_path: Path
    children: set[int] = field(default_factory=set)  # serve's descendants when stop() began
    http_port: int = -1  # the OpenAI-compatible API's port (-1: off)
    admin_key: str | None = None  # an admin tenant's key, for cluster status when tenants are on

    @property
    def http_url(self) -> str:
        """Base URL of the OpenAI-compatible API, e.g. http://127.0.0.1:PORT/v1."""
        return f"http://127.0.0.1:{self.http_port}/v1"

    def client(self, **kwargs) -> PdmeshClient:
        return PdmeshClient(self.address, **kwargs)

    def workers(self, role: str | None = None):
        with self.client(api_key=self.admin_key) as c:
            return [w for w in c.cluster_status().workers if role is None or w.role == role]

    def wait_workers(self, predicate, what: str, timeout_s: float = 60.0) -> list:
        """Poll cluster status until predicate(workers) holds; returns the workers."""
        deadline = time.monotonic() + timeout_s
        while True:
            workers = self.workers()
            if predicate(workers):
                return workers
            if time.monotonic() > deadline:
                raise TimeoutError(f"{what} not seen in {timeout_s}s: {workers}")
            time.sleep(0.2)

    def wait_all_blocks_free(self, timeout_s: float = 15.0) -> list:
        """Poll cluster status until every worker is healthy, runs nothing and has all its KV blocks
        free; returns the workers (as last seen, when timeout_s passes first)."""
        deadline = time.monotonic() + timeout_s
        while True:
            workers = self.workers()
            if all(w.healthy and w.kv_blocks_free == w.kv_blocks_total and w.running == 0 for w in workers):
                return workers
            if time.monotonic() > deadline:
                return workers
            time.sleep(0.2)

    def stop(self, timeout_s: float = 60.0) -> int:
        """SIGTERM serve; returns its exit code. `leftovers` then lists children still running."""
        self.children = descendants(self.process.pid)
        self.process.send_signal(signal.SIGTERM)
        return self.process.wait(timeout_s)

    def live_children(self) -> set[int]:
        return alive(descendants(self.process.pid))

    def leftovers(self) -> set[int]:
        return alive(self.children)


def start_mesh(log_path: Path, *flags: str, timeout_s: float = 300.0, env: dict[str, str] | None = None) -> Mesh:
    """The HTTP API gets a free port of its own unless flags set --http-port. env: extra environment
    for serve (and so its children), e.g. {"PDMESH_FAULTS": "kv_corrupt=1"}."""
    port = free_port()
    http_port = int(flags[flags.index("--http-port") + 1]) if "--http-port" in flags else free_port()
    http = [] if "--http-port" in flags else ["--http-port", str(http_port)]
    cmd = [sys.executable, "-m", "pdmesh.cli", "serve", "--port", str(port), "--internal-port", "0", *http, *flags]
    log = open(log_path, "w")
    process = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                               env={**os.environ, **(env or {})})
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            os.killpg(process.pid, signal.SIGKILL)
            raise RuntimeError(f"pdmesh serve exited with {process.returncode}:\n{log_path.read_text()[-3000:]}")
        if "pdmesh is ready" in log_path.read_text():
            return Mesh(f"127.0.0.1:{port}", process, log_path, http_port=http_port)
        time.sleep(0.3)
    os.killpg(process.pid, signal.SIGKILL)  # serve and every process it started
    raise TimeoutError(f"mesh not ready in {timeout_s}s:\n{log_path.read_text()[-3000:]}")


def handoff_bytes(mesh: Mesh) -> float:
    """KV bytes the mesh's decode workers have received over hand-offs (their own metric)."""
    return role_metric(mesh, "decode", "pdmesh_kv_handoff_bytes_total")


def role_metric(mesh: Mesh, role: str, name: str) -> float:
    """A metric summed over every worker of a role (each worker's own /metrics)."""
    total = 0.0
    for w in mesh.workers(role):
        body = urllib.request.urlopen(f"http://{w.metrics_address}/metrics").read().decode()
        total += sum(float(line.split()[-1]) for line in body.splitlines()
                     if line.startswith(name) and line[len(name):len(name) + 1] in ("{", " "))
    return total


def engine_greedy(reference_engine, prompt_ids: list[int], max_tokens: int, ignore_eos: bool = False) -> list[int]:
    engine, _ = reference_engine
    engine.add_request(EngineRequest("ref", prompt_ids, SamplingParams(max_tokens=max_tokens, ignore_eos=ignore_eos)))
    tokens = []
    while engine.has_work():
        for out in engine.step():
            tokens += out.token_ids
    return tokens
