"""pdmesh.client raises typed errors with the server's details, each against a real scheduler
(the echo mesh of conftest: max-model-len 512, tenants k-free and k-acme at 0.5 requests/s)."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time

import grpc
import pytest

from pdmesh.client import (AsyncPdmeshClient, DeadlineExceededError, InvalidRequestError, NotFoundError,
                           PdmeshClient, PdmeshClientError, PermissionDeniedError, ResourceExhaustedError,
                           RetryLaterError, UnauthenticatedError, UnavailableError)
from support.mesh import free_port

IDS = list(range(100, 110))


def test_too_long_prompt_is_invalid_request_with_field_limit_value(echo_mesh):
    with PdmeshClient(echo_mesh.address, api_key="k-free", retries=0) as client:
        with pytest.raises(InvalidRequestError) as err:
            client.generate(prompt_token_ids=[7] * 600, max_tokens=1)
        assert (err.value.field, err.value.limit, err.value.value) == ("prompt", 511, 600)
        assert "prompt has 600 tokens; max-model-len is 512" in err.value.message
        with pytest.raises(InvalidRequestError) as err:
            client.generate(prompt_token_ids=IDS, max_tokens=10, top_p=1.5)
        assert (err.value.field, err.value.limit, err.value.value) == ("top_p", "(0, 1]", 1.5)
        with pytest.raises(NotFoundError):
            client.generate(prompt="hi", model="gpt-9")
    error = err.value
    assert isinstance(error, PdmeshClientError) and isinstance(error, grpc.RpcError)
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT and error.reason == "INVALID_REQUEST"


def test_async_client_raises_the_same_types(echo_mesh):
    async def scenario():
        async with AsyncPdmeshClient(echo_mesh.address, api_key="k-free", retries=0) as client:
            with pytest.raises(InvalidRequestError) as err:
                await client.generate(prompt_token_ids=IDS, max_tokens=505)
            return err.value
    error = asyncio.run(scenario())
    assert (error.field, error.limit, error.value) == ("max_tokens", 502, 505)


def test_rate_limit_is_resource_exhausted_with_retry_after(echo_mesh):
    with PdmeshClient(echo_mesh.address, api_key="k-acme", retries=0) as client:
        with pytest.raises(ResourceExhaustedError) as err:
            for _ in range(4):  # 0.5 requests/s with a burst of 2
                client.generate(prompt_token_ids=IDS, max_tokens=1)
    assert isinstance(err.value, RetryLaterError) and err.value.retry_after_s > 0
    assert err.value.reason == "RATE_LIMITED"


def test_unknown_key_and_non_admin(echo_mesh):
    with PdmeshClient(echo_mesh.address, api_key="k-nobody", retries=0) as client:
        with pytest.raises(UnauthenticatedError, match="unknown api key"):
            client.generate(prompt="hi", max_tokens=1)
    with PdmeshClient(echo_mesh.address, api_key="k-free", retries=0) as client:
        with pytest.raises(PermissionDeniedError, match="not an admin"):
            client.cluster_status()


def test_deadline(echo_mesh):
    with PdmeshClient(echo_mesh.address, api_key="k-free", retries=0) as client:
        with pytest.raises(DeadlineExceededError):  # 300 steps of 20 ms in 0.5 s
            client.generate(prompt_token_ids=IDS, max_tokens=300, ignore_eos=True, timeout_s=0.5)


@pytest.fixture
def lone_scheduler(tmp_path):
    port = free_port()
    log = tmp_path / "scheduler.log"
    process = subprocess.Popen([sys.executable, "-m", "pdmesh.cli", "scheduler", "--port", str(port),
                                "--internal-port", "0"], stdout=open(log, "w"), stderr=subprocess.STDOUT,
                               env={**os.environ, "PDMESH_CLUSTER_SECRET": "lone-secret"})
    deadline = time.monotonic() + 120
    while "serving" not in log.read_text():
        assert process.poll() is None and time.monotonic() < deadline, log.read_text()
        time.sleep(0.2)
    yield f"127.0.0.1:{port}"
    process.send_signal(signal.SIGTERM)
    assert process.wait(30) == 0


def test_no_worker_is_unavailable_with_retry_after(lone_scheduler):
    with PdmeshClient(lone_scheduler, retries=0) as client:
        with pytest.raises(UnavailableError, match="no healthy decode worker") as err:
            client.generate(prompt="hello", max_tokens=2)
    assert err.value.retry_after_s > 0
    with PdmeshClient(f"127.0.0.1:{free_port()}", retries=0, timeout_s=2) as client:  # nobody listens
        with pytest.raises(UnavailableError) as err:
            client.generate(prompt="hello", max_tokens=2)
    assert err.value.retry_after_s is None
