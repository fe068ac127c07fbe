"""The REST port with TLS: HTTPS, a 400 for plain HTTP, and the client certificate's name in each request.

The port's connections start with the TLS door (``protocols.tls_door``): it reads the first bytes; a TLS handshake
record goes on through TLS (asyncio's ``SSLProtocol``) to the HTTP protocol; a plain HTTP request is answered
``400 use HTTPS``, as nginx does, instead of a closed connection the client cannot explain. (uvicorn's own TLS
support wraps every connection before any byte is read, so it can only drop such a request.)

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
from collections.abc import Callable
from typing import Any

from dhow.protocols import linger
from dhow.protocols.linger import close_lingering
from dhow.protocols.rest.app import CLIENT_CN_SCOPE_KEY
from dhow.protocols.rest.connection import DeadlineHttpProtocol
from dhow.protocols.tls_door import FIRST_BYTE_TIMEOUT_S, TlsDoor, alerting

__all__ = ["HANDSHAKE_S", "ClientCertHttpProtocol", "common_name", "https_door", "https_port_protocol", "plain_http"]

_PLAIN_HTTP_ERROR = json.dumps(
    {
        "error": "this port speaks HTTPS only: the request was sent as plain HTTP; use https:// for this address "
        "(a client that does not trust the server's certificate is given its CA: curl --cacert CA.pem, "
        "tritonclient's ssl_options={'ca_certs': 'CA.pem'})"
    }
).encode()
_PLAIN_HTTP_ANSWER = (
    b"HTTP/1.1 400 Bad Request\r\ncontent-type: application/json\r\nconnection: close\r\n"
    b"content-length: %d\r\n\r\n%s" % (len(_PLAIN_HTTP_ERROR), _PLAIN_HTTP_ERROR)
)


#: a connection's TLS handshake's limit from its accept, the first byte's wait included (asyncio's handshake limit,
#: which would count from the first byte: 60 s for the first byte then 60 s more for the handshake)
HANDSHAKE_S = FIRST_BYTE_TIMEOUT_S


def plain_http(transport: asyncio.Transport, first: bytes, accepted: float) -> None:
    """A connection to the HTTPS port whose first bytes are not TLS: a plain HTTP request gets the 400 (at once:
    the accept's time, ``accepted``, bounds nothing)."""
    # an HTTP method starts with a capital letter; anything else gets no answer it could not read
    if first[:1].isupper():
        transport.write(_PLAIN_HTTP_ANSWER)
    # the rest of the request (a body) read and dropped: not a reset. Such a connection is not counted in
    # --max-connections (only the HTTP connection made once TLS starts is), but no more is needed: its lingering
    # close ends within ``linger.MAX_S`` (30 s) of its short 400 leaving (a client not taking it is aborted after
    # ``GRACE_S``) and reads ``linger.MAX_BYTES`` at most, less than a connection silent before its first byte may
    # hold a socket uncounted (``FIRST_BYTE_TIMEOUT_S``)
    close_lingering(transport, transport.get_protocol(), linger.GRACE_S)


def https_door(
    ssl_context: ssl.SSLContext,
    http: Callable[[], asyncio.Protocol],
    plaintext: Callable[[], None] | None = None,
    opening: set[asyncio.Transport] | None = None,
) -> TlsDoor:
    """A connection's protocol on the HTTPS port: TLS then ``http``, or the 400 for plain HTTP (``plaintext``
    counts it; ``opening``: see ``TlsDoor``). asyncio's ``SSLProtocol`` on either loop, as before the door."""
    return TlsDoor(ssl_context, http, plain_http, handshake_s=HANDSHAKE_S, counted=plaintext, opening=opening)


def https_port_protocol(
    ssl_context: ssl.SSLContext, http: type[DeadlineHttpProtocol], plaintext: Callable[[], None] | None = None
) -> Any:
    """What uvicorn's ``http`` option takes: a factory of the port's protocol, called with uvicorn's arguments;
    ``http`` is the HTTP protocol a connection goes on with once TLS is started (with its time limits). The
    context is the one ``ServerCertificates`` reloads on SIGHUP: new connections get the new certificate.
    ``plaintext`` counts a connection that spoke plain HTTP."""
    alerting(ssl_context)

    def create(**uvicorn_arguments: Any) -> TlsDoor:
        return https_door(ssl_context, functools.partial(http, **uvicorn_arguments), plaintext)

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
