"""Fixtures for rpc tests: a throwaway test proto generated at test time, and a real grpc.aio server
(uvloop, in a background thread) serving it on 127.0.0.1 with a free port."""

from __future__ import annotations

import asyncio
import importlib
import importlib.util
import sys
import threading
from pathlib import Path
from types import ModuleType, SimpleNamespace
from typing import Any, Coroutine

import grpc
import pytest
import uvloop

from pdmesh import errors
from pdmesh.rpc.server import RpcServer, ServiceSpec, build_server

REPO_ROOT = Path(__file__).resolve().parents[2]
TEST_PACKAGE = "rpc_testgen"

COMMON_PROTO = """syntax = "proto3";
package pdmeshtest.v1;

message Usage {
  int32 prompt_tokens = 1;
  int32 completion_tokens = 2;
}
"""

ECHO_PROTO = """syntax = "proto3";
package pdmeshtest.v1;

import "pdmeshtest/v1/common.proto";

message SayRequest { string text = 1; }
message SayReply { string text = 1; }
message CountRequest { int32 n = 1; }
message CountReply { int32 i = 1; }
// error: the exception's class name; after: stream this many replies first.
message FailRequest { string error = 1; int32 after = 2; }

service Echo {
  rpc Say(SayRequest) returns (SayReply);
  rpc Count(CountRequest) returns (stream CountReply);
  rpc Fail(FailRequest) returns (SayReply);
  rpc FailStream(FailRequest) returns (stream CountReply);
}

message GenerateRequest {
  enum Priority {
    PRIORITY_UNSPECIFIED = 0;
    PRIORITY_HIGH = 1;
  }
  string prompt = 1;
  int32 max_tokens = 2;
  optional float temperature = 3;
  repeated string stop = 4;
  map<string, string> labels = 5;
  oneof seed_choice {
    uint64 seed = 6;
    bool random_seed = 7;
  }
  Priority priority = 8;
}
message GenerateChunk {
  string text = 1;
  repeated int32 token_ids = 2;
  string finish_reason = 3;
  Usage usage = 4;
}
message GetClusterStatusRequest {}
message ClusterStatus { repeated string worker_ids = 1; }

// A stand-in for pdmesh.v1.Scheduler, for the debug CLI.
service Scheduler {
  rpc Generate(GenerateRequest) returns (stream GenerateChunk);
  rpc GetClusterStatus(GetClusterStatusRequest) returns (ClusterStatus);
}
"""

# What Fail / FailStream raise, by name.
ERRORS = {
    "InvalidRequestError": lambda: errors.InvalidRequestError(
        "max_tokens is 9,000; this model allows at most 4,096", field="max_tokens", limit=4096, value=9000
    ),
    "ResourceExhaustedError": lambda: errors.ResourceExhaustedError(
        "queue holds 64 of 64 requests", retry_after_s=2.5
    ),
    "NotFoundError": lambda: errors.NotFoundError("no model named 'gpt-9'"),
    "UnauthenticatedError": lambda: errors.UnauthenticatedError("no bearer token"),
    "DeadlineError": lambda: errors.DeadlineError("KV transfer took over 5 s"),
    "UnavailableError": lambda: errors.UnavailableError("no healthy decode worker", 0.25),
    "EngineError": lambda: errors.EngineError("forward pass failed"),
    "RuntimeError": lambda: RuntimeError("secret internal detail"),
}


def load_tool(name: str) -> ModuleType:
    """Import tools/<name>.py (tools/ is not a package)."""
    spec = importlib.util.spec_from_file_location(f"tools_{name}", REPO_ROOT / "tools" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="session")
def raised_errors() -> dict:
    """What the test servicer's Fail methods raise, by name."""
    return ERRORS


@pytest.fixture(scope="session")
def gen_protos() -> ModuleType:
    """tools/gen_protos.py as a module."""
    return load_tool("gen_protos")


@pytest.fixture(scope="session")
def cli() -> ModuleType:
    """tools/pdmesh_debug.py as a module."""
    return load_tool("pdmesh_debug")


@pytest.fixture(scope="session")
def test_protos(tmp_path_factory) -> Path:
    """A proto root holding the throwaway test protos."""
    root = tmp_path_factory.mktemp("protos")
    (root / "pdmeshtest" / "v1").mkdir(parents=True)
    (root / "pdmeshtest" / "v1" / "common.proto").write_text(COMMON_PROTO)
    (root / "pdmeshtest" / "v1" / "echo.proto").write_text(ECHO_PROTO)
    return root


@pytest.fixture(scope="session")
def pb(gen_protos, test_protos, tmp_path_factory) -> SimpleNamespace:
    """The generated test modules, imported as rpc_testgen.pdmeshtest.v1.*."""
    out = tmp_path_factory.mktemp("gen")
    gen_protos.generate(test_protos, out / TEST_PACKAGE, TEST_PACKAGE)
    sys.path.insert(0, str(out))
    prefix = f"{TEST_PACKAGE}.pdmeshtest.v1"
    names = ("echo_pb2", "echo_pb2_grpc", "common_pb2")
    return SimpleNamespace(**{n: importlib.import_module(f"{prefix}.{n}") for n in names})


def make_servicers(pb: SimpleNamespace) -> list[ServiceSpec]:
    """Echo and a fake Scheduler, as async servicers (async generators for streams)."""
    echo_pb2, echo_grpc = pb.echo_pb2, pb.echo_pb2_grpc

    class Echo:
        async def Say(self, request, context):
            return echo_pb2.SayReply(text=request.text)

        async def Count(self, request, context):
            for i in range(request.n):
                yield echo_pb2.CountReply(i=i)

        async def Fail(self, request, context):
            raise ERRORS[request.error]()

        async def FailStream(self, request, context):
            for i in range(request.after):
                yield echo_pb2.CountReply(i=i)
            raise ERRORS[request.error]()

    class Scheduler:
        async def Generate(self, request, context):
            deltas = request.prompt.upper()[: request.max_tokens]
            for delta in deltas[:-1]:
                yield echo_pb2.GenerateChunk(text=delta, token_ids=[ord(delta)])
            usage = pb.common_pb2.Usage(prompt_tokens=len(request.prompt), completion_tokens=len(deltas))
            yield echo_pb2.GenerateChunk(text=deltas[-1:], finish_reason="length", usage=usage)

        async def GetClusterStatus(self, request, context):
            return echo_pb2.ClusterStatus(worker_ids=["prefill-0", "decode-0"])

    return [
        ServiceSpec(echo_grpc.add_EchoServicer_to_server, Echo(), "pdmeshtest.v1.Echo"),
        ServiceSpec(echo_grpc.add_SchedulerServicer_to_server, Scheduler(), "pdmeshtest.v1.Scheduler"),
    ]


class LoopThread:
    """A uvloop event loop running in a daemon thread; `run` executes a coroutine on it."""

    def __init__(self) -> None:
        self.loop = uvloop.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()

    def run(self, coro: Coroutine[Any, Any, Any], timeout: float = 30.0) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def submit(self, coro: Coroutine[Any, Any, Any]) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop)

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)


@pytest.fixture(scope="session")
def loop_thread():
    thread = LoopThread()
    yield thread
    thread.close()


@pytest.fixture(scope="session")
def start_server(loop_thread, pb):
    """Factory: build (with build_server's keyword arguments) and start a fresh server on a free
    port; servers left running are stopped at session end."""
    started: list[RpcServer] = []

    def start(**kwargs: Any) -> RpcServer:
        async def build_and_start() -> RpcServer:
            server = build_server(make_servicers(pb), port=0, **kwargs)
            await server.start()
            return server

        server = loop_thread.run(build_and_start())
        started.append(server)
        return server

    yield start
    for server in started:
        loop_thread.run(server.server.stop(None))


@pytest.fixture(scope="session")
def server(start_server) -> RpcServer:
    """One shared server for tests that do not stop it."""
    return start_server()


@pytest.fixture(scope="session")
def addr(server) -> str:
    return f"127.0.0.1:{server.port}"


@pytest.fixture
def channel(addr):
    with grpc.insecure_channel(addr) as channel:
        yield channel
