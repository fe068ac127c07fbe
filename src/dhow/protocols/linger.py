"""How a connection closes, on every front: its answer leaves, then a lingering close; slow readers are aborted.

Closing a TCP socket that holds bytes the server has not read makes the kernel send a reset in place of the end
of the stream (RFC 9293 §3.6.1; RFC 9112 §9.6 warns of it), and a client whose kernel gets the reset loses what
it had not read yet, or reads ECONNRESET where the end was: a client still sending when the server decided to
close (the rest of a Rapid Reset flood behind the reset past its budget, the body of a request refused at its
headers) gets a reset in place of the GOAWAY or the 400 that says why. A busy server reads its clients late and
in other pieces, so bytes wait behind the one it closes on more often: the rapid-reset tests failed so on a
loaded machine. And a transport's close on its own is no better for a large answer: over TLS the close's grace
for the client's close_notify (the TLS door's ``ssl_shutdown_timeout``) starts at the close and discards what has
not left when it ends (3.8 MB of a 64 MiB answer reached a client that began reading after 3 s).

So the fronts close as nginx (``lingering_close``), Go's HTTP/2 server and h2o do (``close_lingering``):
``Lingering`` takes the connection's place as the transport's protocol, reading what the client still sends and
dropping it (nothing read now reaches the front's parser, so no frame or request behind the close is served), and

1. the answer leaves: the close waits until what was written has left the transport's buffer, and the socket's
   (``wire``: under TLS the TLS protocol hands it all it encrypts); a client taking it slower than
   ``MIN_DRAIN_RATE`` over ``stall_s`` (``drained``) is aborted. In plaintext the write side is shut at once
   (``write_eof``: the FIN follows the answer) and reading goes on, as bytes left unread would make the close a
   reset; over TLS nothing is decrypted meanwhile (reading pauses: it would only be dropped);
2. then the lingering: what the client sends is read and dropped until it ends its side (it has read the end, or
   gone), ``max_bytes`` are read (a client sending without end is reset, its bound spent), or ``grace_s`` after the
   answer left; then the socket closes. TLS has no half-close: its close_notify comes at that close, and the TLS
   door's ``ssl_shutdown_timeout`` (``GRACE_S``) bounds the wait for the client's. The lingering is needed there
   as much: asyncio's TLS close, once under way, stops reading a client still sending, and closes the socket on
   its records unread (a reset in place of the GOAWAY);
3. whatever the client does, the close ends ``MAX_S`` after the answer has left (nginx's ``lingering_time``, which
   counts from then too), so that a client that keeps sending cannot hold the connection and its slot of
   ``--max-connections`` for as long as it likes. An answer still leaving is not cut by it (a large answer to a
   steady reader reaches it whole): step 1's drain rate is what bounds that.

``linger`` False skips the read-and-drop of step 2 (an idle connection's close: no request in flight to drop).
``close_at_once`` is the stop's last step: it ends any of these now.
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
    "leaving",
]

#: how long a closing connection's client has to read its last bytes once they have left (plaintext: before the
#: socket closes; TLS: for its close_notify)
GRACE_S = 2.0
#: the longest a close lasts once its answer has left, whatever the client sends (nginx's ``lingering_time``);
#: while the answer leaves, ``MIN_DRAIN_RATE`` bounds it (a client reading steadily gets all of it)
MAX_S = 30.0
#: the most a closing connection reads and drops: far more than a client that stops once it reads the close has in
#: flight, so that only one sending without end is reset
MAX_BYTES = 16 * 1024 * 1024
#: the bytes a second a client must take of what waits for it to count as reading (``drained``): one taking less,
#: a segment now and then, would hold its connection and the answers buffered for it at next to no cost to itself
MIN_DRAIN_RATE = 4096
#: how often a closing connection looks whether its answer has left (the TLS close's grace starts then)
_SENT_POLL_S = 0.05


def drained(before: int, after: int, seconds: float) -> bool:
    """Whether a write buffer holding ``before`` bytes, then ``after`` bytes ``seconds`` later, was taken from at
    ``MIN_DRAIN_RATE`` at least (or emptied)."""
    return before - after >= min(before, MIN_DRAIN_RATE * seconds)


class Lingering(asyncio.Protocol):
    """A closing connection's protocol (see the module): what the client still sends is dropped; the answer's
    leaving is watched, then the socket closed. ``protocol``, the connection's own, still hears of the end
    (``connection_lost``)."""

    def __init__(
        self,
        transport: asyncio.Transport,
        protocol: asyncio.BaseProtocol,
        *,
        stall_s: float,
        wire: asyncio.Transport | None,
        linger: bool,
        grace_s: float,
        max_bytes: int,
    ) -> None:
        self._transport = transport
        self._protocol = protocol
        self._stall_s = stall_s
        self._wire = wire
        self._linger = linger
        self._grace_s = grace_s
        self._left = max_bytes
        loop = self._loop = asyncio.get_running_loop()
        #: when the drain rate was last measured, and the bytes waiting then
        self._since, self._before = loop.time(), self.buffered()
        self._timer: asyncio.TimerHandle | None = None
        #: ``MAX_S``'s end, set once the answer has left (``look``)
        self._cap: asyncio.TimerHandle | None = None

    def buffered(self) -> int:
        """The bytes written that have not left yet: the transport's, and under TLS the socket's."""
        wire = self._wire
        return self._transport.get_write_buffer_size() + (wire.get_write_buffer_size() if wire is not None else 0)

    def data_received(self, data: bytes) -> None:
        self._left -= len(data)
        if self._left < 0:  # what is still unread resets the connection: the client had its bound
            self._transport.close()

    def eof_received(self) -> None:
        return None  # the client has read the end, or gone: the transport closes (once its answer has left)

    def connection_lost(self, exc: Exception | None) -> None:
        if self._timer is not None:
            self._timer.cancel()
        if self._cap is not None:
            self._cap.cancel()
        self._protocol.connection_lost(exc)

    def look(self) -> None:
        """Step 1 (see the module): wait for the answer to leave, abort a reader too slow; then step 2."""
        transport, loop = self._transport, self._loop
        buffered = self.buffered()
        if buffered:
            now = loop.time()
            if now - self._since >= self._stall_s:
                if not drained(self._before, buffered, now - self._since):
                    transport.abort()
                    return
                self._since, self._before = now, buffered
            self._timer = loop.call_later(_SENT_POLL_S, self.look)
            return
        self._cap = loop.call_later(MAX_S, close_at_once, transport, self._wire)
        if transport.is_closing():  # (the client ended its side, or its bound: the transport is closing)
            return
        transport.resume_reading()  # (paused over TLS while the answer left)
        if self._linger:
            self._timer = loop.call_later(self._grace_s, transport.close)
        else:  # (over TLS the close sends close_notify, and waits ``GRACE_S`` at most for the client's)
            transport.close()


def close_lingering(
    transport: asyncio.Transport,
    protocol: asyncio.BaseProtocol,
    stall_s: float,
    wire: asyncio.Transport | None = None,
    *,
    linger: bool = True,
    grace_s: float | None = None,
    max_bytes: int = MAX_BYTES,
) -> None:
    """Close ``transport``, whose protocol is ``protocol``, once what is written has left and the client has had
    ``grace_s`` to read it (``GRACE_S`` as it is at the call); see the module. ``stall_s``: how long the answer may
    leave slower than ``MIN_DRAIN_RATE`` before the connection is aborted; ``wire``: under TLS, the socket's
    transport; ``linger`` False: closed as soon as the answer has left. A transport closing already (the client's
    FIN closed it, as asyncio does) is watched while its answer leaves, as it would wait for it for ever: a client
    not reading it is aborted, without lingering; nothing for one with nothing left to send."""
    if isinstance(transport.get_protocol(), Lingering):
        return
    closing = transport.is_closing()
    if closing and not transport.get_write_buffer_size() + (wire.get_write_buffer_size() if wire is not None else 0):
        return
    lingering = Lingering(
        transport,
        protocol,
        stall_s=stall_s,
        wire=wire,
        linger=linger and not closing,
        grace_s=GRACE_S if grace_s is None else grace_s,
        max_bytes=max_bytes,
    )
    transport.set_protocol(lingering)
    if closing:  # (its own close ends it once the answer has left)
        lingering.look()
        return
    if transport.can_write_eof():
        try:
            transport.write_eof()
        except OSError:  # the client is gone already (ENOTCONN): nothing to linger for
            transport.close()
            return
        transport.resume_reading()  # (a front pauses a client it has answers waiting for: this one is read to its end)
    else:
        transport.pause_reading()  # TLS: nothing is decrypted to be dropped until the answer has left (``look``)
    lingering.look()


def leaving(transport: asyncio.Transport) -> bool:
    """Whether ``transport``, closing as ``close_lingering`` does, still has its answer leaving (step 1): a drain waits
    for that, not for the lingering after it."""
    protocol = transport.get_protocol()
    return isinstance(protocol, Lingering) and protocol.buffered() > 0


def close_at_once(transport: asyncio.Transport, wire: asyncio.Transport | None = None) -> None:
    """Close ``transport`` now, closing or not (a stop's last step, a drain's end): aborted when bytes still wait to
    leave (its own or, under TLS, the socket's ``wire``'s) or a close is under way, as a client that reads nothing
    would hold a transport's close (it waits for them) for ever, and one that never sends its close_notify would
    hold a TLS close for its grace."""
    waiting = transport.get_write_buffer_size() + (wire.get_write_buffer_size() if wire is not None else 0)
    if waiting or transport.is_closing():
        transport.abort()
    else:
        transport.close()
