"""The errors `pdmesh.client` raises: one class per gRPC status a caller acts on, all under
`PdmeshClientError`, with the server's `google.rpc` details decoded (`pdmesh.rpc.errors.rich_details`).

| class                  | status                     | what it carries                                 |
|------------------------|----------------------------|-------------------------------------------------|
| InvalidRequestError    | INVALID_ARGUMENT           | field, limit, value (BadRequest, ErrorInfo)     |
| NotFoundError          | NOT_FOUND (unknown model)  |                                                 |
| ResourceExhaustedError | RESOURCE_EXHAUSTED         | retry_after_s (RetryInfo; None when absent)     |
| UnavailableError       | UNAVAILABLE                | retry_after_s                                   |
| UnauthenticatedError   | UNAUTHENTICATED            |                                                 |
| PermissionDeniedError  | PERMISSION_DENIED          |                                                 |
| DeadlineExceededError  | DEADLINE_EXCEEDED          |                                                 |
| PdmeshClientError      | anything else (INTERNAL..) | code, message, reason (ErrorInfo) on every one  |

ResourceExhaustedError and UnavailableError share `RetryLaterError`. Every class is also a
`grpc.RpcError` whose `code()`, `details()` and `trailing_metadata()` are the failed call's, so
code written against raw gRPC errors keeps working.
"""

from __future__ import annotations

from typing import Any

import grpc

from pdmesh.rpc.errors import rich_details


class PdmeshClientError(grpc.RpcError):
    """A pdmesh call failed; `code` (a grpc.StatusCode name), `message`, `reason` (ErrorInfo)."""

    def __init__(self, rpc_error: grpc.RpcError):
        self.rpc_error = rpc_error
        self.rich = rich_details(rpc_error)
        self.code_name: str = self.rich["code"]
        self.message: str = self.rich["message"]
        self.reason: str = self.rich.get("error_info", {}).get("reason", "")
        super().__init__(f"{self.code_name}: {self.message}")

    def code(self) -> grpc.StatusCode:
        return self.rpc_error.code()

    def details(self) -> str:
        return self.rpc_error.details()

    def trailing_metadata(self) -> Any:
        return self.rpc_error.trailing_metadata()


class InvalidRequestError(PdmeshClientError):
    """The request broke a cap or had a bad field: `field`, and `limit` and `value` when the
    server's check knows them (numbers where they are numbers, e.g. limit 8191, value 9214)."""

    def __init__(self, rpc_error: grpc.RpcError):
        super().__init__(rpc_error)
        metadata = self.rich.get("error_info", {}).get("metadata", {})
        violations = self.rich.get("field_violations") or [{}]
        self.field: str = metadata.get("field") or violations[0].get("field", "")
        self.limit = _number(metadata.get("limit"))
        self.value = _number(metadata.get("value"))


class NotFoundError(PdmeshClientError):
    """The named model is not served there."""


class RetryLaterError(PdmeshClientError):
    """No room or no worker now; `retry_after_s` is the server's hint (None if it gave none)."""

    def __init__(self, rpc_error: grpc.RpcError):
        super().__init__(rpc_error)
        self.retry_after_s: float | None = self.rich.get("retry_delay_s")


class ResourceExhaustedError(RetryLaterError):
    """The queue is full, a rate limit hit, or the request was displaced by a higher priority."""


class UnavailableError(RetryLaterError):
    """No worker can serve (or the scheduler is unreachable or shutting down)."""


class UnauthenticatedError(PdmeshClientError):
    """No API key, or one the scheduler does not know."""


class PermissionDeniedError(PdmeshClientError):
    """A known key that may not make this call (cluster status needs an admin tenant)."""


class DeadlineExceededError(PdmeshClientError):
    """The call's deadline (timeout_s) passed, in the queue or mid-stream."""


BY_CODE: dict[grpc.StatusCode, type[PdmeshClientError]] = {
    grpc.StatusCode.INVALID_ARGUMENT: InvalidRequestError,
    grpc.StatusCode.NOT_FOUND: NotFoundError,
    grpc.StatusCode.RESOURCE_EXHAUSTED: ResourceExhaustedError,
    grpc.StatusCode.UNAVAILABLE: UnavailableError,
    grpc.StatusCode.UNAUTHENTICATED: UnauthenticatedError,
    grpc.StatusCode.PERMISSION_DENIED: PermissionDeniedError,
    grpc.StatusCode.DEADLINE_EXCEEDED: DeadlineExceededError,
}


def typed(rpc_error: grpc.RpcError) -> PdmeshClientError:
    """The typed error for a failed call (already typed ones pass through)."""
    if isinstance(rpc_error, PdmeshClientError):
        return rpc_error
    return BY_CODE.get(rpc_error.code(), PdmeshClientError)(rpc_error)


def _number(text: str | None) -> int | float | str | None:
    if text is None:
        return None
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text
