"""When a native-front connection is pinged, and closed as dead or idle: counted by a tick rather than timed at every
read, from what the connection has seen since the tick before.

A client is alive while its frames arrive (any frame answers a ping, as grpc-core's own keepalive takes it), and
also while it takes what the server writes: the server stops reading a client whose answers wait in its write buffer
(``H2Connection.pause_writing``), so a client reading a large answer slowly is not heard, its ping's answer
included, though it is well. The buffer going down shows it alive then: its fall below the low mark
(``resume_writing``, counted as a read) or a fall of ``MIN_DRAIN_RATE`` a second at least from one tick to the next
(``drained``, both in ``linger.py``): a client taking a segment now and then (a trickle) is silent, or it would keep
its connection, calls and buffered answers for ever. One that neither sends nor takes enough is pinged and closed
(and its lingering close, ``linger.py``, aborts it when its last frames stop leaving).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from dhow.protocols.linger import drained

if TYPE_CHECKING:
    from dhow.protocols.grpc.server import GrpcConnectionLimits

#: what ``Liveness.tick`` answers when the connection is to be pinged
PING = "ping"


class Liveness:
    """A connection's silence, idleness and unanswered ping, in ticks of ``step`` seconds."""

    __slots__ = ("_buffered", "_idle", "_limits", "_opened", "_quiet", "_reads", "_waited", "ping_out", "step")

    def __init__(self, limits: GrpcConnectionLimits) -> None:
        self._limits = limits
        self.step = max(0.05, min(limits.keepalive_s, limits.keepalive_timeout_s, limits.idle_s) / 4)
        self._reads = self._opened = self._buffered = 0
        self._quiet = self._idle = self._waited = 0.0
        self.ping_out = False  # a ping sent, nothing heard since

    def tick(self, reads: int, opened: int, calls: bool, buffered: int | None) -> str | None:
        """``PING``, the reason to close the connection, or None: from the reads and calls opened so far, whether a
        call is in flight, and the bytes waiting to be written (None while the server reads the client)."""
        limits, step = self._limits, self.step
        heard = reads != self._reads or (buffered is not None and drained(self._buffered, buffered, step))
        self._buffered = buffered or 0
        self._idle = self._idle + step if not calls and opened == self._opened else 0.0
        self._reads, self._opened = reads, opened
        if heard:
            self.ping_out, self._waited, self._quiet = False, 0.0, 0.0
        elif self.ping_out:
            self._waited += step
            if self._waited >= limits.keepalive_timeout_s:
                return "keepalive ping not answered"
        else:
            self._quiet += step
        if self._idle >= limits.idle_s:
            return "max_idle"
        if self._quiet >= limits.keepalive_s and not self.ping_out:
            self.ping_out, self._quiet = True, 0.0
            return PING
        return None
