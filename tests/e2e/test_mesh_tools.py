"""What grpcurl users and operators touch: reflection-only calls, health everywhere, the debug CLI."""

from __future__ import annotations

import importlib.util
import json
import urllib.request
from pathlib import Path

import pytest

from pdmesh.rpc.reflection_client import ReflectionClient

ROOT = Path(__file__).resolve().parents[2]


def load_debug_cli():
    spec = importlib.util.spec_from_file_location("pdmesh_debug", ROOT / "tools" / "pdmesh_debug.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_generate_from_server_reflection_alone(mesh):
    """No generated stubs: the descriptors come from the server, as grpcurl does it."""
    with ReflectionClient(mesh.address) as client:
        assert "pdmesh.v1.Scheduler" in client.list_services()
        responses = list(client.call("pdmesh.v1.Scheduler/Generate", json.dumps(
            {"messages": [{"role": "user", "content": "What is the capital of France?"}], "maxTokens": 32})))
    text = "".join(r.get("text", "") for r in responses)
    assert "Paris" in text
    assert responses[-1]["finish_reason"] == "stop"
    assert int(responses[-1]["usage"]["completion_tokens"]) == sum(len(r.get("token_ids", [])) for r in responses)


def test_every_port_answers_health_and_reflection(mesh):
    expected = {"prefill": "pdmesh.v1.PrefillWorker", "decode": "pdmesh.v1.DecodeWorker"}
    addresses = [(mesh.address, "pdmesh.v1.Scheduler")] + [(w.address, expected[w.role]) for w in mesh.workers()]
    assert len(addresses) == 4
    for address, service in addresses:
        with ReflectionClient(address) as client:
            services = client.list_services()
            assert service in services and "grpc.health.v1.Health" in services
            assert client.health() == "SERVING"
            assert client.health(service) == "SERVING"
            assert "rpc " in client.describe(service)


def test_every_service_serves_prometheus_metrics(mesh):
    with urllib.request.urlopen(f"http://{mesh.workers('decode')[0].metrics_address}/metrics") as r:
        body = r.read().decode()
    for name in ("pdmesh_kv_blocks_free", "pdmesh_kv_blocks_total", "pdmesh_kv_handoff_bytes_total",
                 "pdmesh_kv_handoff_seconds_bucket", "pdmesh_requests_running"):
        assert name in body


@pytest.mark.parametrize("argv,needle", [
    (["list"], "pdmesh.v1.Scheduler"),
    (["describe", "pdmesh.v1.Scheduler"], "rpc Generate"),
    (["health"], "SERVING"),
    (["status"], "kv_blocks_total"),
    (["generate", "The capital of France is", "--max-tokens", "4"], ""),
    (["call", "pdmesh.v1.Scheduler/ListModels", "{}"], "max_model_len"),
])
def test_debug_cli_subcommands(mesh, capsys, argv, needle):
    cli = load_debug_cli()
    assert cli.main(["--addr", mesh.address, "--builtin", *argv]) == 0
    out = capsys.readouterr().out
    assert needle in out
    if argv[0] == "generate":
        assert len(out.strip()) > 0
