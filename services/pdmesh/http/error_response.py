"""pdmesh errors as OpenAI-style error bodies with the matching HTTP status, in one table.

    {"error": {"message": "prompt has 9,214 tokens; max-model-len is 8,192", "type": "invalid_request_error",
               "param": "prompt", "code": "invalid_request"}}

429 (queue full, rate limited) and 503 (no worker can serve) carry `Retry-After` in whole seconds
(and `retry_after_s` in the body, unrounded); 401 carries `WWW-Authenticate: Bearer`.
"""

from __future__ import annotations

import json
import math

from aiohttp import web

from pdmesh import errors
from pdmesh.rpc.errors import error_reason



class BodyTooLargeError(errors.InvalidRequestError):
    """A request body over --max-request-bytes (413; gRPC says RESOURCE_EXHAUSTED for the same)."""


# Looked up along the exception's MRO, like the gRPC table in pdmesh.rpc.errors.
HTTP_STATUS: dict[type[errors.PdmeshError], tuple[int, str]] = {
    BodyTooLargeError: (413, "invalid_request_error"),
    errors.InvalidRequestError: (400, "invalid_request_error"),
    errors.NotFoundError: (404, "invalid_request_error"),
    errors.UnauthenticatedError: (401, "authentication_error"),
    errors.PermissionDeniedError: (403, "permission_error"),
    errors.ResourceExhaustedError: (429, "rate_limit_error"),
    errors.DeadlineError: (504, "timeout_error"),
    errors.UnavailableError: (503, "service_unavailable_error"),
    errors.FailedPreconditionError: (400, "invalid_request_error"),
    errors.PdmeshError: (500, "server_error"),
}
UNEXPECTED = (500, "server_error")


def status_of(exc: BaseException) -> tuple[int, str]:
    """(HTTP status, OpenAI error type) of an exception; anything not a PdmeshError is a 500."""
    for cls in type(exc).__mro__:
        if cls in HTTP_STATUS:
            return HTTP_STATUS[cls]
    return UNEXPECTED


def error_body(exc: BaseException, param: str | None = None) -> dict:
    """The OpenAI error object; `param` overrides the field the error names."""
    status, kind = status_of(exc)
    if isinstance(exc, errors.PdmeshError):
        message, code = str(exc), error_reason(exc).lower()
    else:  # a bug: say nothing of the internals (the handler logs the traceback)
        message, code = f"internal error ({type(exc).__name__})", "unexpected"
    error = {"message": message, "type": kind, "param": param or getattr(exc, "field", None) or None, "code": code}
    retry_after_s = getattr(exc, "retry_after_s", None)
    if retry_after_s is not None and status in (429, 503):
        error["retry_after_s"] = round(retry_after_s, 3)
    return {"error": error}


def error_response(exc: BaseException, param: str | None = None) -> web.Response:
    status, _ = status_of(exc)
    headers = {}
    retry_after_s = getattr(exc, "retry_after_s", None)
    if retry_after_s is not None and status in (429, 503):
        headers["Retry-After"] = str(max(1, math.ceil(retry_after_s)))
    if status == 401:
        headers["WWW-Authenticate"] = "Bearer"
    return web.Response(status=status, text=json.dumps(error_body(exc, param)), content_type="application/json",
                        headers=headers)
