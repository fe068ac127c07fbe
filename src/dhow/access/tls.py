"""TLS for the REST and gRPC ports, with optional client certificates (mutual TLS).

The settings are checked once, at start, with messages that name the option; the doors get what their
servers take (an SSL context for uvicorn, grpc's server credentials) from ``ServerCertificates``, which
reads the certificate and key again when told to (SIGHUP): new connections then get the new ones.
"""

from __future__ import annotations

import ssl
from dataclasses import dataclass
from pathlib import Path

import grpc

from dhow.core.errors import InvalidInput

__all__ = ["ServerCertificates", "TlsSettings"]


@dataclass(frozen=True, slots=True)
class TlsSettings:
    cert: Path
    key: Path
    client_ca: Path | None = None
    client_required: bool = True

    @classmethod
    def resolve(cls, cert: str, key: str, client_ca: str, client_auth: str, require_tls: bool) -> TlsSettings | None:
        """The TLS settings, or None for plaintext; refuses half-given or unreadable files."""
        if not cert and not key:
            if require_tls:
                raise InvalidInput("--require-tls is set but no certificate is: give --tls-cert and --tls-key")
            if client_ca:
                raise InvalidInput("--tls-client-ca needs TLS: give --tls-cert and --tls-key too")
            return None
        if not cert or not key:
            raise InvalidInput("TLS needs both --tls-cert and --tls-key")
        paths = [Path(cert), Path(key), *([Path(client_ca)] if client_ca else [])]
        for path in paths:
            if not path.is_file():
                raise InvalidInput(f"TLS file {path} does not exist")
        settings = cls(paths[0], paths[1], paths[2] if client_ca else None, client_auth == "required")
        settings.ssl_context()  # fail now, with the reason, rather than at the first connection
        return settings

    def ssl_context(self) -> ssl.SSLContext:
        """The REST port's server context: its certificate, and the client CA it verifies certificates with."""
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        try:
            context.load_cert_chain(self.cert, self.key)
            if self.client_ca is not None:
                context.load_verify_locations(self.client_ca)
                context.verify_mode = ssl.CERT_REQUIRED if self.client_required else ssl.CERT_OPTIONAL
        except (ssl.SSLError, OSError) as exc:
            raise InvalidInput(f"cannot use the TLS certificate {self.cert} / key {self.key}: {exc}") from None
        return context

    def grpc_configuration(self) -> grpc.ServerCertificateConfiguration:
        """The gRPC port's certificate, key and (when client certificates are required) client CA."""
        # grpc either requires a client certificate or does not ask for one: "optional" means not asked
        ca = self.client_ca.read_bytes() if self.client_ca is not None and self.client_required else None
        return grpc.ssl_server_certificate_configuration([(self.key.read_bytes(), self.cert.read_bytes())], ca)


class ServerCertificates:
    """The certificate both ports present, read again by ``reload``: new connections get the new one.

    REST: the port's protocol (``protocols.rest.tls``) starts TLS with ``context``, so ``reload`` loads the new
    pair into that same context (connections already open keep theirs), and into the native gRPC front's.
    grpcio's gRPC front: grpc asks ``_next`` at every new connection's handshake, which hands the new
    configuration over once. The client CA is read at start only: an SSL context can add trusted CAs but never
    forget one, so a CA change needs a restart.
    """

    def __init__(self, settings: TlsSettings) -> None:
        self.settings = settings
        self.context = settings.ssl_context()
        self._pending: grpc.ServerCertificateConfiguration | None = None
        self._h2_context: ssl.SSLContext | None = None

    def h2_context(self) -> ssl.SSLContext:
        """The gRPC port's context on the native front: the REST one's settings, offering HTTP/2 by ALPN."""
        if self._h2_context is None:
            context = self.settings.ssl_context()
            context.set_alpn_protocols(["h2"])
            self._h2_context = context
        return self._h2_context

    def grpc_credentials(self) -> grpc.ServerCredentials:
        return grpc.dynamic_ssl_server_credentials(
            self.settings.grpc_configuration(),
            # the stubs want a configuration back, grpc's documentation says None keeps the current one
            self._next,  # type: ignore[arg-type]
            require_client_authentication=self.settings.client_ca is not None and self.settings.client_required,
        )

    def _next(self) -> grpc.ServerCertificateConfiguration | None:
        # called by grpc, in its own thread, at each handshake: None keeps the configuration it has
        pending, self._pending = self._pending, None
        return pending

    def reload(self) -> None:
        """Read the certificate and key again (blocking: call in a thread); ``InvalidInput`` keeps the old ones."""
        settings = self.settings
        settings.ssl_context()  # a bad pair is refused here, before either port takes it
        try:
            configuration = settings.grpc_configuration()
            self.context.load_cert_chain(settings.cert, settings.key)
            if self._h2_context is not None:
                self._h2_context.load_cert_chain(settings.cert, settings.key)
        except (ssl.SSLError, OSError) as exc:
            raise InvalidInput(f"cannot use the TLS certificate {settings.cert} / key {settings.key}: {exc}") from None
        self._pending = configuration
