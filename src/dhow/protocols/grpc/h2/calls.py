"""A call on the native front: its stream's state, the servicer context it hands the method, and the one task
that runs the method and writes the answer.

The methods are grpc's own handlers (``decoding.Methods``): the front deserializes with the handler's
deserializer, calls its behaviour with ``(request, context)`` as grpc.aio would, and serializes with its
serializer. ``CallContext`` implements what dhow's servicers, health and reflection use of
``grpc.aio.ServicerContext``: metadata, peer, auth context, deadline, abort, code/details/trailing metadata.
"""

from __future__ import annotations

import asyncio
import base64
import logging
import zlib
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from dataclasses import dataclass
from types import MappingProxyType
from typing import TYPE_CHECKING, Any

import grpc

if TYPE_CHECKING:
    from dhow.protocols.grpc.h2.connection import H2Connection
    from dhow.protocols.grpc.h2.frames import Block
    from dhow.protocols.runner import CallRunner

log = logging.getLogger("dhow.grpc")

#: headers grpc keeps for itself: not part of a call's invocation metadata
_RESERVED = frozenset(
    {
        b"content-type",
        b"te",
        b"grpc-timeout",
        b"grpc-encoding",
        b"grpc-accept-encoding",
        b"grpc-message",
        b"grpc-status",
    }
)
#: the status a stream's call ends with when the front ends it (``None``: the client reset it, nothing to send)
Ending = tuple[grpc.StatusCode, str] | None
RESET: Ending = None
#: what a client may send on a stream before the server's WINDOW_UPDATE
RECEIVE_WINDOW = 4 * 1024 * 1024
#: a stream of requests whose method has this many waiting gets no more window until it reads them
INBOX_LIMIT = 16


class Aborted(Exception):
    """``context.abort`` ends the method with the status the context holds."""


@dataclass(frozen=True, slots=True)
class Method:
    """One RPC of the port, from grpc's handler."""

    behaviour: Callable[..., Any]
    deserialize: Callable[[bytes], Any]
    serialize: Callable[[Any], bytes]
    request_streaming: bool
    response_streaming: bool

    @classmethod
    def of(cls, handler: Any) -> Method:
        kind = next(k for k in ("unary_unary", "unary_stream", "stream_unary", "stream_stream") if getattr(handler, k))
        return cls(
            getattr(handler, kind),
            handler.request_deserializer or _unchanged,
            handler.response_serializer or _unchanged,
            kind.startswith("stream_"),
            kind.endswith("_stream"),
        )


def _unchanged(data: Any) -> Any:
    return data


class Stream:
    """One HTTP/2 stream carrying one call."""

    __slots__ = (
        "buffer",
        "context",
        "ending",
        "gzip",
        "headers_sent",
        "id",
        "inbox",
        "messages",
        "method",
        "opened",
        "received",
        "remote_closed",
        "started",
        "task",
        "timer",
        "window_delta",
    )

    def __init__(self, stream_id: int, method: Method, gzip: bool, opened: float) -> None:
        self.id = stream_id
        self.method = method
        self.opened = opened  # the loop's time at its HEADERS
        # the stream's send window less the client's SETTINGS_INITIAL_WINDOW_SIZE (its WINDOW_UPDATEs less what was
        # sent): a change of that setting moves every stream's window at once, with no work per stream
        self.window_delta = 0
        self.gzip = gzip
        self.buffer = bytearray()
        self.messages: list[bytes] = []
        self.inbox: asyncio.Queue[bytes | None] | None = None
        self.received = 0  # bytes received since the last WINDOW_UPDATE of the stream
        self.remote_closed = False
        self.headers_sent = False
        self.started = False
        self.ending: Ending | bool = False  # False: nothing decided; else how the front ends the call
        self.task: asyncio.Task[None] | CallRunner | None = None
        self.timer: asyncio.TimerHandle | None = None
        self.context: CallContext | None = None

    def take(self, payload: bytes, limit: int) -> list[bytes]:
        """The whole messages ``payload`` completes (a partial one waits in ``buffer``); raises ``OverflowError``
        for a message above ``limit`` and ``ValueError`` for one that cannot be read, with the status message."""
        buffer = self.buffer
        if not buffer and len(payload) >= 5 and len(payload) - 5 == int.from_bytes(payload[1:5], "big"):
            if payload[0] == 0 and len(payload) - 5 <= limit:
                return [payload[5:]]  # the common case: one uncompressed message, whole, in one DATA frame
            found = [(payload[0], payload[5:])]
        else:
            buffer += payload
            found = []
            while len(buffer) >= 5:
                length = int.from_bytes(buffer[1:5], "big")
                if length > limit:  # said before the bytes arrive: refused before they are gathered
                    raise OverflowError(f"Received message larger than max ({length} vs. {limit})")
                if len(buffer) < 5 + length:
                    break
                found.append((buffer[0], bytes(buffer[5 : 5 + length])))
                del buffer[: 5 + length]
        messages = []
        for flag, data in found:
            if len(data) > limit:
                raise OverflowError(f"Received message larger than max ({len(data)} vs. {limit})")
            messages.append(self.message(flag, data, limit))
        return messages

    def message(self, flag: int, data: bytes, limit: int) -> bytes:
        """A whole message's bytes, inflated when compressed; raises ``ValueError`` with the status message."""
        if flag == 0:
            return data
        if not self.gzip:
            raise ValueError("a message arrived compressed while the call's grpc-encoding is identity")
        inflater = zlib.decompressobj(16 + zlib.MAX_WBITS)
        try:
            inflated = inflater.decompress(data, limit + 1)
        except zlib.error as exc:
            raise ValueError(f"a gzip message cannot be inflated: {exc}") from None
        if len(inflated) > limit:
            raise OverflowError(f"Received message larger than max (more than {limit} once inflated)")
        return inflated


class CallContext:
    """The subset of ``grpc.aio.ServicerContext`` dhow's methods use, for a call on the native front."""

    __slots__ = ("_block", "_code", "_connection", "_details", "_stream", "_trailing", "deadline")

    def __init__(self, connection: H2Connection, stream: Stream, block: Block, deadline: float | None) -> None:
        self._connection = connection
        self._stream = stream
        self._block = block
        self._code: grpc.StatusCode | None = None
        self._details = ""
        self._trailing: tuple[tuple[str, str | bytes], ...] = ()
        self.deadline = deadline

    def invocation_metadata(self) -> tuple[tuple[str, str | bytes], ...]:
        block = self._block
        if block.metadata is None:  # read once per header block: a cached block comes again with its metadata
            block.metadata = tuple(
                (name.decode("latin-1"), _value(name, value))
                for name, value in block.fields
                if name[:1] != b":" and name not in _RESERVED
            )
        metadata: tuple[tuple[str, str | bytes], ...] = block.metadata
        return metadata

    def headers(self) -> Mapping[str, str]:
        """The call's text metadata (``-bin`` entries left out) as the request's headers: names in lower case, the
        last value of a repeated name. Made once per header block and shared by the calls that send it again, so
        it is read-only."""
        block = self._block
        if block.headers is None:
            block.headers = MappingProxyType(
                {name.lower(): value for name, value in self.invocation_metadata() if isinstance(value, str)}
            )
        headers: Mapping[str, str] = block.headers
        return headers

    def credentials(self, read: Callable[[Any], Any]) -> Any:
        """What ``read`` makes of the call's credentials, kept with its header block: the block is the
        connection's own (its HPACK table), so its peer and certificate are those of every call that sends it."""
        block = self._block
        if block.credentials is None:
            block.credentials = read(self)
        return block.credentials

    def peer(self) -> str:
        return self._connection.peer

    def auth_context(self) -> dict[str, list[bytes]]:
        return self._connection.auth_context

    def peer_identities(self) -> list[bytes] | None:
        return self._connection.auth_context.get("x509_common_name")

    def peer_identity_key(self) -> str | None:
        return "x509_common_name" if "x509_common_name" in self._connection.auth_context else None

    def time_remaining(self) -> float | None:
        if self.deadline is None:
            return None
        return max(0.0, self.deadline - self._connection.loop.time())

    async def abort(
        self, code: grpc.StatusCode, details: str = "", trailing_metadata: Sequence[tuple[str, str | bytes]] = ()
    ) -> None:
        if code == grpc.StatusCode.OK:
            raise ValueError("abort needs a status other than OK")
        self._code, self._details = code, details
        if trailing_metadata:
            self._trailing = tuple(trailing_metadata)
        raise Aborted(details)

    def set_code(self, code: grpc.StatusCode) -> None:
        self._code = code

    def set_details(self, details: str) -> None:
        self._details = details

    def set_trailing_metadata(self, trailing_metadata: Sequence[tuple[str, str | bytes]]) -> None:
        self._trailing = tuple(trailing_metadata)

    def code(self) -> grpc.StatusCode | None:
        return self._code

    def details(self) -> str:
        return self._details

    def trailing_metadata(self) -> tuple[tuple[str, str | bytes], ...]:
        return self._trailing

    def cancelled(self) -> bool:
        return self._stream.ending is RESET

    def done(self) -> bool:
        return self._stream.ending is not False

    def set_compression(self, compression: Any) -> None:  # answers are sent uncompressed
        pass

    def disable_next_message_compression(self) -> None:
        pass

    async def send_initial_metadata(self, initial_metadata: Sequence[tuple[str, str | bytes]]) -> None:
        self._connection.send_headers(self._stream)

    async def write(self, message: Any) -> None:
        await self._connection.send_message(self._stream, self._stream.method.serialize(message))

    async def read(self) -> Any:
        inbox = self._stream.inbox
        if inbox is None:
            raise RuntimeError("read() is for methods that take a stream of requests")
        data = await inbox.get()
        if data is None:
            return grpc.aio.EOF  # type: ignore[attr-defined]
        return self._stream.method.deserialize(data)

    def status(self) -> tuple[int, str, tuple[tuple[str, str | bytes], ...]]:
        code = self._code or grpc.StatusCode.OK
        return code.value[0], self._details, self._trailing


def _value(name: bytes, value: bytes) -> str | bytes:
    if name.endswith(b"-bin"):
        return base64.b64decode(value + b"=" * (-len(value) % 4))
    return value.decode("latin-1")


async def run_call(connection: H2Connection, stream: Stream) -> None:
    """The call's one task: the method, its answer and its status; a front's ending (reset, deadline, stop)
    arrives as a cancellation with ``stream.ending`` saying what to send."""
    stream.started = True
    context = stream.context
    assert context is not None
    method = stream.method
    try:
        if stream.ending is not False:  # ended before the task could start
            raise asyncio.CancelledError
        if method.request_streaming:
            requests: Any = _requests(connection, stream)
        else:
            requests = method.deserialize(stream.messages[0])
        if method.response_streaming:
            answers = method.behaviour(requests, context)
            if hasattr(answers, "__aiter__"):
                async for answer in answers:
                    await connection.send_message(stream, method.serialize(answer))
            else:  # a method writing with ``context.write``
                await answers
            connection.end(stream, *context.status())
            return
        answer = await method.behaviour(requests, context)
        if context._code not in (None, grpc.StatusCode.OK):
            connection.end(stream, *context.status())
        elif not connection.respond(stream, data := method.serialize(answer), context._trailing):
            await connection.send_message(stream, data)  # larger than the client's windows take at once
            connection.end(stream, *context.status())
    except Aborted:
        connection.end(stream, *context.status())
    except asyncio.CancelledError:
        ending = stream.ending
        if isinstance(ending, tuple):
            connection.end(stream, ending[0].value[0], ending[1], ())
    except OverflowError as exc:  # an answer larger than the port sends
        connection.end(stream, grpc.StatusCode.RESOURCE_EXHAUSTED.value[0], str(exc), ())
    except Exception as exc:
        log.exception("gRPC method %s failed", type(method.behaviour).__name__)
        connection.end(stream, grpc.StatusCode.UNKNOWN.value[0], f"Unexpected {type(exc)}: {exc}", ())
    finally:
        connection.call_ended(stream)


async def _requests(connection: H2Connection, stream: Stream) -> AsyncIterator[Any]:
    """The stream's requests as the method reads them; the client may send more as they are read."""
    inbox = stream.inbox
    assert inbox is not None
    deserialize = stream.method.deserialize
    while (data := await inbox.get()) is not None:
        if stream.received >= RECEIVE_WINDOW // 2 and inbox.qsize() < INBOX_LIMIT:
            connection.credit(stream)
        yield deserialize(data)
