"""The native gRPC front's listening side: it binds the port, serves a connection per client, and stops as
grpc.aio's server does (``stop(grace)``: GOAWAY, the calls in flight get ``grace`` seconds, then UNAVAILABLE)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import ssl
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import grpc

from dhow.protocols.grpc.h2 import bounds
from dhow.protocols.grpc.h2.calls import Method
from dhow.protocols.grpc.h2.connection import H2Connection
from dhow.protocols.grpc.h2.plaintext import refuse_plaintext
from dhow.protocols.linger import leaving
from dhow.protocols.runner import CallRunner
from dhow.protocols.tls_door import TlsDoor, alerting, ssl_protocol_class

if TYPE_CHECKING:
    from dhow.protocols.grpc.decoding import Methods
    from dhow.protocols.grpc.server import GrpcConnectionLimits

__all__ = ["Front", "NativeServer"]

log = logging.getLogger("dhow.grpc")

#: how often a stop looks whether the calls in flight have ended
_DRAIN_POLL_S = 0.05
#: how often at most the log says the port refuses connections at its bound
_REFUSAL_LOG_S = 60.0


@dataclass(frozen=True, slots=True)
class _CallDetails:
    """What grpc's handlers look a method up by (``grpc.HandlerCallDetails``)."""

    method: str
    invocation_metadata: tuple[tuple[str, str], ...] = ()


@dataclass(slots=True)
class Front:
    """What every connection of the port shares: the methods, the limits, the connections open."""

    methods: Methods
    limits: GrpcConnectionLimits
    max_message: int
    loop: asyncio.AbstractEventLoop
    connections: set[H2Connection] = field(default_factory=set)
    #: counts a connection refused past ``limits.max_connections``
    refused: Callable[[], None] = lambda: None
    _logged: float = float("-inf")
    _found: dict[str, Method] = field(default_factory=dict)

    def admit(self, connection: H2Connection, transport: asyncio.Transport) -> bool:
        """Count ``connection`` in and send the server's SETTINGS; past ``limits.max_connections``, refuse it: False.

        A refused connection is closed before the server's SETTINGS, not sent SETTINGS then GOAWAY: grpc's clients
        take a connection that sent SETTINGS as made, and after its GOAWAY reconnect at once, without backoff (176
        refused connections in 2 s from one channel, its call waiting to its deadline), while a connection closed
        before them failed: the call fails UNAVAILABLE at once and the channel reconnects with its backoff. Counted
        in ``refused``, logged at most once a minute. Aborted, not closed: a TLS close would wait for the client's
        close_notify, holding the socket. A slot is freed when its connection is lost
        (``H2Connection.connection_lost``)."""
        bound = self.limits.max_connections
        if bound is not None and len(self.connections) >= bound:
            transport.abort()
            self.refused()
            if self.loop.time() - self._logged >= _REFUSAL_LOG_S:
                self._logged = self.loop.time()
                log.warning("gRPC connections refused: %d open, the bound of --max-connections", bound)
            return False
        self.connections.add(connection)
        transport.write(bounds.ANNOUNCED)
        return True

    def method(self, name: str) -> Method | None:
        found = self._found.get(name)
        if found is None:
            handler = self.methods.service(_CallDetails(name))  # type: ignore[arg-type]
            if handler is None:
                return None  # unknown names are not kept: a client could send any number of them
            found = self._found[name] = Method.of(handler)
        return found


class NativeServer:
    """Serves ``methods`` over HTTP/2 on the event loop; the interface of ``grpc.aio.Server`` dhow uses."""

    def __init__(
        self,
        methods: Methods,
        limits: GrpcConnectionLimits,
        max_message: int,
        ssl_context: ssl.SSLContext | None,
        refused: Callable[[], None] | None = None,
        plaintext: Callable[[], None] | None = None,
    ) -> None:
        self.front = Front(methods, limits, max_message, asyncio.get_running_loop())
        if refused is not None:
            self.front.refused = refused
        self._ssl = alerting(ssl_context) if ssl_context is not None else None
        self._tls_class = ssl_protocol_class(self.front.loop)
        #: the connections not yet HTTP/2 ones (closed by ``stop``): at the TLS door (no first byte yet, or in their
        #: handshake: ``TlsDoor``'s ``opening``) or plaintext ones being answered that the port needs TLS; and the
        #: count of those
        self._refusing: set[asyncio.Transport] = set()
        self._plaintext = refuse_plaintext(limits.handshake_s, self._refusing)
        self._plaintext_counted = plaintext
        self._server: asyncio.Server | None = None
        self._cut = asyncio.Event()
        self._stopped = False

    async def bind(self, host: str, port: int, reuse_port: bool) -> int:
        """Listen (not yet accepting); the port bound. Raises ``OSError`` when the address cannot be bound."""
        self._server = await self.front.loop.create_server(
            self._protocol, host, port, reuse_port=reuse_port or None, backlog=1024, start_serving=False
        )
        sockets: Any = self._server.sockets
        return int(sockets[0].getsockname()[1])

    def _protocol(self) -> asyncio.Protocol:
        """A connection's protocol: H2 in plaintext; with TLS, the TLS door (``protocols.tls_door``): the loop's own
        TLS protocol with the handshake's limit, a close waiting ``bounds.CLOSE_GRACE_S`` at most for the client's
        close_notify, a failed handshake's alert sent, a plaintext call answered that the port needs TLS."""
        if self._ssl is None:
            return H2Connection(self.front)
        handshake_s = self.front.limits.handshake_s
        return TlsDoor(
            self._ssl,
            lambda: H2Connection(self.front),
            self._plaintext,
            tls_class=self._tls_class,
            handshake_s=handshake_s,
            first_byte_s=handshake_s,
            counted=self._plaintext_counted,
            opening=self._refusing,
        )

    async def start(self) -> None:
        assert self._server is not None, "bind first"
        await self._server.start_serving()

    async def stop(self, grace: float | None) -> None:
        """Close the port, GOAWAY every connection, give the calls in flight ``grace`` seconds (None: none),
        then end those left with UNAVAILABLE; answers still leaving have what is left of ``grace`` (at least
        ``bounds.CLOSE_GRACE_S``) to leave, then every connection closes at once. A second ``stop`` while one waits
        cuts the wait short."""
        if self._stopped:
            self._cut.set()
            await self._end_calls(0.0)
            return
        self._stopped = True
        if self._server is not None:
            self._server.close()
        # (a handshake that ended this turn leaves the door's set on the next: its connection, admitted already,
        # is drained below with the others, not cut)
        admitted = {connection.wire for connection in self.front.connections}
        for refusing in list(self._refusing):
            if refusing not in admitted:
                refusing.abort()
        for connection in list(self.front.connections):
            connection.drain()
        loop = self.front.loop
        deadline = loop.time() + (grace or 0.0)
        # the calls in flight, and the answers of those ended still leaving (a client reading steadily gets them)
        await self._wait(lambda: any(c.streams or _leaving(c) for c in self.front.connections), deadline)
        await self._end_calls(max(deadline, loop.time() + bounds.CLOSE_GRACE_S))

    async def _wait(self, busy: Callable[[], bool], deadline: float) -> None:
        """Until ``busy()`` is false or ``deadline`` (loop time) has passed; a second ``stop`` cuts it short."""
        loop = self.front.loop
        while busy() and not self._cut.is_set():
            left = deadline - loop.time()
            if left <= 0:
                return
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._cut.wait(), min(_DRAIN_POLL_S, left))

    async def _end_calls(self, deadline: float) -> None:
        """End the calls left UNAVAILABLE; their last frames, and the answers still leaving, have till ``deadline``
        to leave (a client not taking them is aborted sooner, ``linger.drained``), then every connection closes at
        once: the stop does not wait out a lingering close."""
        connections = list(self.front.connections)
        tasks = [task for connection in connections for task in _cut(connection)]
        if tasks:
            await asyncio.wait(tasks, timeout=5)
        await self._wait(lambda: any(_leaving(c) for c in connections), deadline)
        for connection in connections:
            connection.close_now()


def _leaving(connection: H2Connection) -> bool:
    """Closed, its last frames still leaving (``linger.leaving``)."""
    return connection.transport is not None and leaving(connection.transport)


def _cut(connection: H2Connection) -> list[asyncio.Future[None]]:
    """End every call in flight on ``connection`` with UNAVAILABLE; the calls still finishing are returned."""
    tasks: list[asyncio.Future[None]] = []
    for stream in list(connection.streams.values()):
        connection.end_call(stream, (grpc.StatusCode.UNAVAILABLE, "the server stopped before the call ended"))
        task = stream.task
        if task is not None and not task.done():
            tasks.append(task.finished() if isinstance(task, CallRunner) else task)
    return tasks
