"""Build the gRPC door: a server bound to an address, serving ``InferenceServicer``, the standard health service
and server reflection, over one of two fronts: ``native`` (dhow's own HTTP/2 on the event loop, ``h2``) or
``grpcio`` (grpc.aio's server). Both serve the same handlers (``decoding.Methods``)."""

from __future__ import annotations

import ssl
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import grpc
import grpc.aio
from grpc_health.v1 import health_pb2

from dhow.protocols.grpc.decoding import Methods
from dhow.protocols.grpc.generated import grpc_service_pb2, grpc_service_pb2_grpc, model_config_pb2
from dhow.protocols.grpc.h2.server import NativeServer
from dhow.protocols.grpc.health import add_health
from dhow.protocols.grpc.reflection import add_reflection
from dhow.protocols.grpc.service import InferenceServicer
from dhow.serving.service import CoreService


@dataclass(frozen=True, slots=True)
class GrpcConnectionLimits:
    """How long a gRPC client may take to open a connection, keep it idle, or stay silent to pings, and how many
    connections the port takes at once."""

    #: the TLS handshake, the HTTP/2 preface and the client's SETTINGS must all arrive within it
    handshake_s: float = 10.0
    #: a connection with no call in flight this long gets a GOAWAY (clients reconnect when they need to)
    idle_s: float = 300.0
    #: the server pings a quiet connection this often, and closes it when a ping goes unanswered
    keepalive_s: float = 60.0
    keepalive_timeout_s: float = 20.0
    #: the connections the port takes at once (``--max-connections``, counted apart from the REST port's); past it
    #: a new one is closed before the server's SETTINGS, nothing sent. None: no bound. The native front's only:
    #: grpcio's server has no such bound
    max_connections: int | None = None

    def options(self) -> list[tuple[str, int]]:
        def ms(seconds: float) -> int:
            return max(1, round(seconds * 1000))

        return [
            # grpc's default is 120 s: that long, a client that says nothing holds a connection
            ("grpc.server_handshake_timeout_ms", ms(self.handshake_s)),
            ("grpc.max_connection_idle_ms", ms(self.idle_s)),
            ("grpc.keepalive_time_ms", ms(self.keepalive_s)),
            ("grpc.keepalive_timeout_ms", ms(self.keepalive_timeout_s)),
        ]


#: the fronts ``--grpc-front`` chooses from
FRONTS = ("native", "grpcio")


class GrpcFront(Protocol):
    """What dhow uses of a gRPC server: grpc.aio's ``Server`` and the native front's ``NativeServer`` alike."""

    async def start(self) -> None: ...

    async def stop(self, grace: float | None) -> None: ...


@dataclass(frozen=True, slots=True)
class GrpcServer:
    """A bound, not yet started server; ``port`` is the port actually bound (useful with port 0)."""

    server: GrpcFront
    host: str
    port: int

    @property
    def address(self) -> str:
        return _address(self.host, self.port)


async def create_grpc_server(
    service: CoreService,
    host: str = "0.0.0.0",
    port: int = 8081,
    *,
    max_message_bytes: int = 64 * 1024 * 1024,
    credentials: grpc.ServerCredentials | None = None,
    reuse_port: bool = False,
    limits: GrpcConnectionLimits | None = None,
    front: str = "native",
    ssl_context: ssl.SSLContext | None = None,
    refused: Callable[[], None] | None = None,
    plaintext: Callable[[], None] | None = None,
) -> GrpcServer:
    """Create the server and bind it; the caller starts it (``await bound.server.start()``) and
    stops it (``await bound.server.stop(grace)``), so it can start the doors together.

    Messages larger than ``max_message_bytes`` are refused by grpc with RESOURCE_EXHAUSTED.
    Raises ``OSError`` if the address cannot be bound. With ``credentials`` the port speaks TLS only.
    ``reuse_port`` shares the port with the other workers of a supervisor, which checked it was free.
    ``limits``: the time limits of connections (default: ``GrpcConnectionLimits()``).
    ``front``: ``grpcio`` takes TLS as ``credentials``, ``native`` as ``ssl_context`` (which must offer ALPN
    "h2": ``ServerCertificates.h2_context``). ``refused``: called for each connection the native front refuses at
    ``limits.max_connections``; ``plaintext``: for each connection that spoke plaintext to its TLS port.
    """
    methods = Methods()
    grpc_service_pb2_grpc.add_GRPCInferenceServiceServicer_to_server(InferenceServicer(service), methods)
    add_health(methods, service.dataplane.ready)
    add_reflection(methods, (model_config_pb2.DESCRIPTOR, grpc_service_pb2.DESCRIPTOR, health_pb2.DESCRIPTOR), service)
    if front not in FRONTS:
        raise ValueError(f"unknown gRPC front {front!r}: choose one of {', '.join(FRONTS)}")
    if (credentials is not None and front != "grpcio") or (ssl_context is not None and front != "native"):
        raise ValueError(
            f"TLS on the {front} gRPC front is given as {'ssl_context' if front == 'native' else 'credentials'}"
        )
    if front == "native":
        native = NativeServer(
            methods, limits or GrpcConnectionLimits(), max_message_bytes, ssl_context, refused, plaintext
        )
        try:
            bound = await native.bind(host, port, reuse_port)
        except OSError as exc:
            raise OSError(f"cannot serve gRPC on {_address(host, port)}: {exc}") from None
        return GrpcServer(native, host, bound)
    server = grpc.aio.server(
        handlers=[methods],
        options=[
            ("grpc.max_receive_message_length", max_message_bytes),
            ("grpc.max_send_message_length", max_message_bytes),
            # grpc sets SO_REUSEPORT by default: a second server on a busy port would bind silently, so only
            # workers whose supervisor made sure the port was free share it
            ("grpc.so_reuseport", 1 if reuse_port else 0),
            *(limits or GrpcConnectionLimits()).options(),
        ],
    )
    address = _address(host, port)
    try:
        if credentials is None:
            bound = server.add_insecure_port(address)
        else:
            bound = server.add_secure_port(address, credentials)
    except RuntimeError as exc:  # grpc raises RuntimeError("Failed to bind to address …")
        raise OSError(f"cannot serve gRPC on {address}: {exc}") from None
    if bound == 0:
        raise OSError(f"cannot serve gRPC on {address}")
    return GrpcServer(server, host, bound)


def _address(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
