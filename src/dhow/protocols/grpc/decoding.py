"""Malformed messages answer INVALID_ARGUMENT with a message, on every service of the gRPC port.

grpc decodes a request with the method's deserializer before any servicer code runs; a ``DecodeError`` there
becomes UNKNOWN ("Unexpected <class 'DecodeError'>") for the client and a traceback in the log.
``Methods``, where every service of the port registers, gives each method a deserializer that returns a
``Malformed`` marker instead, and a behaviour that answers the marker with INVALID_ARGUMENT before the servicer
sees it (a behaviour marked ``refuses_malformed`` answers it itself). A stream ends at its first malformed
message: the requests before it are answered, then the call fails.

A behaviour marked with ``answers_bytes`` gives its answers already serialized: its method is registered without
a serializer, so grpc and the native front send the bytes as they are.
"""

from __future__ import annotations

import inspect
from collections.abc import AsyncIterator, Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeAlias, TypeVar

import grpc
import grpc.aio

__all__ = ["Malformed", "Methods", "answers_bytes"]

# grpc-stubs makes these generic; grpc's classes are not subscriptable at run time
if TYPE_CHECKING:
    _Handler: TypeAlias = grpc.RpcMethodHandler[Any, Any]
    _GenericHandler: TypeAlias = grpc.GenericRpcHandler[Any, Any]
else:
    _Handler = grpc.RpcMethodHandler
    _GenericHandler = grpc.GenericRpcHandler

_Behaviour = TypeVar("_Behaviour", bound=Callable[..., Any])


def answers_bytes(behaviour: _Behaviour) -> _Behaviour:
    """Mark a servicer method whose answers are serialized messages (``bytes``): the generated code registers the
    message type's ``SerializeToString``, which could only take a message made from those bytes again."""
    behaviour.answers_bytes = True  # type: ignore[attr-defined]
    return behaviour


@dataclass(frozen=True, slots=True)
class Malformed:
    """What the deserializer gives for bytes that are not a message of the method's request type."""

    message_type: str
    size: int

    def describe(self) -> str:
        return (
            f"the request ({self.size} bytes) is not a valid {self.message_type} protobuf message; "
            "encode it with the service's .proto file"
        )


class Methods(_GenericHandler):
    """Every method of the gRPC port, each made to refuse malformed messages once, served by one generic handler.

    The generated ``add_*_to_server`` functions register into it as into a server. grpc.aio keeps one request
    for a call pending per method registered with the server itself and waits on all of them again after each
    call, and an interceptor is one more coroutine per call: together about 90k instructions of a tabular
    call's 1,070k (``benchmarks/instructions.py``). One lookup here does the work of both.
    """

    def __init__(self) -> None:
        self._handlers: dict[str, _Handler] = {}
        self._generic: list[_GenericHandler] = []

    def add_registered_method_handlers(self, service: str, handlers: Mapping[str, _Handler]) -> None:
        for name, handler in handlers.items():
            method = f"/{service}/{name}"
            self._handlers[method] = _checked(handler, method)

    def add_generic_rpc_handlers(self, handlers: Iterable[_GenericHandler]) -> None:
        # generated code gives each service both ways: registered methods are found first, these after
        self._generic.extend(handlers)

    def service(self, handler_call_details: grpc.HandlerCallDetails) -> _Handler | None:
        method = handler_call_details.method
        found = self._handlers.get(method)
        if found is not None:
            return found
        for generic in self._generic:
            handler = generic.service(handler_call_details)
            if handler is not None:  # a method only a generic handler knows: wrapped once, then found first
                found = self._handlers[method] = _checked(handler, method)
                return found
        return None  # an unknown method: grpc answers UNIMPLEMENTED itself


def _checked(handler: Any, method: str) -> _Handler:
    """``handler`` with a deserializer that never raises and a behaviour that refuses ``Malformed``."""
    kind = next(k for k in ("unary_unary", "unary_stream", "stream_unary", "stream_stream") if getattr(handler, k))
    behaviour = getattr(handler, kind)
    if getattr(behaviour, "answers_bytes", False):
        handler = handler._replace(response_serializer=None)  # grpc and the native front send bytes as they are
    deserializer = handler.request_deserializer
    if deserializer is None or not _is_async(behaviour):
        unchanged: _Handler = handler  # raw bytes reach the servicer, or a thread-pool handler left as it is
        return unchanged
    message_type = _message_type(deserializer, method)

    def deserialize(data: bytes) -> Any:
        try:
            return deserializer(data)
        except Exception:  # DecodeError, or whatever a deserializer raises on bytes it cannot read
            return Malformed(message_type, len(data))

    if getattr(behaviour, "refuses_malformed", False):  # it answers ``Malformed`` itself: one coroutine less
        refusing: _Handler = handler._replace(request_deserializer=deserialize)
        return refusing
    wrap = _unary_request if kind.startswith("unary_") else _streamed_requests
    wrapped: _Handler = handler._replace(request_deserializer=deserialize, **{kind: wrap(behaviour)})
    return wrapped


def _is_async(behaviour: Callable[..., Any]) -> bool:
    return inspect.iscoroutinefunction(behaviour) or inspect.isasyncgenfunction(behaviour)


def _message_type(deserializer: Callable[[bytes], Any], method: str) -> str:
    # generated code registers ``Message.FromString``: its class names the type
    descriptor = getattr(getattr(deserializer, "__self__", None), "DESCRIPTOR", None)
    name = getattr(descriptor, "full_name", None)
    return name if isinstance(name, str) else f"request of {method}"


def _unary_request(behaviour: Callable[..., Any]) -> Callable[..., Any]:
    """The behaviour of a method taking one request, as a function of the same kind (coroutine or generator)."""
    if inspect.isasyncgenfunction(behaviour):

        async def streaming(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> AsyncIterator[Any]:
            if isinstance(request, Malformed):
                await context.abort(grpc.StatusCode.INVALID_ARGUMENT, request.describe())
            async for answer in behaviour(request, context):
                yield answer

        return streaming

    async def single(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
        if isinstance(request, Malformed):
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, request.describe())
        return await behaviour(request, context)

    return single


def _streamed_requests(behaviour: Callable[..., Any]) -> Callable[..., Any]:
    """The behaviour of a method taking a stream: it sees the requests up to the first malformed one."""

    async def until_malformed(requests: AsyncIterator[Any], found: list[Malformed]) -> AsyncIterator[Any]:
        async for request in requests:
            if isinstance(request, Malformed):
                found.append(request)
                return
            yield request

    if inspect.isasyncgenfunction(behaviour):

        async def streaming(requests: AsyncIterator[Any], context: grpc.aio.ServicerContext[Any, Any]) -> Any:
            found: list[Malformed] = []
            async for answer in behaviour(until_malformed(requests, found), context):
                yield answer
            if found:
                await context.abort(grpc.StatusCode.INVALID_ARGUMENT, found[0].describe())

        return streaming

    async def single(requests: AsyncIterator[Any], context: grpc.aio.ServicerContext[Any, Any]) -> Any:
        found: list[Malformed] = []
        answer = await behaviour(until_malformed(requests, found), context)
        if found:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, found[0].describe())
        return answer

    return single
