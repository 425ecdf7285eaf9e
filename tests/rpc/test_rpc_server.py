"""build_server: health, reflection, free ports and graceful stop, against a real grpc.aio server."""

from __future__ import annotations

import asyncio
import signal
import subprocess
import sys

import grpc
import pytest
import uvloop
from grpc_health.v1 import health_pb2, health_pb2_grpc

from pdmesh import errors
from pdmesh.rpc.errors import rich_details
from pdmesh.rpc.reflection_client import ReflectionClient
from pdmesh.rpc.server import build_server, install_uvloop, service_name

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


def check(channel: grpc.Channel, service: str = "") -> int:
    stub = health_pb2_grpc.HealthStub(channel)
    return stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=5).status


def test_port_zero_binds_a_free_port(server):
    assert server.port > 0
    assert server.address == f"127.0.0.1:{server.port}"


@pytest.mark.parametrize("service", ["", "pdmeshtest.v1.Echo", "pdmeshtest.v1.Scheduler"])
def test_health_reports_serving(channel, service):
    assert check(channel, service) == SERVING


def test_health_of_unknown_service_is_not_found(channel):
    with pytest.raises(grpc.RpcError) as info:
        check(channel, "pdmeshtest.v1.Nope")
    assert info.value.code() == grpc.StatusCode.NOT_FOUND


def test_reflection_lists_services_health_and_reflection(addr):
    with ReflectionClient(addr) as client:
        assert client.list_services() == [
            "grpc.health.v1.Health",
            "grpc.reflection.v1alpha.ServerReflection",
            "pdmeshtest.v1.Echo",
            "pdmeshtest.v1.Scheduler",
        ]


def test_service_name_reads_generated_descriptor(pb):
    assert service_name(pb.echo_pb2, "Scheduler") == "pdmeshtest.v1.Scheduler"


def test_set_serving_flips_one_service(start_server, loop_thread):
    server = start_server()
    with grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        loop_thread.run(server.set_serving(False, "pdmeshtest.v1.Echo"))
        assert check(channel, "pdmeshtest.v1.Echo") == NOT_SERVING
        assert check(channel, "") == SERVING
    loop_thread.run(server.stop(grace=None))


def test_stop_flips_health_to_not_serving_then_refuses_calls(start_server, loop_thread):
    server = start_server()
    with grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        watch = health_pb2_grpc.HealthStub(channel).Watch(
            health_pb2.HealthCheckRequest(service="pdmeshtest.v1.Echo"), timeout=10
        )
        assert next(watch).status == SERVING
        stopping = loop_thread.submit(server.stop(grace=0.5, drain_s=1.0))
        assert next(watch).status == NOT_SERVING  # watchers hear it before the port closes
        assert check(channel, "") == NOT_SERVING  # still answering during the drain
        assert check(channel, "pdmeshtest.v1.Scheduler") == NOT_SERVING
        stopping.result(10)
        loop_thread.run(server.set_serving(True))  # ignored after shutdown began
        assert server.health._server_status[""] == NOT_SERVING
        with pytest.raises(grpc.RpcError) as info:
            check(channel, "")
        assert info.value.code() == grpc.StatusCode.UNAVAILABLE


def test_bind_failure_names_the_address(server, loop_thread):
    async def bind_taken_port():
        build_server([], port=server.port)

    with pytest.raises(OSError, match=f"127.0.0.1:{server.port}"):
        loop_thread.run(bind_taken_port())


class RequireToken(grpc.aio.ServerInterceptor):
    """An auth-like interceptor whose handler raises; the outer error interceptor maps it."""

    async def intercept_service(self, continuation, details):
        metadata = dict(details.invocation_metadata or ())
        if details.method.startswith("/pdmeshtest.") and "authorization" not in metadata:
            async def deny(request, context):
                raise errors.UnauthenticatedError("no bearer token")

            return grpc.unary_unary_rpc_method_handler(deny)
        return await continuation(details)


def test_extra_interceptors_run_inside_error_mapping(start_server, loop_thread, pb):
    server = start_server(interceptors=[RequireToken()])
    with grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        stub = pb.echo_pb2_grpc.EchoStub(channel)
        with pytest.raises(grpc.RpcError) as info:
            stub.Say(pb.echo_pb2.SayRequest(text="x"), timeout=5)
        assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
        assert rich_details(info.value)["error_info"]["reason"] == "UNAUTHENTICATED"
        reply = stub.Say(pb.echo_pb2.SayRequest(text="x"), metadata=[("authorization", "t")])
        assert reply.text == "x"
        assert check(channel) == SERVING  # health is not behind the token
    loop_thread.run(server.stop(grace=None))


SERVE_SCRIPT = """
import asyncio
from pdmesh.rpc.server import build_server, run, serve

async def main():
    server = build_server([], port=0)
    print(server.port, flush=True)
    await serve(server, grace_s=1)
    return type(asyncio.get_running_loop()).__module__

print(run(main()), flush=True)
"""


def test_serve_runs_on_uvloop_until_sigterm():
    proc = subprocess.Popen([sys.executable, "-c", SERVE_SCRIPT], stdout=subprocess.PIPE, text=True)
    try:
        port = int(proc.stdout.readline())
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            grpc.channel_ready_future(channel).result(timeout=10)
            assert check(channel) == SERVING
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=10)
    finally:
        proc.kill()
    assert proc.returncode == 0
    assert out.strip().startswith("uvloop")


def test_install_uvloop_sets_the_policy():
    previous = asyncio.get_event_loop_policy()
    try:
        install_uvloop()
        loop = asyncio.new_event_loop()
        assert isinstance(loop, uvloop.Loop)
        loop.close()
    finally:
        asyncio.set_event_loop_policy(previous)
