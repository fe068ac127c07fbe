"""uvicorn's HTTP protocol, telling the app who the client certificate says the client is.

ASGI has no standard place for the peer certificate, and uvicorn does not pass it on; this protocol reads it
from the TLS connection once, when the connection is made, and puts its common name in every request's scope
under ``CLIENT_CN_SCOPE_KEY``. The certificate was already verified against the client CA by the handshake.
"""

from __future__ import annotations

import asyncio
from typing import Any

from dhow.protocols.rest.app import CLIENT_CN_SCOPE_KEY
from dhow.protocols.rest.connection import DeadlineHttpProtocol

__all__ = ["ClientCertHttpProtocol"]


class ClientCertHttpProtocol(DeadlineHttpProtocol):
    _client_cn = ""

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        ssl_object = transport.get_extra_info("ssl_object")
        certificate = ssl_object.getpeercert() if ssl_object is not None else None
        self._client_cn = _common_name(certificate) if certificate else ""

    def on_message_begin(self) -> None:
        super().on_message_begin()
        if self._client_cn:
            scope: dict[str, Any] = self.scope  # type: ignore[assignment]  # an ASGI scope may carry extension keys
            scope[CLIENT_CN_SCOPE_KEY] = self._client_cn


def _common_name(certificate: dict[str, Any]) -> str:
    for rdn in certificate.get("subject", ()):
        for key, value in rdn:
            if key == "commonName":
                return str(value)
    return ""
