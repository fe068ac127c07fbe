"""A TLS port's door, shared by the REST and gRPC ports: it reads a connection's first bytes before any TLS, so
that a client's mistake gets an answer it can print instead of a closed connection (as nginx and Envoy do).

``TlsDoor`` is the protocol a connection starts with. A TLS handshake record goes on through TLS, with the bytes
already read, to the port's own protocol; anything else is handed to the port's ``plaintext`` answer (REST: a 400
saying to use https://; gRPC: the call failed UNAVAILABLE, saying the port needs TLS). The door costs one look at
the first read: what follows goes through the same TLS protocol as a server's ``ssl=`` would give it.

A handshake that fails sends its alert: asyncio's and uvloop's TLS protocols close the socket on a failed
handshake without writing what OpenSSL put in its outgoing buffer, so a client with no certificate where one is
required (TLS 1.3's alert certificate_required) read an empty reply. ``alerting`` makes a context's TLS objects
write that alert themselves before the failure is raised.

A close waits at most ``linger.GRACE_S`` for the client's close_notify (asyncio's and uvloop's default: 30 s, the
socket and its connection slot held all that time by a client that never answers). The TLS protocols start that
timer at the close, and discard what has not left when it fires: a connection's protocol closes only once its
answer has left the socket's buffer too (``linger.close_lingering``, told the socket's transport as ``wire``), or
a large answer to a slow reader was cut off after 2 s.
"""

from __future__ import annotations

import asyncio
import contextvars
import ssl
from asyncio.sslproto import SSLProtocol
from collections.abc import Callable
from typing import Any, cast

from dhow.protocols.linger import GRACE_S

__all__ = [
    "FIRST_BYTE_TIMEOUT_S",
    "TlsDoor",
    "alerting",
    "ssl_protocol_class",
]

#: the first byte of a TLS record carrying a handshake (RFC 8446 5.1, ContentType handshake(22))
_TLS_HANDSHAKE = 0x16
#: seconds a connection may stay silent before its first byte (then the TLS handshake has its own limit)
FIRST_BYTE_TIMEOUT_S = 60.0

#: the transport of the connection whose TLS object is being made (in ``TlsDoor._start_tls``, synchronously; a
#: context variable: each thread's loop, and each task, sees its own)
_opening: contextvars.ContextVar[asyncio.Transport | None] = contextvars.ContextVar("tls_door_opening", default=None)


class _AlertingSSLObject(ssl.SSLObject):
    """An ``SSLObject`` that writes the alert of a failed handshake to its connection before raising."""

    _door: asyncio.Transport | None = None
    _outgoing: ssl.MemoryBIO | None = None

    def do_handshake(self) -> None:
        try:
            super().do_handshake()
        except (ssl.SSLWantReadError, ssl.SSLWantWriteError):
            raise
        except ssl.SSLError:
            door, self._door = self._door, None
            alert = self._outgoing.read() if self._outgoing is not None else b""
            if door is not None and alert and not door.is_closing():
                door.write(alert)  # the socket is closed right after: an alert is a few bytes, sent at once
            raise
        self._door = None  # the handshake is done: nothing more to say, and no cycle kept


def alerting(context: ssl.SSLContext) -> ssl.SSLContext:
    """``context``, its handshakes' failures sent to the client as their alerts (through ``TlsDoor``): its TLS
    objects are ``_AlertingSSLObject``s, told their outgoing buffer and connection by its ``wrap_bio``."""
    if context.sslobject_class is _AlertingSSLObject:
        return context  # (a context reloaded in place, or given to both ports)
    context.sslobject_class = _AlertingSSLObject
    wrap_bio = context.wrap_bio

    def wrap_bio_alerting(incoming: ssl.MemoryBIO, outgoing: ssl.MemoryBIO, *args: Any, **kwargs: Any) -> Any:
        made = cast(_AlertingSSLObject, wrap_bio(incoming, outgoing, *args, **kwargs))
        made._outgoing = outgoing
        made._door = _opening.get()
        return made

    context.wrap_bio = wrap_bio_alerting  # type: ignore[method-assign]
    return context


def ssl_protocol_class(loop: asyncio.AbstractEventLoop) -> Any:
    """The TLS protocol the loop's own ``create_server(ssl=...)`` uses: uvloop's (compiled) on uvloop."""
    try:
        import uvloop.loop
    except ImportError:  # pragma: no cover - uvloop is a dependency
        return SSLProtocol
    # uvloop's stubs do not name its TLS protocol, though the module has it
    return uvloop.loop.SSLProtocol if isinstance(loop, uvloop.Loop) else SSLProtocol  # type: ignore[attr-defined]


class TlsDoor(asyncio.Protocol):
    """Starts TLS on a connection whose first byte opens a handshake, with ``app`` the protocol behind it; else
    calls ``plaintext(transport, first bytes, the accept's loop time)``, which answers (and closes, or takes the
    transport on).

    ``tls_class``: the TLS protocol (``ssl_protocol_class``, or asyncio's); ``handshake_s``: its handshake's
    limit from the connection's accept, its first byte's wait included (None: the TLS protocol's default, 60 s,
    from the first byte); ``first_byte_s``: how long a connection may stay silent before its first byte; ``counted``:
    called for each connection that spoke plaintext (a metric); ``opening``: holds the connection until its handshake
    ends or, one that spoke plaintext, until it ends (a server's drain aborts those left)."""

    def __init__(
        self,
        context: ssl.SSLContext,
        app: Callable[[], asyncio.BaseProtocol],
        plaintext: Callable[[asyncio.Transport, bytes, float], None],
        *,
        tls_class: Any = SSLProtocol,
        handshake_s: float | None = None,
        first_byte_s: float = FIRST_BYTE_TIMEOUT_S,
        counted: Callable[[], None] | None = None,
        opening: set[asyncio.Transport] | None = None,
    ) -> None:
        self._context = context
        self._app = app
        self._plaintext = plaintext
        self._tls_class = tls_class
        self._handshake_s = handshake_s
        self._first_byte_s = first_byte_s
        self._counted = counted
        self._opening = opening if opening is not None else set()
        self._transport: asyncio.Transport | None = None
        self._silence: asyncio.TimerHandle | None = None
        self._accepted = 0.0

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # a stream transport (uvloop's do not subclass asyncio.Transport)
        self._transport = cast(asyncio.Transport, transport)
        loop = asyncio.get_running_loop()
        self._accepted = loop.time()
        self._silence = loop.call_later(self._first_byte_s, transport.close)
        self._opening.add(self._transport)

    def connection_lost(self, exc: Exception | None) -> None:
        if self._silence is not None:
            self._silence.cancel()
        if self._transport is not None:
            self._opening.discard(self._transport)

    def data_received(self, data: bytes) -> None:
        transport = self._transport
        assert transport is not None
        if self._silence is not None:
            self._silence.cancel()
        if data[0] == _TLS_HANDSHAKE:
            self._start_tls(transport, data)
        else:  # (held in ``opening`` till it ends: its answer's close, lingering, is the drain's to cut too)
            if self._counted is not None:
                self._counted()
            self._plaintext(transport, data, self._accepted)

    def _start_tls(self, transport: asyncio.Transport, first: bytes) -> None:
        """Hand the connection to TLS, then to the app's protocol, with the bytes this protocol already read."""
        loop = asyncio.get_running_loop()
        handshake_s = self._handshake_s
        if handshake_s is not None:  # what the first byte's wait left of it (the two do not stack)
            handshake_s = max(0.001, handshake_s - (loop.time() - self._accepted))
        handshake = loop.create_future()
        # a failed handshake (a wrong certificate) ends the connection; its error needs no other reader
        handshake.add_done_callback(lambda done: done.cancelled() or done.exception())
        handshake.add_done_callback(lambda _: self._opening.discard(transport))
        app = self._app()
        if hasattr(app, "wire"):  # it closes once its answers have left the socket's buffer (``linger.py``)
            app.wire = transport
        if hasattr(app, "accepted"):  # its own limit on the connection's start counts from the accept as well
            app.accepted = self._accepted
        opening = _opening.set(
            transport
        )  # the TLS object is made by the protocol's constructor (asyncio's) or connection_made
        try:
            tls = self._tls_class(
                loop,
                app,
                self._context,
                handshake,
                server_side=True,
                ssl_handshake_timeout=handshake_s,
                ssl_shutdown_timeout=GRACE_S,  # (the close_notify's wait: the lingering close's grace)
            )
            transport.set_protocol(tls)
            tls.connection_made(transport)
        finally:
            _opening.reset(opening)
        view = memoryview(first)
        while view:
            buffer = tls.get_buffer(len(view))
            size = min(len(buffer), len(view))
            buffer[:size] = view[:size]
            tls.buffer_updated(size)
            view = view[size:]
