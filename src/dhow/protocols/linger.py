"""A lingering close: a connection's last bytes (a GOAWAY, an error answer) reach a client that is still sending.

Closing a TCP socket that holds bytes the server has not read makes the kernel send a reset in place of the end
of the stream (RFC 9293 §3.6.1; RFC 9112 §9.6 warns of it), and a client whose kernel gets the reset loses what
it had not read yet, or reads ECONNRESET where the end was: a client still sending when the server decided to
close (the rest of a Rapid Reset flood behind the reset past its budget, the body of a request refused at its
headers) gets a reset in place of the GOAWAY or the 400 that says why. A busy server reads its clients late and
in other pieces, so bytes wait behind the one it closes on more often: the rapid-reset tests failed so on a
loaded machine.

So the fronts close as nginx (``lingering_close``), Go's HTTP/2 server and h2o do: the last bytes written, the write
side is shut (``write_eof``: the FIN follows them), and ``Lingering`` takes the connection's place as the
transport's protocol, reading what the client still sends and dropping it: nothing read now reaches the front's
parser, so no frame or request behind the close is served. It closes when the client ends its side (it has read the
end, or gone), once ``max_bytes`` are read (a client sending without end is reset, its bound spent), or ``grace_s``
after the last bytes left the write buffer; it aborts a client whose buffer stops falling for ``grace_s``
(``drained``: one that neither reads nor closes), and ends after ``MAX_S`` in any case. TLS has no half-close: the
client has the last bytes (a GOAWAY, an answer saying ``connection: close``) and no end of the stream until the
close, whose close_notify then waits for the client's up to the port's ``ssl_shutdown_timeout``; the lingering is
the same, and needed as much (asyncio's TLS close, on its own, resets a client whose records it has not read).
"""

from __future__ import annotations

import asyncio

__all__ = [
    "GRACE_S",
    "MAX_BYTES",
    "MAX_S",
    "MIN_DRAIN_RATE",
    "Lingering",
    "close_at_once",
    "close_lingering",
    "drained",
]

#: how long a closing connection's client has to read its last bytes once they have left the write buffer, and
#: how long that buffer may stop falling before the connection is aborted
GRACE_S = 2.0
#: the longest a lingering close lasts, however the client reads (nginx's ``lingering_time``): one taking its last
#: bytes at ``MIN_DRAIN_RATE`` and no faster would hold its connection, and its slot of ``--max-connections``, for
#: as long as its buffer takes to drain at that rate (megabytes: minutes)
MAX_S = 30.0
#: the most a closing connection reads and drops: far more than a client that stops once it reads the close has in
#: flight, so that only one sending without end is reset
MAX_BYTES = 16 * 1024 * 1024
#: the bytes a second a client must take of what waits for it to count as reading (``drained``): one taking less,
#: a segment now and then, would hold its connection, calls and answers at next to no cost to itself
MIN_DRAIN_RATE = 4096


def drained(before: int, after: int, seconds: float) -> bool:
    """Whether a write buffer holding ``before`` bytes, then ``after`` bytes ``seconds`` later, was taken from at
    ``MIN_DRAIN_RATE`` at least (or emptied)."""
    return before - after >= min(before, MIN_DRAIN_RATE * seconds)


class Lingering(asyncio.Protocol):
    """A closing connection's protocol: what the client still sends is dropped, and the socket closed when it ends
    its side, past ``max_bytes``, or ``grace_s`` after the write buffer emptied (see the module). ``protocol``, the
    connection's own, still hears of the end (``connection_lost``)."""

    def __init__(
        self,
        transport: asyncio.Transport,
        protocol: asyncio.BaseProtocol,
        grace_s: float,
        max_bytes: int,
    ) -> None:
        self._transport = transport
        self._protocol = protocol
        self._grace_s = grace_s
        self._left = max_bytes
        #: the write buffer at the last look: a close once it was empty at two looks in a row (``_look``)
        self._before = transport.get_write_buffer_size()
        self._timer = asyncio.get_running_loop().call_later(grace_s, self._look)
        self._cap = asyncio.get_running_loop().call_later(MAX_S, close_at_once, transport)

    def data_received(self, data: bytes) -> None:
        self._left -= len(data)
        if self._left < 0:  # what is still unread resets the connection: the client had its bound
            self._transport.close()

    def eof_received(self) -> None:
        return None  # the client has read the end, or gone: the transport closes

    def connection_lost(self, exc: Exception | None) -> None:
        self._timer.cancel()
        self._cap.cancel()
        self._protocol.connection_lost(exc)

    def _look(self) -> None:
        transport, before = self._transport, self._before
        buffered = self._before = transport.get_write_buffer_size()
        if not buffered and not before:  # the last bytes left a whole grace ago at least
            transport.close()
            return
        if buffered and not drained(before, buffered, self._grace_s):
            transport.abort()
            return
        self._timer = asyncio.get_running_loop().call_later(self._grace_s, self._look)


def close_lingering(
    transport: asyncio.Transport,
    protocol: asyncio.BaseProtocol,
    grace_s: float | None = None,
    max_bytes: int = MAX_BYTES,
) -> None:
    """Close ``transport``, whose protocol is ``protocol``, once what is written has left and the client has read
    it (see the module); nothing for a transport closing already. ``grace_s``: ``GRACE_S`` as it is at the call."""
    if transport.is_closing() or isinstance(transport.get_protocol(), Lingering):
        return
    transport.set_protocol(Lingering(transport, protocol, GRACE_S if grace_s is None else grace_s, max_bytes))
    if transport.can_write_eof():
        try:
            transport.write_eof()
        except OSError:  # the client is gone already (ENOTCONN): nothing to linger for
            transport.close()
            return
    transport.resume_reading()  # (a front pauses a client it has answers waiting for: this one is read to its end)


def close_at_once(transport: asyncio.Transport) -> None:
    """Close ``transport`` now, lingering or not (a stop's last step, an idle connection): aborted when bytes still
    wait to leave, as a client that reads nothing would hold a transport's close (it waits for them) for ever."""
    if transport.get_write_buffer_size():
        transport.abort()
    else:
        transport.close()
