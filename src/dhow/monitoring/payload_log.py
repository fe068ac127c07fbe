"""Payload logging: every inference's masked inputs and outputs, and every error, to a sink, off the hot path.

The data plane ``offer``s one event per request: a plain list (``FIELDS``) of what it saw, the request's and the
answer's tensors as they are, appended to a bounded queue, never a wait. Once per turn of the event loop, what was
queued is written, all of it in one ``orjson`` call (numpy arrays as they are) and one write, into the pipe of a
**writer process** of the server's own (``dhow.serving.payload_writer``). That process masks each event by its
model's ``pii:`` rules (handed over once per model), renders it as a CloudEvent and hands it to the sink
(``payload_sinks``: a rotating JSON Lines file, a Kafka topic, an HTTP endpoint); it answers with counts of
logged, dropped and failed events, which a thread here adds to the counters. Masking, rendering and the sink's
work never take the server's interpreter lock or its CPU time.

The queue is bounded twice: here (events waiting for the pipe, which fills only when the writer is far behind) and
in the writer (``capacity`` events waiting for the sink). A full queue drops the event and counts it; a sink that
fails counts it as failed; one that took it counts it as logged. Unlike a logger that buffers without bound, a slow
sink costs dropped events, never memory or latency (``dhow_payload_log_events_total{outcome="dropped"}``).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import os
import select
import subprocess
import threading
import time
from collections.abc import Sequence
from typing import Any, Protocol

import numpy as np
import orjson
from prometheus_client import CollectorRegistry, Counter, Gauge

from dhow.core.errors import InvalidInput
from dhow.core.frames import decode_frames, frame

__all__ = [
    "EVENT_TYPES",
    "FIELDS",
    "MAX_MASKINGS",
    "Masking",
    "PayloadCounts",
    "PayloadLog",
    "PayloadSink",
    "encode_frame",
]

log = logging.getLogger("dhow.payload_log")

#: the CloudEvents ``type`` of an answered request and of a failed one
EVENT_TYPES = {True: "io.dhow.inference.response", False: "io.dhow.inference.error"}
#: an event as the data plane offers it: a list in this order (``outcome``: "success" or the error's code;
#: ``error``: the message the client got; ``time``: Unix time it reached the data plane; ``inputs``/``outputs``:
#: name -> array, outputs None when it failed; ``inputs`` may be the request's Open Inference Protocol JSON body
#: as text instead, which the writer reads). ``offer`` appends the number of the model's masking.
FIELDS = ("request_id", "model", "version", "principal", "tenant", "data_region", "outcome", "error", "time",
          "latency_s", "parameters", "inputs", "outputs")  # fmt: skip
#: the indexes the data plane sets after the request ran
VERSION, OUTCOME, ERROR, LATENCY, OUTPUTS = 2, 6, 7, 9, 12

_NUMPY = orjson.OPT_SERIALIZE_NUMPY | orjson.OPT_NON_STR_KEYS
#: how long the server waits for the writer to open its sink (a Kafka producer, a file) at start
_START_TIMEOUT_S = 300.0
#: masking rules remembered at most (one per model config; past it they are handed over again)
MAX_MASKINGS = 4096


class Masking(Protocol):
    """A model's PII masking, as the writer process rebuilds it (``Masker.spec``)."""

    def spec(self) -> dict[str, Any]: ...


class PayloadCounts(Protocol):
    """What a sink reports, from any thread: events it took (``logged``), events its own bounded buffer had no room
    for (``dropped``) and events it lost (``failed``)."""

    def logged(self, count: int) -> None: ...

    def dropped(self, count: int) -> None: ...

    def failed(self, count: int, reason: str) -> None: ...


class PayloadSink(Protocol):
    """Where rendered events go. ``write`` runs in the writer's thread; it may report later (a Kafka delivery)."""

    #: how the metrics and the log name it: file, kafka or http
    kind: str

    def write(self, events: list[tuple[str, bytes]], counts: PayloadCounts) -> None:
        """Hand over (key, CloudEvent JSON) pairs; report each as logged or failed, now or when known."""

    def idle(self) -> None:
        """Called when nothing is queued (a Kafka producer serves its delivery reports)."""

    def close(self, timeout_s: float) -> None:
        """Deliver what is pending (at most ``timeout_s``) and release the sink."""


def _plain(value: Any) -> Any:
    """What orjson does not write by itself: text tensors' bytes, arrays it cannot take as they are."""
    if isinstance(value, bytes | bytearray | memoryview):
        return bytes(value).decode("utf-8", "replace")
    if isinstance(value, np.ndarray):
        return value.tolist()
    return str(value)


def encode_frame(document: Any) -> bytes:
    """A frame of the pipes between the server and its writer: a 4-byte big-endian length, then JSON."""
    try:
        body = orjson.dumps(document, default=_plain, option=_NUMPY)
    except TypeError:  # an array orjson refuses as it is (not native-endian): as lists
        body = orjson.dumps(_lists(document), default=_plain, option=_NUMPY)
    return frame(body)


def _lists(value: Any) -> Any:
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, dict):
        return {key: _lists(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [_lists(item) for item in value]
    return value


class PayloadLog:
    """The bounded queue in front of the writer process (``command``, given the sink's ``url``), and the thread
    that reads its counts."""

    def __init__(
        self,
        url: str,
        *,
        capacity: int,
        source: str,
        command: Sequence[str],
        registry: CollectorRegistry | None = None,
        close_timeout_s: float = 5.0,
    ) -> None:
        self.capacity = capacity
        self.close_timeout_s = close_timeout_s
        self._queue: collections.deque[list[Any]] = collections.deque()
        self._scheduled = False
        #: bytes of a frame the pipe did not take yet (the writer is behind): nothing more is written meanwhile
        self._unsent = b""
        self._loop: asyncio.AbstractEventLoop | None = None
        self._maskings: dict[Masking, int] = {}
        self._masking_count = 0
        self._new_maskings: list[tuple[int, dict[str, Any]]] = []
        self._closing = False
        self._gone = False
        self._last_failure = 0.0
        self._process = subprocess.Popen(list(command), stdin=subprocess.PIPE, stdout=subprocess.PIPE)
        assert self._process.stdin is not None and self._process.stdout is not None
        self._in, self._out = self._process.stdin.fileno(), self._process.stdout.fileno()
        os.write(self._in, encode_frame({"url": url, "source": source, "capacity": capacity,
                                         "close_timeout_s": close_timeout_s}))  # fmt: skip
        self._answers = bytearray()
        first = self._first_answer()
        if "error" in first:
            self._process.wait(10)
            raise InvalidInput(str(first["error"]))
        self.kind = str(first["ready"])
        events = Counter(
            "dhow_payload_log_events",
            "Payload events by outcome: logged (the sink took it), dropped (the queue was full), failed (the sink "
            "refused or lost it)",
            ["sink", "outcome"],
            registry=registry,
        )
        self._logged = events.labels(self.kind, "logged")
        self._dropped = events.labels(self.kind, "dropped")
        self._failed = events.labels(self.kind, "failed")
        self._queued = Gauge(
            "dhow_payload_log_queued",
            "Payload events waiting for the sink",
            ["sink"],
            registry=registry,
            multiprocess_mode="livesum",
        ).labels(self.kind)
        #: events the writer holds (its last report): failed if it dies with them
        self._writer_queued = 0
        os.set_blocking(self._in, False)
        self._reader = threading.Thread(target=self._read_counts, name=f"dhow-payload-log-{self.kind}", daemon=True)
        self._reader.start()

    def _first_answer(self) -> dict[str, Any]:
        deadline = time.monotonic() + _START_TIMEOUT_S
        while time.monotonic() < deadline:
            if select.select([self._out], [], [], 0.5)[0]:
                chunk = os.read(self._out, 1 << 16)
                if not chunk:
                    break
                self._answers += chunk
                frames = decode_frames(self._answers)
                if frames:
                    answer: dict[str, Any] = frames[0]
                    return answer
        self._process.kill()
        raise InvalidInput(f"the payload log's writer process did not start (exit code {self._process.wait()})")

    # -- the request's path (the event loop's thread) --

    def offer(self, event: list[Any], masking: Masking) -> None:
        """Queue an event (``FIELDS``), or drop and count it when the queue is full: never waits."""
        if len(self._queue) >= self.capacity or self._gone:
            if self._gone:
                self._failed.inc()
            else:
                self._dropped.inc()
            return
        number = self._maskings.get(masking)
        if number is None:
            number = self._masking_number(masking)
        event.append(number)
        self._queue.append(event)
        if not self._scheduled:
            self._scheduled = True
            try:
                loop = asyncio.get_running_loop()
            except RuntimeError:  # not on an event loop: written now
                self._flush()
                return
            self._loop = loop
            loop.call_soon(self._flush)

    def _masking_number(self, masking: Masking) -> int:
        """A number for the model's masking, its rules handed over with the next frame (once per masking)."""
        if len(self._maskings) >= MAX_MASKINGS:  # config reloads: the old ones are handed over again if still used
            self._maskings.clear()
        self._masking_count += 1
        self._maskings[masking] = self._masking_count
        self._new_maskings.append((self._masking_count, masking.spec()))
        return self._masking_count

    def _flush(self) -> None:
        """Write every queued event in one frame (unless the pipe has not taken the last one yet)."""
        self._scheduled = False
        if self._unsent or not self._queue:
            return
        events = list(self._queue)
        self._queue.clear()
        maskings, self._new_maskings = self._new_maskings, []
        self._write(encode_frame([maskings, events]), len(events))

    def _write(self, frame: bytes, count: int) -> None:
        try:
            written = os.write(self._in, frame)
        except BlockingIOError:
            written = 0
        except OSError as exc:  # the writer is gone
            self._writer_gone(count, repr(exc))
            return
        if written < len(frame):
            self._unsent = frame[written:]
            if self._loop is not None and not self._closing:
                self._loop.add_writer(self._in, self._write_more)

    def _write_more(self) -> None:
        try:
            written = os.write(self._in, self._unsent)
        except BlockingIOError:
            return
        except OSError as exc:
            self._unsent = b""
            self._stop_writing()
            self._writer_gone(0, repr(exc))
            return
        self._unsent = self._unsent[written:]
        if not self._unsent:
            self._stop_writing()
            self._flush()

    def _stop_writing(self) -> None:
        if self._loop is not None:
            with contextlib.suppress(Exception):
                self._loop.remove_writer(self._in)

    def _writer_gone(self, count: int, reason: str) -> None:
        if not self._gone and not self._closing:
            log.error("payload log: the writer process stopped (%s, exit code %s): events are counted failed",
                      reason, self._process.poll())  # fmt: skip
        self._gone = True
        self._failed.inc(count)

    # -- the counts, from the writer process (the reader's thread) --

    def _read_counts(self) -> None:
        while True:
            try:
                chunk = os.read(self._out, 1 << 16)
            except OSError:
                chunk = b""
            if not chunk:
                break
            self._answers += chunk
            for report in decode_frames(self._answers):
                self._count(report)
        if not self._closing:
            self._writer_gone(self._writer_queued, "its pipe closed")

    def _count(self, report: dict[str, Any]) -> None:
        if report.get("logged"):
            self._logged.inc(report["logged"])
        if report.get("dropped"):
            self._dropped.inc(report["dropped"])
        if report.get("failed"):
            self._failed.inc(report["failed"])
        self._writer_queued = int(report.get("queued", 0))
        self._queued.set(self._writer_queued)
        reason = report.get("reason")
        now = time.monotonic()
        if reason and now - self._last_failure > 10:  # one line per 10 s: a sink that is down must not flood the log
            self._last_failure = now
            log.warning("payload log: event(s) to the %s sink failed: %s", self.kind, reason)

    def close(self, timeout_s: float | None = None) -> None:
        """Hand over what is queued, then let the writer deliver what it holds, within about ``timeout_s``."""
        timeout = self.close_timeout_s if timeout_s is None else timeout_s
        self._closing = True
        self._stop_writing()
        if not self._gone:
            frame = self._unsent
            if self._queue:
                events = list(self._queue)
                self._queue.clear()
                frame += encode_frame([self._new_maskings, events])
            with contextlib.suppress(OSError):
                os.set_blocking(self._in, True)
                while frame:
                    frame = frame[os.write(self._in, frame) :]
        with contextlib.suppress(OSError):
            assert self._process.stdin is not None
            self._process.stdin.close()
        try:
            self._process.wait(timeout + 10)
        except subprocess.TimeoutExpired:
            self._process.kill()
            self._process.wait()
        self._reader.join(5)
