"""The REST port served by dhow's own HTTP/1.1 (``--http-front native``, ``http1.py``), in place of uvicorn's server.

It does what the server needs of uvicorn's, with the same switches (``started``, ``should_exit``,
``force_exit``, ``serve(sockets)``), so that ``server.py`` starts and drains either the same way:

- the connection bound: past ``limit`` connections or requests in flight, counting the one asking, a request
  is answered ``503`` and its connection closed (as uvicorn's ``limit_concurrency``), and counted (``refused``);
- the deadlines on slow clients (``ConnectionTimeouts``, as ``connection.py`` gives uvicorn) and the keep-alive
  limit, from one watchdog looking at the open connections a few times per time limit, instead of a timer
  armed and cancelled per request;
- TLS through ``tls.py``'s ``https_door`` (a ``tls_door.TlsDoor``: plain HTTP answered 400), the client
  certificate's name in the scope;
- the drain: the port closed, idle connections closed, busy ones closed after their answer; then up to
  ``drain_s`` for them, after which what is still running is cancelled, and the answers still held for their
  audit records (``held_answers.py``) are given up: their access log lines 499; the connections left are aborted.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import ssl
from collections.abc import Callable

from dhow.protocols.rest.app import CLIENT_CN_SCOPE_KEY
from dhow.protocols.rest.connection import BODY_LATE, HEADERS_LATE, ConnectionTimeouts
from dhow.protocols.rest.forwarded import TrustedProxies
from dhow.protocols.rest.http1 import App, Exchange, Http1Connection
from dhow.protocols.rest.tls import common_name, https_door
from dhow.protocols.runner import CallRunner
from dhow.protocols.tls_door import alerting

__all__ = ["HttpFront"]

log = logging.getLogger("dhow.rest")

#: how long the drain's end waits for its aborted connections to be gone (they go on the loop's next turns)
_WAIT_CLOSED_S = 1.0


class HttpFront:
    """The REST port's listening sockets and connections; ``ssl_context``: HTTPS (None: plain HTTP)."""

    client_cn_key = CLIENT_CN_SCOPE_KEY

    def __init__(
        self,
        app: App,
        *,
        host: str,
        port: int,
        timeouts: ConnectionTimeouts,
        keepalive_s: float,
        limit: int | None = None,
        refused: Callable[[], None] | None = None,
        drain_s: float = 30.0,
        ssl_context: ssl.SSLContext | None = None,
        plaintext: Callable[[], None] | None = None,
    ) -> None:
        self.app = app
        self.host = host
        self.port = port
        self.timeouts = timeouts
        self.keepalive_s = keepalive_s
        self.limit = limit
        #: counts a request refused at ``limit`` (503)
        self.refused = refused or (lambda: None)
        self.drain_s = drain_s
        self.ssl_context = alerting(ssl_context) if ssl_context is not None else None
        #: counts a connection that spoke plain HTTP to the HTTPS port (answered 400)
        self.plaintext = plaintext
        self.proxies = TrustedProxies()
        self.started = False
        self.should_exit = False
        self.force_exit = False
        self.servers: list[asyncio.AbstractServer] = []
        self._open: set[Http1Connection] = set()
        self._running: dict[Exchange, CallRunner] = {}
        self._watchdog: asyncio.TimerHandle | None = None
        #: the HTTPS connections still at the TLS door (waiting for a first byte, or in their handshake)
        self._opening: set[asyncio.Transport] = set()

    # -- what the connections tell ----------------------------------------------------------

    def opened(self, connection: Http1Connection) -> None:
        self._open.add(connection)
        if self._watchdog is None:
            self._watch_later()

    def closed(self, connection: Http1Connection) -> None:
        self._open.discard(connection)

    def crowded(self) -> bool:
        limit = self.limit
        return limit is not None and (len(self._open) >= limit or len(self._running) >= limit)

    def client_cn(self, ssl_object: ssl.SSLObject) -> str:
        certificate = ssl_object.getpeercert()
        return common_name(certificate) if certificate else ""

    def track(self, exchange: Exchange, task: CallRunner) -> None:
        self._running[exchange] = task

    def finished(self, exchange: Exchange) -> None:
        self._running.pop(exchange, None)

    # -- serving -----------------------------------------------------------------------------

    async def serve(self, sockets: list[socket.socket] | None = None) -> None:
        """Listen, serve until ``should_exit``, then drain (see the module's docstring)."""
        loop = asyncio.get_running_loop()
        factory = self._protocol
        try:
            if sockets is not None:
                self.servers = [await loop.create_server(factory, sock=s, backlog=2048) for s in sockets]
            else:
                self.servers = [await loop.create_server(factory, self.host, self.port, backlog=2048)]
        except OSError as exc:
            log.error("cannot serve REST on %s:%d: %s", self.host, self.port, exc)
            return
        self.started = True
        while not self.should_exit:
            await asyncio.sleep(0.1)
        await self._drain()

    def _protocol(self) -> asyncio.Protocol:
        if self.ssl_context is None:
            return Http1Connection(self)
        return https_door(self.ssl_context, lambda: Http1Connection(self), self.plaintext, self._opening)

    async def _drain(self) -> None:
        for server in self.servers:
            server.close()
        for connection in list(self._open):
            if connection.closed:
                continue  # its answer leaving (waited for, below) or lingering (not: the last step below ends it)
            if connection.running is None and connection.parsing is None:
                connection.close(linger=False)
            else:
                connection.closing = True  # closed once its answer is written
        deadline = asyncio.get_running_loop().time() + self.drain_s
        while (any(not c.closed or c.leaving for c in self._open) or self._running) and not self.force_exit:
            if asyncio.get_running_loop().time() > deadline:
                break
            await asyncio.sleep(0.1)
        held = [exchange for exchange in self._running if exchange.deferred]
        if held:  # their coroutines have ended: nothing to cancel, their answers wait for their audit records
            log.error(
                "gave up %d REST answer(s) held for their audit records after the drain's %g s", len(held), self.drain_s
            )
            for exchange in held:
                exchange.abandon()  # (its connection closes, and it leaves ``_running``)
        if self._running:
            log.error(
                "cancelled %d REST request(s) still running after the drain's %g s", len(self._running), self.drain_s
            )
            for task in self._running.values():
                task.cancel()
        # the drain's time is over: a connection still open (an answer a client takes slowly, a lingering close, a
        # close waiting for its close_notify, a door waiting for a first byte or a handshake) is cut, not left to its
        # own limits, which ``wait_closed`` would wait for (Python 3.12.1+ waits for every connection)
        for connection in list(self._open):
            connection.abort()
        for opening in list(self._opening):
            opening.abort()
        for server in self.servers:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(server.wait_closed(), _WAIT_CLOSED_S)

    # -- the watchdog ------------------------------------------------------------------------

    def _watch_later(self) -> None:
        timeouts = self.timeouts
        tick = min(1.0, max(0.05, min(timeouts.header_s, timeouts.body_s, self.keepalive_s) / 10))
        self._watchdog = asyncio.get_running_loop().call_later(tick, self._watch)

    def _watch(self) -> None:
        self._watchdog = None
        now = asyncio.get_running_loop().time()
        for connection in list(self._open):
            self._check(connection, now)
        if self._open:
            self._watch_later()

    def _check(self, connection: Http1Connection, now: float) -> None:
        if connection.closing:
            return
        if connection.idle_since and now - connection.idle_since > self.keepalive_s:
            connection.close(linger=False)
            return
        parsing = connection.parsing
        if connection.headers_due:
            if now > connection.headers_due:
                # a request had begun (bytes came): its headers are late; a silent connection gets no answer
                answer = HEADERS_LATE if connection.last_read else b""
                self._close_late(connection, answer)
        elif parsing is not None and not parsing.complete:
            # the server paused reading (a large body waiting for the app): the client is not the slow one
            late = not connection.paused and now - connection.last_read > self.timeouts.body_s
            if late:
                self._close_late(connection, b"" if parsing.response_started else BODY_LATE)

    @staticmethod
    def _close_late(connection: Http1Connection, answer: bytes) -> None:
        if answer:
            connection.write(answer)
        log.debug("closed a connection from %s: its request came too slowly", connection.client)
        connection.close(linger=bool(connection.last_read))  # one that never sent a byte has nothing in flight
