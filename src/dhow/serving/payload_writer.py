"""The payload log's writer process: masks, renders and writes the events a server hands over.

``python -m dhow.serving.payload_writer`` reads frames on its stdin: first the settings (``url`` of the sink,
``source``, ``capacity``, ``close_timeout_s``, ``priority``: ``writer_main._yield_cpu``), answered ``{"ready":
kind}`` once the sink is open (or ``{"error": …}``, and it exits); then frames of events
(``payload_log.frame_events``): the masking rules of models not seen before (``Masker.spec``, by number) and events
(``payload_log.FIELDS``, a masking number and, for a JSON body, its number of tensors).

A thread reads the pipe as fast as it fills, into a queue of at most ``capacity`` events (past it, events are
dropped and counted: a slow sink never fills the pipe, so the server never waits); another masks each event by its
model's rules, renders it as a CloudEvent and hands chunks to the sink. Counts of logged, dropped and failed events
and the queue's length go back on stdout, as frames, every ``_REPORT_S``. When stdin closes (the server stops, or
died), what is queued is written, the sink closed, the last counts sent, and the process exits. SIGINT and SIGTERM
are ignored: a Ctrl-C or a stop of the whole process group must not lose what the server handed over.
"""

from __future__ import annotations

import collections
import sys
import threading
import time
from typing import Any

from dhow.governance.masking import Masker
from dhow.monitoring.payload_log import INPUTS, MAX_MASKINGS, OUTPUTS, QUEUE_BYTES, PayloadSink, read_events
from dhow.monitoring.payload_sinks import open_sink
from dhow.serving.payload_render import FEW as _FEW
from dhow.serving.payload_render import cloud_events
from dhow.serving.writer_main import Answer, serve

__all__ = ["CHUNK", "Writer", "main"]

#: events handed to the sink at once (at most)
CHUNK = 512
#: the least events rendered in one step, how long a step runs at most (about), and the pause between two steps while
#: more are queued. The server handed the payload writer what came in ``writer_pipe.FLUSH_S`` (50 ms then, 10 ms now:
#: ~350-400 payload events at 7,000-8,000 requests a second then; the trace writer, what came in 0.5 s,
#: ``tracing.FLUSH_S``, or 1024 requests); rendered and written in one go they took ~3-4 ms of CPU at once from the core
#: the load and the model share, and the requests in flight then waited for it: ``tabular`` over REST at c=16 with the
#: payload log to a file, p99 5.35 ms in one go against 4.6 in steps of 64 events (median of 8 rounds, all off 3.4),
#: throughput the same. Those steps were ~0.5 ms each; the renderer got faster and steps of 64 shrank to ~0.2 ms, 4-5
#: pauses a frame, and each pause is a wake-up that costs the writer more than the step it ends (cold caches, an idle
#: core woken): ``benchmarks/payload_writer_cpu.py``, 350 events every 50 ms, 7.6-9.7 µs of CPU an event with steps of
#: 64, 6.1-7.5 with no pause at all, 4.4-5.5 fed without pauses (2026-12-06; a pause ~300 µs of CPU). So a step is as
#: many events as render in about ``_STEP_S`` of CPU at the pace of the step before (at least ``_STEP``): bursts as
#: short as those measured, and the fewest pauses they allow (one or two a frame of 50 ms then; a frame of 10 ms,
#: 70-130 events at 7,000-13,000 requests a second, is one step now). At most ``_MOST`` events a
#: step: events far dearer than the last step's (``pii`` masking, large bodies) make one step at most 4x as long as a
#: step of 64 of them, until the next step is sized by their pace. A backlog (``_BEHIND``) is written without pauses: a
#: writer that falls behind catches up at full speed.
_STEP = 64
_MOST = 4 * _STEP
_STEP_S = 0.0005
_STEP_PAUSE_S = 0.001
_BEHIND = 4 * CHUNK
#: how often counts go back to the server (when something changed)
_REPORT_S = 0.2


class Writer:
    """The bounded queue of one writer process, the sink's thread that drains it, and the counts (PayloadCounts)."""

    #: seconds an event took to render in the last step (what sizes the next: ``_render_steps``)
    _event_s = _STEP_S / _STEP
    #: events taken off the queue and not handed to the sink yet: being rendered, or being written (``queued``)
    _rendering = 0

    def __init__(
        self, sink: PayloadSink, *, capacity: int, source: str, report: Any, capacity_bytes: int = QUEUE_BYTES
    ) -> None:
        self.sink = sink
        self.kind = sink.kind
        self.capacity = capacity
        #: the bytes of the queued events' JSON bodies and answers at most, and those queued (under ``_lock``), each
        #: event's in ``_sizes`` (in step with ``_queue``: extended before it, taken after it)
        self.capacity_bytes = capacity_bytes
        self._bytes = 0
        self._sizes: collections.deque[int] = collections.deque()
        #: the bytes of the events taken for the sink and not handed yet (counted out once handed)
        self._freeing = 0
        self.source = source
        self._report_to = report
        self._queue: collections.deque[list[Any]] = collections.deque()
        self._maskers: dict[int, Masker] = {}
        self._lock = threading.Lock()
        self._counts = {"logged": 0, "dropped": 0, "failed": 0}
        self._reason = ""
        self._reported_queued = 0
        self._wake = threading.Event()
        self._stopping = threading.Event()
        #: set by ``close``: the sink's thread stops after its step, and the close writes the rest on its own thread
        self._handover = threading.Event()
        #: set once the close delivered what it could: the reporter reports until then (what the sink delivers
        #: during the close too, reported even if the writer is killed before its last report)
        self._closed = threading.Event()
        self._thread = threading.Thread(target=self._drain, name="sink", daemon=True)
        self._thread.start()
        self._reporter = threading.Thread(target=self._report_loop, name="report", daemon=True)
        self._reporter.start()

    # -- the reader's side --

    def take(self, frame: list[Any]) -> None:
        maskings, events = frame
        for number, spec in maskings:
            if len(self._maskers) >= 2 * MAX_MASKINGS:  # numbers only grow: the oldest are no longer used
                for old in list(self._maskers)[:MAX_MASKINGS]:
                    del self._maskers[old]
            self._maskers[number] = Masker.from_spec(spec)
        self.queue(events)

    def queue(self, events: list[Any]) -> None:
        """Queue events for the sink's thread, dropping (and counting) what the queue has no room for: past its
        count of events, or of bytes (the newest dropped)."""
        room = self.capacity - len(self._queue)
        kept = events[: max(room, 0)]
        size_of = self._size
        sizes = [size_of(event) for event in kept]
        total, held = 0, self._bytes
        for n, size in enumerate(sizes):
            # (an event larger than the bound alone goes into an empty queue: a bound below one request must not
            # drop them all)
            if held + total and held + total + size > self.capacity_bytes:
                kept, sizes = kept[:n], sizes[:n]
                break
            total += size
        if len(kept) < len(events):
            self.dropped(len(events) - len(kept))
        with self._lock:
            self._bytes += total
        self._sizes.extend(sizes)
        self._queue.extend(kept)
        self._wake.set()

    def _size(self, event: Any) -> int:
        """What an event counts against ``capacity_bytes``: its JSON body and answer, or its tensors' values."""
        return _bytes_of(event[INPUTS]) + _bytes_of(event[OUTPUTS]) if len(event) > OUTPUTS else 0

    # -- PayloadCounts, called by the sink --

    def logged(self, count: int) -> None:
        with self._lock:
            self._counts["logged"] += count

    def dropped(self, count: int) -> None:
        with self._lock:
            self._counts["dropped"] += count

    def failed(self, count: int, reason: str) -> None:
        with self._lock:
            self._counts["failed"] += count
            self._reason = reason

    # -- the sink's thread --

    def _drain(self) -> None:
        while not self._handover.is_set():
            if not self._queue:
                if self._stopping.is_set():
                    return
                try:
                    self.sink.idle()
                except Exception as error:  # (a sink counts what it delivers: its thread must not die of a bug in it)
                    self.failed(0, f"the {self.kind} sink failed while idle: {error!r}")
                # (a sink with nothing to do meanwhile is woken by the reader alone: no turn every 20 ms)
                self._wake.wait(self.sink.idle_s)
                self._wake.clear()
                continue
            rendered, failures = self._render_steps()
            for event, exc in failures:  # a value masking or JSON cannot take: that event fails, not the others
                self.failed(1, f"could not render the event of request {event[0]}: {exc!r}")
            try:
                if rendered:
                    self.hand(rendered)
            # a sink's ``write`` that raises has counted none of them (one that holds events never raises once it
            # holds them: ``OtlpSink.write``)
            except Exception as exc:
                self.failed(len(rendered), repr(exc))
            finally:
                self._rendering = 0
                with self._lock:
                    self._bytes -= self._freeing
                self._freeing = 0

    def hand(self, rendered: list[tuple[str, bytes]]) -> None:
        """Give the sink what was rendered: counted as being rendered (``queued``) until ``write`` returns."""
        self.sink.write(rendered, self)

    def _render_steps(self) -> tuple[list[tuple[str, bytes]], list[tuple[Any, Exception]]]:
        """Up to ``CHUNK`` queued events rendered in steps of about ``_STEP_S`` (at least ``_STEP`` events) with
        ``_STEP_PAUSE_S`` between steps unless the writer is behind (``_BEHIND`` queued, or half its capacity) or
        stopping (then at once)."""
        rendered: list[tuple[str, bytes]] = []
        failures: list[tuple[Any, Exception]] = []
        queue = self._queue
        behind = min(_BEHIND, self.capacity // 2)  # (a small queue must not fill while its writer pauses)
        done = 0
        while queue and done < CHUNK and not self._handover.is_set():
            if done and len(queue) < behind and not self._stopping.is_set():
                time.sleep(_STEP_PAUSE_S)
            left = min(len(queue), CHUNK - done)
            size = min(left, _MOST, max(_STEP, int(_STEP_S / self._event_s)))
            if left - size < _FEW:  # (a remainder too short for the renderer's columns goes with this step)
                size = left
            step = [queue.popleft() for _ in range(size)]
            sizes = self._sizes
            # (counted out once the sink took them: ``_drain``; rendered and handed, they are held till then. Never
            # more than it holds: events queued by another way than ``queue`` count nothing)
            self._freeing += sum([sizes.popleft() for _ in range(min(size, len(sizes)))])
            self._rendering += size
            start = time.thread_time()
            written, failed = self.render_chunk(step)
            # (the thread's CPU time: a step another thread preempted did not take the core all that while)
            self._event_s = max(time.thread_time() - start, 1e-9) / size
            rendered += written
            failures += failed
            done += size
        return rendered, failures

    def render_chunk(self, chunk: list[Any]) -> tuple[list[tuple[str, bytes]], list[tuple[Any, Exception]]]:
        """A chunk's events as the sink takes them (key and CloudEvent, masked), and those that could not be."""
        return cloud_events(chunk, self._maskers, self.source)

    # -- the counts, back to the server --

    def _report_loop(self) -> None:
        while not self._closed.wait(_REPORT_S):
            self.report()

    def report(self) -> None:
        with self._lock:
            counts, self._counts = self._counts, {"logged": 0, "dropped": 0, "failed": 0}
            reason, self._reason = self._reason, ""
        queued = self.queued()
        if any(counts.values()) or reason or queued != self._reported_queued:
            self._reported_queued = queued
            self._report_to({**counts, "queued": queued, "reason": reason})

    def queued(self) -> int:
        """What the writer holds, as its reports count it (``queued``): the events not handed to the sink yet,
        queued or being rendered."""
        return len(self._queue) + self._rendering

    def close(self, timeout_s: float) -> None:
        """Write what is queued, deliver what the sink holds (within about ``timeout_s``), send the last counts: on
        the calling thread (the sink's stops after its step), which ``writer_main`` keeps at the normal CPU priority
        when the others yield it."""
        self._stopping.set()
        self._handover.set()
        self._wake.set()
        self._thread.join()
        self._handover.clear()
        try:
            try:
                self._drain()
            finally:  # (what the sink holds is delivered, and reported below, whatever the drain met)
                self._rendering = 0
                self.sink.close(timeout_s)
        finally:
            self._closed.set()
            self._reporter.join()
            self.report()

    def kept_threads(self) -> set[int]:
        """The reporter's thread keeps the normal CPU priority when the writer's others yield it (``writer_main``):
        its few wake-ups a second cost nothing, and a close on a thread of the normal priority must not wait for the
        interpreter lock behind one that waits for a CPU."""
        return {self._reporter.native_id} if self._reporter.native_id is not None else set()


def _bytes_of(part: Any) -> int:
    """An event's JSON body or answer, in bytes; decoded tensors (``[name, datatype, shape, values]``, their values
    lists of Python numbers here) at about 32 bytes a value."""
    if type(part) is bytes:
        return len(part)
    if type(part) is not list:
        return 0
    size = 0
    for tensor in part:
        count = 1
        for dim in tensor[2] if type(tensor) is list and len(tensor) > 2 and type(tensor[2]) is list else ():
            count *= dim if type(dim) is int and dim > 0 else 1
        size += 32 * count
    return size


def _open(settings: dict[str, Any], answer: Answer) -> Writer:
    sink = open_sink(str(settings["url"]))
    return Writer(sink, capacity=int(settings["capacity"]), source=str(settings["source"]), report=answer,
                  capacity_bytes=int(settings.get("capacity_bytes", QUEUE_BYTES)))  # fmt: skip


def main() -> int:
    return serve(_open, "--payload-log", read_events)


if __name__ == "__main__":
    sys.exit(main())
