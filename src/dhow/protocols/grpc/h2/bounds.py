"""What one client may make a connection of the native front hold or do: the sizes the server's SETTINGS announce,
and bounds on what HTTP/2 leaves unbounded (the frames of a header block, the calls a client resets).

Rapid Reset (CVE-2023-44487) opens streams and resets them at once, endlessly, so that the bound on concurrent
streams never holds back the work it makes (a header block read, a call started and cancelled, per stream):
``ResetBudget`` is a token bucket per connection, with nghttp2's sizes, 1000 resets at once then 33 a second. Only
a reset that ends a call counts: one that crosses the server's own answer costs it nothing more. A call the server
ends because the client sent it a bad frame counts as a reset (MadeYouReset, CVE-2025-8671: the same flood with a
WINDOW_UPDATE of 0 or a malformed request in place of RST_STREAM), as nghttp2 1.66 counts it, once however many
bad frames follow.

One rule for both ways a call with a grpc-timeout ends, the client's reset at its own deadline and the server's
timer (``expire``): it is free once it has run half its timeout and at least ``RESET_FREE_FLOOR_S`` (5 ms); an
expired call counts as having run its whole timeout, whenever its timer fired (timers fire late behind a long
read: 900 calls read at once, 0.1 s). A call without a grpc-timeout is free once it has run ``RESET_FREE_AFTER_S``
(1 s). So a flood still counts: calls reset at once, or given a grpc-timeout of 0 or 1 ns (started and ended at
once, a reset flood's work with no reset sent). Why 5 ms and no more: with any floor above 0 the bound on
concurrent streams holds back the work again (a client waits for a call to run the floor before it may open
another in its place), and 1000 streams every 5 ms is already more calls than a server process parses. A floor
of 50 ms disconnected real-time clients: a grpc client resets each call at its deadline, a little before the
server's timer, and 10-50 ms deadlines that an overloaded server misses were charged, 1800 calls of 40 ms ending
in GOAWAY. A client is not disconnected for the server's own lateness.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterable
from typing import TYPE_CHECKING

import grpc

from dhow.protocols import linger
from dhow.protocols.grpc.h2 import frames as f
from dhow.protocols.grpc.h2.calls import RECEIVE_WINDOW, Stream

if TYPE_CHECKING:
    from dhow.protocols.grpc.h2.connection import H2Connection

#: what a client may send in all before the server's WINDOW_UPDATE on the connection
CONNECTION_WINDOW = 16 * 1024 * 1024
MAX_FRAME_IN = 1024 * 1024
MAX_STREAMS = 1000
MAX_HEADER_LIST = 64 * 1024
#: the frames of one header block: the largest block taken, in frames of the smallest size (16 KiB), doubled; an
#: empty CONTINUATION adds no bytes, so only a count ends a flood of them (CVE-2024-27316's class)
MAX_HEADER_FRAMES = 2 * (2 * MAX_HEADER_LIST // f.DEFAULT_FRAME_SIZE)
#: the server's SETTINGS, and its WINDOW_UPDATE making the connection's window ``CONNECTION_WINDOW``
ANNOUNCED = f.settings(
    {
        f.SETTINGS_MAX_CONCURRENT_STREAMS: MAX_STREAMS,
        f.SETTINGS_INITIAL_WINDOW_SIZE: RECEIVE_WINDOW,
        f.SETTINGS_MAX_FRAME_SIZE: MAX_FRAME_IN,
        f.SETTINGS_MAX_HEADER_LIST_SIZE: MAX_HEADER_LIST,
    }
) + f.window_update(0, CONNECTION_WINDOW - f.DEFAULT_WINDOW)
#: a closing connection's close (``linger.py``): how long its last frames (its GOAWAY) may leave slower than
#: ``linger.MIN_DRAIN_RATE`` before it is aborted, and how long its client then has to read them (over TLS: to send
#: its close_notify, ``linger.GRACE_S``, the same)
CLOSE_GRACE_S = linger.GRACE_S
#: the resets a connection may make at once, and those it gets back a second
RESET_BURST = 1000
RESET_RATE = 33.0
#: a call ended (reset by the client, failed for its frames, or at its grpc-timeout) after it has run this long, or
#: half its grpc-timeout but never under ``RESET_FREE_FLOOR_S``, costs its client no reset (see above)
RESET_FREE_AFTER_S = 1.0
RESET_FREE_FLOOR_S = 0.005
#: how a call past its grpc-timeout ends
EXPIRED = (grpc.StatusCode.DEADLINE_EXCEEDED, "Deadline Exceeded")


class ResetBudget:
    """The resets a connection has left, and the calls it ends."""

    __slots__ = ("_left", "_loop", "_read", "_reading", "_since")

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._left = float(RESET_BURST)
        self._since = loop.time()
        #: when the read being parsed began, and the last whole read's beginning and end
        self._reading = 0.0
        self._read = (0.0, 0.0)

    def begin_read(self) -> None:
        self._reading = self._loop.time()

    def end_read(self) -> None:
        self._read = (self._reading, self._loop.time())

    def spend(self, opened: float, deadline: float | None, ended: float | None = None) -> bool:
        """One more call ended, opened at ``opened`` with ``deadline``, at ``ended`` (loop times; None: when the
        read that brought its end began), free once it ran ``RESET_FREE_FLOOR_S`` and half its timeout: False when
        none is left. A call runs from the end of the read that opened it: the server's own time parsing a read of
        many calls and their resets is not time they ran (a flood sent in one write, its resets behind its calls,
        would otherwise be free on a busy server)."""
        now = self._loop.time()
        if ended is None:
            start, end = self._read
            ran = min(now, self._reading) - (end if start <= opened <= end else opened)
        else:
            ran = ended - opened
        if ran >= RESET_FREE_AFTER_S or (
            deadline is not None and ran >= max(RESET_FREE_FLOOR_S, (deadline - opened) / 2)
        ):
            return True
        self._left = min(RESET_BURST, self._left + (now - self._since) * RESET_RATE)
        self._since = now
        if self._left < 1:
            return False
        self._left -= 1
        return True

    def charge(self, stream: Stream, expired: bool = False) -> None:
        """One more call ended (``spend``), reset or ``expired``; a connection error ENHANCE_YOUR_CALM when none is
        left. An expired call ran its grpc-timeout, whenever its timer fired: the calls of a 1 ns flood are not
        freed by the server's lag."""
        deadline = stream.context.deadline if stream.context is not None else None
        if not self.spend(stream.opened, deadline, deadline if expired else None):
            reason = "with a grpc-timeout too short to run" if expired else "reset by the client"
            raise f.ConnectionError_(f.ENHANCE_YOUR_CALM, f"too many calls {reason}")


def expire(connection: H2Connection, stream: Stream) -> None:
    """The call's grpc-timeout has passed (its timer): it ends DEADLINE_EXCEEDED, charged as a reset (nothing when
    the timeout was ``RESET_FREE_FLOOR_S`` or more)."""
    connection.end_call(stream, EXPIRED)
    try:
        connection.resets.charge(stream, expired=True)
    except f.ConnectionError_ as exc:
        connection.close_with(exc.code, exc.reason)


def largest_delta(initial: int, bound: int, streams: Iterable[Stream]) -> int:
    """``bound`` (at least every open stream's ``window_delta``), or the exact largest when a stream's window may
    pass 2^31-1 with ``initial`` as the client's SETTINGS_INITIAL_WINDOW_SIZE: a connection error if one does
    (RFC 9113 §6.9.2). The pass over the streams comes only when the bound is crossed, and makes it exact: a client
    cannot have each SETTINGS cost one without ending a stream whose window it raised between two."""
    if initial + bound > f.MAX_WINDOW:
        bound = max((stream.window_delta for stream in streams), default=0)
        if initial + bound > f.MAX_WINDOW:
            raise f.ConnectionError_(f.FLOW_CONTROL_ERROR, "a stream's window above 2^31-1")
    return bound
