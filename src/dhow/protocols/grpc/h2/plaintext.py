"""A plaintext HTTP/2 connection to the TLS gRPC port: its first call is answered UNAVAILABLE with a message
saying the port needs TLS, instead of a closed socket (grpcio printed "Socket closed").

The answer is a call's, not the connection's: grpcio shows a GOAWAY's debug data only in its log, reconnects at
once without backoff after it, and its call waits to its deadline ("Deadline Exceeded"); a call ended
trailers-only with grpc-status 14 fails at once, its grpc-message as the error's details. grpc's clients send
their first call only after the server's SETTINGS, so the server sends SETTINGS, reads up to that call's HEADERS,
answers it, sends GOAWAY and closes. Bounded: ``limit_s`` in all (the handshake's limit), ``_MAX_READ`` bytes.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import hpack

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


def refuse_plaintext(limit_s: float) -> Callable[[asyncio.Transport, bytes], None]:
    """What ``TlsDoor`` calls with a connection whose first bytes are not TLS: an HTTP/2 preface is answered
    (``_Refusal``), anything else closed."""

    def refuse(transport: asyncio.Transport, first: bytes) -> None:
        if not first.startswith(f.PREFACE[: len(first)]) and not first.startswith(f.PREFACE):  # not HTTP/2
            transport.close()
            return
        transport.write(f.settings({}))
        refusal = _Refusal(transport, limit_s)
        transport.set_protocol(refusal)
        refusal.data_received(first)

    return refuse


class _Refusal(asyncio.Protocol):
    """Reads a plaintext client's frames up to its first call's HEADERS; answers it, GOAWAY, closes."""

    def __init__(self, transport: asyncio.Transport, limit_s: float) -> None:
        self._transport = transport
        self._read = bytearray()
        self._timer = asyncio.get_running_loop().call_later(limit_s, transport.abort)

    def connection_lost(self, exc: Exception | None) -> None:
        self._timer.cancel()

    def data_received(self, data: bytes) -> None:
        if self._transport.is_closing():
            return
        self._read += data
        position = len(f.PREFACE)
        while position + _FRAME_HEADER <= len(self._read):
            size = int.from_bytes(self._read[position : position + 3], "big")
            kind = self._read[position + 3]
            stream = int.from_bytes(self._read[position + 5 : position + 9], "big") & 0x7FFFFFFF
            if kind == f.HEADERS and stream % 2 == 1:
                answer = f.frame(f.HEADERS, f.END_HEADERS | f.END_STREAM, stream, _ANSWER)
                self._end(answer + f.goaway(stream, f.NO_ERROR, MESSAGE))
                return
            position += _FRAME_HEADER + size
        if len(self._read) > _MAX_READ:
            self._end(f.goaway(0, f.NO_ERROR, MESSAGE))

    def _end(self, last: bytes) -> None:
        self._transport.write(last)
        self._transport.close()
