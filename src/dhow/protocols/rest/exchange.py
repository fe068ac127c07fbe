"""One request's cycle on dhow's HTTP/1.1 connection (``http1.py``): what the parser feeds it, what the app reads
(``receive``, or ``arrived`` for a body already whole) and writes (``send``, or ``respond`` for a whole answer in
one write), the answer's head and chunks.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from email.utils import formatdate
from http import HTTPStatus
from typing import TYPE_CHECKING

from dhow.protocols.rest.body import Message, Scope

if TYPE_CHECKING:
    from dhow.protocols.rest.http1 import Http1Connection

__all__ = ["STATUS_LINES", "Exchange"]

log = logging.getLogger("dhow.rest")

#: an answer as a whole: status, headers (content-length last), body
Answer = tuple[int, list[tuple[bytes, bytes]], bytes]

#: the status line of each status, built once
STATUS_LINES = {s.value: b"HTTP/1.1 %d %s\r\n" % (s.value, s.phrase.encode()) for s in HTTPStatus}
_CONTINUE = b"HTTP/1.1 100 Continue\r\n\r\n"
#: bytes of a request body buffered before reading pauses until the app takes them
_HIGH_WATER = 64 * 1024
_BODY_DONE: Message = {"type": "http.request", "body": b"", "more_body": False}
_DISCONNECT: Message = {"type": "http.disconnect"}


class _Date:
    """The ``date`` header, made again at most once a second."""

    second = 0
    line = b""

    @classmethod
    def header(cls) -> bytes:
        now = int(time.time())
        if now != cls.second:
            cls.second = now
            cls.line = b"date: %s\r\n" % formatdate(now, usegmt=True).encode()
        return cls.line


class Exchange:
    """One request and its answer: the ASGI ``receive`` and ``send`` of one request cycle.

    ``disconnected`` is read by the app (``Request.gone``) through ``receive.__self__``, as it reads uvicorn's.
    """

    __slots__ = (
        "_body",
        "_buffered",
        "_continue",
        "_sized",
        "_status",
        "_waiter",
        "complete",
        "connection",
        "deferred",
        "disconnected",
        "head",
        "headers_out",
        "held",
        "keep_alive",
        "response_complete",
        "response_started",
        "scope",
        "then",
    )

    def __init__(self, connection: Http1Connection, scope: Scope, keep_alive: bool, expect: bool) -> None:
        self.connection = connection
        self.scope = scope
        self.keep_alive = keep_alive
        self.head = scope["method"] == "HEAD"
        self._continue = expect
        self._body: list[bytes] = []
        self._buffered = 0
        self._waiter: asyncio.Future[None] | None = None
        self._status = 0
        self._sized = False
        self.headers_out: list[bytes] = []
        #: the whole request (its body included) has arrived
        self.complete = False
        self.disconnected = False
        self.response_started = False
        self.response_complete = False
        #: the answer held until the request's audit record has left, and what to answer if it cannot
        #: (``answer_after``); None the rest of the time
        self.held: tuple[Answer, Callable[[BaseException], Answer]] | None = None
        #: its answer is held (``answer_after``), for good: the connection's ``answered`` ends it, not the app's
        #: return (``held`` is cleared once sent, which may come first)
        self.deferred = False
        #: told the status an answer held was sent with (the access log's line), once it is
        self.then: Callable[[int], None] | None = None

    # -- what the parser feeds ---------------------------------------------------------------

    def feed(self, chunk: bytes) -> None:
        if self.response_complete:  # answered without it (a refusal): the rest of the body is read and dropped
            return
        self._body.append(chunk)
        self._buffered += len(chunk)
        if self._buffered > _HIGH_WATER:
            self.connection.pause()
        self._wake()

    def finish(self) -> None:
        self.complete = True
        self._wake()

    def lose(self) -> None:
        self.disconnected = True
        self._wake()

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None:
            self._waiter = None
            if not waiter.done():
                waiter.set_result(None)

    # -- what the REST door asks without ASGI's messages (``app.py``: its usual request) --------------

    def arrived(self) -> bytes | None:
        """The whole body when it has arrived and nothing of it was read, taken as ``receive`` would take it (no
        coroutine, no message); None: ask ``receive``."""
        if not self.complete:
            return None
        chunks = self._body
        if not chunks:
            return None if self.disconnected or self.response_complete else b""
        body = chunks[0] if len(chunks) == 1 else b"".join(chunks)
        chunks.clear()
        self._buffered = 0
        self.connection.resume()
        return body

    def respond(self, status: int, headers: list[tuple[bytes, bytes]], body: bytes) -> None:
        """The whole answer at once: what ``send`` does with a start and one last body message."""
        if self.disconnected:
            return
        if self.response_started:
            raise RuntimeError("unexpected ASGI message 'http.response.start' at this point of the response")
        self.response_started = True
        self._status = status
        self.headers_out = [b"%s: %s\r\n" % header for header in headers]
        self._sized = (bool(headers) and headers[-1][0] == b"content-length") or any(
            name.lower() == b"content-length" for name, _ in headers
        )
        self.connection.write(self._head(body, False) + (b"" if self.head else self._chunk(body, False)))
        self.response_complete = True

    def answer_after(
        self, departure: asyncio.Future[None], answer: Answer, refusal: Callable[[BaseException], Answer]
    ) -> None:
        """Send ``answer`` (its content-length last) once ``departure`` is done, or what ``refusal`` makes of its
        exception; then tell ``then`` the status and the connection that this request is done (the next pipelined
        one runs). The app's coroutine ends at once, without awaiting the departure."""
        self.held = (answer, refusal)
        self.deferred = True
        departure.add_done_callback(self._release)

    def abandon(self) -> None:
        """Give up a held answer before it could go (the drain's end): its connection closes now, as its client
        would otherwise wait for an answer that may never come, and nothing pipelined behind it is served; its
        access log line says 499 now, while the log is open, and nothing is sent or logged when the departure
        comes."""
        if self.held is None:  # its answer went already (logged, the connection gone on): nothing to give up
            return
        then, self.then = self.then, None
        self.lose()  # (``respond`` sends nothing)
        self.connection.abandoned(self)
        if then is not None:
            then(499)

    def _release(self, departure: asyncio.Future[None]) -> None:
        held, self.held = self.held, None
        assert held is not None
        (status, headers, body), refusal = held
        try:
            error = departure.exception()  # (a departure cannot be cancelled)
            if error is not None:
                status, headers, body = refusal(error)
            self.respond(status, headers, body)
            if self.then is not None:  # (a client that left meanwhile was sent nothing: 499, as the app logs it)
                self.then(499 if self.disconnected else status)
        except Exception:  # as the app's failure while answering: logged; the connection closes if the answer is
            # not all written, else (``then`` failed) goes on (``_done``)
            log.exception("the REST app failed on %s %s", self.scope["method"], self.scope["path"])
        finally:
            self.connection.answered(self)

    # -- ASGI ----------------------------------------------------------------------------------

    async def receive(self) -> Message:
        while True:
            if self._body:
                body = self._body[0] if len(self._body) == 1 else b"".join(self._body)
                self._body.clear()
                self._buffered = 0
                self.connection.resume()
                return {"type": "http.request", "body": body, "more_body": not self.complete}
            if self.disconnected or self.response_complete:
                return _DISCONNECT
            if self.complete:
                return _BODY_DONE
            if self._continue:
                self._continue = False
                self.connection.write(_CONTINUE)
            self.connection.resume()
            self._waiter = self.connection.loop.create_future()
            await self._waiter

    async def send(self, message: Message) -> None:
        if self.disconnected:
            return
        kind = message["type"]
        if kind == "http.response.start" and not self.response_started:
            self.response_started = True
            self._status = message["status"]
            headers = message.get("headers", ())
            self.headers_out = [b"%s: %s\r\n" % header for header in headers]
            # the door names the length last; another app may name it anywhere, in any case
            self._sized = (bool(headers) and headers[-1][0] == b"content-length") or any(
                name.lower() == b"content-length" for name, _ in headers
            )
            return
        if kind != "http.response.body" or not self.response_started or self.response_complete:
            raise RuntimeError(f"unexpected ASGI message {kind!r} at this point of the response")
        body: bytes = message.get("body", b"")
        more = message.get("more_body", False)
        if self._status:  # the first part: the head goes with it
            self.connection.write(self._head(body, more) + (b"" if self.head else self._chunk(body, more)))
        elif not self.head:
            self.connection.write(self._chunk(body, more))
        if not more:
            self.response_complete = True

    def _head(self, body: bytes, more: bool) -> bytes:
        lines = self.headers_out
        status, self._status = self._status, 0
        sized = self._sized
        if not sized:
            lines.append(b"transfer-encoding: chunked\r\n" if more else b"content-length: %d\r\n" % len(body))
        if self._continue and not self.complete:
            # answered before asking for the body (a 413, a refusal): the client may never send it, or send it
            # after a while, where the next request would be read (RFC 9110 §10.1.1): the connection ends here
            self.keep_alive = False
        if not self.keep_alive or self.connection.closing:
            self.keep_alive = False
            lines.append(b"connection: close\r\n")
        lines.append(_Date.header())
        line = STATUS_LINES.get(status) or b"HTTP/1.1 %d \r\n" % status
        head = b"".join((line, *lines, b"\r\n"))
        if head.count(b"\n") != len(lines) + 2:  # a header with a line break in it would forge headers
            raise RuntimeError("a response header holds a line break")
        self.headers_out = [] if not more or sized else [b"chunked"]
        return head

    def _chunk(self, body: bytes, more: bool) -> bytes:
        if not self.headers_out:  # sized: the body as it is
            return body
        framed = b"%x\r\n%s\r\n" % (len(body), body) if body else b""
        return framed if more else framed + b"0\r\n\r\n"
