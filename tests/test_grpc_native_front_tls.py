"""The native gRPC front over TLS, on both event loops (``--loop asyncio|uvloop``): a connection the server closes,
or refuses at ``--max-connections``, gives back its socket and its slot at once, not after the client's TLS
close_notify (asyncio's and uvloop's wait for it 30 s by default), and a refused connection's data is never read.
Real sockets; the client speaks TLS through memory BIOs, so that it can stay silent where a library would answer."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import ssl
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import uvloop
from cryptography.x509.oid import ExtendedKeyUsageOID

from dhow.protocols.grpc import create_grpc_server
from dhow.protocols.grpc.h2 import frames as f
from dhow.protocols.grpc.h2.plaintext import MESSAGE, _Refusal, refuse_plaintext
from dhow.protocols.grpc.h2.server import NativeServer
from dhow.protocols.grpc.server import GrpcConnectionLimits
from tests.conftest import read_until_closed, wait_until
from tests.inprocess import open_service
from tests.test_e2e_security_transport import _issue
from tests.test_grpc_native_front import HELLO, GatedPlane, _goaway_code, _read_frames, _request
from tests.test_grpc_native_front_abuse import _INFER

#: how long a socket waits for the server to act: a server that never does fails the test by this wait
SAFETY_S = 10.0


@dataclass
class TlsDoor:
    port: int
    server: NativeServer
    folder: Path
    #: what the loop's exception handler was given ("Fatal error on SSL protocol" among them)
    errors: list[dict[str, Any]]

    def connections(self) -> int:
        return len(self.server.front.connections)


@pytest.fixture(params=["asyncio", "uvloop"])
def tls_door(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[TlsDoor]:
    """A native front speaking TLS (ALPN h2) on a free port: one connection at most, 1 s to say its preface."""
    ca = _issue(tmp_path, "ca", "dhow test CA", None)
    _issue(tmp_path, "server", "localhost", ca, ExtendedKeyUsageOID.SERVER_AUTH)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(tmp_path / "server.pem", tmp_path / "server.key")
    context.set_alpn_protocols(["h2"])
    loop = asyncio.new_event_loop() if request.param == "asyncio" else uvloop.new_event_loop()
    errors: list[dict[str, Any]] = []
    loop.set_exception_handler(lambda _, error: errors.append(error))
    thread = threading.Thread(target=loop.run_forever, name="tls-door", daemon=True)
    thread.start()
    plane = GatedPlane()
    service, trail = open_service(plane)
    limits = GrpcConnectionLimits(max_connections=1, handshake_s=1.0)

    async def start() -> Any:
        plane.gate = asyncio.Event()
        await trail.start()
        bound = await create_grpc_server(service, "127.0.0.1", 0, front="native", limits=limits, ssl_context=context)
        await bound.server.start()
        return bound

    bound = asyncio.run_coroutine_threadsafe(start(), loop).result(10)
    try:
        yield TlsDoor(bound.port, bound.server, tmp_path, errors)
    finally:
        asyncio.run_coroutine_threadsafe(bound.server.stop(None), loop).result(10)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)
        loop.close()


def _handshake(door: TlsDoor, then: bytes = b"") -> socket.socket:
    """A TLS connection whose client finishes the handshake, sends ``then`` in the same segment as its Finished,
    and never answers the server's close_notify; the raw socket."""
    context = ssl.create_default_context(cafile=door.folder / "ca.pem")
    context.set_alpn_protocols(["h2"])
    sock = socket.create_connection(("127.0.0.1", door.port), timeout=SAFETY_S)
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    tls = context.wrap_bio(incoming, outgoing, server_hostname="localhost")
    while True:
        try:
            tls.do_handshake()
            break
        except ssl.SSLWantReadError:
            if outgoing.pending:
                sock.sendall(outgoing.read())
            incoming.write(sock.recv(65536))
    if then:
        tls.write(then)
    sock.sendall(outgoing.read())
    return sock


def _closed_by_the_server(sock: socket.socket) -> bool:
    """Read until the server closes the connection (True), or ``SAFETY_S`` passes without it (False)."""
    try:
        while sock.recv(65536):
            pass
    except ConnectionResetError:
        pass
    except TimeoutError:
        return False
    return True


def test_a_closed_tls_connection_frees_its_slot_without_the_clients_close_notify(tls_door: TlsDoor) -> None:
    """A client silent after its handshake is closed at the 1 s handshake limit: its socket and its slot are
    freed within the close's grace (2 s) though it never answers the server's close_notify (30 s, before)."""
    with _handshake(tls_door) as silent:
        wait_until(lambda: tls_door.connections() == 1, SAFETY_S, "the connection admitted")
        assert _closed_by_the_server(silent), "the server still holds the connection"
        wait_until(lambda: tls_door.connections() == 0, SAFETY_S, "the slot freed")
    with _handshake(tls_door, HELLO):
        wait_until(lambda: tls_door.connections() == 1, SAFETY_S, "a new connection admitted in the slot")
    assert not tls_door.errors, tls_door.errors


def test_a_refused_tls_connection_is_closed_at_once_and_its_data_never_read(tls_door: TlsDoor) -> None:
    """With the one slot held, a connection whose preface, SETTINGS and ten calls come with its handshake's end:
    its socket is closed at once (not 30 s later, waiting for its close_notify), nothing of it is parsed (under
    asyncio its SETTINGS were, and failed with an IndexError, "Fatal error on SSL protocol"), the held connection
    goes on."""
    request = _request("slow", np.ones((1, 4), np.float32)).SerializeToString()
    message = b"\0" + len(request).to_bytes(4, "big") + request
    calls = b"".join(
        f.frame(f.HEADERS, f.END_HEADERS, s, _INFER) + f.frame(f.DATA, f.END_STREAM, s, message)
        for s in range(1, 21, 2)
    )
    with _handshake(tls_door, HELLO):
        wait_until(lambda: tls_door.connections() == 1, SAFETY_S, "the first connection admitted")
        with _handshake(tls_door, HELLO + calls) as refused:
            assert _closed_by_the_server(refused), "the refused connection still open"
        assert tls_door.connections() == 1
        (held_connection,) = tls_door.server.front.connections
        assert not held_connection.streams
    assert not tls_door.errors, tls_door.errors


def test_the_handshakes_limit_counts_from_the_accept_not_from_the_tls_handshakes_end(tls_door: TlsDoor) -> None:
    """--header-timeout covers a gRPC connection's start, TLS handshake and HTTP/2 settings together: a client that
    waited before its handshake has that much less for its settings (each step had the whole limit: 3 times it)."""
    with socket.create_connection(("127.0.0.1", tls_door.port), timeout=SAFETY_S) as sock:
        time.sleep(0.5)  # half the fixture's 1 s limit before its first byte
        context = ssl.create_default_context(cafile=tls_door.folder / "ca.pem")
        context.set_alpn_protocols(["h2"])
        with context.wrap_socket(sock, server_hostname="localhost") as tls:
            # its preface (no settings): heard from, its close at the limit lingers, and it stays to be looked at
            tls.sendall(f.PREFACE)
            wait_until(lambda: tls_door.connections() == 1, SAFETY_S, "the connection admitted")
            (connection,) = tls_door.server.front.connections
            limit = tls_door.server.front.limits.handshake_s
            # (uvloop keeps a timer's due time in whole ms of its own clock: a few ms past the limit are its rounding;
            # the whole limit again would be 0.5 s past it)
            due = connection._timers[0].when()
            assert due < connection.accepted + limit + 0.1, (
                f"the settings got the whole limit ({due - connection.accepted:.3f} s)"
            )


def _answered_plaintext(door: TlsDoor) -> asyncio.Transport:
    """The one plaintext connection being answered that the port needs TLS (the server holds a connection from its
    accept, at the TLS door, to the end of its handshake or of that answer)."""
    found: list[asyncio.Transport] = []

    def answered() -> bool:
        found[:] = [t for t in list(door.server._refusing) if isinstance(t.get_protocol(), _Refusal)]
        return len(found) == 1

    wait_until(answered, SAFETY_S, "the plaintext connection answered")
    return found[0]


def _stop(door: TlsDoor) -> None:
    asyncio.run_coroutine_threadsafe(door.server.stop(None), door.server.front.loop).result(SAFETY_S)


def test_a_handshake_under_way_at_the_stop_is_cut_not_admitted_after_it(tls_door: TlsDoor) -> None:
    """A client in its TLS handshake when the server stops does not finish it into a connection of the stopped
    server (admitted, sent its SETTINGS, never a GOAWAY: its calls sent to a server that is going)."""
    context = ssl.create_default_context(cafile=tls_door.folder / "ca.pem")
    context.set_alpn_protocols(["h2"])
    with socket.create_connection(("127.0.0.1", tls_door.port), timeout=SAFETY_S) as sock:
        incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
        tls = context.wrap_bio(incoming, outgoing, server_hostname="localhost")
        with pytest.raises(ssl.SSLWantReadError):
            tls.do_handshake()
        sock.sendall(outgoing.read())  # its ClientHello
        while True:  # the server's whole answer read: the client's part done, its Finished not sent yet
            incoming.write(sock.recv(65536))
            try:
                tls.do_handshake()
                break
            except ssl.SSLWantReadError:
                continue
        assert tls.version() is not None
        _stop(tls_door)  # the server's handshake under way: it waits for the client's Finished
        received = b""
        with contextlib.suppress(ssl.SSLError, OSError):  # (the cut: a reset, or the end of the stream)
            tls.write(HELLO)
            sock.sendall(outgoing.read())
            sock.settimeout(0.5)
            while chunk := sock.recv(65536):
                incoming.write(chunk)
                with contextlib.suppress(ssl.SSLWantReadError):
                    received += tls.read(65536)
        # (looked at while the client is still connected: its close would end an admitted connection too)
        assert not tls_door.server.front.connections, "a connection admitted after the stop"
    assert received == b"", f"the stopped server answered a new connection: {received[:40]!r}"


def test_a_silent_connection_at_the_tls_door_is_cut_by_the_stop(tls_door: TlsDoor) -> None:
    """Not left to its first byte's limit (the fixture's 1 s; 10 s by default) after the server stopped."""
    with socket.create_connection(("127.0.0.1", tls_door.port), timeout=SAFETY_S) as sock:
        wait_until(lambda: len(tls_door.server._refusing) == 1, SAFETY_S, "the connection accepted")
        _stop(tls_door)
        sock.settimeout(0.5)
        with contextlib.suppress(ConnectionResetError):  # (cut: a reset, or the end of the stream)
            assert sock.recv(1) == b""


def test_a_server_stopping_closes_the_plaintext_connections_it_is_answering(tls_door: TlsDoor) -> None:
    """A plaintext client that said its preface and no call yet is held until its handshake's limit: a stop closes
    it at once, as it closes the TLS connections."""
    with socket.create_connection(("127.0.0.1", tls_door.port), timeout=SAFETY_S) as plain:
        plain.sendall(HELLO)
        held = _answered_plaintext(tls_door)
        asyncio.run_coroutine_threadsafe(tls_door.server.stop(None), tls_door.server.front.loop).result(SAFETY_S)
        assert held.is_closing(), "the stop left the plaintext connection to its handshake's limit"
        assert read_until_closed(plain) == f.settings({})
    assert not tls_door.server._refusing


def test_a_plaintext_connections_limit_counts_from_the_accept_not_from_its_first_byte(tls_door: TlsDoor) -> None:
    """A plaintext client that waited before its preface has that much less of the handshake's limit left for its
    call (the refusal had the whole limit from the first byte: twice it in all)."""
    with socket.create_connection(("127.0.0.1", tls_door.port), timeout=SAFETY_S) as plain:
        time.sleep(0.5)  # half the fixture's 1 s limit before its first byte
        plain.sendall(HELLO)
        refusal: Any = _answered_plaintext(tls_door).get_protocol()
        # accepted at most when the client's connect returned, 0.5 s ago: at most 0.5 s of the limit is left
        left = refusal._timer.when() - tls_door.server.front.loop.time()
        assert left < tls_door.server.front.limits.handshake_s * 0.75, f"{left:.2f} s left: the whole limit again"


def _refusing(feed: Callable[[Any], None]) -> bytes:
    """A plaintext connection on a real socket pair handed to ``refuse_plaintext`` after the preface's first byte,
    then ``feed(its refusal)``; what the client got before the server closed."""
    client, served = socket.socketpair()

    async def run() -> None:
        transport, _ = await asyncio.get_running_loop().connect_accepted_socket(asyncio.Protocol, served)
        refuse_plaintext(SAFETY_S, set())(transport, f.PREFACE[:1], asyncio.get_running_loop().time())
        feed(transport.get_protocol())
        await asyncio.sleep(0.1)  # the closed transport's connection_lost

    with client:
        client.settimeout(SAFETY_S)
        asyncio.run(run())
        return read_until_closed(client)


def test_a_plaintext_clients_frames_one_a_read_are_each_looked_at_once() -> None:
    """64 KiB of 9-byte frames, one a read: each read is looked at alone (every read parsed all that came before
    it from the preface: 10 s of CPU for one connection); at the bound, GOAWAY saying the port needs TLS."""
    empty = f.frame(f.SETTINGS, 1, 0, b"")  # an acknowledgement: a frame header and nothing more

    def flood(refusal: Any) -> None:
        refusal.data_received(f.PREFACE[1:] + f.settings({}))
        while refusal._transport.get_protocol() is refusal:  # (until its close, lingering, reads in its place)
            refusal.data_received(empty)
            assert not refusal.pending and not refusal.skip, "a whole frame is kept after its read"
        assert refusal.read > 64 * 1024

    frames = _refusing(flood)
    assert frames.startswith(f.settings({})) and MESSAGE.encode() in frames, frames[-200:]


def test_a_plaintext_client_whose_preface_goes_wrong_after_its_first_byte_is_closed() -> None:
    assert _refusing(lambda refusal: refusal.data_received(b"RI * HTTP/1.1\r\n\r\n")) == f.settings({})


def test_a_connection_admitted_in_the_turn_its_handshake_ended_is_drained_by_the_stop_not_cut(
    tls_door: TlsDoor,
) -> None:
    """A connection leaves the TLS door's set (what a stop cuts) on the turn after its handshake ended, while its
    HTTP/2 connection is admitted already: a stop in that turn drains it (GOAWAY, its calls given their grace) as it
    drains the others, never cuts it."""
    context = ssl.create_default_context(cafile=tls_door.folder / "ca.pem")
    context.set_alpn_protocols(["h2"])
    raw = socket.create_connection(("127.0.0.1", tls_door.port), timeout=SAFETY_S)
    with context.wrap_socket(raw, server_hostname="localhost") as sock:
        sock.sendall(HELLO)
        wait_until(lambda: tls_door.connections() == 1, SAFETY_S, "the connection admitted")

        async def stop_in_that_turn() -> None:
            server = tls_door.server
            (connection,) = server.front.connections
            assert connection.wire is not None
            server._refusing.add(connection.wire)  # where it stands in the turn its handshake ended
            await server.stop(None)

        asyncio.run_coroutine_threadsafe(stop_in_that_turn(), tls_door.server.front.loop).result(SAFETY_S)
        assert _goaway_code(_read_frames(sock, f.GOAWAY))[0] == f.NO_ERROR
