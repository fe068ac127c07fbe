"""The REST port with TLS: HTTPS, a 400 for plain HTTP, and the client certificate's name in each request.

``HttpsPortProtocol`` is the protocol the port's connections start with. It reads the first bytes: a TLS
handshake record goes on through TLS (asyncio's ``SSLProtocol``) to uvicorn; a plain HTTP request is answered
``400 use HTTPS``, as nginx does, instead of a closed connection the client cannot explain. (uvicorn's own
TLS support wraps every connection before any byte is read, so it can only drop such a request.)

``ClientCertHttpProtocol`` is uvicorn's HTTP protocol telling the app who the client certificate says the
client is. ASGI has no standard place for the peer certificate, and uvicorn does not pass it on; it is read
from the TLS connection once, when the connection is made, and its common name goes in every request's scope
under ``CLIENT_CN_SCOPE_KEY``. The certificate was already verified against the client CA by the handshake.
"""

from __future__ import annotations

import asyncio
import functools
import json
import ssl
from asyncio.sslproto import SSLProtocol
from collections.abc import Callable
from typing import Any, cast

from dhow.protocols import linger
from dhow.protocols.linger import close_lingering
from dhow.protocols.rest.app import CLIENT_CN_SCOPE_KEY
from dhow.protocols.rest.connection import DeadlineHttpProtocol

__all__ = ["ClientCertHttpProtocol", "HttpsPortProtocol", "common_name", "https_port_protocol"]

#: the first byte of a TLS record carrying a handshake (RFC 8446 5.1, ContentType handshake(22))
_TLS_HANDSHAKE = 0x16
#: seconds a connection may stay silent before its first byte (then the TLS handshake has its own limit)
FIRST_BYTE_TIMEOUT_S = 60.0
_PLAIN_HTTP_ERROR = json.dumps(
    {"error": "this port speaks HTTPS only: the request was sent as plain HTTP; use https:// for this address"}
).encode()
_PLAIN_HTTP_ANSWER = (
    b"HTTP/1.1 400 Bad Request\r\ncontent-type: application/json\r\nconnection: close\r\n"
    b"content-length: %d\r\n\r\n%s" % (len(_PLAIN_HTTP_ERROR), _PLAIN_HTTP_ERROR)
)


class HttpsPortProtocol(asyncio.Protocol):
    """Starts TLS on a connection whose first byte opens a handshake; answers plain HTTP with a 400. ``http``
    makes the HTTP protocol the connection goes on with (uvicorn's or dhow's own, ``http1.py``)."""

    def __init__(self, ssl_context: ssl.SSLContext, http: Callable[[], asyncio.Protocol]) -> None:
        self._ssl_context = ssl_context
        self._http = http
        self._transport: asyncio.Transport | None = None
        self._silence: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # a stream transport (uvloop's do not subclass asyncio.Transport)
        self._transport = cast(asyncio.Transport, transport)
        self._silence = asyncio.get_running_loop().call_later(FIRST_BYTE_TIMEOUT_S, transport.close)

    def connection_lost(self, exc: Exception | None) -> None:
        if self._silence is not None:
            self._silence.cancel()

    def data_received(self, data: bytes) -> None:
        transport = self._transport
        assert transport is not None
        if self._silence is not None:
            self._silence.cancel()
        if data[0] != _TLS_HANDSHAKE:
            # an HTTP method starts with a capital letter; anything else gets no answer it could not read
            if data[:1].isupper():
                transport.write(_PLAIN_HTTP_ANSWER)
            # the rest of the request (a body) read and dropped: not a reset. Such a connection is not counted in
            # --max-connections (only the HTTP connection made once TLS starts is), but no more is needed: its
            # lingering close ends within ``linger.MAX_S`` (30 s) and reads ``linger.MAX_BYTES`` at most, less
            # than a connection silent before its first byte may hold a socket uncounted (FIRST_BYTE_TIMEOUT_S)
            close_lingering(transport, self)
            return
        self._start_tls(transport, data)

    def _start_tls(self, transport: asyncio.Transport, first: bytes) -> None:
        """Hand the connection to TLS, then to HTTP, with the bytes this protocol already read."""
        http = self._http()
        loop = asyncio.get_running_loop()
        handshake = loop.create_future()
        # a failed handshake (a wrong certificate) ends the connection; its error needs no other reader
        handshake.add_done_callback(lambda done: done.cancelled() or done.exception())
        # its close waits for the client's close_notify as long as a lingering close waits (not asyncio's 30 s)
        tls = SSLProtocol(
            loop, http, self._ssl_context, handshake, server_side=True, ssl_shutdown_timeout=linger.GRACE_S
        )
        transport.set_protocol(tls)
        tls.connection_made(transport)
        view = memoryview(first)
        while view:
            buffer = tls.get_buffer(len(view))
            size = min(len(buffer), len(view))
            buffer[:size] = view[:size]
            tls.buffer_updated(size)
            view = view[size:]


def https_port_protocol(ssl_context: ssl.SSLContext, http: type[DeadlineHttpProtocol]) -> Any:
    """What uvicorn's ``http`` option takes: a factory of the port's protocol, called with uvicorn's arguments;
    ``http`` is the HTTP protocol a connection goes on with once TLS is started (with its time limits). The
    context is the one ``ServerCertificates`` reloads on SIGHUP: new connections get the new certificate."""

    def create(**uvicorn_arguments: Any) -> HttpsPortProtocol:
        return HttpsPortProtocol(ssl_context, functools.partial(http, **uvicorn_arguments))

    return create


class ClientCertHttpProtocol(DeadlineHttpProtocol):
    _client_cn = ""

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        ssl_object = transport.get_extra_info("ssl_object")
        certificate = ssl_object.getpeercert() if ssl_object is not None else None
        self._client_cn = common_name(certificate) if certificate else ""

    def on_message_begin(self) -> None:
        super().on_message_begin()
        if self._client_cn:
            scope: dict[str, Any] = self.scope  # type: ignore[assignment]  # an ASGI scope may carry extension keys
            scope[CLIENT_CN_SCOPE_KEY] = self._client_cn


def common_name(certificate: dict[str, Any]) -> str:
    """The subject's common name of a verified peer certificate (``SSLObject.getpeercert()``); "" without one."""
    for rdn in certificate.get("subject", ()):
        for key, value in rdn:
            if key == "commonName":
                return str(value)
    return ""
