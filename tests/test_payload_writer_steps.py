"""The payload and trace writers render what is queued in steps (sized by the time the last one took), pausing between
them unless behind or stopping."""

from __future__ import annotations

import collections
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from dhow.monitoring.payload_sinks import open_sink
from dhow.serving import payload_writer
from dhow.serving.payload_writer import Writer

#: the CPU clock the steps are timed by (``_render_steps``), moved on by ``_Steps.render_chunk``
_now = [0.0]


class _Steps(Writer):
    """A writer whose render records each step's size and takes ``cost`` seconds an event on a clock of its own (no
    sink, no threads: ``_render_steps`` alone); by default as long as makes a step of ``_STEP`` events."""

    def __init__(
        self, queued: int, *, stopping: bool = False, capacity: int = 10_000, cost: float | None = None
    ) -> None:
        self.cost = payload_writer._STEP_S / payload_writer._STEP if cost is None else cost
        self.capacity = capacity
        self._queue = collections.deque([[n] for n in range(queued)])
        self._sizes, self._freeing = collections.deque([0] * queued), 0
        self._stopping = threading.Event()
        self._handover = threading.Event()
        if stopping:
            self._stopping.set()
        self.steps: list[int] = []

    def render_chunk(self, chunk: list[Any]) -> tuple[list[tuple[str, bytes]], list[tuple[Any, Exception]]]:
        self.steps.append(len(chunk))
        _now[0] += self.cost * len(chunk)
        failed = [(event, ValueError("odd")) for event in chunk if event[0] % 97 == 1]
        return [(str(event[0]), b"") for event in chunk if event[0] % 97 != 1], failed


@pytest.fixture
def pauses(monkeypatch: pytest.MonkeyPatch) -> list[float]:
    slept: list[float] = []
    _now[0] = 0.0  # (each test's steps are sized from the same clock reading, whichever tests ran before)
    monkeypatch.setattr(payload_writer.time, "sleep", slept.append)
    monkeypatch.setattr(payload_writer.time, "thread_time", lambda: _now[0])
    return slept


def test_a_frame_is_rendered_in_steps_with_a_pause_between_them(pauses: list[float]) -> None:
    writer = _Steps(400)
    rendered, failures = writer._render_steps()
    # (the last 16 would be too few for the renderer's columns: they go with the step before)
    assert writer.steps == [64] * 5 + [80]
    assert pauses == [payload_writer._STEP_PAUSE_S] * 5
    # every event once, in order: rendered or failed
    seen = sorted([int(key) for key, _ in rendered] + [event[0] for event, _ in failures])
    assert seen == list(range(400))
    assert [int(key) for key, _ in rendered] == sorted(int(key) for key, _ in rendered)
    assert len(failures) == 5  # 1, 98, 195, 292, 389
    assert not writer._queue


def test_a_step_is_as_many_events_as_render_in_about_its_time_at_the_last_steps_pace(pauses: list[float]) -> None:
    # events that render 200 in a step's time: a first step of 64 (no pace known yet), then 200, then the rest
    writer = _Steps(400, cost=payload_writer._STEP_S / 200)
    rendered, failures = writer._render_steps()
    assert writer.steps == [64, 200, 136]
    assert pauses == [payload_writer._STEP_PAUSE_S] * 2  # not five: each pause is a wake-up
    assert len(rendered) + len(failures) == 400
    # cheap ones: steps of at most _MOST, which bounds the one step a dearer event than the last makes too long
    # (the pace is the writer's: the next frame starts so)
    cheap = _Steps(400, cost=payload_writer._STEP_S / 1000)
    cheap._render_steps()
    assert cheap.steps == [64, payload_writer._MOST, 400 - 64 - payload_writer._MOST]
    cheap._queue.extend([[n] for n in range(400)])
    cheap._render_steps()
    assert cheap.steps[3:] == [payload_writer._MOST, 400 - payload_writer._MOST]
    # dear ones: never fewer than 64 a step
    dear = _Steps(200, cost=payload_writer._STEP_S)
    dear._render_steps()
    assert dear.steps == [64, 64, 72]


def test_a_sink_gets_at_most_a_chunk_and_the_rest_stays_queued(pauses: list[float]) -> None:
    writer = _Steps(payload_writer.CHUNK + 100)
    rendered, failures = writer._render_steps()
    assert len(rendered) + len(failures) == payload_writer.CHUNK
    assert len(writer._queue) == 100


def test_a_writer_behind_or_stopping_renders_without_pauses(pauses: list[float]) -> None:
    behind = _Steps(payload_writer._BEHIND + payload_writer.CHUNK)
    behind._render_steps()
    assert pauses == []
    stopping = _Steps(300, stopping=True)
    stopping._render_steps()
    assert pauses == [] and stopping.steps == [64, 64, 64, 64, 44]


def test_a_small_queue_half_full_counts_as_behind(pauses: list[float]) -> None:
    writer = _Steps(400, capacity=600)  # 336 left after the first step: more than half of 600
    writer._render_steps()
    assert writer.steps == [64] * 5 + [80]
    assert pauses == [payload_writer._STEP_PAUSE_S] * 4  # not before the second step (336 left), then each


def test_a_few_events_are_one_step_without_a_pause(pauses: list[float]) -> None:
    writer = _Steps(10)
    rendered, failures = writer._render_steps()
    assert writer.steps == [10] and pauses == [] and len(rendered) + len(failures) == 10


def test_tracings_writer_in_steps_exports_every_span_once_and_a_bad_record_fails_alone(
    pauses: list[float],
) -> None:
    from opentelemetry.proto.trace.v1.trace_pb2 import ScopeSpans

    from dhow.monitoring.tracing import record_fields
    from dhow.serving.trace_writer import TraceWriter
    from tests.test_otlp_attribute_types import _record

    records = [_record("k", n // 7, n) for n in range(300)]  # batches of 7, split across the steps of 64
    bad = list(records[130])
    bad[0] = "zz"  # a trace id that is not hex: it cannot be written
    records[130] = bad
    writer = TraceWriter.__new__(TraceWriter)  # its steps alone: no sink, no threads
    writer._stopping, writer._handover, writer.capacity = threading.Event(), threading.Event(), 8192
    writer._queue, writer._sizes, writer._freeing = collections.deque(records), collections.deque(), 0
    rendered, failures = writer._render_steps()
    assert [event for event, _ in failures] == [bad]
    assert [key for key, _ in rendered] == [f"r-{n}" for n in range(300) if n != 130]
    spans = ScopeSpans.FromString(b"".join(fields for _, fields in rendered)).spans
    written = [ScopeSpans.FromString(record_fields(r)).spans for n, r in enumerate(records) if n != 130]

    # (span ids are drawn anew: the spans' names, times and links say they are the same)
    def shown(span: Any) -> tuple[Any, ...]:
        return span.name, span.start_time_unix_nano, span.end_time_unix_nano, len(span.links), len(span.attributes)

    # (a step writes its spans in an order of its own)
    assert sorted(map(shown, spans)) == sorted(shown(span) for each in written for span in each)


class _Held(Writer):
    """A writer whose rendering waits until the test lets it go (``go``), to a file sink."""

    def __init__(self, path: str, reports: list[dict[str, Any]]) -> None:
        self.rendering, self.go = threading.Event(), threading.Event()
        super().__init__(open_sink(path), capacity=1000, source="test", report=reports.append)

    def render_chunk(self, chunk: list[Any]) -> tuple[list[tuple[str, bytes]], list[tuple[Any, Exception]]]:
        self.rendering.set()
        self.go.wait(30)
        return [(str(event[0]), b"{}") for event in chunk], []


def test_what_is_being_rendered_is_reported_as_queued(tmp_path: Path) -> None:
    """Events taken off the queue to be rendered are still the writer's (lost if it died now): its reports count
    them as queued until the sink has them."""
    reports: list[dict[str, Any]] = []
    writer = _Held(f"file://{tmp_path}/payloads.jsonl", reports)
    try:
        writer.queue([[n] for n in range(10)])
        assert writer.rendering.wait(30)
        writer.report()
        assert reports and reports[-1]["queued"] == 10 and reports[-1]["logged"] == 0
    finally:
        writer.go.set()
        writer.close(5)
    assert reports[-1]["queued"] == 0 and sum(report["logged"] for report in reports) == 10


class _Threads(_Held):
    """A held writer that notes the thread each event is rendered on."""

    threads: dict[int, int]

    def render_chunk(self, chunk: list[Any]) -> tuple[list[tuple[str, bytes]], list[tuple[Any, Exception]]]:
        rendered = super().render_chunk(chunk)
        self.threads.update((event[0], threading.get_ident()) for event in chunk)
        return rendered


def test_the_close_writes_what_is_left_on_its_own_thread(tmp_path: Path) -> None:
    """The sink's thread stops after the step it is in; what is still queued is rendered and written by the thread
    that closes (``writer_main`` keeps it at the normal CPU priority while the others run at SCHED_IDLE)."""
    reports: list[dict[str, Any]] = []
    writer = _Threads(f"file://{tmp_path}/payloads.jsonl", reports)
    writer.threads = {}
    writer.queue([[n] for n in range(payload_writer._STEP)])
    assert writer.rendering.wait(30)  # the sink's thread is in its step of 64
    writer.queue([[n] for n in range(payload_writer._STEP, 3 * payload_writer._STEP)])
    closing = threading.Thread(target=writer.close, args=(5,))
    closing.start()
    while not writer._handover.is_set():
        time.sleep(0.01)
    writer.go.set()
    closing.join(30)
    assert not closing.is_alive()
    sink_thread = writer.threads[0]
    assert sink_thread != closing.ident
    assert {writer.threads[n] for n in range(payload_writer._STEP)} == {sink_thread}
    assert {writer.threads[n] for n in range(payload_writer._STEP, 3 * payload_writer._STEP)} == {closing.ident}
    assert sum(report["logged"] for report in reports) == 3 * payload_writer._STEP
    assert len((tmp_path / "payloads.jsonl").read_text().splitlines()) == 3 * payload_writer._STEP


class _Failing(_Held):
    """A held writer whose render raises on any thread but the sink's (the close's drain: a bug in a renderer)."""

    def render_chunk(self, chunk: list[Any]) -> tuple[list[tuple[str, bytes]], list[tuple[Any, Exception]]]:
        if threading.current_thread() is not self._thread:
            raise RuntimeError("a renderer's bug")
        return super().render_chunk(chunk)


def test_a_close_whose_drain_fails_still_closes_the_sink_and_reports_what_it_delivered(tmp_path: Path) -> None:
    reports: list[dict[str, Any]] = []
    writer = _Failing(f"file://{tmp_path}/payloads.jsonl", reports)
    closed: list[float] = []
    close = writer.sink.close
    writer.sink.close = lambda timeout_s: (closed.append(timeout_s), close(timeout_s))[1]  # type: ignore[method-assign]
    writer.queue([[n] for n in range(payload_writer._STEP)])
    assert writer.rendering.wait(30)  # the sink's thread is in its step
    writer.queue([[n] for n in range(payload_writer._STEP, 2 * payload_writer._STEP)])
    writer.go.set()
    with pytest.raises(RuntimeError, match="a renderer's bug"):
        writer.close(5)
    assert closed == [5]
    # the step the sink's thread finished is reported logged, and the failed step is no longer counted as being
    # rendered (the server counts what was handed over and never reported as failed)
    assert sum(report["logged"] for report in reports) == payload_writer._STEP
    assert reports[-1]["queued"] == 0
