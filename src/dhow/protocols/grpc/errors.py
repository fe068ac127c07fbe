"""Where dhow's errors become gRPC statuses: one map, one guard around every unary RPC.

A ``DhowError`` aborts the call with the status of its code and its message (written for the
client), plus a ``retry-after`` trailer when it names one. Any other exception is logged with an
error id, and the client sees only that id.
"""

from __future__ import annotations

import functools
import logging
import secrets
from collections.abc import Awaitable, Callable
from typing import Any, NoReturn, Protocol, TypeVar

import grpc
import grpc.aio

from dhow.core.errors import DhowError, ErrorCode

log = logging.getLogger("dhow.grpc")

Context = grpc.aio.ServicerContext[Any, Any]

STATUS: dict[ErrorCode, grpc.StatusCode] = {
    ErrorCode.INVALID_ARGUMENT: grpc.StatusCode.INVALID_ARGUMENT,
    ErrorCode.NOT_FOUND: grpc.StatusCode.NOT_FOUND,
    ErrorCode.UNAVAILABLE: grpc.StatusCode.UNAVAILABLE,
    ErrorCode.RESOURCE_EXHAUSTED: grpc.StatusCode.RESOURCE_EXHAUSTED,
    ErrorCode.DEADLINE_EXCEEDED: grpc.StatusCode.DEADLINE_EXCEEDED,
    ErrorCode.UNIMPLEMENTED: grpc.StatusCode.UNIMPLEMENTED,
    ErrorCode.PERMISSION_DENIED: grpc.StatusCode.PERMISSION_DENIED,
    ErrorCode.UNAUTHENTICATED: grpc.StatusCode.UNAUTHENTICATED,
    ErrorCode.ABORTED: grpc.StatusCode.ABORTED,
    ErrorCode.INTERNAL: grpc.StatusCode.INTERNAL,
}


class Admitting(Protocol):
    """A servicer that lets requests in (access control) and hears how they ended (audit)."""

    async def admit(self, rpc: str, request: Any, context: Context) -> object: ...

    async def finish(self, admission: object, outcome: str, message: str = "") -> None: ...


_Servicer = TypeVar("_Servicer", bound=Admitting)
_Request = TypeVar("_Request")
_Response = TypeVar("_Response")
UnaryMethod = Callable[[_Servicer, _Request, Context], Awaitable[_Response]]


def trailing_metadata(exc: DhowError) -> tuple[tuple[str, str], ...]:
    """``retry-after`` in seconds (``1``, ``0.5``) for errors that say when to retry."""
    if exc.retry_after is None:
        return ()
    return (("retry-after", f"{exc.retry_after:g}"),)


def log_internal_error(rpc: str) -> str:
    """Log the exception being handled under a fresh error id; call it inside ``except``."""
    error_id = secrets.token_hex(4)
    log.exception("internal error in gRPC %s (error id %s)", rpc, error_id)
    return error_id


def internal_message(error_id: str) -> str:
    return f"internal error (id {error_id}); see the server log"


async def abort(context: Context, exc: DhowError) -> NoReturn:
    await context.abort(STATUS[exc.code], exc.message, trailing_metadata=trailing_metadata(exc))


def guarded(method: UnaryMethod[_Servicer, _Request, _Response]) -> UnaryMethod[_Servicer, _Request, _Response]:
    """Wrap a unary RPC: let it in through the servicer's access control, end every exception it raises with
    a proper status, and tell the servicer how it ended."""

    @functools.wraps(method)
    async def rpc(self: _Servicer, request: _Request, context: Context) -> _Response:
        admission = None
        try:
            admission = await self.admit(method.__name__, request, context)
            response = await method(self, request, context)
        except DhowError as exc:
            await self.finish(admission, exc.code.value, exc.message)
            await abort(context, exc)
        except grpc.aio.AbortError:
            raise  # the method aborted the call itself
        except Exception:
            error_id = log_internal_error(method.__name__)
            await self.finish(admission, "INTERNAL", f"internal error (id {error_id})")
            await context.abort(grpc.StatusCode.INTERNAL, internal_message(error_id))
        try:
            await self.finish(admission, "success")
        except DhowError as exc:  # the audit trail cannot take the record: fail closed
            await abort(context, exc)
        return response

    return rpc
