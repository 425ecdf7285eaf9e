"""The observability stack end to end: a real Prometheus server, with deploy/prometheus's own
config and rules, scrapes an echo mesh (`pdmesh serve --engine echo`) and `pdmesh exporter` under
load; every query of the Grafana dashboard returns data and every alert rule evaluates."""

from __future__ import annotations

import json
import math
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import grpc
import pytest
import yaml

from pdmesh.client import PdmeshClient
from support.deploy_files import DEPLOY
from support.mesh import free_port, start_mesh
from support.prometheus_server import local_config, start_prometheus

ECHO_BLOCK_BYTES = 1 * 2 * 16 * 1 * 1 * 4  # the echo model's KV block: 1 layer, k/v, 16 tokens, 1 head, dim 1, fp32
KV_BLOCKS = 24  # about 8 requests of 16 + 16 tokens at once: 10 senders keep a queue
SENDERS, LOAD_LIMIT_S = 10, 240
DASHBOARD = json.loads((DEPLOY / "grafana" / "pdmesh.json").read_text())


class Load:
    """SENDERS threads sending short requests (and now and then one over the max_tokens cap, so
    rejections have a reason) until stopped, for at most LOAD_LIMIT_S."""

    def __init__(self, address: str):
        self.address, self.stop_event, self.sent = address, threading.Event(), 0
        self.pool = ThreadPoolExecutor(SENDERS)
        self.deadline = time.monotonic() + LOAD_LIMIT_S

    def start(self) -> None:
        for i in range(SENDERS):
            self.pool.submit(self._send, i)

    def _send(self, sender: int) -> None:
        with PdmeshClient(self.address, timeout_s=20, retries=0) as client:
            while not self.stop_event.is_set() and time.monotonic() < self.deadline:
                over_cap = sender == 0 and self.sent % 10 == 0
                try:
                    client.generate(prompt=f"request {self.sent} from {sender}: " + "hello " * 8,
                                    max_tokens=10_000 if over_cap else 16)
                except grpc.RpcError:
                    pass  # refusals are part of the load
                self.sent += 1

    def stop(self) -> None:
        self.stop_event.set()
        self.pool.shutdown(wait=True)


@pytest.fixture(scope="module")
def stack(tmp_path_factory, smollm2_path):
    folder = tmp_path_factory.mktemp("observe")
    scheduler_metrics, exporter_port = free_port(), free_port()
    mesh = start_mesh(folder / "serve.log", "--engine", "echo", "--echo-step-ms", "10",
                      "--local-prefill-threshold", "0", "--max-model-len", "256",
                      "--kv-cache-gib", str(KV_BLOCKS * ECHO_BLOCK_BYTES / 2**30), "--metrics-port", str(scheduler_metrics))
    exporter = subprocess.Popen([sys.executable, "-m", "pdmesh.cli", "exporter", "--scheduler", mesh.address,
                                 "--port", str(exporter_port), "--scrape-interval", "1", "--window", "30"],
                                stdout=open(folder / "exporter.log", "w"), stderr=subprocess.STDOUT)
    prometheus = start_prometheus(folder, local_config(f"127.0.0.1:{scheduler_metrics}", f"127.0.0.1:{exporter_port}"))
    load = Load(mesh.address)
    load.start()
    yield prometheus
    load.stop()
    assert prometheus.stop() == 0
    exporter.send_signal(signal.SIGTERM)
    assert exporter.wait(15) == 0, (folder / "exporter.log").read_text()
    assert mesh.stop() == 0
    assert not mesh.leftovers()


def wait_for(check, timeout_s: float = 90.0, interval_s: float = 1.0):
    """Call `check` until it returns a falsy list of problems; returns the last problems."""
    deadline = time.monotonic() + timeout_s
    while True:
        problems = check()
        if not problems or time.monotonic() > deadline:
            return problems
        time.sleep(interval_s)


def test_prometheus_scrapes_the_scheduler_the_exporter_and_every_worker(stack):
    def down():
        targets = stack.api("targets")["activeTargets"]
        jobs = sorted(t["labels"]["job"] for t in targets if t["health"] == "up")
        return [] if jobs == ["pdmesh-exporter", "pdmesh-scheduler", "pdmesh-workers", "pdmesh-workers"] else [
            f"up: {jobs}"]
    assert not wait_for(down)
    roles = {t["labels"].get("role") for t in stack.api("targets")["activeTargets"]}
    assert roles == {"scheduler", "prefill", "decode", None}


def test_every_dashboard_query_returns_data(stack):
    queries = {(panel["title"], t["legendFormat"]): t["expr"].replace("$__rate_interval", "30s")
               for panel in DASHBOARD["panels"] for t in panel["targets"]}

    def without_data():
        return [key for key, promql in queries.items()
                if not any(math.isfinite(float(r["value"][1])) for r in stack.query(promql))]
    assert not wait_for(without_data), "dashboard queries without data"


def test_every_alert_rule_evaluates_and_none_fires(stack):
    wanted = {r.get("alert") or r["record"] for g in yaml.safe_load((DEPLOY / "prometheus" / "rules.yaml")
                                                                   .read_text())["groups"] for r in g["rules"]}

    def not_ok():
        rules = [r for g in stack.api("rules")["groups"] for r in g["rules"]]
        bad = [r["name"] for r in rules if r["health"] != "ok" or r["lastEvaluation"].startswith("0001")]
        return bad or sorted(wanted - {r["name"] for r in rules})
    assert not wait_for(not_ok, timeout_s=30)
    assert [a for a in stack.api("alerts")["alerts"] if a["state"] == "firing"] == []


def test_exporter_series_agree_with_the_mesh(stack):
    def value(promql: str) -> dict[str, float]:
        return {r["metric"].get("role", ""): float(r["value"][1]) for r in stack.query(promql)}
    assert value("pdmesh_cluster_workers_healthy") == {"prefill": 1.0, "decode": 1.0}
    assert value("pdmesh_cluster_up") == {"": 1.0}
    assert value("pdmesh_cluster_prefill_throughput_tokens_per_second")[""] > 0
    assert set(value("pdmesh_cluster_kv_handoff_p95_seconds")) == {"prefill", "decode"}
    assert value('sum(pdmesh_exporter_scrape_errors_total)') == {"": 0.0}
