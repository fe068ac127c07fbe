"""The payload and trace writers render what is queued in steps, pausing between them unless behind or stopping."""

from __future__ import annotations

import collections
import threading
from typing import Any

import pytest

from dhow.serving import payload_writer
from dhow.serving.payload_writer import Writer


class _Steps(Writer):
    """A writer whose render records each step's size (no sink, no threads: ``_render_steps`` alone)."""

    def __init__(self, queued: int, *, stopping: bool = False, capacity: int = 10_000) -> None:
        self.capacity = capacity
        self._queue = collections.deque([[n] for n in range(queued)])
        self._stopping = threading.Event()
        if stopping:
            self._stopping.set()
        self.steps: list[int] = []

    def render_chunk(self, chunk: list[Any]) -> tuple[list[tuple[str, bytes]], list[tuple[Any, Exception]]]:
        self.steps.append(len(chunk))
        failed = [(event, ValueError("odd")) for event in chunk if event[0] % 97 == 1]
        return [(str(event[0]), b"") for event in chunk if event[0] % 97 != 1], failed


@pytest.fixture
def pauses(monkeypatch: pytest.MonkeyPatch) -> list[float]:
    slept: list[float] = []
    monkeypatch.setattr(payload_writer.time, "sleep", slept.append)
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


def test_a_sink_gets_at_most_a_chunk_and_the_rest_stays_queued(pauses: list[float]) -> None:
    writer = _Steps(payload_writer._CHUNK + 100)
    rendered, failures = writer._render_steps()
    assert len(rendered) + len(failures) == payload_writer._CHUNK
    assert len(writer._queue) == 100


def test_a_writer_behind_or_stopping_renders_without_pauses(pauses: list[float]) -> None:
    behind = _Steps(payload_writer._BEHIND + payload_writer._CHUNK)
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
    writer._stopping, writer.capacity = threading.Event(), 8192
    writer._queue = collections.deque(records)
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
