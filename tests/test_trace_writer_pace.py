"""Tracing's writer keeps up with more than one export's worth a second: a whole export is posted at once, the rest
within the sink's ``post_s`` (or at the close)."""

from __future__ import annotations

import http.server
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from tests.test_otlp_attribute_types import _record


class _Collector(http.server.BaseHTTPRequestHandler):
    """An OTLP/HTTP collector that counts the requests (SERVER spans) of each export it takes."""

    exports: list[int] = []

    def do_POST(self) -> None:
        from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest

        body = self.rfile.read(int(self.headers["content-length"]))
        message = ExportTraceServiceRequest.FromString(body)
        spans = [s for r in message.resource_spans for scope in r.scope_spans for s in scope.spans]
        self.exports.append(sum(span.name.startswith("infer ") for span in spans))
        self.send_response(200)
        self.send_header("content-length", "0")
        self.end_headers()

    def log_message(self, *args: Any) -> None:
        pass


def _writer(post_s: float) -> tuple[Any, http.server.ThreadingHTTPServer]:
    from dhow.serving.trace_writer import OtlpSink, TraceWriter

    collector = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Collector)
    threading.Thread(target=collector.serve_forever, daemon=True).start()
    _Collector.exports = []
    sink = OtlpSink(f"http://127.0.0.1:{collector.server_address[1]}/v1/traces", "test")
    sink.post_s = post_s
    return TraceWriter(sink, capacity=8192, source="", report=lambda _: None), collector


def _wait_for(exported: int) -> None:
    deadline = time.monotonic() + 60  # (a deadline for a loaded machine, not a measure of speed)
    while sum(_Collector.exports) < exported and time.monotonic() < deadline:
        time.sleep(0.05)


def test_requests_are_rendered_as_they_come_and_posted_by_whole_exports_the_rest_at_the_interval_or_the_close() -> None:
    # an export is the steps held up to the first past 512 (512-767 requests: a step is 256 at most): 1,300 make two
    # whatever the steps (the renderer's pace sizes them), and never a third
    records = [_record("k", n % 5, n) for n in range(1300)]
    writer, collector = _writer(post_s=3600.0)  # the longest a request waits for its post: longer than this test
    try:
        writer.take(records[:100])
        while writer._queue:  # the sink's thread took them (and rendered them: held, not posted)
            time.sleep(0.01)
        writer.take(records[100:])
        _wait_for(2 * 512)
        # two whole exports (whole steps of the writer's: 512 requests or a little more), posted at once, whatever came
        # in between; the rest waits for the interval or the close
        assert len(_Collector.exports) == 2 and min(_Collector.exports) >= 512
        whole = sum(_Collector.exports)
    finally:
        writer.close(10)
        collector.shutdown()
    # (the two whole exports may have carried all 1,300)
    assert sum(_Collector.exports) == 1300 and len(_Collector.exports) == 2 + (whole < 1300)


def test_what_is_held_is_posted_within_the_interval_with_nothing_new_to_render() -> None:
    writer, collector = _writer(post_s=0.05)
    try:
        writer.take([_record("k", n % 5, n) for n in range(10)])
        _wait_for(10)
        assert _Collector.exports == [10]
    finally:
        writer.close(10)
        collector.shutdown()


@pytest.mark.parametrize(
    ("module", "settings"),
    [
        ("trace_writer", {"url": "http://127.0.0.1:9", "service": "test"}),
        ("payload_writer", {"url": "file://{folder}/payloads.jsonl", "source": "test"}),
    ],
)
def test_a_writer_leaves_the_objects_of_its_start_out_of_the_collector_s_passes_once_collected(
    module: str, settings: dict[str, str], tmp_path: Path
) -> None:
    """What a writer process holds later is short-lived (what it is handed): the collector's full passes, which it
    reaches by waiting in the queue, do not walk the modules and objects of its start each time
    (``writer_main.serve``); its start's cyclic garbage is collected first, not frozen for good. The process is
    started as the server starts it (its settings on stdin, then stdin closed), in a process of its own: freezing
    this one would change what the other tests' collector walks."""
    settings = {key: value.format(folder=tmp_path) for key, value in settings.items()}
    check = f"""if True:
        import gc, os, sys, weakref
        from dhow.monitoring.payload_log import encode_frame
        from dhow.serving import {module}
        gc.disable()  # (only the writer's start collects)
        class Garbage:
            pass
        cycle = Garbage()
        cycle.self = cycle
        left = weakref.ref(cycle)
        del cycle
        read, write = os.pipe()
        os.write(write, encode_frame({{**{settings!r}, "capacity": 8, "close_timeout_s": 1}}))
        os.close(write)
        os.dup2(read, 0)
        assert {module}.main() == 0
        print(gc.get_freeze_count() > 0, left() is None, file=sys.stderr)
    """
    done = subprocess.run([sys.executable, "-c", check], capture_output=True, text=True, timeout=120, check=True)
    assert done.stderr.split()[-2:] == ["True", "True"], done.stderr


def test_the_writer_reports_its_counts_as_often_as_its_sink_posts() -> None:
    """Counts change about once a post (a second apart): the reporter wakes no more often than that."""
    from dhow.serving.trace_writer import OtlpSink, TraceWriter

    waits: list[float] = []

    class _Closed:
        def wait(self, timeout: float) -> bool:
            waits.append(timeout)
            return len(waits) == 3

    writer = TraceWriter.__new__(TraceWriter)  # its reporter's loop alone
    writer._closed, writer.report = _Closed(), lambda: None  # type: ignore[assignment, method-assign]
    writer._report_loop()
    assert waits == [OtlpSink.post_s] * 3


def test_the_sink_holds_each_step_s_spans_with_the_count_of_its_requests() -> None:
    """A step's spans come with its first request, its others with none: what is held is counted by request, each
    with the spans of its step (requests before any spans go with the step held last, or one without spans)."""
    from dhow.serving.trace_writer import OtlpSink

    sink, counts = OtlpSink("http://127.0.0.1:9/v1/traces", "test"), object()
    sink.hold([("", b""), ("", b"")], counts)  # type: ignore[arg-type]
    sink.hold([("", b""), ("a", b"A"), ("", b""), ("", b""), ("b", b"B")], counts)  # type: ignore[arg-type]
    sink.hold([("", b""), ("c", b"C")], counts)  # type: ignore[arg-type]
    assert list(sink._held) == [(3, b""), (3, b"A"), (2, b"B"), (1, b"C")] and sink.held == 9
