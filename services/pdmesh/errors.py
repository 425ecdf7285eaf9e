"""One exception hierarchy for pdmesh; the rpc layer maps each class to a gRPC status code."""


class PdmeshError(Exception):
    """Base class of every error pdmesh raises on purpose."""


class CheckpointError(PdmeshError):
    """A model file is missing, corrupt or of an unsupported kind."""


class InvalidRequestError(PdmeshError):
    """A request breaks a cap or carries a bad field (gRPC INVALID_ARGUMENT). limit and value,
    when the check has them, travel to clients as well as the message (ErrorInfo metadata)."""

    def __init__(self, message: str, field: str = "", limit: object = None, value: object = None):
        super().__init__(message)
        self.field = field
        self.limit = limit
        self.value = value


class ResourceExhaustedError(PdmeshError):
    """No room now: queue, budget or KV blocks (gRPC RESOURCE_EXHAUSTED)."""

    def __init__(self, message: str, retry_after_s: float = 1.0):
        super().__init__(message)
        self.retry_after_s = retry_after_s


class EngineError(PdmeshError):
    """The engine failed while running a request (gRPC INTERNAL)."""


class NotFoundError(PdmeshError):
    """A named thing (model, request, worker) does not exist (gRPC NOT_FOUND)."""


class UnauthenticatedError(PdmeshError):
    """The caller sent no credentials or bad ones (gRPC UNAUTHENTICATED)."""


class DeadlineError(PdmeshError):
    """A deadline passed before the work finished (gRPC DEADLINE_EXCEEDED)."""


class PermissionDeniedError(PdmeshError):
    """The caller is known but may not do this (gRPC PERMISSION_DENIED)."""


class UnavailableError(PdmeshError):
    """A needed worker or peer is down or draining; retry later (gRPC UNAVAILABLE)."""

    def __init__(self, message: str, retry_after_s: float = 1.0):
        super().__init__(message)
        self.retry_after_s = retry_after_s


class FailedPreconditionError(PdmeshError):
    """The system is not in a state the call needs, e.g. peers with different KV layouts
    (gRPC FAILED_PRECONDITION)."""
