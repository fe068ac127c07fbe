"""What a native-front connection sends: a unary answer in one write when the client's windows take it, other
messages in frames as its windows open (WINDOW_UPDATE), and each call's status as trailers."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import struct
import urllib.parse
from collections import deque
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from dhow.protocols.grpc.h2 import frames as f
from dhow.protocols.grpc.h2.calls import Stream

if TYPE_CHECKING:
    from dhow.protocols.grpc.h2.server import Front


#: a unary answer's opening: the HEADERS frame of the response headers, then a DATA frame's header and the gRPC
#: message prefix (compressed flag, length); and its OK trailers' HEADERS frame (both smaller than any frame size)
_OPENING = struct.Struct(f">BHBBL{len(f.RESPONSE_HEADERS)}sBHBBLBL")
_HEADERS_HEAD = (0, len(f.RESPONSE_HEADERS), f.HEADERS, f.END_HEADERS)
_OK_CLOSING = struct.Struct(f">BHBBL{len(f.OK_TRAILERS)}s")
_OK_HEAD = (0, len(f.OK_TRAILERS), f.HEADERS, f.END_HEADERS | f.END_STREAM)


class WindowWaits:
    """The answers waiting for a window to open: for their stream's own (woken by a WINDOW_UPDATE on that stream, or
    by SETTINGS raising every stream's), or, that one open, for the connection's, woken in turn and no more at once
    than it has bytes. A WINDOW_UPDATE wakes the answers it lets go on, never every answer waiting: else a client
    sending small ones, a read at a time, would have the server wake a thousand calls for each (CVE-2019-9511's
    class)."""

    __slots__ = ("_own", "_shared")

    def __init__(self) -> None:
        self._own: dict[int, asyncio.Future[None]] = {}
        self._shared: deque[asyncio.Future[None]] = deque()

    async def wait(self, loop: asyncio.AbstractEventLoop, stream_id: int, own: bool, shared_left: int) -> None:
        """Until the window may have grown: the stream's own when ``own``, else the connection's."""
        waiter = loop.create_future()
        if own:
            self._own[stream_id] = waiter
            if shared_left > 0:
                self.shared(1)  # it may have been woken for the connection's bytes: another waiter takes them
        else:
            self._shared.append(waiter)
        try:
            await waiter
        except asyncio.CancelledError:
            if not own and waiter.done() and not waiter.cancelled():
                self.shared(1)  # woken for the connection's bytes, then cancelled before it ran: hand them on
            raise
        finally:
            if own and self._own.get(stream_id) is waiter:
                del self._own[stream_id]
            elif waiter.cancelled():
                with contextlib.suppress(ValueError):
                    self._shared.remove(waiter)

    def stream(self, stream_id: int) -> None:
        waiter = self._own.pop(stream_id, None)
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def streams(self) -> None:
        for waiter in self._own.values():
            if not waiter.done():
                waiter.set_result(None)
        self._own.clear()

    def shared(self, window: int) -> None:
        woken = 0
        while self._shared and woken < window:
            waiter = self._shared.popleft()
            if not waiter.done():
                waiter.set_result(None)
                woken += 1

    def all(self) -> None:
        self.streams()
        self.shared(len(self._shared))


class Sender:
    """The writing half of ``H2Connection``, which sets these attributes."""

    front: Front
    transport: asyncio.Transport | None
    closed: bool
    send_window: int
    initial_send_window: int
    max_frame_out: int
    waits: WindowWaits
    _writable: asyncio.Event

    def write(self, data: bytes) -> None:
        if not self.closed and self.transport is not None:
            self.transport.write(data)

    def send_headers(self, stream: Stream) -> None:
        if not stream.headers_sent:
            stream.headers_sent = True
            self.write(f.frame(f.HEADERS, f.END_HEADERS, stream.id, f.RESPONSE_HEADERS))

    def respond(self, stream: Stream, data: bytes, trailing: Sequence[tuple[str, str | bytes]]) -> bool:
        """A unary answer in one write, when the windows take it whole; False to send it by ``send_message``."""
        size = len(data) + 5
        window = self.initial_send_window + stream.window_delta
        if size > self.send_window or size > window or size > self.max_frame_out or stream.headers_sent:
            return False
        if len(data) > self.front.max_message:
            raise OverflowError(f"Sent message larger than max ({len(data)} vs. {self.front.max_message})")
        self.send_window -= size
        stream.window_delta -= size
        stream.headers_sent, stream.ending = True, True
        sid = stream.id
        # the frames' headers packed at once around the message: HEADERS, DATA's header and the message's prefix
        opening = _OPENING.pack(
            *_HEADERS_HEAD, sid, f.RESPONSE_HEADERS, size >> 16, size & 0xFFFF, f.DATA, 0, sid, 0, size - 5
        )
        if trailing:
            closing = f.header_frames(sid, trailers(0, "", trailing), True, self.max_frame_out)
        else:
            closing = _OK_CLOSING.pack(*_OK_HEAD, sid, f.OK_TRAILERS)
        end = b"" if stream.remote_closed else f.rst_stream(sid, f.NO_ERROR)
        self.write(b"".join((opening, data, closing, end)))
        return True

    async def send_message(self, stream: Stream, data: bytes) -> None:
        """One message, in frames the client's windows and frame size allow (waiting for WINDOW_UPDATE)."""
        if len(data) > self.front.max_message:
            raise OverflowError(f"Sent message larger than max ({len(data)} vs. {self.front.max_message})")
        self.send_headers(stream)
        message = memoryview(b"\x00" + len(data).to_bytes(4, "big") + data)
        position = 0
        while position < len(message):
            window = self.initial_send_window + stream.window_delta
            allowed = min(self.send_window, window, self.max_frame_out, len(message) - position)
            if self.closed:
                raise asyncio.CancelledError
            if allowed <= 0:
                await self.waits.wait(self.front.loop, stream.id, window <= 0, self.send_window)
                continue
            self.write(f.frame(f.DATA, 0, stream.id, bytes(message[position : position + allowed])))
            position += allowed
            self.send_window -= allowed
            stream.window_delta -= allowed
            if not self._writable.is_set():
                await self._writable.wait()

    def end(self, stream: Stream, code: int, message: str, trailing: Sequence[tuple[str, str | bytes]]) -> None:
        """The call's status: trailers after an answer, or alone (trailers-only) when none was sent."""
        block = trailers(code, message, trailing)
        if not stream.headers_sent:
            block = f.RESPONSE_HEADERS + block
            stream.headers_sent = True
        end = b"" if stream.remote_closed else f.rst_stream(stream.id, f.NO_ERROR)
        self.write(f.header_frames(stream.id, block, True, self.max_frame_out) + end)


def trailers(code: int, message: str, trailing: Sequence[tuple[str, str | bytes]]) -> bytes:
    if code == 0 and not message and not trailing:
        return f.OK_TRAILERS
    parts = [f.literal(b"grpc-status", str(code).encode())]
    if message:
        parts.append(f.literal(b"grpc-message", urllib.parse.quote(message, safe=_UNRESERVED).encode()))
    for key, value in trailing:
        if isinstance(value, bytes):
            parts.append(f.literal(key.encode(), _base64(value)))
        else:
            parts.append(f.literal(key.encode(), value.encode("latin-1", "replace")))
    return b"".join(parts)


#: what grpc-message keeps as it is: printable ASCII but '%'
_UNRESERVED = "".join(chr(c) for c in range(0x20, 0x7F) if c != 0x25)


def _base64(value: bytes) -> bytes:
    return base64.b64encode(value).rstrip(b"=")


def peer_name(address: Any) -> str:
    if isinstance(address, tuple) and len(address) >= 2:
        host, port = address[0], address[1]
        return f"ipv6:[{host}]:{port}" if ":" in host else f"ipv4:{host}:{port}"
    return f"unix:{address}"


def auth_context(certificate: Any) -> dict[str, list[bytes]]:
    context = {"transport_security_type": [b"ssl"]}
    names = [
        value.encode()
        for field in (certificate or {}).get("subject", ())
        for key, value in field
        if key == "commonName"
    ]
    if names:
        context["x509_common_name"] = names
    return context
