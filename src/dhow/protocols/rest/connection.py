"""uvicorn's HTTP protocol with the deadlines it lacks: a request's headers and the silences within its body.

uvicorn closes a kept-alive connection that stays idle (``timeout_keep_alive``), but nothing else: a client
that connects and says nothing, or sends its headers a byte at a time, or stops half-way through a body,
holds its connection (a file descriptor, a slot of ``limit_concurrency``) forever. 450 such clients kept
their connections for as long as they liked. ``DeadlineHttpProtocol`` gives each connection one timer:

- headers: from the connection's start (or the first byte of a kept-alive connection's next request) to the
  end of the request's headers, at most ``header_s``, however the bytes trickle in;
- body: at most ``body_s`` of silence between two parts of a body (a large upload on a slow link is fine as
  long as it keeps coming); silence while the server itself has paused reading does not count.

A late request is answered ``408 Request Timeout`` (when it had begun and nothing was answered yet) and its
connection closed. The timer is armed and cancelled per request, not per read: a read only notes its time.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass
from typing import Any, ClassVar

import orjson
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

__all__ = ["ConnectionTimeouts", "DeadlineHttpProtocol"]

log = logging.getLogger("dhow.rest")


@dataclass(frozen=True, slots=True)
class ConnectionTimeouts:
    #: seconds from a request's first byte (or the connection's start) to the end of its headers
    header_s: float
    #: longest silence, in seconds, between two parts of a request's body
    body_s: float


def _timeout_answer(what: str) -> bytes:
    body = orjson.dumps({"error": f"the request's {what} did not arrive in time; the connection is closed"})
    head = b"HTTP/1.1 408 Request Timeout\r\ncontent-type: application/json\r\nconnection: close\r\n"
    return head + b"content-length: %d\r\n\r\n%s" % (len(body), body)


_HEADERS_LATE = _timeout_answer("headers")
_BODY_LATE = _timeout_answer("body")


class DeadlineHttpProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol, closing connections whose request headers or body come too slowly.

    uvicorn makes its protocols from a class and its own arguments: ``with_timeouts`` makes the class.
    """

    timeouts: ClassVar[ConnectionTimeouts] = ConnectionTimeouts(header_s=10.0, body_s=30.0)

    @classmethod
    def with_timeouts(cls, timeouts: ConnectionTimeouts) -> type[DeadlineHttpProtocol]:
        """This protocol class with these time limits (a subclass, as uvicorn's ``http`` option takes a class)."""
        return type(cls.__name__, (cls,), {"timeouts": timeouts})

    def __init__(self, **uvicorn_arguments: Any) -> None:
        super().__init__(**uvicorn_arguments)
        self._deadline: asyncio.TimerHandle | None = None
        #: a request has begun (its first byte came) and is not complete
        self._begun = False
        #: its headers are complete and its body is arriving
        self._in_body = False
        self._last_read = 0.0

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        # a connection that says nothing is a request whose headers never come
        self._arm(self.timeouts.header_s)

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        self._last_read = self.loop.time()
        super().data_received(data)
        # armed here, not when the headers end: a request without a body (most) never arms it
        if self._in_body and self._deadline is None:
            self._arm(self.timeouts.body_s)

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._begun = True
        if self._deadline is None:  # a kept-alive connection's next request: timed from its first byte
            self._arm(self.timeouts.header_s)

    def on_headers_complete(self) -> None:
        self._disarm()
        super().on_headers_complete()
        self._in_body = True

    def on_message_complete(self) -> None:
        super().on_message_complete()
        self._begun = self._in_body = False
        self._disarm()

    def _arm(self, seconds: float) -> None:
        self._disarm()
        self._deadline = self.loop.call_later(seconds, self._expire)

    def _disarm(self) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None

    def _expire(self) -> None:
        self._deadline = None
        if self.transport.is_closing():
            return
        if self._in_body:
            silent_s = self.loop.time() - self._last_read
            # the server paused reading (a large body waiting for the app): the client is not the slow one
            if self.flow.read_paused or silent_s < self.timeouts.body_s:
                self._arm(self.timeouts.body_s - (0.0 if self.flow.read_paused else silent_s))
                return
            if not self.cycle.response_started:
                self.transport.write(_BODY_LATE)
        elif self._begun:
            self.transport.write(_HEADERS_LATE)
        log.debug("closed a connection from %s: its request came too slowly", self.client)
        self.transport.close()
