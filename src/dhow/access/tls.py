"""TLS for the REST and gRPC ports, with optional client certificates (mutual TLS).

The settings are checked once, at start, with messages that name the option; the doors get what their
servers take (an SSL context for the REST port, grpc's server credentials).
"""

from __future__ import annotations

import ssl
from dataclasses import dataclass
from pathlib import Path

import grpc

from dhow.core.errors import InvalidInput

__all__ = ["TlsSettings"]


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

    def grpc_credentials(self) -> grpc.ServerCredentials:
        # grpc either requires a client certificate or does not ask for one: "optional" means not asked
        ca = self.client_ca.read_bytes() if self.client_ca is not None and self.client_required else None
        return grpc.ssl_server_credentials(
            [(self.key.read_bytes(), self.cert.read_bytes())],
            root_certificates=ca,
            require_client_auth=ca is not None,
        )
