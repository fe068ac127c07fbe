"""dhow's own HTTP/1.1 connection for the REST door (``--http-front native``): less work per request than uvicorn's.

The REST door's whole cost on the event loop is per request, and uvicorn spends much of it on generality the
door does not use: a scope with every ASGI key, header validation with regular expressions, a flow-control
object, an answer written in two ``transport.write`` calls (two ``send`` system calls). Here one
``Exchange`` per request is the whole request cycle: ``receive`` hands over a body that has already arrived
without waiting, and the answer (status line, headers, body) goes out in one write.

What the connection does besides: keep-alive; pipelined requests answered in order, one at a time (reading
pauses meanwhile); chunked request bodies (httptools de-chunks them); ``Expect: 100-continue`` (answered when
the app first reads the body); HEAD (the headers only); a body the app answered without reading (a refusal)
is read and dropped, as uvicorn does: closing with unread bytes would reset the connection, and the client
could lose the answer; for the same reason a connection closed after an answer (a refusal, ``connection: close``)
reads and drops what still comes for a while (``close``, ``linger.py``). The deadlines on slow clients and the
connection bound are the server's (``front.py``), which looks at its connections from one watchdog.
"""

from __future__ import annotations

import asyncio
import contextvars
import logging
from collections import deque
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any, cast
from urllib.parse import unquote

import httptools

from dhow.protocols.linger import close_at_once, close_lingering, leaving
from dhow.protocols.rest.body import Message, Scope
from dhow.protocols.rest.exchange import STATUS_LINES, Exchange
from dhow.protocols.rest.framing import coding_refusal, parse_refusal
from dhow.protocols.runner import CallRunner

if TYPE_CHECKING:
    from dhow.protocols.rest.front import HttpFront

__all__ = ["Exchange", "Http1Connection"]

log = logging.getLogger("dhow.rest")

App = Callable[[Scope, Callable[[], Awaitable[Message]], Callable[[Message], Awaitable[None]]], Awaitable[None]]

_ASGI = {"version": "3.0", "spec_version": "2.3"}
#: the request headers the connection itself looks at
_NOTED = frozenset((b"expect", b"transfer-encoding", b"x-forwarded-for", b"x-forwarded-proto"))


def _plain_answer(status: int, text: bytes) -> bytes:
    head = STATUS_LINES[status] + b"content-type: text/plain; charset=utf-8\r\nconnection: close\r\n"
    return head + b"content-length: %d\r\n\r\n%s" % (len(text), text)


_BAD_REQUEST = _plain_answer(400, b"Invalid HTTP request received.")
_UNAVAILABLE = _plain_answer(503, b"Service Unavailable")
_INTERNAL = _plain_answer(500, b"Internal Server Error")


class Http1Connection(asyncio.Protocol):
    """One client connection: httptools parses, each request runs the app (a ``CallRunner``), one at a time."""

    def __init__(self, front: HttpFront, client_cn: str = "") -> None:
        self.front = front
        self.app: App = front.app
        self.loop = asyncio.get_running_loop()
        self.parser = httptools.HttpRequestParser(self)
        self.transport: asyncio.Transport | None = None
        #: under TLS, the socket's transport (``TlsDoor``): what the TLS protocol has sent on waits in its buffer
        self.wire: asyncio.Transport | None = None
        self.client_cn = client_cn
        self._scheme = "http"
        #: each request runs in a copy of this (the loop's; not of the request before it's, which a pipelined
        #: request would otherwise inherit: it starts from the end of the previous one's run)
        self._context = contextvars.copy_context()
        self.client: tuple[str, int] | None = None
        self._server: tuple[str, int] | None = None
        self._url = b""
        self._headers: list[tuple[bytes, bytes]] = []
        self._expect = False
        #: the ``transfer-encoding`` of the request being parsed (its values joined by commas; b"": none)
        self._coding = b""
        #: the ``x-forwarded-*`` headers of the request being parsed
        self._forwarded: dict[bytes, bytes] = {}
        #: the request being parsed (its body may still be arriving), the one being answered, those waiting
        self.parsing: Exchange | None = None
        self.running: Exchange | None = None
        self._pipeline: deque[Exchange] = deque()
        self.paused = False
        #: to close once the answer being written is out (the drain)
        self.closing = False
        #: closed (``close``): nothing more is written or read as a request, its answers may still be leaving
        self.closed = False
        #: the answer owed to a refused request, written after those accepted before it (then the connection
        #: closes; nothing more is read meanwhile)
        self.refusal = b""
        #: the headers of a request have begun (not all arrived)
        self._begun = False
        #: loop time of the last bytes read, and when the headers awaited are late (0: none awaited)
        self.last_read = 0.0
        self.headers_due = 0.0
        #: loop time since when nothing is asked or answered (0: busy), for the keep-alive limit
        self.idle_since = 0.0

    # -- the transport -------------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport = cast(asyncio.Transport, transport)
        self.client = _address(transport.get_extra_info("peername"))
        self._server = _address(transport.get_extra_info("sockname"))
        ssl_object = transport.get_extra_info("ssl_object")
        if ssl_object is not None:
            self._scheme = "https"
            if not self.client_cn:
                self.client_cn = self.front.client_cn(ssl_object)
        self.headers_due = self.loop.time() + self.front.timeouts.header_s
        self.front.opened(self)

    def connection_lost(self, exc: Exception | None) -> None:
        self.closing = self.closed = True
        self.front.closed(self)
        self._lose_all()

    def _lose_all(self) -> None:
        for exchange in (self.parsing, self.running, *self._pipeline):
            if exchange is not None:
                exchange.lose()
        self._pipeline.clear()

    def data_received(self, data: bytes) -> None:
        if self.closed:  # closed, its answers still leaving: nothing sent now is answered (``linger.py`` drops it)
            return
        self.last_read = self.loop.time()
        self.idle_since = 0.0
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError as exc:  # HttpParserUpgrade too: no upgrade is offered
            log.debug("an invalid HTTP request from %s: %s", self.client, exc)
            if not self.refusal:  # refused already (its framing, below): the first answer stands
                self._refuse(parse_refusal(exc) or _BAD_REQUEST)

    def write(self, data: bytes) -> None:
        transport = self.transport
        if transport is not None and not self.closed and not transport.is_closing():
            transport.write(data)

    def pause(self) -> None:
        if not self.paused and self.transport is not None and not self.closed:
            self.paused = True
            self.transport.pause_reading()

    def resume(self) -> None:
        if self.paused and self.transport is not None and not self._pipeline and not self.refusal and not self.closed:
            self.paused = False
            self.last_read = self.loop.time()  # the client could not send meanwhile: its deadlines start again
            self.transport.resume_reading()

    def eof_received(self) -> None:
        """The client has ended its side (FIN): closed as ``close`` closes, without lingering (it sends no more), so
        that an answer it does not read is bounded by the drain rate rather than waited for for ever.

        Its requests still running are lost, a half-close (``shutdown(SHUT_WR)``: ``nc -N``, some scripted clients)
        included: TCP cannot tell it from a client that gave up and closed, and answering it would compute every
        abandoned request queued under overload (test_e2e_overload; the README's REST front section)."""
        self.close(linger=False)

    def close(self, linger: bool = True) -> None:
        """Close as ``linger.py`` does: once the answers written have left (over TLS the close's grace for the
        client's close_notify starts only then; a client taking nothing for ``timeouts.body_s``, the silence a
        request's body may keep, is aborted), then a lingering close: a client still sending (a body not read, a
        request behind a refused one) gets the answer rather than a reset, and nothing it sends now is read as a
        request; the requests still open are lost now. ``linger`` False (an idle connection: nothing in flight to
        drop): closed as soon as the answers have left."""
        if self.transport is not None and not self.closed:
            self.closing = self.closed = True
            close_lingering(self.transport, self, self.front.timeouts.body_s, self.wire, linger=linger)
            self._lose_all()

    @property
    def leaving(self) -> bool:
        """Closed, and its answers still leaving (``linger.leaving``): a drain waits for them."""
        return self.closed and self.transport is not None and leaving(self.transport)

    def abort(self) -> None:
        """End the connection now, closing or not, what it has not sent included (the drain's time is over):
        ``close_at_once``."""
        self.closing = self.closed = True
        if self.transport is not None:
            close_at_once(self.transport, self.wire)

    def _refuse(self, answer: bytes) -> None:
        """Refuse the request being parsed (invalid, or the server crowded) and close the connection.

        A request already answered (or answering) keeps its answer and gets no second one. A request the app
        runs whose body turned out broken is answered ``answer`` and lost: its ``receive`` says disconnect. Any
        other refused request is answered after those accepted before it, in order; nothing more is read."""
        self.headers_due = 0.0
        self._begun = False
        refused, self.parsing = self.parsing, None
        if refused is not None and (refused.response_started or refused is self.running):
            if not refused.response_started:
                self.write(answer)
                refused.response_complete = True
            refused.lose()
            self.close()
            return
        if self._pipeline and self._pipeline[-1] is refused:  # its body is broken: it will not run
            self._pipeline.pop()
        if self.running is None:
            self.write(answer)
            self.close()
            return
        self.refusal = answer
        self.pause()

    # -- httptools' callbacks ------------------------------------------------------------------

    def on_message_begin(self) -> None:
        if self.refusal or self.closing:  # the rest of a write after a refusal: never asked
            return
        self._url = b""
        self._headers = []
        self._expect = False
        if self._forwarded:
            self._forwarded = {}
        self._begun = True
        # a kept-alive connection's next request: timed from its first byte, or if pipelined behind a request
        # still running, from that request's answer (the client may well wait for it)
        if not self.headers_due and self.running is None:
            self.headers_due = self.last_read + self.front.timeouts.header_s

    def on_url(self, url: bytes) -> None:
        self._url += url

    def on_header(self, name: bytes, value: bytes) -> None:
        name = name.lower()
        if name in _NOTED:
            if name == b"expect":
                self._expect = value.lower() == b"100-continue"
            elif name == b"transfer-encoding":
                self._coding = b"%s, %s" % (self._coding, value) if self._coding else value
            else:
                self._forwarded[name] = value
        self._headers.append((name, value))

    def on_headers_complete(self) -> None:
        self.headers_due = 0.0
        self._begun = False
        if self.refusal or self.closing:
            return
        if self._coding:  # refused before the app starts: it would read a body it cannot decode as plain
            refusal, self._coding = coding_refusal(self._coding), b""
            if refusal:
                self._refuse(refusal)
                return
        parser = self.parser
        url = self._url
        if url[:1] == b"/":
            raw_path, _, query = url.partition(b"?")
        else:  # absolute-form (a proxy's) or asterisk-form
            parsed = httptools.parse_url(url)
            raw_path, query = parsed.path or b"/", parsed.query or b""
        path = raw_path.decode("latin-1")
        scope: Scope = {
            "type": "http",
            "asgi": _ASGI,
            "http_version": parser.get_http_version(),
            "method": parser.get_method().decode("ascii"),
            "scheme": self._scheme,
            "path": unquote(path) if "%" in path else path,
            "raw_path": raw_path,
            "query_string": query,
            "root_path": "",
            "headers": self._headers,
            "client": self.client,
            "server": self._server,
        }
        if self._forwarded and self.client is not None and self.front.proxies.trusts(self.client[0]):
            self.front.proxies.apply(scope, self._forwarded)
        if self.client_cn:
            scope[self.front.client_cn_key] = self.client_cn
        exchange = Exchange(self, scope, parser.should_keep_alive(), self._expect)
        self.parsing = exchange
        if self.front.crowded():
            self.front.refused()
            exchange.keep_alive = False
            self._refuse(_UNAVAILABLE)
        elif self.running is None:
            self._run(exchange)
        else:  # pipelined: answered after the one before it; read no further meanwhile
            self._pipeline.append(exchange)
            self.pause()

    def on_body(self, body: bytes) -> None:
        if self.parsing is not None:
            self.parsing.feed(body)

    def on_message_complete(self) -> None:
        if self.parsing is not None:
            self.parsing.finish()
            self.parsing = None

    # -- running the app -----------------------------------------------------------------------

    def _run(self, exchange: Exchange) -> None:
        self.running = exchange
        # a coroutine without a Task (``runner.py``: a Task costs ~13k instructions a request), started on the
        # loop's next pass, as a Task would be: after the rest of what this read brought has been parsed
        runner = CallRunner(self.loop, self._answer(exchange), "a REST request", self._context, soon=True)
        self.front.track(exchange, runner)

    async def _answer(self, exchange: Exchange) -> None:
        try:
            await self.app(exchange.scope, exchange.receive, exchange.send)
        except BaseException as exc:
            if not isinstance(exc, asyncio.CancelledError):
                log.exception("the REST app failed on %s %s", exchange.scope["method"], exchange.scope["path"])
            if not exchange.response_started:
                exchange.keep_alive = False
                self.write(_INTERNAL)
                exchange.response_complete = True
            if isinstance(exc, (asyncio.CancelledError, KeyboardInterrupt, SystemExit)):
                self.close()
                raise
        finally:
            if not exchange.deferred:
                self.front.finished(exchange)
        if not exchange.deferred:  # (else its answer waits for its audit record: ``answered`` ends it)
            self._done(exchange)

    def answered(self, exchange: Exchange) -> None:
        """A request whose answer was held until its audit record left (``Exchange.answer_after``) is done."""
        self.front.finished(exchange)
        self._done(exchange)

    def abandoned(self, exchange: Exchange) -> None:
        """A held answer was given up (``Exchange.abandon``): it no longer counts as running, and its connection
        closes, the requests pipelined behind it unserved (when its departure comes, ``_done`` writes to a closed
        transport: nothing)."""
        self.front.finished(exchange)
        self.close()

    def _done(self, exchange: Exchange) -> None:
        """After an answer: close, or go on with the next pipelined request, or wait for one."""
        self.running = None
        if not exchange.response_complete:  # the app answered nothing, or left its answer unfinished
            if not exchange.response_started:
                self.write(_INTERNAL)
            self.close()
            return
        if not exchange.keep_alive or self.closing:
            self.close()
            return
        if self._pipeline:
            self._run(self._pipeline.popleft())
            if not self._pipeline:
                self.resume()
            return
        if self.refusal:  # the answers owed before the refused request are out: its answer, then close
            self.write(self.refusal)
            self.close()
            return
        if self._begun:  # the next request's headers began while this one ran: their deadline starts now
            self.headers_due = self.loop.time() + self.front.timeouts.header_s
        else:
            self.idle_since = self.loop.time()
        self.resume()


def _address(address: Any) -> tuple[str, int] | None:
    if isinstance(address, tuple) and len(address) >= 2:
        return str(address[0]), int(address[1])
    return None
