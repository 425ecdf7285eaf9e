"""Map pdmesh exceptions to gRPC status codes with rich `google.rpc` details, in one place.

Server side, `ErrorInterceptor` wraps every grpc.aio handler (unary and streaming responses): a
`PdmeshError` ends the RPC with its mapped code, its message, and details packed into a
`google.rpc.Status` in the `grpc-status-details-bin` trailer (grpcio-status's format):

| exception              | code                | details                          |
|------------------------|---------------------|----------------------------------|
| InvalidRequestError    | INVALID_ARGUMENT    | BadRequest (field, description)  |
| ResourceExhaustedError | RESOURCE_EXHAUSTED  | RetryInfo (retry_after_s)        |
| NotFoundError          | NOT_FOUND           |                                  |
| UnauthenticatedError   | UNAUTHENTICATED     |                                  |
| PermissionDeniedError  | PERMISSION_DENIED   |                                  |
| DeadlineError          | DEADLINE_EXCEEDED   |                                  |
| UnavailableError       | UNAVAILABLE         | RetryInfo (retry_after_s)        |
| FailedPreconditionError| FAILED_PRECONDITION |                                  |
| any other PdmeshError  | INTERNAL            |                                  |

Every one also carries ErrorInfo(reason=<class name in UPPER_SNAKE without "Error">, domain
"pdmesh"); an InvalidRequestError's ErrorInfo.metadata holds its `field`, `limit` and `value`
(as strings) when the check that raised it knows them. A request body that does not parse as the method's message is INVALID_ARGUMENT (the
deserializer is wrapped, so it never surfaces as UNKNOWN). Any other exception is a bug: its traceback is logged and the client gets INTERNAL with
reason UNEXPECTED and no internals. The server keeps serving either way.

Client side, `rich_details(rpc_error)` decodes those details back into a plain dict.
"""

from __future__ import annotations

import functools
import inspect
import logging
import re
from typing import Any, Awaitable, Callable

import grpc
from google.protobuf import duration_pb2
from google.rpc import error_details_pb2, status_pb2
from grpc_status import rpc_status

from pdmesh import errors

logger = logging.getLogger(__name__)

DOMAIN = "pdmesh"
UNEXPECTED_REASON = "UNEXPECTED"
_DETAILS_KEY = "grpc-status-details-bin"

# Looked up along the exception's MRO, so subclasses inherit their parent's code.
STATUS_CODES: dict[type[errors.PdmeshError], grpc.StatusCode] = {
    errors.InvalidRequestError: grpc.StatusCode.INVALID_ARGUMENT,
    errors.ResourceExhaustedError: grpc.StatusCode.RESOURCE_EXHAUSTED,
    errors.NotFoundError: grpc.StatusCode.NOT_FOUND,
    errors.UnauthenticatedError: grpc.StatusCode.UNAUTHENTICATED,
    errors.PermissionDeniedError: grpc.StatusCode.PERMISSION_DENIED,
    errors.DeadlineError: grpc.StatusCode.DEADLINE_EXCEEDED,
    errors.UnavailableError: grpc.StatusCode.UNAVAILABLE,
    errors.FailedPreconditionError: grpc.StatusCode.FAILED_PRECONDITION,
    errors.PdmeshError: grpc.StatusCode.INTERNAL,
}


def status_code(exc: errors.PdmeshError) -> grpc.StatusCode:
    """The gRPC status code a pdmesh exception maps to."""
    for cls in type(exc).__mro__:
        if cls in STATUS_CODES:
            return STATUS_CODES[cls]
    return grpc.StatusCode.INTERNAL


def error_reason(exc: errors.PdmeshError) -> str:
    """ErrorInfo.reason for an exception: `ResourceExhaustedError` -> `RESOURCE_EXHAUSTED`."""
    return _reason_of(type(exc))


@functools.lru_cache(maxsize=None)
def _reason_of(cls: type) -> str:
    name = cls.__name__.removesuffix("Error") or "PDMESH"
    return re.sub(r"(?<=[a-z0-9])(?=[A-Z])", "_", name).upper()


def to_rpc_status(exc: BaseException) -> status_pb2.Status:
    """The google.rpc.Status (code, message, details) that reports `exc` to a client."""
    if not isinstance(exc, errors.PdmeshError):
        status = _status(grpc.StatusCode.INTERNAL, f"internal error ({type(exc).__name__})")
        _pack(status, error_details_pb2.ErrorInfo(reason=UNEXPECTED_REASON, domain=DOMAIN))
        return status
    status = _status(status_code(exc), str(exc))
    _pack(status, error_details_pb2.ErrorInfo(reason=error_reason(exc), domain=DOMAIN, metadata=_info(exc)))
    if isinstance(exc, errors.InvalidRequestError):
        violation = error_details_pb2.BadRequest.FieldViolation(
            field=exc.field, description=str(exc)
        )
        _pack(status, error_details_pb2.BadRequest(field_violations=[violation]))
    retry_after_s = getattr(exc, "retry_after_s", None)
    if retry_after_s is not None:
        _pack(status, error_details_pb2.RetryInfo(retry_delay=_duration(retry_after_s)))
    return status


def _info(exc: errors.PdmeshError) -> dict[str, str]:
    """ErrorInfo metadata: an invalid request's field, limit and value, when it has them."""
    info = {}
    for name in ("field", "limit", "value"):
        value = getattr(exc, name, None) if isinstance(exc, errors.InvalidRequestError) else None
        if value is not None and value != "":
            info[name] = str(value)
    return info


def _status(code: grpc.StatusCode, message: str) -> status_pb2.Status:
    return status_pb2.Status(code=code.value[0], message=message)


def _pack(status: status_pb2.Status, detail: Any) -> None:
    status.details.add().Pack(detail)


def _duration(seconds: float) -> duration_pb2.Duration:
    duration = duration_pb2.Duration()
    duration.FromNanoseconds(round(max(seconds, 0.0) * 1e9))
    return duration


def _log(exc: BaseException, status, method: str) -> None:
    if status.code == grpc.StatusCode.INTERNAL:
        logger.error("%s failed: %s", method, status.details, exc_info=exc)
    else:  # expected refusals (caps, full queues) can come thousands a second: not at INFO
        logger.debug("%s -> %s: %s", method, status.code.name, status.details)


async def abort_with(context: grpc.aio.ServicerContext, exc: BaseException, method: str) -> None:
    """Log `exc` as it deserves and end the RPC with its rich status (raises AbortError)."""
    status = rpc_status.to_status(to_rpc_status(exc))
    _log(exc, status, method)
    await context.abort(status.code, status.details, status.trailing_metadata)


def end_with(context: grpc.aio.ServicerContext, exc: BaseException, method: str) -> None:
    """Like abort_with, for a streaming handler about to return: sets the status without raising,
    which costs less than abort() when refusals come by the thousand."""
    status = rpc_status.to_status(to_rpc_status(exc))
    _log(exc, status, method)
    context.set_code(status.code)
    context.set_details(status.details)
    context.set_trailing_metadata(status.trailing_metadata)


class ErrorInterceptor(grpc.aio.ServerInterceptor):
    """Turns exceptions raised by async handlers into gRPC statuses; see the module docstring.

    Async (coroutine or async-generator) behaviours are wrapped; sync ones pass through unchanged,
    since grpc.aio runs those in a thread pool and pdmesh services are async throughout.
    """

    def __init__(self):
        self._wrapped: dict[tuple[str, int], tuple[grpc.RpcMethodHandler, grpc.RpcMethodHandler]] = {}

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        """The next handler for this call, its behaviour wrapped by `wrap_handler`."""
        handler = await continuation(handler_call_details)
        if handler is None:
            return None
        key = (handler_call_details.method, id(handler))
        wrapped = self._wrapped.get(key)
        if wrapped is None or wrapped[0] is not handler:
            wrapped = self._wrapped[key] = (handler, wrap_handler(handler, handler_call_details.method))
        return wrapped[1]


def wrap_handler(handler: grpc.RpcMethodHandler, method: str) -> grpc.RpcMethodHandler:
    """A copy of `handler` whose behaviour maps exceptions to statuses."""
    kind = _handler_kind(handler)
    behavior = getattr(handler, kind)
    if inspect.isasyncgenfunction(behavior):
        wrapped = _wrap_async_gen(behavior, method)
    elif inspect.iscoroutinefunction(behavior):
        wrapped = _wrap_coroutine(behavior, method)
    else:
        return handler
    factory = getattr(grpc, f"{kind}_rpc_method_handler")
    return factory(
        wrapped,
        request_deserializer=_tolerant(handler.request_deserializer, method),
        response_serializer=handler.response_serializer,
    )


class _BadBody:
    """What a request that does not parse becomes; the wrapped behaviour refuses it."""

    def __init__(self, error: errors.InvalidRequestError):
        self.error = error


def _tolerant(deserialize: Callable | None, method: str) -> Callable | None:
    if deserialize is None:
        return None

    def parse(data: bytes) -> Any:
        try:
            return deserialize(data)
        except Exception as exc:  # protobuf's DecodeError, or anything a bad body trips
            name = getattr(getattr(deserialize, "__self__", None), "DESCRIPTOR", None)
            what = name.full_name if name is not None else "request"
            return _BadBody(errors.InvalidRequestError(
                f"the body of {method} is not a valid {what} message ({len(data):,} bytes; {type(exc).__name__})",
                "body"))
    return parse


def _check_body(request: Any) -> Any:
    if isinstance(request, _BadBody):
        raise request.error
    return request


def _handler_kind(handler: grpc.RpcMethodHandler) -> str:
    request = "stream" if handler.request_streaming else "unary"
    response = "stream" if handler.response_streaming else "unary"
    return f"{request}_{response}"


def _wrap_coroutine(behavior: Callable, method: str) -> Callable:
    async def handle(request: Any, context: grpc.aio.ServicerContext) -> Any:
        try:
            return await behavior(_check_body(request), context)
        except grpc.aio.AbortError:
            raise
        except Exception as exc:  # every failure becomes a status; the server lives on
            await abort_with(context, exc, method)

    return handle


def _wrap_async_gen(behavior: Callable, method: str) -> Callable:
    async def handle(request: Any, context: grpc.aio.ServicerContext) -> Any:
        try:
            async for response in behavior(_check_body(request), context):
                yield response
        except grpc.aio.AbortError:
            raise
        except Exception as exc:  # every failure becomes a status; the server lives on
            end_with(context, exc, method)

    return handle


def rich_details(rpc_error: grpc.RpcError) -> dict[str, Any]:
    """Decode a failed call's status and google.rpc details into a plain dict.

    Works for sync `grpc.RpcError` and `grpc.aio.AioRpcError`. Keys: `code` (name), `message`,
    and when present `error_info` {reason, domain, metadata}, `field_violations` [{field,
    description}], `retry_delay_s` (float).
    """
    result: dict[str, Any] = {"code": rpc_error.code().name, "message": rpc_error.details() or ""}
    status = _status_from_trailers(rpc_error.trailing_metadata())
    if status is None:
        return result
    for detail in status.details:
        result.update(_decode_detail(detail))
    return result


def _status_from_trailers(metadata: Any) -> status_pb2.Status | None:
    for key, value in metadata or ():
        if key == _DETAILS_KEY:
            return status_pb2.Status.FromString(value)
    return None


def _decode_detail(detail: Any) -> dict[str, Any]:
    if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
        info = _unpack(detail, error_details_pb2.ErrorInfo)
        metadata = dict(info.metadata)
        return {"error_info": {"reason": info.reason, "domain": info.domain, "metadata": metadata}}
    if detail.Is(error_details_pb2.BadRequest.DESCRIPTOR):
        bad = _unpack(detail, error_details_pb2.BadRequest)
        violations = [{"field": v.field, "description": v.description} for v in bad.field_violations]
        return {"field_violations": violations}
    if detail.Is(error_details_pb2.RetryInfo.DESCRIPTOR):
        retry = _unpack(detail, error_details_pb2.RetryInfo)
        return {"retry_delay_s": retry.retry_delay.ToNanoseconds() / 1e9}
    return {}


def _unpack(detail: Any, cls: type) -> Any:
    message = cls()
    detail.Unpack(message)
    return message
