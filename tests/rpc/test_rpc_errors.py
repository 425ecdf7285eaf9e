"""Exception -> gRPC status mapping: pure mapping, then unary and streaming calls on a real server."""

from __future__ import annotations

import logging

import grpc
import pytest
from google.rpc import error_details_pb2

from pdmesh import errors
from pdmesh.rpc.errors import error_reason, rich_details, status_code, to_rpc_status

Code = grpc.StatusCode

# error name -> (code, details expected from rich_details beyond code and message)
EXPECTED = {
    "InvalidRequestError": (Code.INVALID_ARGUMENT, {
        "field_violations": [{
            "field": "max_tokens",
            "description": "max_tokens is 9,000; this model allows at most 4,096",
        }],
    }),
    "ResourceExhaustedError": (Code.RESOURCE_EXHAUSTED, {"retry_delay_s": 2.5}),
    "NotFoundError": (Code.NOT_FOUND, {}),
    "UnauthenticatedError": (Code.UNAUTHENTICATED, {}),
    "DeadlineError": (Code.DEADLINE_EXCEEDED, {}),
    "UnavailableError": (Code.UNAVAILABLE, {"retry_delay_s": 0.25}),
    "EngineError": (Code.INTERNAL, {}),
}
# an invalid request's field, limit and value travel in ErrorInfo.metadata
METADATA = {"InvalidRequestError": {"field": "max_tokens", "limit": "4096", "value": "9000"}}
REASONS = {
    "InvalidRequestError": "INVALID_REQUEST",
    "ResourceExhaustedError": "RESOURCE_EXHAUSTED",
    "NotFoundError": "NOT_FOUND",
    "UnauthenticatedError": "UNAUTHENTICATED",
    "DeadlineError": "DEADLINE",
    "UnavailableError": "UNAVAILABLE",
    "EngineError": "ENGINE",
}


# pure mapping


class ShedError(errors.UnavailableError):
    """A subclass keeps its parent's code."""


def test_subclass_inherits_parent_code():
    assert status_code(ShedError("draining")) == Code.UNAVAILABLE
    assert status_code(errors.CheckpointError("bad file")) == Code.INTERNAL
    assert error_reason(ShedError("draining")) == "SHED"


def test_status_carries_code_message_and_packed_details():
    status = to_rpc_status(errors.ResourceExhaustedError("budget spent", retry_after_s=0.5))
    assert status.code == Code.RESOURCE_EXHAUSTED.value[0]
    assert status.message == "budget spent"
    retry = error_details_pb2.RetryInfo()
    assert status.details[1].Unpack(retry)
    assert retry.retry_delay.ToNanoseconds() == 500_000_000


def test_unexpected_exception_hides_its_message():
    status = to_rpc_status(KeyError("api_key=hunter2"))
    assert status.code == Code.INTERNAL.value[0]
    assert "hunter2" not in status.message
    assert "KeyError" in status.message


# on the wire


def fail(pb, channel, error: str):
    stub = pb.echo_pb2_grpc.EchoStub(channel)
    with pytest.raises(grpc.RpcError) as info:
        stub.Fail(pb.echo_pb2.FailRequest(error=error), timeout=5)
    return info.value


def fail_stream(pb, channel, error: str, after: int):
    stub = pb.echo_pb2_grpc.EchoStub(channel)
    received = []
    with pytest.raises(grpc.RpcError) as info:
        for reply in stub.FailStream(pb.echo_pb2.FailRequest(error=error, after=after), timeout=5):
            received.append(reply.i)
    return info.value, received


def assert_maps(rpc_error: grpc.RpcError, error: str, message: str) -> None:
    code, extra = EXPECTED[error]
    details = rich_details(rpc_error)
    assert rpc_error.code() == code
    assert details["code"] == code.name
    assert details["message"] == message
    assert details["error_info"] == {"reason": REASONS[error], "domain": "pdmesh",
                                     "metadata": METADATA.get(error, {})}
    assert {k: v for k, v in details.items() if k in extra} == extra
    not_expected = {"field_violations", "retry_delay_s"} - set(extra)
    assert not not_expected & set(details)


@pytest.mark.parametrize("error", sorted(EXPECTED))
def test_unary_error_maps_to_status_with_details(pb, channel, raised_errors, error):
    assert_maps(fail(pb, channel, error), error, str(raised_errors[error]()))


@pytest.mark.parametrize("error", sorted(EXPECTED))
def test_streaming_error_after_replies_maps_to_status(pb, channel, raised_errors, error):
    rpc_error, received = fail_stream(pb, channel, error, after=2)
    assert received == [0, 1]
    assert_maps(rpc_error, error, str(raised_errors[error]()))


def test_rich_details_decodes_aio_errors(pb, addr, loop_thread):
    async def fail_with_aio_client() -> grpc.aio.AioRpcError:
        async with grpc.aio.insecure_channel(addr) as channel:
            stub = pb.echo_pb2_grpc.EchoStub(channel)
            try:
                await stub.Fail(pb.echo_pb2.FailRequest(error="ResourceExhaustedError"), timeout=5)
            except grpc.aio.AioRpcError as exc:
                return exc
        raise AssertionError("Fail did not fail")

    details = rich_details(loop_thread.run(fail_with_aio_client()))
    assert details["code"] == "RESOURCE_EXHAUSTED"
    assert details["retry_delay_s"] == 2.5


@pytest.mark.parametrize("stream", [False, True])
def test_unexpected_exception_is_internal_logged_and_server_survives(pb, channel, caplog, stream):
    with caplog.at_level(logging.ERROR, logger="pdmesh.rpc.errors"):
        if stream:
            rpc_error, received = fail_stream(pb, channel, "RuntimeError", after=1)
            assert received == [0]
        else:
            rpc_error = fail(pb, channel, "RuntimeError")
    details = rich_details(rpc_error)
    assert rpc_error.code() == Code.INTERNAL
    assert details["error_info"]["reason"] == "UNEXPECTED"
    assert "secret internal detail" not in details["message"]
    logged = [r for r in caplog.records if r.exc_info]
    assert logged and isinstance(logged[-1].exc_info[1], RuntimeError)
    method = "FailStream" if stream else "Fail"
    assert f"/pdmeshtest.v1.Echo/{method}" in logged[-1].getMessage()
    reply = pb.echo_pb2_grpc.EchoStub(channel).Say(pb.echo_pb2.SayRequest(text="still here"), timeout=5)
    assert reply.text == "still here"


def test_rich_details_without_trailer_gives_code_and_message(channel):
    unknown = channel.unary_unary("/pdmeshtest.v1.Echo/Nope")
    with pytest.raises(grpc.RpcError) as info:
        unknown(b"", timeout=5)
    assert rich_details(info.value) == {"code": "UNIMPLEMENTED", "message": "Method not found!"}
