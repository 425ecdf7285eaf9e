"""A scheduler without workers is up but NOT_SERVING, and says why a request cannot run."""

from __future__ import annotations

import os
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
    port, internal = free_port(), free_port()
    log = open(tmp_path / "scheduler.log", "w")
    process = subprocess.Popen([sys.executable, "-m", "pdmesh.cli", "scheduler", "--port", str(port),
                                "--internal-port", str(internal)], stdout=log, stderr=subprocess.STDOUT,
                               env={**os.environ, "PDMESH_CLUSTER_SECRET": "lone-secret"})
    address = f"127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while "serving" not in (tmp_path / "scheduler.log").read_text():
        assert process.poll() is None and time.monotonic() < deadline, (tmp_path / "scheduler.log").read_text()
        time.sleep(0.2)
    yield address, f"127.0.0.1:{internal}"
    process.send_signal(signal.SIGTERM)
    assert process.wait(30) == 0


def test_not_serving_without_workers(lone_scheduler):
    client_address, internal_address = lone_scheduler
    with ReflectionClient(client_address) as client:
        assert client.health() == "NOT_SERVING"
        assert "pdmesh.v1.Registry" not in client.list_services()  # membership is not on the client port
    with ReflectionClient(internal_address) as client:
        assert client.health("pdmesh.v1.Registry") == "SERVING"  # workers may still join
    with PdmeshClient(client_address, retries=0) as client:
        with pytest.raises(grpc.RpcError) as err:
            client.generate(prompt="hello", max_tokens=2)
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE
        assert "no healthy decode worker" in err.value.details()
        assert client.cluster_status().workers == []
