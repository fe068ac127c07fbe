"""Tracing's writer against collectors that fail: every traced request is counted once, exported or failed (with a
reason), the sink's thread lives on, and the close keeps to its time against a collector that never answers."""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from typing import Any

import pytest

from tests.test_otlp_attribute_types import _record

#: how a ``_Collector`` answers each export it reads
OK = b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n"
GARBAGE = b"what is this\r\n\r\n"
CUT = b"HTTP/1.1 200 OK\r\ncontent-length: 100\r\n\r\nabc"  # then the connection closes mid-answer


class _Collector:
    """A collector on a real socket that reads each export whole and answers ``answer`` (then closes the
    connection, unless the answer is ``OK``), or, with ``answer=None``, reads and never answers."""

    def __init__(self, answer: bytes | None) -> None:
        self.answer = answer
        self.posts = self.ended = 0  # exports read; connections the writer closed (EOF read)
        self._server = socket.create_server(("127.0.0.1", 0))
        self.port = self._server.getsockname()[1]
        self._connections: list[socket.socket] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        with contextlib.suppress(OSError):
            while True:
                connection, _ = self._server.accept()
                self._connections.append(connection)
                threading.Thread(target=self._serve, args=(connection,), daemon=True).start()

    def _serve(self, connection: socket.socket) -> None:
        data = b""
        with contextlib.suppress(OSError), connection:
            while chunk := connection.recv(1 << 16):
                data += chunk
                while b"\r\n\r\n" in data:
                    head, rest = data.split(b"\r\n\r\n", 1)
                    length = int(head.lower().split(b"content-length:", 1)[1].split(b"\r\n", 1)[0])
                    if len(rest) < length:
                        break
                    data = rest[length:]
                    self.posts += 1
                    if self.answer is None:
                        continue  # read on, never answer
                    connection.sendall(self.answer)
                    if self.answer != OK:
                        return
            self.ended += 1

    def close(self) -> None:
        self._server.close()
        for connection in self._connections:
            with contextlib.suppress(OSError):
                connection.close()


class _Counts:
    """What the writer reports, summed."""

    def __init__(self) -> None:
        self.logged = self.failed = self.dropped = 0
        self.reasons: list[str] = []

    def __call__(self, report: dict[str, Any]) -> None:
        self.logged += report["logged"]
        self.failed += report["failed"]
        self.dropped += report["dropped"]
        if report["reason"]:
            self.reasons.append(report["reason"])

    def wait_for(self, total: int) -> None:
        deadline = time.monotonic() + 30  # (a deadline for a loaded machine, not a measure of speed)
        while self.logged + self.failed < total and time.monotonic() < deadline:
            time.sleep(0.02)


def _writer(collector: _Collector, path: str = "/v1/traces", post_s: float = 0.05) -> tuple[Any, _Counts]:
    from dhow.serving.trace_writer import OtlpSink, TraceWriter

    counts = _Counts()
    sink = OtlpSink(f"http://127.0.0.1:{collector.port}{path}", "test")
    sink.post_s = post_s
    return TraceWriter(sink, capacity=8192, source="", report=counts), counts


def _records(start: int, count: int) -> list[list[Any]]:
    return [_record("k", n % 5, n) for n in range(start, start + count)]


@pytest.mark.parametrize(
    ("answer", "path", "error"),
    [
        (GARBAGE, "/v1/traces", "BadStatusLine"),
        (CUT, "/v1/traces", "IncompleteRead"),
        # http.client cannot write this path into a request line: UnicodeEncodeError, neither OSError nor its own
        (OK, "/v1/tr\u00e4ces", "UnicodeEncodeError"),
    ],
    ids=["garbage", "closed-mid-answer", "unencodable-path"],
)
def test_a_post_that_fails_in_any_way_fails_its_requests_once_and_the_writer_goes_on(
    answer: bytes, path: str, error: str
) -> None:
    collector = _Collector(answer)
    writer, counts = _writer(collector, path)
    try:
        writer.take(_records(0, 100))  # fewer than an export: posted by the sink's thread while idle
        counts.wait_for(100)
        assert (counts.logged, counts.failed) == (0, 100)
        assert writer._thread.is_alive()
        writer.take(_records(100, 700))  # a whole export posted as it is written, the rest while idle
        counts.wait_for(800)
        assert writer._thread.is_alive()
    finally:
        writer.close(5)
        collector.close()
    assert (counts.logged, counts.failed, counts.dropped) == (0, 800, 0)
    assert all(error in reason for reason in counts.reasons)


def test_the_requests_of_a_post_that_fails_are_failed_and_the_next_are_exported() -> None:
    collector = _Collector(OK)
    writer, counts = _writer(collector)
    try:
        collector.answer = CUT
        writer.take(_records(0, 100))
        counts.wait_for(100)
        collector.answer = OK
        writer.take(_records(100, 50))
        counts.wait_for(150)
    finally:
        writer.close(5)
        collector.close()
    assert (counts.logged, counts.failed) == (50, 100)


def test_a_post_that_timed_out_closes_its_connection() -> None:
    """The close's watchdog holds a duplicate of the post's socket: a post that failed closes it too, or the
    collector would keep a connection the writer gave up (no FIN sent) until the next post or the close."""
    collector = _Collector(None)
    writer, counts = _writer(collector)
    writer.sink.post_timeout_s = 0.5
    try:
        writer.take(_records(0, 10))
        counts.wait_for(10)
        deadline = time.monotonic() + 30  # (a deadline for a loaded machine, not a measure of speed)
        while not collector.ended and time.monotonic() < deadline:
            time.sleep(0.02)
        assert counts.failed == 10 and collector.ended == 1
    finally:
        writer.close(5)
        collector.close()


def test_the_close_keeps_to_its_time_against_a_collector_that_never_answers(monkeypatch: pytest.MonkeyPatch) -> None:
    collector = _Collector(None)
    writer, counts = _writer(collector, post_s=3600.0)
    # nothing is rendered (so nothing posted) before the close sets its deadline: every post knows it
    known = threading.Event()
    stop_by, render_chunk = writer.otlp.stop_by, writer.render_chunk
    monkeypatch.setattr(writer.otlp, "stop_by", lambda timeout_s: (stop_by(timeout_s), known.set()))
    monkeypatch.setattr(writer, "render_chunk", lambda chunk: (known.wait(30), render_chunk(chunk))[1])
    try:
        writer.take(_records(0, 2000))  # four exports' worth, all of them queued as the close begins
        start = time.monotonic()
        writer.close(1.0)
        took = time.monotonic() - start
    finally:
        collector.close()
    # the first post waited for what was left of the close's second (not the connection's 10 s), the others were not
    # tried: each would have waited too
    assert took < 5, took
    assert collector.posts <= 1
    assert (counts.logged, counts.failed, counts.dropped) == (0, 2000, 0)
    assert any("not posted within the 1 s" in reason for reason in counts.reasons)


def test_a_post_under_way_as_the_close_begins_is_cut_at_the_close_s_time() -> None:
    """A post that started before the close, with its 10 s to wait for the collector, is cut at the close's deadline
    (the watchdog shuts its socket down): the close takes about its second, and its requests fail as late."""
    collector = _Collector(None)
    writer, counts = _writer(collector)
    with contextlib.closing(collector):
        writer.take(_records(0, 100))  # posted within post_s, and the collector never answers
        deadline = time.monotonic() + 30  # (a deadline for a loaded machine, not a measure of speed)
        while collector.posts < 1 and time.monotonic() < deadline:
            time.sleep(0.02)
        assert collector.posts == 1
        _cut_at_the_close_s_time(writer, counts)


def _cut_at_the_close_s_time(writer: Any, counts: _Counts) -> None:
    """A close of 1 s with a post of 100 requests under way: it takes about that second, not the post's 10, and the
    requests fail as late."""
    start = time.monotonic()
    writer.close(1.0)
    took = time.monotonic() - start
    assert took < 5, took  # (the post's own timeout is 10 s)
    assert (counts.logged, counts.failed, counts.dropped) == (0, 100, 0)
    assert any("not posted within the 1 s" in reason for reason in counts.reasons), counts.reasons
    assert writer.otlp.held == 0


def test_a_post_that_raises_past_its_own_error_handling_still_counts_each_request_once(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Whatever a post raises (here, a fault put in the export itself), the requests it took are failed once, none
    stays held, and the writer's thread goes on: a whole export posted as it is written, the rest while idle."""
    collector = _Collector(OK)
    writer, counts = _writer(collector)

    def broken(fields: bytes) -> str:
        raise RuntimeError("a fault past the post's own error handling")

    monkeypatch.setattr(writer.otlp, "_export", broken)
    try:
        writer.take(_records(0, 600))
        counts.wait_for(600)
        deadline = time.monotonic() + 30  # (a deadline for a loaded machine, not a measure of speed)
        while writer.otlp.held and time.monotonic() < deadline:
            time.sleep(0.02)
        assert writer.otlp.held == 0 and writer._thread.is_alive()
    finally:
        writer.close(5)
        collector.close()
    assert (counts.logged, counts.failed, counts.dropped) == (0, 600, 0)
    assert all("a fault past" in reason for reason in counts.reasons)


def test_what_the_sink_holds_for_its_post_is_reported_as_queued() -> None:
    collector = _Collector(OK)
    writer, counts = _writer(collector, post_s=3600.0)
    reports: list[dict[str, Any]] = []
    writer._report_to = lambda report: (reports.append(report), counts(report))
    try:
        writer.take(_records(0, 100))
        deadline = time.monotonic() + 30  # (a deadline for a loaded machine, not a measure of speed)
        while writer.sink.idle_s is None and time.monotonic() < deadline:  # rendered, handed to the sink, held
            time.sleep(0.02)
        writer.report()
        # not on their way to the collector: lost if the writer died now, and the server counts them failed then
        assert reports and reports[-1]["queued"] == 100 and counts.logged == 0
    finally:
        writer.close(5)
        collector.close()
    assert reports[-1]["queued"] == 0 and counts.logged == 100


def _self_signed(directory: Any) -> tuple[str, str]:
    """A certificate for 127.0.0.1, signed by its own key: (its file, the key's file)."""
    import datetime
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    now = datetime.datetime.now(datetime.UTC)
    certificate = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), True)
        .sign(key, hashes.SHA256())
    )
    cert_file, key_file = directory / "collector.pem", directory / "collector.key"
    cert_file.write_bytes(certificate.public_bytes(serialization.Encoding.PEM))
    key_file.write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    return str(cert_file), str(key_file)


class _TlsCollector(_Collector):
    """A collector over HTTPS that never answers: it completes the TLS handshake and reads on (``handshake=True``),
    or reads the client's hello and never answers it, leaving the post in its handshake."""

    def __init__(self, cert_file: str, key_file: str, *, handshake: bool) -> None:
        import ssl

        self._context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        self._context.load_cert_chain(cert_file, key_file)
        self._handshake = handshake
        self.connected = threading.Event()
        super().__init__(None)

    def _serve(self, connection: socket.socket) -> None:
        with contextlib.suppress(OSError):
            if self._handshake:
                connection = self._context.wrap_socket(connection, server_side=True)
                self._connections.append(connection)
            self.connected.set()
            while connection.recv(1 << 16):
                pass


@pytest.mark.parametrize("handshake", [False, True], ids=["in-its-handshake", "waiting-for-the-answer"])
def test_an_https_post_under_way_as_the_close_begins_is_cut_at_the_close_s_time(
    handshake: bool, tmp_path: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Over HTTPS too, a post under way at the close's deadline is cut then, in its TLS handshake as well as while
    it waits for the answer (the watchdog holds a duplicate of its socket's descriptor, which the TLS socket took)."""
    from dhow.serving.trace_writer import OtlpSink, TraceWriter

    cert_file, key_file = _self_signed(tmp_path)
    monkeypatch.setenv("SSL_CERT_FILE", cert_file)  # (the sink trusts what the system's default context trusts)
    collector = _TlsCollector(cert_file, key_file, handshake=handshake)
    counts = _Counts()
    sink = OtlpSink(f"https://127.0.0.1:{collector.port}/v1/traces", "test")
    sink.post_s = 0.05
    writer = TraceWriter(sink, capacity=8192, source="", report=counts)
    with contextlib.closing(collector):
        writer.take(_records(0, 100))  # posted within post_s, and the collector never answers
        assert collector.connected.wait(30)  # (a deadline for a loaded machine, not a measure of speed)
        time.sleep(0.2)  # (into its handshake, or its wait for the answer)
        _cut_at_the_close_s_time(writer, counts)


def test_what_the_sink_took_is_counted_queued_once_while_its_post_waits() -> None:
    """While a post of a whole export waits on the collector, its requests are held by the sink: counted in
    ``queued`` there, not a second time as being rendered."""
    collector = _Collector(None)
    writer, counts = _writer(collector)
    try:
        writer.take(_records(0, 600))  # a whole export (512) posted at once, which the collector never answers
        deadline = time.monotonic() + 30  # (a deadline for a loaded machine, not a measure of speed)
        while collector.posts < 1 and time.monotonic() < deadline:
            time.sleep(0.02)
        assert collector.posts == 1
        assert writer.queued() == 600  # 512 being posted, 88 queued
    finally:
        writer.close(1.0)
        collector.close()
    assert (counts.logged, counts.failed, counts.dropped) == (0, 600, 0)
