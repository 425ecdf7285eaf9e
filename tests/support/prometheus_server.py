"""A real Prometheus server (Debian's `prometheus` binary) on 127.0.0.1, for e2e tests: the
project's own deploy/prometheus config with its targets pointed at a local mesh."""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import time
import urllib.parse
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import yaml

from support.deploy_files import DEPLOY
from support.mesh import free_port


@dataclass
class Prometheus:
    url: str
    process: subprocess.Popen
    log_path: Path

    def api(self, path: str, **params: str) -> dict:
        query = f"?{urllib.parse.urlencode(params)}" if params else ""
        with urllib.request.urlopen(f"{self.url}/api/v1/{path}{query}", timeout=10) as response:
            body = json.loads(response.read())
        assert body["status"] == "success", body
        return body["data"]

    def query(self, promql: str) -> list[dict]:
        return self.api("query", query=promql)["result"]

    def stop(self) -> int:
        self.process.send_signal(signal.SIGTERM)
        return self.process.wait(30)


def local_config(scheduler_metrics: str, exporter: str, interval_s: int = 1) -> dict:
    """deploy/prometheus/prometheus.yml with the compose host names replaced by local addresses."""
    config = yaml.safe_load((DEPLOY / "prometheus" / "prometheus.yml").read_text())
    config["global"].update(scrape_interval=f"{interval_s}s", evaluation_interval=f"{interval_s}s")
    config["rule_files"] = [str(DEPLOY / "prometheus" / name) for name in config["rule_files"]]
    jobs = {job["job_name"]: job for job in config["scrape_configs"]}
    jobs["pdmesh-scheduler"]["static_configs"][0]["targets"] = [scheduler_metrics]
    jobs["pdmesh-exporter"]["static_configs"][0]["targets"] = [exporter]
    jobs["pdmesh-workers"]["http_sd_configs"][0].update(url=f"http://{exporter}/targets",
                                                        refresh_interval=f"{interval_s}s")
    return config


def start_prometheus(folder: Path, config: dict, timeout_s: float = 60.0) -> Prometheus:
    binary = shutil.which("prometheus")
    assert binary, "prometheus is not installed (tools/run_tests.sh installs it)"
    (folder / "prometheus.yml").write_text(yaml.safe_dump(config))
    port = free_port()
    log_path = folder / "prometheus.log"
    process = subprocess.Popen(
        [binary, f"--config.file={folder / 'prometheus.yml'}", f"--storage.tsdb.path={folder / 'data'}",
         f"--web.listen-address=127.0.0.1:{port}", "--log.level=warn"],
        stdout=open(log_path, "w"), stderr=subprocess.STDOUT, start_new_session=True)
    server = Prometheus(f"http://127.0.0.1:{port}", process, log_path)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        assert process.poll() is None, f"prometheus exited:\n{log_path.read_text()[-3000:]}"
        try:
            with urllib.request.urlopen(f"{server.url}/-/ready", timeout=2) as response:
                if response.status == 200:
                    return server
        except OSError:
            time.sleep(0.3)
    server.stop()
    raise TimeoutError(f"prometheus not ready in {timeout_s}s:\n{log_path.read_text()[-3000:]}")
