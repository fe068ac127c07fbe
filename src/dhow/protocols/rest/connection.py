"""uvicorn's HTTP protocol with the deadlines it lacks: a request's headers and the silences within its body.

uvicorn closes a kept-alive connection that stays idle (``timeout_keep_alive``), but nothing else: a client
that connects and says nothing, or sends its headers a byte at a time, or stops half-way through a body,
holds its connection (a file descriptor, a slot of ``limit_concurrency``) forever. 450 such clients kept
their connections for as long as they liked. ``DeadlineHttpProtocol`` gives each connection two limits:

- headers: from the connection's start (or the first byte of a kept-alive connection's next request, or for
  one pipelined behind a request still running, that request's answer) to the end of the request's headers,
  at most ``header_s``, however the bytes trickle in;
- body: at most ``body_s`` of silence between two parts of a body (a large upload on a slow link is fine as
  long as it keeps coming); silence while the server itself has paused reading does not count.

A late request is answered ``408 Request Timeout`` (when it had begun and nothing was answered yet) and its
connection closed. A request only notes times; one watchdog per server looks at its open connections.

It also answers as the native front does where uvicorn alone would not: a request framing refused (both
lengths, a ``Transfer-Encoding`` other than ``chunked``: ``framing.py``) gets dhow's JSON error, before any app
starts. A client's end of the connection (its FIN) is taken as its leaving, half-close included: TCP cannot tell
one from the other, and a client that gave up must not have its requests computed (``test_e2e_overload``).
"""

from __future__ import annotations

import asyncio
import contextvars
import logging
import sys
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, ClassVar, cast

import httptools
import orjson
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from dhow.protocols.linger import close_lingering
from dhow.protocols.rest.body import Message
from dhow.protocols.rest.framing import coding_refusal, parse_refusal

__all__ = ["BODY_LATE", "HEADERS_LATE", "ConnectionTimeouts", "DeadlineHttpProtocol"]

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


HEADERS_LATE = _timeout_answer("headers")
BODY_LATE = _timeout_answer("body")


class _BodyThenGone:
    """The ASGI ``receive`` of a request whose client is gone but whose body had arrived whole: the body, then the
    disconnect; ``disconnected`` is what the REST door's ``gone`` reads (of ``receive``'s owner)."""

    disconnected = True

    def __init__(self, body: bytes) -> None:
        self._body: bytes | None = body

    async def receive(self) -> Message:
        body, self._body = self._body, None
        if body is None:
            return {"type": "http.disconnect"}
        return {"type": "http.request", "body": body, "more_body": False}


class DeadlineHttpProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol, closing connections whose request headers or body come too slowly.

    uvicorn makes its protocols from a class and its own arguments: ``with_timeouts`` makes the class. A
    request only notes times; one watchdog per class looks at every open connection a few times per time limit
    (a tenth of the shorter one, between 50 ms and 1 s), instead of a timer armed and cancelled per request.
    """

    timeouts: ClassVar[ConnectionTimeouts] = ConnectionTimeouts(header_s=10.0, body_s=30.0)
    #: the open connections of this class (each server's own, made by ``with_timeouts``), for its watchdog
    _open: ClassVar[set[DeadlineHttpProtocol]] = set()
    _watchdog: ClassVar[asyncio.TimerHandle | None] = None
    #: under TLS, the socket's transport (set by ``TlsDoor``): uvicorn's closes then wait for the answer to leave
    wire: asyncio.Transport | None = None

    @classmethod
    def with_timeouts(cls, timeouts: ConnectionTimeouts) -> type[DeadlineHttpProtocol]:
        """This protocol class with these time limits (a subclass, as uvicorn's ``http`` option takes a class)."""
        return type(cls.__name__, (cls,), {"timeouts": timeouts, "_open": set(), "_watchdog": None})

    def __init__(self, **uvicorn_arguments: Any) -> None:
        super().__init__(**uvicorn_arguments)
        #: when the headers being awaited are late (loop time; 0: none awaited)
        self._headers_due = 0.0
        self._last_read = 0.0
        #: a request's headers began behind a request not answered yet: timed from that answer
        self._begun = False
        #: the answer to a request refused for its framing once its headers were read (b"": none)
        self._refusal = b""
        #: each request's task runs in a copy of this (the loop's), as the native front's requests do: uvicorn
        #: starts a pipelined request from the end of the one before it, whose context it would inherit
        self._context = contextvars.copy_context()
        #: the requests started and not ended: the one running, and with it those uvicorn started while it was
        #: answered (``self.cycle`` is the last request read, one pipelined behind it when there is one)
        self._started: set[Any] = set()

    def _start_asgi_task(self, cycle: Any, app: Any) -> None:
        if cycle.waiting_for_100_continue:
            send = cycle.send

            async def send_closing(message: Message) -> None:
                # answered before asking for the body (a 413, a refusal): the client may never send it, or send it
                # later, where the next request would be read (RFC 9110 §10.1.1): the connection ends here
                if message["type"] == "http.response.start" and cycle.waiting_for_100_continue and cycle.more_body:
                    cycle.keep_alive = False
                await send(message)

            cycle.send = send_closing
        task = self.loop.create_task(cycle.run_asgi(app), context=self._context.copy())
        task.add_done_callback(self.tasks.discard)
        self._started.add(cycle)
        task.add_done_callback(lambda _: self._started.discard(cycle))
        self.tasks.add(task)

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        if self.wire is not None:
            transport = cast(asyncio.Transport, _ClosingWhenSent(transport, self, self.timeouts.body_s, self.wire))
        super().connection_made(transport)
        # a connection that says nothing is a request whose headers never come
        self._headers_due = self.loop.time() + self.timeouts.header_s
        cls = type(self)
        cls._open.add(self)
        if cls._watchdog is None:
            cls._watch_later(self.loop)

    def connection_lost(self, exc: Exception | None) -> None:
        type(self)._open.discard(self)
        super().connection_lost(exc)

    def eof_received(self) -> None:
        # the client's end (its FIN): the requests it waits on are gone now, not when ``connection_lost`` says so, a
        # turn later (once the loop has closed the transport), by which time a batch may have taken them, and not
        # only the last one read (uvicorn's ``connection_lost`` marks that one alone, one pipelined behind the
        # running one, which then computes for no one): the batcher drops them before the model, as the native
        # front's are (``Request.gone``), and one waiting for its body wakes. Returning nothing lets the loop
        # close the transport, as uvicorn does
        for cycle in (*self._started, self.cycle):
            if cycle is not None and not cycle.response_complete:
                cycle.disconnected = True
                cycle.message_event.set()
        # those pipelined behind the running one, which uvicorn would never start (nor count): started now, gone
        # once their body is read, so that each is counted CANCELLED and computed for no one, as the native front's
        while self.pipeline:
            cycle, app = self.pipeline.pop()
            cycle.disconnected = True  # (nothing is sent: uvicorn writes no 500 for an app that answered no one)
            if not cycle.more_body:  # (its body whole; one cut short by the FIN is gone before it, as ever)
                cycle.receive = _BodyThenGone(bytes(cycle.body)).receive  # type: ignore[method-assign,assignment]
            self._start_asgi_task(cycle, app)

    def data_received(self, data: bytes) -> None:
        if self.transport.is_closing():  # closed, its answer still leaving: a request sent now is never answered
            return
        self._last_read = self.loop.time()
        super().data_received(data)

    def on_message_begin(self) -> None:
        super().on_message_begin()
        if self._headers_due:
            return
        cycle = self.cycle  # the request parsed last: unanswered, it (or one before it) is still running
        if cycle is not None and not cycle.response_complete:
            self._begun = True  # pipelined: the client may well wait for that answer before sending the rest
        else:  # a kept-alive connection's next request: timed from its first byte
            self._headers_due = self._last_read + self.timeouts.header_s

    def on_headers_complete(self) -> None:
        self._headers_due = 0.0
        self._begun = False
        if any(name == b"transfer-encoding" for name, _ in self.headers):
            coding = b", ".join(value for name, value in self.headers if name == b"transfer-encoding")
            self._refusal = coding_refusal(coding)
            if self._refusal:  # the parser stops; uvicorn answers its error with send_400_response, below
                raise httptools.HttpParserError("a Transfer-Encoding refused")
        super().on_headers_complete()

    def send_400_response(self, msg: str) -> None:
        # uvicorn calls it from its handler of the parser's error, which sys.exc_info() holds
        refusal = self._refusal or parse_refusal(sys.exc_info()[1])
        if not refusal:
            super().send_400_response(msg)
            return
        self.transport.write(refusal)
        self.transport.close()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        cycle = self.cycle
        if self._begun and not self._headers_due and (cycle is None or cycle.response_complete):
            self._begun = False
            self._headers_due = self.loop.time() + self.timeouts.header_s

    def _in_body(self) -> bool:
        """Whether a request's body is arriving: its headers came, its body has not all come, nothing answered."""
        cycle = self.cycle
        return not self._headers_due and cycle is not None and cycle.more_body and not cycle.response_complete

    @classmethod
    def _watch_later(cls, loop: asyncio.AbstractEventLoop) -> None:
        tick = min(1.0, max(0.05, min(cls.timeouts.header_s, cls.timeouts.body_s) / 10))
        cls._watchdog = loop.call_later(tick, cls._watch, loop)

    @classmethod
    def _watch(cls, loop: asyncio.AbstractEventLoop) -> None:
        cls._watchdog = None
        now = loop.time()
        for connection in [c for c in cls._open if c._late(now)]:
            connection._close_late()
        if cls._open:
            cls._watch_later(loop)

    def _late(self, now: float) -> bool:
        if self._in_body():
            # the server paused reading (a large body waiting for the app): the client is not the slow one
            return not self.flow.read_paused and now - self._last_read > self.timeouts.body_s
        return bool(self._headers_due) and now > self._headers_due

    def _close_late(self) -> None:
        type(self)._open.discard(self)
        if self.transport.is_closing():
            return
        if self._in_body():
            if not self.cycle.response_started:
                self.transport.write(BODY_LATE)
        elif self._last_read:  # a request had begun: its headers are late
            self.transport.write(HEADERS_LATE)
        log.debug("closed a connection from %s: its request came too slowly", self.client)
        self.transport.close()


class _ClosingWhenSent:
    """A TLS connection's transport as uvicorn's protocol sees it: its ``close`` is ``linger.close_lingering``'s, which
    waits for what was written to leave, so that the close's grace for the client's close_notify does not cut a
    large answer off; nothing more is written or read meanwhile (a request pipelined after the close is not run).
    uvicorn closes its transport itself, where the protocol is not told."""

    __slots__ = ("_protocol", "_shut", "_stall_s", "_transport", "_wire")

    def __init__(
        self, transport: asyncio.Transport, protocol: asyncio.Protocol, stall_s: float, wire: asyncio.Transport
    ) -> None:
        self._transport = transport
        self._protocol = protocol
        self._stall_s = stall_s
        self._wire = wire
        self._shut = False

    def write(self, data: bytes) -> None:
        if not self._shut:
            self._transport.write(data)

    def writelines(self, data: Iterable[bytes]) -> None:
        if not self._shut:
            self._transport.writelines(data)

    def resume_reading(self) -> None:
        if not self._shut:  # (``close_lingering`` reads again once the answer has left, itself)
            self._transport.resume_reading()

    def is_closing(self) -> bool:
        return self._shut or self._transport.is_closing()

    def close(self) -> None:
        if not self._shut:
            self._shut = True
            # an idle connection (uvicorn's keep-alive limit or stop, its timer armed since its last answer) or one
            # that never sent a byte: nothing in flight to drop, so no lingering, as on the native front. uvicorn
            # arms that timer also when the next request's headers had begun with the one answered: not idle
            protocol = self._protocol
            armed = getattr(protocol, "timeout_keep_alive_task", None) is not None
            idle = armed and not getattr(protocol, "_begun", False) and not getattr(protocol, "_headers_due", 0.0)
            silent = not getattr(protocol, "_last_read", 1)
            close_lingering(self._transport, protocol, self._stall_s, self._wire, linger=not (idle or silent))

    def __getattr__(self, name: str) -> Any:
        return getattr(self._transport, name)
