"""A scheduler without workers is up but NOT_SERVING, and says why a request cannot run."""

from __future__ import annotations

import signal
import subprocess
import sys
import time

import grpc
import pytest

from pdmesh.client import PdmeshClient
from pdmesh.rpc.reflection_client import ReflectionClient
from support.mesh import free_port


@pytest.fixture
def lone_scheduler(tmp_path):
    port = free_port()
    log = open(tmp_path / "scheduler.log", "w")
    process = subprocess.Popen([sys.executable, "-m", "pdmesh.cli", "scheduler", "--port", str(port)],
                               stdout=log, stderr=subprocess.STDOUT)
    address = f"127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while "serving" not in (tmp_path / "scheduler.log").read_text():
        assert process.poll() is None and time.monotonic() < deadline, (tmp_path / "scheduler.log").read_text()
        time.sleep(0.2)
    yield address
    process.send_signal(signal.SIGTERM)
    assert process.wait(30) == 0


def test_not_serving_without_workers(lone_scheduler):
    with ReflectionClient(lone_scheduler) as client:
        assert client.health() == "NOT_SERVING"
        assert client.health("pdmesh.v1.Registry") == "SERVING"  # workers may still join
    with PdmeshClient(lone_scheduler, retries=0) as client:
        with pytest.raises(grpc.RpcError) as err:
            client.generate(prompt="hello", max_tokens=2)
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE
        assert "no healthy decode worker" in err.value.details()
        assert client.cluster_status().workers == []
