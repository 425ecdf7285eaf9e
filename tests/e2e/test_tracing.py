"""Tracing across every hop: with --otlp-endpoint, one request with the client's traceparent yields
one connected trace over the scheduler, the decode worker and the prefill worker (admission, the
KV hand-off and the prefill included), exported over OTLP to a real collector; the traceparent is
honoured and echoed."""

from __future__ import annotations

import json
import os
import time
import urllib.request

import grpc
import pytest

from pdmesh.client import build_request
from support.mesh import start_mesh
from support.otlp_collector import OtlpCollector

TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
HTTP_TRACE_ID = "5cf92f3577b34da6a3ce929d0e0e4737"
CLIENT_SPAN = "00f067aa0ba902b7"


@pytest.fixture
def collector():
    collector = OtlpCollector()
    yield collector
    collector.stop()


def test_one_request_is_one_trace_across_three_processes(tmp_path, collector):
    mesh = start_mesh(tmp_path / "serve.log", "--engine", "echo", "--kv-cache-gib", "0.001", "--max-model-len", "512",
                      "--local-prefill-threshold", "0", "--otlp-endpoint", collector.endpoint, "--no-warmup")
    try:
        with grpc.insecure_channel(mesh.address) as channel:
            call = channel.unary_stream("/pdmesh.v1.Scheduler/Generate",
                                        request_serializer=lambda r: r.SerializeToString())(
                build_request(prompt="trace me through the mesh", max_tokens=4),
                metadata=(("traceparent", f"00-{TRACE_ID}-{CLIENT_SPAN}-01"),), timeout=30)
            chunks = list(call)
            echoed = dict(call.initial_metadata()).get("traceparent", "")
        assert len(chunks) >= 1 and echoed.startswith(f"00-{TRACE_ID}-")  # honoured and echoed
        deadline = time.monotonic() + 20
        wanted = {"pdmesh.v1.Scheduler/Generate", "admission", "pdmesh.v1.DecodeWorker/Generate",
                  "pdmesh.v1.PrefillWorker/Prefill", "kv_handoff", "pdmesh.v1.PrefillWorker/PullKV"}
        while not wanted <= {s.name for s in collector.trace(TRACE_ID)} and time.monotonic() < deadline:
            time.sleep(0.2)
        spans = collector.trace(TRACE_ID)
        http_spans = http_trace(mesh, collector)
    finally:
        assert mesh.stop() == 0
    http_by_name = {s.name: s for s in http_spans}
    http_root = http_by_name["POST /v1/completions"]
    assert http_root.parent_span_id == CLIENT_SPAN and http_root.service == "pdmesh-scheduler"
    assert http_by_name["admission"].parent_span_id == http_root.span_id
    by_name = {s.name: s for s in spans}
    assert wanted <= set(by_name), sorted(by_name)
    assert {s.service for s in spans} == {"pdmesh-scheduler", "pdmesh-decode", "pdmesh-prefill"}
    ids = {s.span_id for s in spans}
    root = by_name["pdmesh.v1.Scheduler/Generate"]
    assert root.parent_span_id == CLIENT_SPAN  # the client's span is its parent
    assert all(s.parent_span_id in ids for s in spans if s is not root)  # one connected tree
    assert by_name["admission"].parent_span_id == root.span_id
    decode = by_name["pdmesh.v1.DecodeWorker/Generate"]
    assert by_name["pdmesh.v1.PrefillWorker/Prefill"].parent_span_id == decode.span_id
    assert by_name["kv_handoff"].attributes["bytes"] > 0


def http_trace(mesh, collector) -> list:
    """One OpenAI HTTP request with a traceparent header: its spans, once the collector has them."""
    request = urllib.request.Request(f"{mesh.http_url}/completions", method="POST",
                                     data=json.dumps({"prompt": "trace me over http", "max_tokens": 2}).encode(),
                                     headers={"Content-Type": "application/json",
                                              "traceparent": f"00-{HTTP_TRACE_ID}-{CLIENT_SPAN}-01"})
    urllib.request.urlopen(request, timeout=30).read()
    wanted = {"POST /v1/completions", "admission", "pdmesh.v1.DecodeWorker/Generate"}
    deadline = time.monotonic() + 20
    while not wanted <= {s.name for s in collector.trace(HTTP_TRACE_ID)} and time.monotonic() < deadline:
        time.sleep(0.2)
    return collector.trace(HTTP_TRACE_ID)


def test_tracing_off_exports_nothing_and_echoes_nothing(tmp_path, collector):
    mesh = start_mesh(tmp_path / "serve.log", "--engine", "echo", "--kv-cache-gib", "0.001", "--max-model-len", "512",
                      "--no-warmup")
    try:
        with grpc.insecure_channel(mesh.address) as channel:
            call = channel.unary_stream("/pdmesh.v1.Scheduler/Generate",
                                        request_serializer=lambda r: r.SerializeToString())(
                build_request(prompt="no tracing", max_tokens=2),
                metadata=(("traceparent", f"00-{TRACE_ID}-{CLIENT_SPAN}-01"),), timeout=30)
            list(call)
            assert "traceparent" not in dict(call.initial_metadata())
    finally:
        assert mesh.stop() == 0
    assert collector.spans == [] and not os.environ.get("OTEL_SDK_DISABLED")
