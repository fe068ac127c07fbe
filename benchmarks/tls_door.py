"""What the TLS door (``protocols.tls_door``) costs the server: CPU per TLS handshake and per round trip on an
open TLS connection, against the loop's own ``create_server(ssl=...)`` (the gRPC port before the door) and the
REST port's door before it (``--base``: a ``src`` tree of the commit before, e.g. ``git archive``'s).

    python benchmarks/tls_door.py [--base /tmp/main/src] [--handshakes 1500] [--trips 20000]

Each mode serves an echo protocol in a process of its own on uvloop; the client is another process. The
server's CPU time (user + system) is read before and after each phase: the client's work is not in it. Modes:
``loop-ssl`` uvloop's ``create_server(ssl=...)``; ``door-loop-class`` the door with uvloop's TLS protocol (the gRPC
port now); ``base-rest-door`` the REST port's door before (asyncio's TLS protocol); ``door-asyncio-class`` the door
with asyncio's (the REST port now).
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import json
import multiprocessing
import resource
import socket
import ssl
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

MODES = ("loop-ssl", "door-loop-class", "base-rest-door", "door-asyncio-class")


def _certificate(folder: Path) -> None:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = datetime.datetime.now(datetime.UTC)
    certificate = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(1)
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName("localhost")]), critical=False)
        .sign(key, hashes.SHA256())
    )
    (folder / "cert.pem").write_bytes(certificate.public_bytes(serialization.Encoding.PEM))
    (folder / "key.pem").write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )


class _Echo(asyncio.Protocol):
    def connection_made(self, transport: Any) -> None:
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        self.transport.write(data)


def _cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def _serve(mode: str, folder: str, base: str | None, ports: Any, control: Any) -> None:
    import uvloop

    if mode == "base-rest-door":
        assert base, "--base names the src tree of the commit before"
        sys.path.insert(0, base)
    # every mode loads the same modules: a process's state (its allocator's, after the imports) moved the cost of a
    # handshake by 100 us, more than any door does
    import dhow.protocols.rest.tls  # noqa: F401

    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(f"{folder}/cert.pem", f"{folder}/key.pem")

    async def main() -> None:
        loop = asyncio.get_running_loop()
        if mode == "loop-ssl":
            server = await loop.create_server(_Echo, "127.0.0.1", 0, ssl=context)
        elif mode == "base-rest-door":
            from dhow.protocols.rest.tls import HttpsPortProtocol  # type: ignore[attr-defined]

            server = await loop.create_server(lambda: HttpsPortProtocol(context, _Echo), "127.0.0.1", 0)
        else:
            from dhow.protocols.tls_door import TlsDoor, alerting, ssl_protocol_class

            alerting(context)
            tls_class = ssl_protocol_class(loop) if mode == "door-loop-class" else None
            kwargs = {"tls_class": tls_class} if tls_class is not None else {}
            server = await loop.create_server(
                lambda: TlsDoor(context, _Echo, lambda transport, *_: transport.close(), **kwargs), "127.0.0.1", 0
            )
        ports.put(server.sockets[0].getsockname()[1])
        while True:
            command = await loop.run_in_executor(None, control.get)
            if command == "stop":
                return
            ports.put(_cpu())

    uvloop.run(main())


def _client(port: int, handshakes: int, trips: int, ca: str, report: Any) -> None:
    context = ssl.create_default_context(cafile=ca)
    for _ in range(handshakes):
        with (
            socket.create_connection(("127.0.0.1", port)) as sock,
            context.wrap_socket(sock, server_hostname="localhost") as tls,
        ):
            tls.sendall(b"x")
            tls.recv(16)
    report("handshakes")
    with (
        socket.create_connection(("127.0.0.1", port)) as sock,
        context.wrap_socket(sock, server_hostname="localhost") as tls,
    ):
        payload = b"y" * 200
        for _ in range(trips):
            tls.sendall(payload)
            got = 0
            while got < len(payload):
                got += len(tls.recv(4096))
    report("trips")


def run(mode: str, folder: Path, base: str | None, handshakes: int, trips: int) -> dict[str, float]:
    spawn = multiprocessing.get_context("spawn")
    ports, control = spawn.Queue(), spawn.Queue()
    server = spawn.Process(target=_serve, args=(mode, str(folder), base, ports, control), daemon=True)
    server.start()
    port = ports.get(timeout=30)
    marks: list[tuple[str, float, float]] = []

    def mark(name: str) -> None:
        control.put("cpu")
        marks.append((name, ports.get(timeout=30), time.perf_counter()))

    mark("start")
    _client(port, handshakes, trips, str(folder / "cert.pem"), mark)
    control.put("stop")
    server.join(30)
    (_, cpu0, _), (_, cpu1, _), (_, cpu2, _) = marks
    return {
        "handshake_cpu_us": (cpu1 - cpu0) / handshakes * 1e6,
        "trip_cpu_us": (cpu2 - cpu1) / trips * 1e6,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base", help="src tree of the commit before (for base-rest-door)")
    parser.add_argument("--handshakes", type=int, default=1500)
    parser.add_argument("--trips", type=int, default=20000)
    parser.add_argument("--rounds", type=int, default=3)
    arguments = parser.parse_args()
    modes = [mode for mode in MODES if mode != "base-rest-door" or arguments.base]
    with tempfile.TemporaryDirectory() as folder:
        _certificate(Path(folder))
        for round_ in range(arguments.rounds):
            for mode in modes:
                result = run(mode, Path(folder), arguments.base, arguments.handshakes, arguments.trips)
                print(json.dumps({"round": round_, "mode": mode, **{k: round(v, 1) for k, v in result.items()}}))


if __name__ == "__main__":
    main()
