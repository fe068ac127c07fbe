"""A connection the server ends while its client is still sending: the client gets the last bytes (the native gRPC
front's GOAWAY, the native HTTP/1.1 front's error answer) and then the end of the stream, not a reset that
loses them (``linger.py``); and a client that never stops sending does not hold the connection past the bounds.

Each case makes certain that bytes wait unread when the server decides to close, as a loaded server leaves them
(the flaky rapid-reset tests): the server's loop is held by a callback blocking it (``_loop_held``) while the
client sends the bytes that end the connection and more behind them, until the server's kernel has taken every
one (none left unacknowledged in the client's: ``_unacked``). Released, the server reads at most 256 KiB at a
time (asyncio's read size), closes on the first read, and the rest waits behind it. The server's receive window
is first widened past one read by a few megabytes it reads at once (Linux grows it as a reader keeps up): at its
first size the kernel would take no more than one read holds.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import socket
import ssl
import struct
import termios
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import uvloop
from cryptography.x509.oid import ExtendedKeyUsageOID

from dhow.protocols import linger
from dhow.protocols.grpc.h2 import bounds
from dhow.protocols.grpc.h2 import frames as f
from dhow.protocols.grpc.server import GrpcConnectionLimits
from tests.conftest import wait_until
from tests.test_e2e_security_transport import _issue
from tests.test_grpc_native_front import HELLO, Door, _connect, _goaway_code, _read_frames, serving
from tests.test_grpc_native_front_abuse import _INFER, _PING, _frames, _large_call, _send_until_unread, _stuffed
from tests.test_grpc_native_front_tls import TlsDoor, tls_door  # noqa: F401 (a fixture)
from tests.test_rest_http1 import _Native, _post, _running, native_served  # noqa: F401 (a fixture)

#: the longest any wait of these tests lasts before it fails: no measure of the server
SAFETY_S = 30.0
#: the longest the server's loop is held (``_loop_held``): longer than any wait made while it is held, so that the
#: hold never ends before the test ends it
_HOLD_S = 2 * SAFETY_S
#: a frame of a type HTTP/2 does not define, which the server reads and ignores
_IGNORED = f.frame(0xFA, 0, 0, bytes(16_000))


def _unacked(sock: socket.socket) -> int:
    """The bytes sent on ``sock`` that the peer's kernel has not acknowledged yet (Linux's SIOCOUTQ)."""
    return int(struct.unpack("i", fcntl.ioctl(sock, termios.TIOCOUTQ, b"\0\0\0\0"))[0])


@contextlib.contextmanager
def _loop_held(loop: asyncio.AbstractEventLoop) -> Iterator[None]:
    """The server's loop blocked in a callback until the block ends: it reads nothing meanwhile."""
    held, release, expired = threading.Event(), threading.Event(), threading.Event()

    def hold() -> None:
        held.set()
        if not release.wait(_HOLD_S):
            expired.set()

    loop.call_soon_threadsafe(hold)
    assert held.wait(SAFETY_S), "the server's loop never ran the hold"
    try:
        yield
    finally:
        release.set()
    assert not expired.is_set(), f"the hold of the server's loop ended on its own after {_HOLD_S} s: no case was made"


#: more than the server takes in one read (its fronts read 256 KiB at most): bytes past it are certainly unread when
#: the server answers what its first read brought
_ONE_READ = 300_000


def _sent_unread(sock: socket.socket, loop: asyncio.AbstractEventLoop, data: bytes) -> None:
    """``data`` sent while the server's loop is held, and in the server's kernel when it goes on: all of it, or, where
    the server's receive window stopped growing short of it (a loaded machine widens it less), more than one read's
    worth (``_ONE_READ``), the rest waiting in this side's send buffer."""
    with _loop_held(loop):
        sock.sendall(data)
        deadline, last, since = time.monotonic() + SAFETY_S, -1, time.monotonic()
        while (left := _unacked(sock)) > 0:
            if left != last:
                last, since = left, time.monotonic()
            elif time.monotonic() - since > 1.0 and len(data) - left > _ONE_READ:
                break  # (the window is full: what it holds is more than a read)
            assert time.monotonic() < deadline, f"the server's kernel took {len(data) - left} of {len(data)} bytes"
            time.sleep(0.01)


def _read_to_end(sock: socket.socket) -> tuple[bytes, str]:
    """All the server sends, and how the connection ended: "end" (the server's FIN) or "reset"."""
    received = b""
    while True:
        try:
            chunk = sock.recv(1 << 20)
        except ConnectionResetError:
            return received, "reset"
        if not chunk:
            return received, "end"
        received += chunk


def _sent_until_refused(sock: socket.socket, data: bytes, pause_s: float) -> bool:
    """Send ``data`` again and again (``pause_s`` apart) until the server no longer takes it: whether it stopped
    taking it within ``SAFETY_S``."""
    deadline = time.monotonic() + SAFETY_S
    while time.monotonic() < deadline:
        try:
            sock.sendall(data)
        except (BrokenPipeError, ConnectionResetError):
            return True
        time.sleep(pause_s)  # the client's own pace, not a wait for the server
    return False


# -- the native gRPC front ---------------------------------------------------------------------------------------


@pytest.fixture(params=["asyncio", "uvloop"])
def door(request: pytest.FixtureRequest) -> Iterator[Door]:
    """A native gRPC front on either event loop (their transports half-close each their own way)."""
    yield from serving(
        GrpcConnectionLimits(), asyncio.new_event_loop() if request.param == "asyncio" else uvloop.new_event_loop()
    )


def _opened_and_reset(streams: range) -> bytes:
    return b"".join(f.frame(f.HEADERS, f.END_HEADERS, s, _INFER) + f.rst_stream(s, f.CANCEL) for s in streams)


def test_the_goaway_of_a_reset_flood_reaches_a_client_still_sending(door: Door) -> None:
    """A Rapid Reset flood past its budget, and 600 KB more of it that the server has not read when it sends its
    GOAWAY: the client reads the whole GOAWAY, with its code and reason, then the end; no stream behind the one
    the server stopped at was read as a call."""
    flood, more = _opened_and_reset(range(1, 2400, 2)), _opened_and_reset(range(2401, 12_001, 2))
    with _connect(door) as sock:
        sock.sendall(HELLO + _IGNORED * 512 + _PING)  # 8 MB read at once: the server's window widens
        _read_frames(sock, f.PING, flags=f.ACK)
        _sent_unread(sock, door.loop, flood + more)
        received, ending = _read_to_end(sock)
    frames = _frames(received)
    assert _goaway_code(frames) == (f.ENHANCE_YOUR_CALM, b"too many calls reset by the client")
    last_stream = next(int.from_bytes(p[:4], "big") for kind, _, _, p in frames if kind == f.GOAWAY)
    assert last_stream < 2400, last_stream
    assert ending == "end"
    wait_until(lambda: not door.server.front.connections, SAFETY_S, "the connection ending on the server")


@pytest.mark.parametrize(
    ("sent", "pause_s"),
    [
        pytest.param(_IGNORED * 64, 0.0, id="flood"),  # ends at the bytes' bound
        pytest.param(_PING, 0.05, id="trickle"),  # ends at the time's bound
    ],
)
def test_a_client_that_never_stops_sending_is_closed_after_the_lingering_close(
    door: Door,
    sent: bytes,
    pause_s: float,
) -> None:
    """A client sent a GOAWAY for a protocol error, which goes on sending for ever: the lingering close reads it
    for a bounded time or number of bytes, then the connection ends."""
    with _connect(door) as sock:
        sock.sendall(HELLO + f.frame(f.DATA, 0, 7, b"\0\0\0\0\0"))  # DATA on a stream never opened
        assert _goaway_code(_read_frames(sock, f.GOAWAY))[0] == f.PROTOCOL_ERROR
        assert _sent_until_refused(sock, sent, pause_s), "the server read the client for ever"
    wait_until(lambda: not door.server.front.connections, SAFETY_S, "the connection ending on the server")


class _TlsClient:
    """A TLS client over memory BIOs: it sends all it likes and reads the raw stream to its end, decrypted after."""

    def __init__(self, door: TlsDoor) -> None:
        context = ssl.create_default_context(cafile=door.folder / "ca.pem")
        context.set_alpn_protocols(["h2"])
        self.sock = socket.create_connection(("127.0.0.1", door.port), timeout=SAFETY_S)
        self._in, self._out = ssl.MemoryBIO(), ssl.MemoryBIO()
        self.tls = context.wrap_bio(self._in, self._out, server_hostname="localhost")
        while True:
            try:
                self.tls.do_handshake()
                return
            except ssl.SSLWantReadError:
                self.sock.sendall(self._out.read())
                self._in.write(self.sock.recv(65536))

    def sendall(self, data: bytes) -> None:
        for start in range(0, len(data), 16384):
            self.tls.write(data[start : start + 16384])
        self.sock.sendall(self._out.read())

    def read(self, raw: bytes = b"") -> bytes:
        """What ``raw`` and the records already read hold, decrypted."""
        self._in.write(raw)
        plain = b""
        with contextlib.suppress(ssl.SSLWantReadError, ssl.SSLZeroReturnError):
            while chunk := self.tls.read(1 << 20):
                plain += chunk
        return plain


# uvloop's TLS close read and dropped them before: only asyncio's is a case (and uvloop widened its window less)
@pytest.mark.parametrize("tls_door", ["asyncio"], indirect=True)
def test_the_goaway_of_a_reset_flood_reaches_a_tls_client_still_sending(tls_door: TlsDoor) -> None:  # noqa: F811
    """The same over TLS, which has no half-close: the client reads the GOAWAY and the end of the stream, not a
    reset (asyncio's TLS close reset it: the records behind the flood's end were never read)."""
    client = _TlsClient(tls_door)
    with client.sock:
        client.sendall(HELLO + _IGNORED * 2048 + _PING)  # 32 MB: a reader of TLS widens its window more slowly
        answered = b""
        while b"12345678" not in answered:
            answered += client.read(client.sock.recv(1 << 20))
        flood, more = _opened_and_reset(range(1, 2400, 2)), _opened_and_reset(range(2401, 8001, 2))
        with _loop_held(tls_door.server.front.loop):
            client.sendall(flood + more)
            wait_until(lambda: _unacked(client.sock) == 0, SAFETY_S, "the server's kernel taking every byte sent")
        received, ending = _read_to_end(client.sock)
    frames = _frames(client.read(received))
    assert _goaway_code(frames) == (f.ENHANCE_YOUR_CALM, b"too many calls reset by the client")
    assert ending == "end"


# -- the native HTTP/1.1 front -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("sent", "status"),
    [
        pytest.param(b"NOT HTTP AT ALL\r\n\r\n" + b"x" * 600_000, b"400", id="invalid-request"),
        # answered before its body is read, on a connection that closes after its answer
        pytest.param(_post("/early", b"x" * 800_000, b"connection: close"), b"413", id="early-answer-closing"),
    ],
)
def test_the_error_answer_reaches_a_client_still_sending(
    native_served: _Native,  # noqa: F811
    sent: bytes,
    status: bytes,
) -> None:
    """A request the server answers with an error and then closes on, with 500 KB and more behind it that it has
    not read: the client reads the whole answer, then the end."""
    loop = native_served.front.servers[0].get_loop()
    with socket.create_connection(("127.0.0.1", native_served.port()), timeout=SAFETY_S) as sock:
        sock.sendall(_post("/echo", b"x" * 8_000_000))  # 8 MB read at once: the server's window widens
        echoed = b""
        while not echoed.endswith(b"x" * 1000) or len(echoed) < 8_000_000:
            echoed += sock.recv(1 << 20)
        _sent_unread(sock, loop, sent)
        received, ending = _read_to_end(sock)
    assert received.startswith(b"HTTP/1.1 " + status), received[:200]
    head, _, body = received.partition(b"\r\n\r\n")
    length = int(next(line for line in head.split(b"\r\n") if line.lower().startswith(b"content-length"))[15:])
    assert len(body) == length, (head, body)
    assert ending == "end"


def test_plain_http_to_the_https_port_gets_its_whole_400_though_it_goes_on_sending(tmp_path: Path) -> None:
    """A plain HTTP request with a large body, to a port that speaks HTTPS only: its 400 (``tls.py``), then the end;
    the body, still coming, is read and dropped. (No held loop here: the first read of a new connection takes all
    its window holds, so no case of bytes certainly unread is made; this proves the port's close lingers.)"""
    ca = _issue(tmp_path, "ca", "dhow test CA", None)
    _issue(tmp_path, "server", "localhost", ca, ExtendedKeyUsageOID.SERVER_AUTH)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(tmp_path / "server.pem", tmp_path / "server.key")
    served = _Native()
    served.front.ssl_context = context
    for running in _running(served):
        with socket.create_connection(("127.0.0.1", running.port()), timeout=SAFETY_S) as sock:
            sending = threading.Thread(target=_sent_until_refused, args=(sock, b"x" * 65536, 0.0), daemon=True)
            sock.sendall(b"POST /echo HTTP/1.1\r\nhost: t\r\ncontent-length: 100000000\r\n\r\n")
            sending.start()
            received, ending = _read_to_end(sock)
            sending.join(SAFETY_S)
        assert received.startswith(b"HTTP/1.1 400 Bad Request\r\n") and received.endswith(b"'CA.pem'})\"}"), received
        assert ending == "end"


def _settled(loop: asyncio.AbstractEventLoop) -> None:
    """Once every callback the server's loop had queued has run (the read of the bytes it took among them)."""
    asyncio.run_coroutine_threadsafe(asyncio.sleep(0), loop).result(SAFETY_S)


def test_no_stream_behind_the_clients_goaway_is_opened(door: Door) -> None:
    """The client's GOAWAY, no stream open, then 100 HEADERS in the same read: the server closes at the GOAWAY, and
    none of the streams behind it is opened as a call on the closed connection (they would run till the lingering
    close ends)."""
    with _connect(door) as sock:
        sock.sendall(HELLO + _PING)
        _read_frames(sock, f.PING, flags=f.ACK)
        behind = b"".join(f.frame(f.HEADERS, f.END_HEADERS, s, _INFER) for s in range(1, 201, 2))
        _sent_unread(sock, door.loop, f.goaway(0, f.NO_ERROR) + behind)
        _settled(door.loop)
        assert [len(connection.streams) for connection in door.server.front.connections] in ([], [0])
    wait_until(lambda: not door.server.front.connections, SAFETY_S, "the connection ending on the server")


def test_the_stop_does_not_wait_for_a_lingering_connection(monkeypatch: pytest.MonkeyPatch) -> None:
    """A request running when the server is asked to stop: it is answered, and its connection then closes with a
    lingering close, its client never closing: the drain waits for requests and answers, not for a lingering close
    (which the stop's last step ends), so it is over long before that close's own limit."""
    monkeypatch.setattr(linger, "GRACE_S", 10 * SAFETY_S)  # this lingering close never ends on its own
    served = _Native()
    served.front.drain_s = 10 * SAFETY_S
    for running in _running(served):
        with socket.create_connection(("127.0.0.1", running.port()), timeout=SAFETY_S) as sock:
            sock.sendall(_post("/wait/300", b""))
            wait_until(lambda: served.front._running, SAFETY_S, "the request running")
            served.front.should_exit = True
            assert sock.recv(1 << 16).startswith(b"HTTP/1.1 200")
            wait_until(lambda: not served.thread.is_alive(), SAFETY_S, "the stop, waiting on a lingering close")


def test_a_close_at_once_aborts_a_client_that_reads_nothing(door: Door, monkeypatch: pytest.MonkeyPatch) -> None:
    """A client that sends until the server stops reading it, and reads nothing, its connection then closed at once
    (the stop's last step, when its calls outlast the cut): the connection, the server's answers stuck in its write
    buffer, is aborted rather than held for as long as the client likes (a lingering close, its grace made longer
    than the test here, would hold it past the wait)."""
    monkeypatch.setattr(bounds, "CLOSE_GRACE_S", 10 * SAFETY_S)
    with _stuffed(door) as sock:
        _send_until_unread(sock)
        (connection,) = door.server.front.connections
        door.loop.call_soon_threadsafe(connection.close_now)
        wait_until(lambda: not door.server.front.connections, SAFETY_S, "the server ending the connection")


def test_a_lingering_close_ends_at_its_limit_however_the_client_reads(monkeypatch: pytest.MonkeyPatch) -> None:
    """A connection lingering after its 400 whose client never closes, its grace made longer than the test: it
    ends at the lingering close's own limit (``MAX_S`` after the answer left, made short here)."""
    monkeypatch.setattr(linger, "GRACE_S", 10 * SAFETY_S)
    monkeypatch.setattr(linger, "MAX_S", 0.5)
    served = _Native()
    for running in _running(served):
        with socket.create_connection(("127.0.0.1", running.port()), timeout=SAFETY_S) as sock:
            sock.sendall(b"NOT HTTP AT ALL\r\n\r\n")
            received, _ = _read_to_end(sock)
            assert received.startswith(b"HTTP/1.1 400"), received[:200]
            wait_until(lambda: not served.front._open, SAFETY_S, "the lingering connection ending on the server")


def test_a_connection_that_never_sent_a_byte_is_closed_without_lingering(monkeypatch: pytest.MonkeyPatch) -> None:
    """A connection silent past the header limit: closed with nothing to say and nothing to read, so it does not
    linger (its grace made longer than the test here: it would hold the connection till then)."""
    monkeypatch.setattr(linger, "GRACE_S", 10 * SAFETY_S)
    served = _Native()
    for running in _running(served):
        with socket.create_connection(("127.0.0.1", running.port()), timeout=SAFETY_S) as sock:
            assert _read_to_end(sock)[0] == b""
            wait_until(lambda: not served.front._open, SAFETY_S, "the silent connection ending on the server")


def test_a_grpc_connection_that_never_sent_a_byte_is_closed_without_lingering(monkeypatch: pytest.MonkeyPatch) -> None:
    """The same on the native gRPC front: silent past the handshake's limit, it gets its GOAWAY and the end, and the
    server lets it go once the GOAWAY has left, not after the lingering close's grace (longer than the test here)."""
    monkeypatch.setattr(bounds, "CLOSE_GRACE_S", 10 * SAFETY_S)
    limits = GrpcConnectionLimits(handshake_s=0.5)
    with contextlib.contextmanager(serving)(limits, asyncio.new_event_loop()) as door, _connect(door) as silent:
        assert _goaway_code(_read_frames(silent, f.GOAWAY))[0] == f.PROTOCOL_ERROR
        wait_until(lambda: not door.server.front.connections, SAFETY_S, "the silent connection ending")


def test_no_request_pipelined_behind_a_400_is_run(native_served: _Native) -> None:  # noqa: F811
    """An invalid request and 50 valid ones behind it, all in the server's kernel when it reads: it answers the
    400 only, then the end; none of those behind it is run (the lingering close drops them)."""
    loop = native_served.front.servers[0].get_loop()
    with socket.create_connection(("127.0.0.1", native_served.port()), timeout=SAFETY_S) as sock:
        _sent_unread(sock, loop, b"NOT HTTP AT ALL\r\n\r\n" + _post("/echo", b"behind") * 50)
        received, ending = _read_to_end(sock)
    assert received.startswith(b"HTTP/1.1 400") and received.count(b"HTTP/1.1 ") == 1, received[:300]
    assert b"behind" not in received and ending == "end"


def test_a_lingering_connection_holds_its_rest_slot_till_it_ends(monkeypatch: pytest.MonkeyPatch) -> None:
    """``--max-connections`` counts a lingering connection (it still holds a socket), and its slot is free once it
    ends: a request meanwhile is refused 503, one after it is served."""
    monkeypatch.setattr(linger, "GRACE_S", 10 * SAFETY_S)  # the lingering close ends with its client only
    served = _Native()
    served.front.limit = 2  # (counting the connection asking)
    for running in _running(served):
        with socket.create_connection(("127.0.0.1", running.port()), timeout=SAFETY_S) as lingering:
            lingering.sendall(b"NOT HTTP AT ALL\r\n\r\n")
            assert _read_to_end(lingering)[0].startswith(b"HTTP/1.1 400")
            with socket.create_connection(("127.0.0.1", running.port()), timeout=SAFETY_S) as crowded:
                crowded.sendall(_post("/echo", b"crowded"))
                assert _read_to_end(crowded)[0].startswith(b"HTTP/1.1 503")
        wait_until(lambda: not served.front._open, SAFETY_S, "the lingering connections ending with their clients")
        with socket.create_connection(("127.0.0.1", running.port()), timeout=SAFETY_S) as sock:
            sock.sendall(_post("/echo", b"served"))
            assert sock.recv(1 << 16).startswith(b"HTTP/1.1 200")


def test_a_lingering_connection_holds_its_grpc_slot_till_it_ends(monkeypatch: pytest.MonkeyPatch) -> None:
    """The same on the native gRPC front: a connection made while one lingers is refused, one made after served."""
    monkeypatch.setattr(bounds, "CLOSE_GRACE_S", 10 * SAFETY_S)
    with contextlib.contextmanager(serving)(GrpcConnectionLimits(max_connections=1), asyncio.new_event_loop()) as door:
        with _connect(door) as lingering:
            lingering.sendall(HELLO + f.frame(f.DATA, 0, 7, b"\0\0\0\0\0"))  # DATA on a stream never opened
            assert _goaway_code(_read_frames(lingering, f.GOAWAY))[0] == f.PROTOCOL_ERROR
            with _connect(door) as refused:
                assert _read_to_end(refused) in ((b"", "end"), (b"", "reset"))  # aborted before its SETTINGS
        wait_until(lambda: not door.server.front.connections, SAFETY_S, "the lingering connection ending")
        with _connect(door) as sock:
            sock.sendall(HELLO + _PING)
            _read_frames(sock, f.PING, flags=f.ACK)


def _read_steadily(sock: socket.socket) -> tuple[bytes, str]:
    """All the server sends, taken 64 KiB every 20 ms (some 3 MB/s: far above ``linger.MIN_DRAIN_RATE``, a reader
    keeping up), and how the connection ended."""
    received = b""
    while True:
        try:
            chunk = sock.recv(65536)
        except ConnectionResetError:
            return received, "reset"
        if not chunk:
            return received, "end"
        received += chunk
        time.sleep(0.02)  # the client's own pace, not a wait for the server


@pytest.mark.parametrize(
    "closing",
    [
        pytest.param(b"connection: close", id="connection-close"),
        pytest.param(b"x-kept: alive", id="keep-alive-ends"),  # the keep-alive limit closes it, its answer leaving
    ],
)
def test_a_large_answer_read_steadily_is_delivered_whole_though_it_outlasts_the_cap(
    monkeypatch: pytest.MonkeyPatch, closing: bytes
) -> None:
    """An 8 MB answer on a closing connection, read steadily but for longer than ``MAX_S`` (made short here): the
    cap counts from when the answer has left (nginx's ``lingering_time``), so the client gets every byte, then the
    end. (Leaving, the answer is bounded by the drain rate only.)"""
    monkeypatch.setattr(linger, "MAX_S", 0.5)
    served = _Native()
    served.front.keepalive_s = 0.1
    body = bytes(range(256)) * (8 * 4096)
    for running in _running(served):
        with socket.create_connection(("127.0.0.1", running.port()), timeout=SAFETY_S) as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 65536)
            sock.sendall(_post("/echo", body, closing))
            received, ending = _read_steadily(sock)
        head, _, answer = received.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 200") and answer == body, (head, len(answer))
        assert ending == "end"


def test_a_rest_client_that_half_closes_without_reading_its_answer_is_aborted() -> None:
    """A client that asks for an 8 MB answer, then ends its side (FIN) and reads nothing: the close the FIN makes
    is one of ``linger.py``'s, so the answer not leaving aborts it (``--body-timeout`` of it), rather than the
    socket's own close waiting for it to leave for ever."""
    served = _Native()
    for running in _running(served):
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        sock.connect(("127.0.0.1", running.port()))
        with sock:
            sock.sendall(_post("/echo", b"x" * 8_000_000))
            assert sock.recv(16).startswith(b"HTTP/1.1 200")  # the answer is written
            sock.shutdown(socket.SHUT_WR)
            wait_until(lambda: not served.front._open, SAFETY_S, "the half-closed connection ending on the server")


def test_a_grpc_client_that_half_closes_without_reading_its_answer_is_aborted(door: Door) -> None:
    """The same on the native gRPC front: an 8 MB answer written, the client's FIN, nothing read. (The front stops
    reading a client whose answers fill its write buffer past the buffer's high mark, which an 8 MB answer does;
    one under it, a smaller answer to a client whose socket buffers are full, is read on, its FIN too: the mark is
    raised here to make that case with a large answer.)"""
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.connect(("127.0.0.1", door.port))
    with sock:
        wait_until(lambda: door.server.front.connections, SAFETY_S, "the connection made")
        (connection,) = door.server.front.connections
        raised = asyncio.run_coroutine_threadsafe(_high_mark(connection.transport), door.loop)
        raised.result(SAFETY_S)
        _large_call(sock)
        wait_until(lambda: door.server.front.connections and door.streams() == 0, SAFETY_S, "the call answered")
        sock.shutdown(socket.SHUT_WR)
        wait_until(lambda: not door.server.front.connections, SAFETY_S, "the half-closed connection ending")


async def _high_mark(transport: asyncio.Transport | None) -> None:
    assert transport is not None
    transport.set_write_buffer_limits(high=64 * 1024 * 1024)
