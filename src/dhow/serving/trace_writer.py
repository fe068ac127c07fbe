"""Tracing's writer process: makes the spans of the requests a server traced, writes them as OTLP protobuf and
posts them to the collector, off the server's interpreter.

``python -m dhow.serving.trace_writer`` is run by ``monitoring.tracing.Tracing`` (``writer_main``'s loop): its
settings are the collector's ``url``, the ``service`` name, ``capacity`` and ``close_timeout_s``; then it takes
frames of finished requests (``tracing.Record``). The payload writer's queue and sink thread carry them (at most
``capacity`` waiting, past it dropped and counted) and render them as they come: a step's spans (64 requests or
more, ``Writer._render_steps``) are written at once from its records (``trace_chunk.chunk_fields``; one that cannot
be fails alone). The sink holds the steps and posts them with ``http.client`` about a second apart, at once by whole
steps when ``CHUNK`` (512) requests are held (``OtlpSink``), each post waiting at most ``post_timeout_s`` on the
collector. At the close, what is queued and held is posted within ``close_timeout_s``, and what is not posted by then
fails, untried: a watchdog shuts the socket of a post still under way down then (``OtlpSink.stop_by``). Counts of
exported and failed requests go back to the server.
"""

from __future__ import annotations

import collections
import contextlib
import http.client
import socket
import sys
import threading
import time
from itertools import compress
from operator import itemgetter, sub
from typing import Any
from urllib.parse import urlsplit

from dhow.monitoring.otlp import export_request_of, resource_bytes
from dhow.monitoring.payload_log import PayloadCounts
from dhow.monitoring.trace_chunk import chunk_fields
from dhow.monitoring.tracing import record_fields
from dhow.serving.payload_writer import CHUNK, Writer
from dhow.serving.writer_main import Answer, serve

__all__ = ["OtlpSink", "TraceWriter", "main"]


class OtlpSink:
    """The collector (OTLP/HTTP): the requests' spans as the writer renders them, held and posted ``post_s`` apart,
    or at once by whole steps when ``CHUNK`` requests are held, over one connection (opened again after an
    error)."""

    kind = "otlp"
    #: the longest a rendered request waits for its post (with nothing new to render, the writer's thread wakes
    #: this often to post what it holds)
    post_s = 1.0
    #: the longest a post waits on the collector: to connect, to send, for each read of its answer (at the close,
    #: what is left of its time: ``stop_by``)
    post_timeout_s = 10.0

    def __init__(self, url: str, service: str) -> None:
        self.url = url
        self._resource = resource_bytes(service)
        target = urlsplit(url)
        kind = http.client.HTTPSConnection if target.scheme == "https" else http.client.HTTPConnection
        self._connection = kind(target.netloc, timeout=self.post_timeout_s)
        # (http.client's own seam: the sockets it connects are made by ``_connect``, where the watchdog finds them)
        self._connection._create_connection = self._connect  # type: ignore[attr-defined]
        #: a duplicate of the descriptor of the socket a post connects or uses (``_connect``), and whether the close's
        #: deadline passed: both the watchdog's (``_cut_off``), under ``_cut_lock``
        self._socket: socket.socket | None = None
        self._cut = False
        self._cut_lock = threading.Lock()
        self._watchdog: threading.Timer | None = None
        self._path = target.path or "/"
        #: what is rendered and not posted yet: (requests, their spans written), as the writer rendered them (a step's
        #: spans are held by its first request, the others have none: a post takes whole steps)
        self._held: collections.deque[tuple[int, bytes]] = collections.deque()
        #: requests rendered and not counted yet: held, or being posted
        self._requests = 0
        self._counts: PayloadCounts | None = None
        self._posted = time.monotonic()
        #: when the writer must be done (``time.monotonic``), and the close's seconds it was set from: None until then
        self._deadline: float | None = None
        self._close_s = 0.0
        #: how long the writer's thread waits, with nothing to render: for the post of what is held, if anything
        self.idle_s: float | None = None

    @property
    def held(self) -> int:
        """Requests rendered and not counted yet: held for their post (up to ``CHUNK`` for up to ``post_s``), or
        being posted."""
        return self._requests

    def stop_by(self, timeout_s: float) -> None:
        """The writer is closing: what is posted from now on is posted within ``timeout_s`` or fails, and what is
        left then fails without being tried. A post under way at that time (one started before this call, with its
        ``post_timeout_s``, included) is cut then: a watchdog shuts its socket down, which ends its connect, its
        send or its wait for the answer at once. Only a name lookup (``getaddrinfo``) cannot be cut: a writer stuck
        in one past the 10 s the server waits beyond the close's time is killed, and the server counts what it
        held failed."""
        self._deadline = time.monotonic() + timeout_s
        self._close_s = timeout_s
        if self._watchdog is not None:
            self._watchdog.cancel()
        self._watchdog = threading.Timer(max(timeout_s, 0.0), self._cut_off)
        self._watchdog.daemon = True  # (cancelled by ``close``; never what keeps the process alive)
        self._watchdog.start()

    def _cut_off(self) -> None:
        """The close's deadline (the watchdog's thread): the socket of a post under way is shut down, and no post
        connects after it."""
        with self._cut_lock:
            self._cut = True
            # (a duplicate of the descriptor of the socket a post uses: shutting it down stops that socket, and an
            # HTTPS connection's wrap of it, its TLS handshake included)
            if self._socket is not None:
                with contextlib.suppress(OSError):
                    self._socket.shutdown(socket.SHUT_RDWR)

    def _connect(
        self, address: tuple[str, int], timeout: float | None, source_address: tuple[str, int] | None = None
    ) -> socket.socket:
        """``socket.create_connection``, each socket known to the watchdog (``_cut_off``) before it connects: by a
        duplicate of its descriptor, as the socket itself gives its own up when HTTPS wraps it (``SSLSocket`` takes
        it with ``detach`` before its handshake)."""
        error: OSError = OSError(f"{address[0]}: no address")
        for family, kind, proto, _, target in socket.getaddrinfo(*address, 0, socket.SOCK_STREAM):
            sock = socket.socket(family, kind, proto)
            try:
                watched = sock.dup()
            except OSError:
                sock.close()
                raise
            self._forget_socket(watched)  # (under the lock: the watchdog shuts it down, or set ``_cut`` before)
            try:
                if self._cut:
                    raise TimeoutError("the close's deadline passed")
                sock.settimeout(timeout)
                if source_address:
                    sock.bind(source_address)
                sock.connect(target)
                if self._cut:  # (the watchdog shut it down before it began to connect)
                    raise TimeoutError("the close's deadline passed")
                return sock
            except OSError as exc:
                sock.close()
                error = exc
        raise error

    def _forget_socket(self, watched: socket.socket | None = None) -> None:
        """The watchdog's duplicate of the last socket closed (a new one connects, or the sink closes), and
        ``watched`` its next."""
        with self._cut_lock:
            old, self._socket = self._socket, watched
        if old is not None:
            old.close()

    def write(self, events: list[tuple[str, bytes]], counts: PayloadCounts) -> None:
        # (never raises once a request is held: ``_post`` counts each it takes, and the writer counts what ``write``
        # raises as failed, all the events it was given)
        self.hold(events, counts)
        self.post_held()

    def hold(self, events: list[tuple[str, bytes]], counts: PayloadCounts) -> None:
        """Take the requests rendered: held (``held``) until their post."""
        self._counts = counts
        held, count = self._held, len(events)
        # a step's spans are held by its first request, the others have none (``TraceWriter.render_chunk``): steps
        # found in C (``compress``), not a Python turn a request
        written = list(map(itemgetter(1), events))
        starts = list(compress(range(count), written))
        first = starts[0] if starts else count
        if first:  # requests without spans before the first with some: the last step held takes them, or one of none
            requests, fields = held.pop() if held else (0, b"")
            held.append((requests + first, fields))
        held.extend(zip(map(sub, [*starts[1:], count], starts), map(written.__getitem__, starts), strict=True))
        self._requests += count

    def post_held(self) -> None:
        """Post whole exports of what is held, at once, and the rest once it waited ``post_s``."""
        while self._requests >= CHUNK:
            self._post(CHUNK)
        self.idle()

    def idle(self) -> None:
        if self._held and time.monotonic() - self._posted >= self.post_s:
            self._post(self._requests)
        self.idle_s = self.post_s if self._held else None

    def _post(self, requests: int) -> None:
        """Post the first steps held, up to ``requests`` requests or the first step past it, and count them."""
        count, parts = 0, []
        while self._held and count < requests:
            step, fields = self._held.popleft()
            count += step
            parts.append(fields)
        self._posted = time.monotonic()
        if not count or self._counts is None:
            return
        try:
            failure = self._export(b"".join(parts))
        except Exception as exc:  # (``_export`` catches the post's errors: anything else fails them all the same)
            failure = repr(exc)
        finally:
            self._requests -= count  # (no longer what the writer holds: counted below, whatever happened)
        if failure:
            self._counts.failed(count, f"not exported to {self.url}: {failure}")
        else:
            self._counts.logged(count)

    def _export(self, fields: bytes) -> str:
        """Post one export of these spans: what went wrong, or "" when the collector took it."""
        timeout = self.post_timeout_s
        if self._deadline is not None:
            timeout = min(timeout, self._deadline - time.monotonic())
            if timeout <= 0 or self._cut:
                return self._late()
        try:
            self._connection.timeout = timeout  # (a connection opened for this post)
            if self._connection.sock is not None:
                self._connection.sock.settimeout(timeout)
            body = export_request_of(self._resource, "dhow", fields)
            if self._connection.sock is None:
                self._connection.connect()
                if self._cut:  # (cut while it connected: an HTTPS handshake the watchdog stopped, or just done)
                    raise TimeoutError("the close's deadline passed")
            self._connection.request("POST", self._path, body, {"content-type": "application/x-protobuf"})
            answer = self._connection.getresponse()
            answer.read()
        # OSError (RemoteDisconnected, timeouts, TLS errors), http.client's HTTPException (an answer it cannot read)
        # and any other (a URL path http.client cannot encode: UnicodeEncodeError): these requests fail, counted
        # once, by ``_post``, and the sink's thread goes on (``idle`` posts too); a post the watchdog cut is late
        except Exception as exc:
            with contextlib.suppress(Exception):
                self._connection.close()  # the next export connects again
            self._forget_socket()  # (the watchdog's duplicate would keep the connection open: no FIN sent)
            return self._late() if self._cut else repr(exc)
        if self._connection.sock is None:  # (the collector closed it: "Connection: close")
            self._forget_socket()
        return "" if 200 <= answer.status < 300 else f"the collector answered {answer.status}"

    def _late(self) -> str:
        # (said when the post fails: one under way since before ``stop_by`` learns the close's time only then)
        return f"not posted within the {self._close_s:g} s the writer had to close"

    def close(self, timeout_s: float) -> None:
        """Post what is held within ``timeout_s`` (counted from ``stop_by`` when the writer called it first); what
        is not posted by then fails."""
        if self._deadline is None:
            self.stop_by(timeout_s)
        while self._held:
            self._post(CHUNK)
        self._connection.close()
        if self._watchdog is not None:
            self._watchdog.cancel()
        self._forget_socket()


class TraceWriter(Writer):
    """The payload writer's queue and sink thread, for traced requests: rendered as their spans as they come (in
    the writer's paced steps), held by the sink and posted a second apart (``OtlpSink``). Rendered once a second
    instead, in the second's steps, the writer took a core for ~15-20 ms a second (steps at ~60% of it), and after
    every post it paused a second whatever waited: it exported at most ``CHUNK`` requests a second (at ratio 0.1,
    5,120 served a second), its queue grew past it, was rendered without pauses once behind, and dropped once
    full."""

    #: how often counts go back to the server (when something changed): the sink posts about a second apart, so
    #: counts change about as often, and each turn of the reporter is a wake-up (~170 µs of CPU on a small machine,
    #: cold caches: at the payload writer's 0.2 s, ~1.2 µs a traced request at 700 a second, ``trace_writer_cpu.py``)
    report_s = OtlpSink.post_s

    def __init__(self, sink: OtlpSink, *, capacity: int, source: str = "", report: Any) -> None:
        self.otlp = sink
        super().__init__(sink, capacity=capacity, source=source, report=report)

    def _report_loop(self) -> None:
        while not self._closed.wait(self.report_s):
            self.report()

    def queued(self) -> int:
        """Queued, being rendered, and rendered but held by the sink until posted (``OtlpSink.held``): what is lost
        if the writer dies."""
        return super().queued() + self.otlp.held

    def close(self, timeout_s: float) -> None:
        """As the payload writer's, within ``timeout_s`` from now: the queue's last steps are posted by then too
        (each whole export is posted as it is written), and what is not fails."""
        self.otlp.stop_by(timeout_s)
        super().close(timeout_s)

    def hand(self, rendered: list[tuple[str, bytes]]) -> None:
        """As the payload writer's, but what the sink holds is counted there (``OtlpSink.held``) from when it took
        it, and no longer as being rendered: not twice in ``queued`` while its post waits on the collector."""
        self.otlp.hold(rendered, self)
        self._rendering = 0
        self.otlp.post_held()

    def take(self, frame: list[Any]) -> None:
        self.queue(frame)

    def _size(self, event: Any) -> int:
        """Nothing: a traced request's record is a few hundred bytes, bounded by their count (``capacity``)."""
        return 0

    def render_chunk(self, chunk: list[Any]) -> tuple[list[tuple[str, bytes]], list[tuple[Any, Exception]]]:
        """A step's spans written at once (``chunk_fields``), held by its first request (the sink joins them and
        counts requests); a chunk with a record that cannot be written is written one record at a time, and that
        record fails alone."""
        if not chunk:
            return [], []
        try:
            fields = chunk_fields(chunk)
        except Exception:  # which record: ``records`` finds it, and it alone fails
            return self.records(chunk)
        return list(zip(map(itemgetter(4), chunk), [fields] + [b""] * (len(chunk) - 1), strict=True)), []

    def records(self, chunk: list[Any]) -> tuple[list[tuple[str, bytes]], list[tuple[Any, Exception]]]:
        """The chunk's records written one by one: one that cannot be is a failure of its own."""
        rendered, failures = [], []
        for record in chunk:
            try:
                rendered.append((str(record[4]), record_fields(record)))
            except Exception as exc:  # a record that cannot be written: that one fails, not the others
                failures.append((record, exc))
        return rendered, failures


def _open(settings: dict[str, Any], answer: Answer) -> TraceWriter:
    sink = OtlpSink(str(settings["url"]), str(settings["service"]))
    return TraceWriter(sink, capacity=int(settings["capacity"]), source="", report=answer)


def main() -> int:
    return serve(_open, "--otlp-endpoint")


if __name__ == "__main__":
    sys.exit(main())
