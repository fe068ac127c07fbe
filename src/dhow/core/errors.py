"""The error tree every layer raises, with transport-neutral codes.

    DhowError                 (INTERNAL)
    ├── InvalidInput          (INVALID_ARGUMENT) bad request: shape, datatype, framing
    ├── NotFound              (NOT_FOUND)        unknown model or version
    ├── Unavailable           (UNAVAILABLE)      model not ready, server shutting down
    ├── Overloaded            (RESOURCE_EXHAUSTED) queue full; retry later
    ├── DeadlineExceeded      (DEADLINE_EXCEEDED) request timed out before compute
    ├── Unsupported           (UNIMPLEMENTED)    feature or runtime not available
    ├── Forbidden             (PERMISSION_DENIED)
    ├── Unauthenticated       (UNAUTHENTICATED)
    ├── Conflict              (ABORTED)          an edit based on a stale revision
    ├── ModelLoadError        (UNAVAILABLE)      an artifact or manifest failed to load
    ├── ModelFault            (INTERNAL)         the model raised while computing
    ├── SignatureMismatch     (INTERNAL)         the model answered outside its declared outputs
    └── InternalError         (INTERNAL)         any other exception: the message holds only an error id

    CallCancelled             (not a DhowError)  the client went away; nobody is left to answer

The doors map ``ErrorCode`` to HTTP statuses and gRPC codes at the edge; the message of a
``DhowError`` is written for the client. Any other exception is internal: the client sees
only a generic message and an id that is in the server log.
"""

from __future__ import annotations

import enum


class ErrorCode(enum.Enum):
    INVALID_ARGUMENT = "INVALID_ARGUMENT"
    NOT_FOUND = "NOT_FOUND"
    UNAVAILABLE = "UNAVAILABLE"
    RESOURCE_EXHAUSTED = "RESOURCE_EXHAUSTED"
    DEADLINE_EXCEEDED = "DEADLINE_EXCEEDED"
    UNIMPLEMENTED = "UNIMPLEMENTED"
    PERMISSION_DENIED = "PERMISSION_DENIED"
    UNAUTHENTICATED = "UNAUTHENTICATED"
    ABORTED = "ABORTED"
    INTERNAL = "INTERNAL"


# Triton's mapping: NOT_FOUND→404, UNAVAILABLE→503, UNSUPPORTED→501, INTERNAL→500, rest→400.
HTTP_STATUS: dict[ErrorCode, int] = {
    ErrorCode.INVALID_ARGUMENT: 400,
    ErrorCode.NOT_FOUND: 404,
    ErrorCode.UNAVAILABLE: 503,
    ErrorCode.RESOURCE_EXHAUSTED: 429,
    ErrorCode.DEADLINE_EXCEEDED: 504,
    ErrorCode.UNIMPLEMENTED: 501,
    ErrorCode.PERMISSION_DENIED: 403,
    ErrorCode.UNAUTHENTICATED: 401,
    ErrorCode.ABORTED: 409,
    ErrorCode.INTERNAL: 500,
}


class DhowError(Exception):
    """Base of every error dhow raises on purpose; the message is safe to show a client."""

    code = ErrorCode.INTERNAL
    #: seconds a client should wait before retrying, for overload and unavailability
    retry_after: float | None = None

    def __init__(self, message: str, *, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.message = message
        if retry_after is not None:
            self.retry_after = retry_after

    @property
    def http_status(self) -> int:
        return HTTP_STATUS[self.code]


class InvalidInput(DhowError):
    code = ErrorCode.INVALID_ARGUMENT


class NotFound(DhowError):
    code = ErrorCode.NOT_FOUND


class Unavailable(DhowError):
    code = ErrorCode.UNAVAILABLE
    retry_after = 1.0


class Overloaded(DhowError):
    code = ErrorCode.RESOURCE_EXHAUSTED
    retry_after = 1.0


class DeadlineExceeded(DhowError):
    code = ErrorCode.DEADLINE_EXCEEDED


class Unsupported(DhowError):
    code = ErrorCode.UNIMPLEMENTED


class Forbidden(DhowError):
    code = ErrorCode.PERMISSION_DENIED


class Unauthenticated(DhowError):
    code = ErrorCode.UNAUTHENTICATED


class Conflict(DhowError):
    """An edit made against a revision that is no longer the current one (optimistic concurrency)."""

    code = ErrorCode.ABORTED


class ModelLoadError(DhowError):
    code = ErrorCode.UNAVAILABLE


class ModelFault(DhowError):
    code = ErrorCode.INTERNAL
    #: the model's traceback as text, when it ran in another process (in this one, the exception's cause has it)
    trace: str = ""


class SignatureMismatch(DhowError):
    """A model answered an output of another shape or datatype than its model.yaml declares: the model and its
    declaration disagree. Unlike a ``ModelFault`` the message is the client's to read (it names only what the
    model's metadata shows)."""

    code = ErrorCode.INTERNAL


class InternalError(DhowError):
    """An exception that is not a ``DhowError``, logged with ``error_id``; the client sees only the id."""

    def __init__(self, error_id: str) -> None:
        super().__init__(f"internal error (id {error_id}); see the server log")
        self.error_id = error_id


class CallCancelled(Exception):
    """The client went away before its answer (a closed connection, a cancelled RPC)."""


def unknown_model(name: str) -> NotFound:
    """The answer for a model that does not exist, or that the caller may not see: the same, so that a
    refusal does not reveal another tenant's model names."""
    return NotFound(
        f"unknown model '{name}'; the repository index (REST POST /v2/repository/index, gRPC RepositoryIndex) "
        "lists the models you may use"
    )


def too_many_rows(label: str, rows: int, max_rows: int) -> InvalidInput:
    """The refusal of a request of more rows than its model's ``max_batch_size`` (``label``: "model 'm'")."""
    return InvalidInput(
        f"{label} takes at most {max_rows} rows a request (its max_batch_size), got {rows}: split them into "
        f"requests of at most {max_rows} rows"
    )
