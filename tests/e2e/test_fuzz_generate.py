"""Property-based fuzz of Generate on the echo mesh: whatever the fields, never INTERNAL or UNKNOWN,
no service down, every KV block free afterwards."""

from __future__ import annotations

import grpc
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pdmesh.client import PdmeshClient, build_request
from pdmesh.rpc.reflection_client import ReflectionClient

INT64 = st.integers(-(2**63), 2**63 - 1)
TEXT = st.text(alphabet=st.characters(blacklist_categories=("Cs",)), max_size=300)  # protobuf needs valid UTF-8
ALLOWED = {grpc.StatusCode.OK, grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND,
           grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.DEADLINE_EXCEEDED}

messages = st.lists(st.fixed_dictionaries({
    "role": st.one_of(st.sampled_from(["system", "user", "assistant", "", "tool"]), TEXT),
    "content": TEXT}), max_size=40)
requests = st.fixed_dictionaries({}, optional={
    "prompt": st.one_of(TEXT, st.text(max_size=20000)),
    "messages": messages,
    "prompt_token_ids": st.one_of(st.lists(INT64, max_size=50), st.lists(st.integers(0, 49151), max_size=3000)),
    "model": st.one_of(st.just(""), TEXT),
    "max_tokens": st.one_of(INT64, st.integers(1, 12)),
    "temperature": st.floats(allow_nan=True, allow_infinity=True),
    "top_p": st.floats(allow_nan=True, allow_infinity=True),
    "top_k": INT64,
    "seed": INT64,
    "stop": st.lists(TEXT, max_size=24),
    "ignore_eos": st.booleans(),
    "priority": st.integers(-(2**31), 2**31 - 1),
    "request_id": TEXT,
})


@settings(max_examples=150, deadline=None, suppress_health_check=list(HealthCheck))
@given(fields=requests)
def test_generate_never_fails_internally(echo_mesh, fields):
    with PdmeshClient(echo_mesh.address, api_key="k-free", retries=0) as client:
        request = build_request(**fields)
        try:
            for _ in client.stub.Generate(request, timeout=5, metadata=client.metadata):
                pass
            code = grpc.StatusCode.OK
        except grpc.RpcError as exc:
            code = exc.code()
            assert code in ALLOWED, (code, exc.details(), fields)
            assert exc.details(), "an error must say why"


def test_mesh_is_whole_after_the_fuzz(echo_mesh):
    workers = echo_mesh.wait_all_blocks_free(timeout_s=30)
    assert len(workers) == 2 and all(w.healthy for w in workers)
    assert all(w.kv_blocks_free == w.kv_blocks_total for w in workers), workers
    with ReflectionClient(echo_mesh.address) as client:
        assert client.health() == "SERVING"
