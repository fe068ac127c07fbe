"""A TLS port's mistakes answered as nginx and Envoy answer them, against real servers over real sockets: plain HTTP
sent to the HTTPS port gets a 400 saying to use https://, a plaintext gRPC call to the TLS gRPC port fails with a
message saying the port needs TLS (not grpcio's "Socket closed"), a client with no certificate where one is
required gets the TLS alert saying so (not an empty reply), and a REST connection the server closes does not wait
asyncio's 30 s for the client's close_notify.

One server per REST front and event loop, with client certificates required; certificates are made here.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import ssl
import subprocess
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import hpack
import pytest
import uvicorn
from cryptography.x509.oid import ExtendedKeyUsageOID
from grpc_health.v1 import health_pb2, health_pb2_grpc

from dhow.protocols import linger
from dhow.protocols.grpc.h2 import frames as f
from dhow.protocols.grpc.h2.plaintext import MESSAGE
from dhow.protocols.linger import GRACE_S
from dhow.protocols.rest import connection as connection_module
from dhow.protocols.rest.connection import ConnectionTimeouts, DeadlineHttpProtocol
from dhow.protocols.rest.front import HttpFront
from dhow.protocols.rest.tls import HANDSHAKE_S, https_port_protocol
from tests.conftest import DhowProcess, start_dhow, wait_until
from tests.test_e2e_security_transport import _issue, _wait_tls_ready
from tests.test_grpc_native_front import HELLO
from tests.test_grpc_native_front_abuse import _INFER
from tests.test_grpc_native_front_tls import _closed_by_the_server as _read_to_the_end
from tests.test_lingering_close import _read_to_end

#: a wait for the server to act; a server that never does fails the test by this wait (asyncio's default wait
#: for a close_notify is 30 s: a close bounded as the gRPC port's, 2 s, ends well within it)
SAFETY_S = 15.0


@dataclass(frozen=True)
class Door:
    server: DhowProcess
    folder: Path

    def context(self, client: bool = True) -> ssl.SSLContext:
        """A client context trusting the test CA, presenting the client certificate when ``client``."""
        context = ssl.create_default_context(cafile=self.folder / "ca.pem")
        if client:
            context.load_cert_chain(self.folder / "client.pem", self.folder / "client.key")
        return context


@pytest.fixture(scope="module", params=[("native", "uvloop"), ("uvicorn", "asyncio")], ids=lambda p: "-".join(p))
def door(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Door]:
    """TLS with client certificates required on both ports (native gRPC front), keep-alive 1 s, no model."""
    http_front, loop = request.param
    folder = tmp_path_factory.mktemp("door")
    ca = _issue(folder, "ca", "dhow test CA", None)
    _issue(folder, "server", "localhost", ca, ExtendedKeyUsageOID.SERVER_AUTH)
    _issue(folder, "client", "svc-a", ca, ExtendedKeyUsageOID.CLIENT_AUTH)
    (folder / "models").mkdir()
    server = start_dhow(
        folder / "models", folder,
        "--tls-cert", str(folder / "server.pem"), "--tls-key", str(folder / "server.key"),
        "--tls-client-ca", str(folder / "ca.pem"),
        "--http-front", http_front, "--loop", loop, "--keepalive-timeout", "1",
        wait=False,
    )  # fmt: skip
    done = Door(server, folder)
    try:
        _wait_tls_ready(server, done.context())
    except BaseException:
        server.stop()
        raise
    yield done
    assert server.stop() == 0, server.log()


def _closed_by_the_server(sock: socket.socket) -> bool:
    """Read until the server closes the connection (True), or ``SAFETY_S`` passes without it (False)."""
    sock.settimeout(SAFETY_S)
    return _read_to_the_end(sock)


def _plaintext_refused(door: Door, port: str) -> float:
    """The ``dhow_plaintext_refused_total`` sample of ``port`` in the server's metrics (0 when none)."""
    done = subprocess.run(
        ["curl", "-sS", "--cacert", str(door.folder / "ca.pem"), "--cert", str(door.folder / "client.pem"),
         "--key", str(door.folder / "client.key"), f"https://localhost:{door.server.http_port}/metrics"],
        capture_output=True, text=True, check=True,
    )  # fmt: skip
    prefix = f'dhow_plaintext_refused_total{{port="{port}"}} '
    return sum(float(line.removeprefix(prefix)) for line in done.stdout.splitlines() if line.startswith(prefix))


def test_plain_http_to_the_https_port_is_told_to_use_https_and_the_ca(door: Door) -> None:
    done = subprocess.run(
        ["curl", "-sS", "-i", f"http://{door.server.http_url}/v2/health/live"], capture_output=True, text=True
    )
    assert done.stdout.startswith("HTTP/1.1 400 Bad Request"), done
    assert "use https:// for this address" in done.stdout, done.stdout
    assert "--cacert" in done.stdout, done.stdout  # how a client that does not trust the certificate fixes it
    assert _plaintext_refused(door, "rest") >= 1


def test_a_plaintext_grpc_call_to_the_tls_port_says_the_port_needs_tls(door: Door) -> None:
    with grpc.insecure_channel(door.server.grpc_url) as channel, pytest.raises(grpc.RpcError) as caught:
        health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=SAFETY_S)
    assert caught.value.code() == grpc.StatusCode.UNAVAILABLE, caught.value
    assert "this port speaks gRPC over TLS only" in str(caught.value.details()), caught.value.details()
    assert "secure_channel" in str(caught.value.details()), caught.value.details()
    assert _plaintext_refused(door, "grpc") >= 1


def test_a_plaintext_grpc_call_still_sending_its_message_gets_the_whole_answer_then_the_end(door: Door) -> None:
    """A plaintext call whose 4 MiB message follows its HEADERS (grpcio sends them at once): the server answers at
    the HEADERS with most of the message still to come; its close lingers, reading the rest and dropping it, so the
    client sends its whole message, then reads the UNAVAILABLE answer and its grpc-message, then the end. (A plain
    close reset the connection under the client still sending: grpcio's write failed, the answer unread.)"""
    message = f.frame(f.DATA, f.END_STREAM, 1, bytes(4 << 20))
    with socket.create_connection(("127.0.0.1", door.server.grpc_port), timeout=SAFETY_S) as sock:
        try:
            sock.sendall(HELLO + f.frame(f.HEADERS, f.END_HEADERS, 1, _INFER) + message)
            sent = "whole"
        except (BrokenPipeError, ConnectionResetError) as exc:
            sent = repr(exc)
        received, ending = _read_to_end(sock)
    assert sent == "whole" and ending == "end", f"the connection was reset: sending {sent}, reading {ending}"
    headers = [payload for kind, _, stream, payload in _frames_in(received) if kind == f.HEADERS and stream == 1]
    assert headers, received[-300:]
    answer = dict(hpack.Decoder().decode(headers[0]))
    assert answer["grpc-status"] == "14" and answer["grpc-message"] == MESSAGE, answer


def _frames_in(received: bytes) -> list[tuple[int, int, int, bytes]]:
    """The whole frames of ``received`` (the server's bytes from its first), as (type, flags, stream, payload)."""
    frames, position = [], 0
    while len(received) - position >= 9:
        size = int.from_bytes(received[position : position + 3], "big")
        kind, flags, stream = received[position + 3], received[position + 4], received[position + 5 : position + 9]
        frames.append((kind, flags, int.from_bytes(stream, "big"), received[position + 9 : position + 9 + size]))
        position += 9 + size
    return frames


@pytest.mark.parametrize("port", ["http", "grpc"])
def test_no_client_certificate_where_one_is_required_gets_the_tls_alert(door: Door, port: str) -> None:
    """TLS 1.3: the client's handshake ends before the server reads its (empty) certificate; the server's alert
    certificate_required comes to its first read, which says why instead of an empty reply."""
    address = ("127.0.0.1", door.server.http_port if port == "http" else door.server.grpc_port)
    context = door.context(client=False)
    if port == "grpc":
        context.set_alpn_protocols(["h2"])
    with (
        socket.create_connection(address, timeout=SAFETY_S) as sock,
        context.wrap_socket(sock, server_hostname="localhost") as tls,
        pytest.raises(ssl.SSLError, match="CERTIFICATE_REQUIRED"),
    ):
        tls.sendall(b"GET /v2/health/live HTTP/1.1\r\nhost: localhost\r\n\r\n" if port == "http" else b"PRI")
        tls.recv(4096)
    done = subprocess.run(
        ["curl", "-sS", "--cacert", str(door.folder / "ca.pem"), f"https://localhost:{door.server.http_port}/"],
        capture_output=True,
        text=True,
    )
    assert "certificate required" in done.stderr, done
    with (
        grpc.secure_channel(
            f"localhost:{door.server.grpc_port}", grpc.ssl_channel_credentials((door.folder / "ca.pem").read_bytes())
        ) as channel,
        pytest.raises(grpc.RpcError) as caught,
    ):
        health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=SAFETY_S)
    # grpcio logs the alert (TLSV1_ALERT_CERTIFICATE_REQUIRED); its status says the reply failed to decrypt
    assert caught.value.code() == grpc.StatusCode.UNAVAILABLE, caught.value
    assert "Unwrap failed" in str(caught.value.details()), caught.value.details()  # the alert read, not
    assert "Socket closed" not in str(caught.value.details()), caught.value.details()  # a connection just closed


def test_a_rest_connection_closed_by_the_server_does_not_wait_for_the_clients_close_notify(door: Door) -> None:
    """The keep-alive (1 s) closes an idle connection: the server sends its close_notify, and its socket is closed
    within the close's grace (2 s, as the gRPC port's) though the client never answers (asyncio waits 30 s)."""
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    tls = door.context().wrap_bio(incoming, outgoing, server_hostname="localhost")
    with socket.create_connection(("127.0.0.1", door.server.http_port), timeout=SAFETY_S) as sock:
        while True:
            try:
                tls.do_handshake()
                break
            except ssl.SSLWantReadError:
                if outgoing.pending:
                    sock.sendall(outgoing.read())
                incoming.write(sock.recv(65536))
        tls.write(b"GET /v2/health/live HTTP/1.1\r\nhost: localhost\r\n\r\n")
        sock.sendall(outgoing.read())
        answer = b""
        while b"\r\n\r\n" not in answer:
            incoming.write(sock.recv(65536))
            with contextlib.suppress(ssl.SSLWantReadError):
                answer += tls.read(65536)
        assert answer.startswith(b"HTTP/1.1 200"), answer
        # the client stays silent from here on: it reads, and never sends its close_notify
        assert _closed_by_the_server(sock), "the server still holds the connection after its keep-alive"


#: an answer larger than what the loopback's socket buffers hold between the server and a client not reading yet
_LARGE = 16 * 1024 * 1024


async def _large_app(scope: Any, receive: Any, send: Any) -> None:
    await send({"type": "http.response.start", "status": 200, "headers": [(b"content-length", b"%d" % _LARGE)]})
    await send({"type": "http.response.body", "body": b"x" * _LARGE})


#: the fronts ``_served_in_a_thread`` started, the last one's last
_FRONTS: list[Any] = []


def _served_in_a_thread(
    front: str, context: ssl.SSLContext, app: Any = _large_app, keepalive_s: int = 5
) -> Iterator[int]:
    """A REST front (``native`` or ``uvicorn``) serving ``app`` over TLS; its port."""
    timeouts = ConnectionTimeouts(header_s=SAFETY_S, body_s=SAFETY_S)
    server: Any
    if front == "native":
        server = HttpFront(
            app, host="127.0.0.1", port=0, timeouts=timeouts, keepalive_s=keepalive_s, ssl_context=context
        )
        thread = threading.Thread(target=asyncio.run, args=(server.serve(),), daemon=True)
    else:
        protocol = https_port_protocol(context, DeadlineHttpProtocol.with_timeouts(timeouts))
        config = uvicorn.Config(
            app, host="127.0.0.1", port=0, loop="asyncio", lifespan="off", http=protocol, timeout_keep_alive=keepalive_s
        )
        server = uvicorn.Server(config)
        thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    wait_until(lambda: server.started, SAFETY_S, "the front started")
    _FRONTS.append(server)
    yield int(server.servers[0].sockets[0].getsockname()[1])
    server.should_exit = True
    thread.join(SAFETY_S)


def _tls_pair(folder: Path) -> tuple[ssl.SSLContext, ssl.SSLContext]:
    """A server context and a client context trusting its CA, made in ``folder``."""
    ca = _issue(folder, "ca", "dhow test CA", None)
    _issue(folder, "server", "localhost", ca, ExtendedKeyUsageOID.SERVER_AUTH)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(folder / "server.pem", folder / "server.key")
    return context, ssl.create_default_context(cafile=folder / "ca.pem")


@pytest.mark.parametrize("front", ["native", "uvicorn"])
def test_a_large_answer_on_a_closing_connection_reaches_a_client_that_reads_it_late(front: str, tmp_path: Path) -> None:
    """``Connection: close``: the server closes once its answer is written, and the close's grace for the client's
    close_notify (2 s) starts only once the answer has left: a client that begins reading after it gets every
    byte (the grace once began at the close, and cut the answer off after 2 s: 3.8 MB of 64 MiB came)."""
    context, client = _tls_pair(tmp_path)
    for port in _served_in_a_thread(front, context):
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 32 * 1024)  # the kernel holds little for it
        sock.settimeout(SAFETY_S)
        sock.connect(("127.0.0.1", port))
        with client.wrap_socket(sock, server_hostname="localhost") as tls:
            tls.sendall(b"GET / HTTP/1.1\r\nhost: localhost\r\nconnection: close\r\n\r\n")
            time.sleep(GRACE_S + 1)  # the client is busy: it reads later
            answer = bytearray()
            with contextlib.suppress(ssl.SSLEOFError, ConnectionResetError):
                while chunk := tls.recv(1024 * 1024):
                    answer += chunk
        head, _, body = bytes(answer).partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 200"), head
        assert len(body) == _LARGE, f"{len(body)} of {_LARGE} bytes came"


@pytest.mark.parametrize("front", ["native", "uvicorn"])
def test_a_connection_closing_while_its_answer_leaves_starts_no_request_sent_after_the_close(
    front: str, tmp_path: Path
) -> None:
    """The keep-alive limit closes a connection whose large answer a slow client is still reading (the answer
    waits to leave, ``linger.close_lingering``): the requests the client then pipelines are not run, their answers would
    be thrown away (uvicorn's front ran each of them, and logged a 200 for answers never sent)."""
    paths: list[str] = []

    async def app(scope: Any, receive: Any, send: Any) -> None:
        paths.append(scope["path"])
        await _large_app(scope, receive, send)

    context, client = _tls_pair(tmp_path)
    for port in _served_in_a_thread(front, context, app, keepalive_s=1):
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 32 * 1024)
        sock.settimeout(SAFETY_S)
        sock.connect(("127.0.0.1", port))
        with client.wrap_socket(sock, server_hostname="localhost") as tls:
            tls.sendall(b"GET /big HTTP/1.1\r\nhost: localhost\r\n\r\n")
            time.sleep(2.5)  # past the keep-alive limit: the server closes, its answer still leaving
            tls.sendall(b"GET /again HTTP/1.1\r\nhost: localhost\r\n\r\n" * 3)
            answer = bytearray()
            with contextlib.suppress(ssl.SSLEOFError, ConnectionResetError):
                while chunk := tls.recv(1024 * 1024):
                    answer += chunk
        assert len(answer) >= _LARGE, f"{len(answer)} bytes came"
    assert paths == ["/big"]


@pytest.mark.parametrize("client", ["reading nothing", "silent at the tls door"])
def test_a_connection_left_at_the_drains_end_is_cut_not_left_to_its_own_limits(client: str, tmp_path: Path) -> None:
    """The native front's drain gives its connections ``drain_s``; then a connection still sending an answer to a
    client that stopped reading, or still at the TLS door (no first byte yet), is aborted, not left to its own
    limits (``--body-timeout`` with no byte taken; a minute for the first byte), which ``Server.wait_closed``
    waits for on Python 3.12.1+. The bounds here are waits for the server, not timings of it."""
    timeouts = ConnectionTimeouts(header_s=120.0, body_s=120.0)
    context = _tls_pair(tmp_path)[0] if client == "silent at the tls door" else None
    front = HttpFront(
        _large_app, host="127.0.0.1", port=0, timeouts=timeouts, keepalive_s=60, drain_s=0.5, ssl_context=context
    )
    thread = threading.Thread(target=asyncio.run, args=(front.serve(),), daemon=True)
    thread.start()
    wait_until(lambda: front.started, SAFETY_S, "the front started")
    port = int(front.servers[0].sockets[0].getsockname()[1])
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 32 * 1024)
        sock.settimeout(SAFETY_S)
        sock.connect(("127.0.0.1", port))
        if context is None:
            sock.sendall(b"GET / HTTP/1.1\r\nhost: localhost\r\n\r\n")
            assert sock.recv(1), "the answer began"  # then the client reads nothing more
        else:
            wait_until(lambda: front._opening, SAFETY_S, "the connection at the door")
        front.should_exit = True
        thread.join(SAFETY_S)
        assert not thread.is_alive(), "the drain still waits for the connection"
        assert _closed_by_the_server(sock), "the connection outlived the drain"


def test_a_rest_connections_handshake_limit_counts_from_the_accept(tmp_path: Path) -> None:
    """The HTTPS port's handshake limit includes the first byte's wait (the docs say so): a client that waited
    before its ClientHello has that much less of it (it had a minute for its first byte, then a minute more)."""
    context, client = _tls_pair(tmp_path)
    for port in _served_in_a_thread("native", context):
        with socket.create_connection(("127.0.0.1", port), timeout=SAFETY_S) as sock:
            time.sleep(0.5)  # before its first byte
            incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
            with contextlib.suppress(ssl.SSLWantReadError):
                client.wrap_bio(incoming, outgoing, server_hostname="localhost").do_handshake()
            sock.sendall(outgoing.read())  # its ClientHello, and nothing more
            sock.recv(1)  # the server's answer: its TLS protocol has started
            (tls,) = [door.get_protocol() for door in _FRONTS[-1]._opening]
            # accepted at most when the client's connect returned, 0.5 s ago (asyncio's loop time is monotonic)
            left = tls._handshake_timeout_handle.when() - time.monotonic()
            assert left < HANDSHAKE_S - 0.25, f"{left:.2f} s left: the whole limit from the first byte"


@pytest.mark.parametrize("front", ["native", "uvicorn"])
def test_an_idle_tls_connection_closes_at_the_keepalive_limit_without_lingering(
    front: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A TLS connection idle after its answer, past the keep-alive limit: it closes once its answer has left, its
    close_notify sent at once, without a lingering close (nothing in flight to drop; the grace of one made longer
    than the test here, so a lingering close would hold it past the wait)."""
    monkeypatch.setattr(linger, "GRACE_S", 10 * SAFETY_S)
    context, client = _tls_pair(tmp_path)
    for port in _served_in_a_thread(front, context, keepalive_s=1):
        with client.wrap_socket(socket.create_connection(("127.0.0.1", port)), server_hostname="localhost") as tls:
            tls.sendall(b"GET / HTTP/1.1\r\nhost: localhost\r\n\r\n")
            answer = b""
            while not answer.endswith(b"x" * 1024) or len(answer) < _LARGE:
                answer += tls.recv(1024 * 1024)
            assert _closed_by_the_server(tls), "the idle connection lingered"


def test_plain_http_lingering_on_the_https_port_is_cut_at_the_drains_end(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Plain HTTP to the native HTTPS port, answered 400 and lingering (its client never closes, the grace made
    longer than the test): it is among the connections the stop's last step cuts (those not yet HTTP ones) till it
    ends, and the stop cuts it rather than leaving it open."""
    monkeypatch.setattr(linger, "GRACE_S", 10 * SAFETY_S)
    context, _ = _tls_pair(tmp_path)
    fronts = _served_in_a_thread("native", context)
    port = next(fronts)
    with socket.create_connection(("127.0.0.1", port), timeout=SAFETY_S) as sock:
        sock.sendall(b"GET / HTTP/1.1\r\nhost: localhost\r\n\r\n")
        assert sock.recv(65536).startswith(b"HTTP/1.1 400")
        assert len(_FRONTS[-1]._opening) == 1, "the lingering connection is not among those the stop cuts"
        next(fronts, None)  # the front stops
        assert _closed_by_the_server(sock), "the lingering connection was left open by the stop"


def test_a_uvicorn_tls_connection_whose_next_headers_began_lingers_at_the_keepalive_limit(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """uvicorn arms its keep-alive timer once an answer is complete, though the next request's headers had begun
    arriving with the request before: that connection is not idle (its client is sending), so the close at the
    keep-alive limit lingers (a reset could cost the client what it has not read). The close's ``linger`` is seen
    through a pass-through wrapper: whether a close lingers shows on the wire only as time."""
    closes: list[bool] = []
    close_lingering = connection_module.close_lingering

    def recorded(*args: Any, linger: bool = True) -> None:
        closes.append(linger)
        close_lingering(*args, linger=linger)

    monkeypatch.setattr(connection_module, "close_lingering", recorded)
    context, client = _tls_pair(tmp_path)
    for port in _served_in_a_thread("uvicorn", context, keepalive_s=1):
        with client.wrap_socket(socket.create_connection(("127.0.0.1", port)), server_hostname="localhost") as tls:
            tls.sendall(b"GET / HTTP/1.1\r\nhost: localhost\r\n\r\nGET / HTTP/1.1\r\nho")
            answer = b""
            while not answer.endswith(b"x" * 1024) or len(answer) < _LARGE:
                answer += tls.recv(1024 * 1024)
            wait_until(lambda: closes, SAFETY_S, "the keep-alive limit closing the connection")
    assert closes == [True]
