"""Where a gRPC call enters the core service's admission point, and dhow's errors become gRPC statuses.

A ``DhowError`` aborts the call with the status of its code and its message (written for the
client), plus a ``retry-after`` trailer when it names one. Any other exception is logged with an
error id by the core service, and the client sees only that id.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Awaitable, Callable
from typing import Any, NoReturn, Protocol, TypeVar

import grpc
import grpc.aio

from dhow.access.authenticator import Credentials
from dhow.core.errors import DhowError, ErrorCode
from dhow.core.ids import client_request_id
from dhow.protocols.grpc.decoding import Malformed
from dhow.protocols.grpc.h2.calls import CallContext
from dhow.protocols.routes import GRPC_ACCESS
from dhow.serving.service import Call, CoreService

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


class Servicer(Protocol):
    """A servicer whose RPCs enter the core service's one admission point."""

    @property
    def service(self) -> CoreService: ...


_Servicer = TypeVar("_Servicer", bound=Servicer)
_Request = TypeVar("_Request")
_Response = TypeVar("_Response")
UnaryMethod = Callable[[_Servicer, _Request, Context], Awaitable[_Response]]
AdmittedMethod = Callable[[_Servicer, _Request, Context, Call], Awaitable[_Response]]


def trailing_metadata(exc: DhowError) -> tuple[tuple[str, str], ...]:
    """``retry-after`` in seconds (``1``, ``0.5``) for errors that say when to retry."""
    if exc.retry_after is None:
        return ()
    return (("retry-after", f"{exc.retry_after:g}"),)


async def abort(context: Context, exc: DhowError) -> NoReturn:
    await context.abort(STATUS[exc.code], exc.message, trailing_metadata=trailing_metadata(exc))


def guarded(method: AdmittedMethod[_Servicer, _Request, _Response]) -> UnaryMethod[_Servicer, _Request, _Response]:
    """Wrap a unary RPC: enter the core service's admission point with the call's credentials and the access
    ``GRPC_ACCESS`` names, hand the method the admitted call, end every error with its status."""
    access = GRPC_ACCESS[method.__name__]

    @functools.wraps(method)
    async def rpc(self: _Servicer, request: _Request, context: Context) -> _Response:
        if isinstance(request, Malformed):
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, request.describe())
        model = getattr(request, "model_name", "") or getattr(request, "name", "")
        try:
            async with self.service.call(credentials(context), access, model, request_id(context)) as call:
                return await method(self, request, context, call)
        except DhowError as exc:
            await abort(context, exc)

    rpc.refuses_malformed = True  # type: ignore[attr-defined]  # see dhow.protocols.grpc.decoding
    return rpc


def credentials(context: Context) -> Credentials:
    """The call's ``authorization`` metadata entry and its verified client certificate's common name.

    The native front reads them once per header block of a connection (``CallContext.credentials``): a client
    sending the same call again sends the same block, from the same peer."""
    if isinstance(context, CallContext):
        return context.credentials(_read_credentials)
    return _read_credentials(context)


def request_id(context: Context) -> str:
    """The call's ``x-request-id`` metadata entry when it is a plain token, else "" (the request's own id names it,
    else the admission point's: ``dhow.core.ids``)."""
    if isinstance(context, CallContext):  # its headers are made once per header block
        sent: object = context.headers().get("x-request-id", "")
    else:
        sent = next((value for key, value in context.invocation_metadata() or () if key == "x-request-id"), "")
    return client_request_id(sent.encode()) if isinstance(sent, str) and sent else ""


def _read_credentials(context: Context) -> Credentials:
    sent = [value for key, value in context.invocation_metadata() or () if key == "authorization"]
    authorization = sent[0] if sent and isinstance(sent[0], str) else ""
    names = list((context.auth_context() or {}).get("x509_common_name") or ())
    client_cn = names[0].decode("utf-8", "replace") if names else ""
    return Credentials(authorization, client_cn, source=_source(context.peer()), repeated_authorization=len(sent) > 1)


def _source(peer: str) -> str:
    """The address of grpc's peer string (``ipv4:127.0.0.1:5000``, ``ipv6:[::1]:5000``), without the port."""
    kind, _, address = peer.partition(":")
    if kind == "ipv6":
        return address.rpartition("]")[0].lstrip("[")
    if kind == "ipv4":
        return address.rpartition(":")[0]
    return address
