"""A plaintext HTTP/2 connection to the TLS gRPC port: its first call is answered UNAVAILABLE with a message
saying the port needs TLS, instead of a closed socket (grpcio printed "Socket closed").

The answer is a call's, not the connection's: grpcio shows a GOAWAY's debug data only in its log, reconnects at
once without backoff after it, and its call waits to its deadline ("Deadline Exceeded"); a call ended
trailers-only with grpc-status 14 fails at once, its grpc-message as the error's details. grpc's clients send
their first call only after the server's SETTINGS, so the server sends SETTINGS, reads up to that call's HEADERS,
answers it, sends GOAWAY and closes. Bounded: ``limit_s`` from the accept in all (the handshake's limit, the first
byte's wait included), ``_MAX_READ`` bytes. Every close is lingering (``linger.py``): grpcio sends a call's message
right behind its HEADERS, and a plain close with those bytes unread reset the connection under it (its write
failed, the answer unread).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import hpack

from dhow.protocols import linger
from dhow.protocols.grpc.h2 import frames as f

__all__ = ["MESSAGE", "refuse_plaintext"]

MESSAGE = (
    "this port speaks gRPC over TLS only: the call was sent in plaintext; use a secure channel "
    "(grpc.secure_channel with grpc.ssl_channel_credentials(the server's CA), or tritonclient's "
    "ssl=True, root_certificates=CA.pem)"
)
#: the answer's header block: printable ASCII without '%', so grpc-message needs no percent-encoding
_ANSWER = hpack.Encoder().encode(
    [(":status", "200"), ("content-type", "application/grpc"), ("grpc-status", "14"), ("grpc-message", MESSAGE)]
)
#: what a plaintext client may send before its first call (its SETTINGS and WINDOW_UPDATE take a few dozen bytes)
_MAX_READ = 64 * 1024
_FRAME_HEADER = 9


def refuse_plaintext(
    limit_s: float, refusing: set[asyncio.Transport]
) -> Callable[[asyncio.Transport, bytes, float], None]:
    """What ``TlsDoor`` calls with a connection whose first bytes are not TLS, and the loop time of its accept: an
    HTTP/2 preface is answered (``_Refusal``, until ``limit_s`` after the accept), anything else closed.
    ``refusing`` holds the connections being answered (a server's stop closes them)."""

    def refuse(transport: asyncio.Transport, first: bytes, accepted: float) -> None:
        if not first.startswith(f.PREFACE[: len(first)]):  # not HTTP/2 (the rest of a short preface: _Refusal)
            linger.close_lingering(transport, transport.get_protocol(), linger.GRACE_S)
            return
        transport.write(f.settings({}))
        refusal = _Refusal(transport, accepted + limit_s, refusing)
        transport.set_protocol(refusal)
        refusal.data_received(first)

    return refuse


class _Refusal(asyncio.Protocol):
    """Reads a plaintext client's frames up to its first call's HEADERS; answers it, GOAWAY, closes.

    Each byte is looked at once, whatever the reads' sizes: the preface's are checked as they come, a frame's
    header is kept until whole, its payload skipped as it arrives (a client sending a frame a read would otherwise
    have every read parse all it sent before)."""

    def __init__(self, transport: asyncio.Transport, due: float, refusing: set[asyncio.Transport]) -> None:
        self._transport = transport
        self._refusing = refusing
        refusing.add(transport)
        #: the preface's bytes checked so far, the bytes read in all, a frame header's bytes not yet whole
        self.preface = 0
        self.read = 0
        self.pending = bytearray()
        #: the bytes of the frame being read still to skip (its payload)
        self.skip = 0
        self._timer = asyncio.get_running_loop().call_at(due, transport.abort)

    def connection_lost(self, exc: Exception | None) -> None:
        self._timer.cancel()
        self._refusing.discard(self._transport)

    def data_received(self, data: bytes) -> None:
        if self._transport.is_closing():
            return
        self.read += len(data)
        view = memoryview(data)
        if self.preface < len(f.PREFACE):
            said = view[: len(f.PREFACE) - self.preface]
            if said != f.PREFACE[self.preface : self.preface + len(said)]:  # not HTTP/2 after all
                self._end(b"")
                return
            self.preface += len(said)
            view = view[len(said) :]
        skipped = min(self.skip, len(view))
        self.skip -= skipped
        view = view[skipped:]
        while view:
            wanted = _FRAME_HEADER - len(self.pending)
            self.pending += view[:wanted]
            view = view[wanted:]
            if len(self.pending) < _FRAME_HEADER:
                break
            header, self.pending = self.pending, bytearray()
            stream = int.from_bytes(header[5:9], "big") & 0x7FFFFFFF
            if header[3] == f.HEADERS and stream % 2 == 1:
                answer = f.frame(f.HEADERS, f.END_HEADERS | f.END_STREAM, stream, _ANSWER)
                self._end(answer + f.goaway(stream, f.NO_ERROR, MESSAGE))
                return
            size = int.from_bytes(header[:3], "big")
            skipped = min(size, len(view))
            self.skip = size - skipped
            view = view[skipped:]
        if self.read > _MAX_READ:
            self._end(f.goaway(0, f.NO_ERROR, MESSAGE))

    def _end(self, last: bytes) -> None:
        """Write ``last``, then close lingering: what the client still sends is dropped; the limits are the
        lingering close's now (``linger.Lingering`` hands the end on to ``connection_lost``)."""
        self._timer.cancel()
        if last:
            self._transport.write(last)
        linger.close_lingering(self._transport, self, linger.GRACE_S)
