"""ReflectionClient: describe and call a real server knowing nothing but its reflection service."""

from __future__ import annotations

import grpc
import pytest

from pdmesh.errors import InvalidRequestError, NotFoundError
from pdmesh.rpc.errors import rich_details
from pdmesh.rpc.reflection_client import ReflectionClient

GENERATE_REQUEST = """pdmeshtest.v1.GenerateRequest is a message:
message GenerateRequest {
  string prompt = 1;
  int32 max_tokens = 2;
  optional float temperature = 3;
  repeated string stop = 4;
  map<string, string> labels = 5;
  pdmeshtest.v1.GenerateRequest.Priority priority = 8;
  oneof seed_choice {
    uint64 seed = 6;
    bool random_seed = 7;
  }
  enum Priority {
    PRIORITY_UNSPECIFIED = 0;
    PRIORITY_HIGH = 1;
  }
}"""


@pytest.fixture
def client(addr):
    with ReflectionClient(addr) as client:
        yield client


def test_unary_call_with_json_text(client):
    assert client.call_unary("pdmeshtest.v1.Echo/Say", '{"text": "hi"}') == {"text": "hi"}


def test_unary_call_accepts_dot_method_and_camel_case(client):
    reply = client.call_unary("pdmeshtest.v1.Scheduler.GetClusterStatus", {})
    assert reply == {"worker_ids": ["prefill-0", "decode-0"]}


def test_streaming_call_yields_each_response(client):
    chunks = list(client.call("pdmeshtest.v1.Scheduler/Generate", '{"prompt": "abc", "maxTokens": 5}'))
    assert [c["text"] for c in chunks] == ["A", "B", "C"]
    assert chunks[0]["token_ids"] == [65]
    assert chunks[-1]["finish_reason"] == "length"
    assert chunks[-1]["usage"] == {"prompt_tokens": 3, "completion_tokens": 3}


def test_streaming_call_of_count(client):
    assert [r.get("i", 0) for r in client.call("pdmeshtest.v1.Echo/Count", {"n": 3})] == [0, 1, 2]


def test_describe_service(client):
    assert client.describe("pdmeshtest.v1.Scheduler") == (
        "pdmeshtest.v1.Scheduler is a service:\n"
        "service Scheduler {\n"
        "  rpc Generate(pdmeshtest.v1.GenerateRequest) returns (stream pdmeshtest.v1.GenerateChunk);\n"
        "  rpc GetClusterStatus(pdmeshtest.v1.GetClusterStatusRequest) returns (pdmeshtest.v1.ClusterStatus);\n"
        "}"
    )


def test_describe_message_shows_labels_maps_oneofs_and_nested_enums(client):
    assert client.describe("pdmeshtest.v1.GenerateRequest") == GENERATE_REQUEST


def test_describe_method_and_enum(client):
    assert client.describe("pdmeshtest.v1.Echo/Say").endswith(
        "rpc Say(pdmeshtest.v1.SayRequest) returns (pdmeshtest.v1.SayReply);"
    )
    assert "PRIORITY_HIGH = 1;" in client.describe("pdmeshtest.v1.GenerateRequest.Priority")


def test_unknown_symbol_is_not_found(client):
    with pytest.raises(NotFoundError, match="pdmeshtest.v1.Missing"):
        client.describe("pdmeshtest.v1.Missing")
    with pytest.raises(NotFoundError, match="not a method"):
        client.call("pdmeshtest.v1.SayRequest", {})


def test_bad_json_is_invalid_request(client):
    with pytest.raises(InvalidRequestError, match="SayRequest") as info:
        client.call("pdmeshtest.v1.Echo/Say", '{"txt": "typo"}')
    assert info.value.field == "request"
    with pytest.raises(InvalidRequestError):
        client.call("pdmeshtest.v1.Echo/Say", "{not json")


def test_failed_call_raises_rpc_error_with_details(client):
    with pytest.raises(grpc.RpcError) as info:
        client.call_unary("pdmeshtest.v1.Echo/Fail", {"error": "InvalidRequestError"})
    assert rich_details(info.value)["field_violations"][0]["field"] == "max_tokens"


def test_health(client):
    assert client.health() == "SERVING"
    assert client.health("pdmeshtest.v1.Echo") == "SERVING"
