"""The server's side of a writer process of its own (the payload log's, tracing's): a bounded queue, written into the
process's stdin as one frame every ``flush_s`` at most (``FLUSH_S``, the payload log's; tracing's is longer), and a
thread reading the counts it sends back.

The process (``command``) gets its settings as the first frame and answers ``{"ready": kind}`` (or
``{"error": …}``: refused at start, as ``InvalidInput``); then it takes frames of whatever the subclass
writes (``_frame``) and answers, as frames, counts: ``logged``, ``dropped``, ``failed``, ``queued`` and a
failure's ``reason``. The queue never waits: a full one drops and counts; a writer that died fails and counts,
once logged, and the request's path goes on (``dhow.serving.writer_main`` is the process's side). Every item handed
over is counted once: what a writer that died (or that the close had to kill) was handed and never counted is
counted failed (``_settle``).
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
from typing import Any

import orjson
from prometheus_client import CollectorRegistry, Counter, Gauge

from dhow.core import affinity
from dhow.core.errors import InvalidInput
from dhow.core.frames import decode_frames, frame, widen_pipe

__all__ = ["WriterPipe"]

#: how long the server waits for the writer to open its sink (a Kafka producer, a file) at start
_START_TIMEOUT_S = 300.0
#: how long an item waits to be handed over with the others that came meanwhile: one pipe write, and one wake-up
#: of the writer process (its reader thread, then its sink thread), per interval instead of per turn of the event
#: loop (thousands a second under load, each a context switch). The hand-over is a stall of the loop: the frame is
#: made there, ~1.9 µs an event, so at 13,000 requests a second 50 ms of events (~650) held every request in flight
#: for ~1 ms, twenty times a second, and that set the p99: ``tabular``, REST, c=16, monitoring all on, p99 1.65-1.97x
#: all off's at 50 ms, 1.27-1.33x at 10 ms, 1.08x at 5 ms (one run), 1.57x at 20 ms; throughput 0.83-0.87 of all off
#: at 50 ms, 0.83-0.94 at 10 ms, 0.91 at 5 ms, with no more server CPU a request (``monitoring_overhead.py --compare``,
#: 2026-12-06 night, paired rounds). On 2026-12-05, when the writers' wake-ups were dearer (rendering in fixed
#: steps), 10 ms had cost ~24 µs of CPU a request against ~13 at 50 ms; no longer seen. Neither promises when an item
#: is written, and the queue (``capacity``) bounds what waits meanwhile
FLUSH_S = 0.01
#: items framed in one turn of the event loop at most (``frame_items``): a writer that falls behind (its sink slow,
#: or its process starved of CPU at the lowest priority on a machine with none idle) lets its pipe fill, and the
#: queue then grows to its capacity while the pipe waits; framing all of it at once when the pipe drains held the
#: loop, and every request in flight, 24-56 ms a time (10,000 payload events, 7 MB; ``tabular``, REST, c=16, a
#: machine with a CPU spinning beside the server, 2026-12-08), twelve times in five seconds. In chunks, one a turn,
#: the loop serves requests between them: ~1 ms a chunk at the payload log's ~2 µs an event (of a few hundred bytes:
#: the bound is in events, not bytes), and a hand-over of ``FLUSH_S`` under load is a quarter of it or less (~100-130
#: events at 10,000-13,000 requests a second)
FRAME_ITEMS = 512


class WriterPipe:
    """A writer process (``command``, given ``settings``), the bounded queue in front of it (``capacity``) and the
    thread that reads its counts into the subclass's metrics (``_metrics``)."""

    #: how the log names it ("payload log", "tracing")
    what = "writer"
    #: how long an item waits to be handed over with the others (``FLUSH_S``; tracing's is longer: its writer posts
    #: a second apart)
    flush_s = FLUSH_S
    #: items framed in one turn at most (``FRAME_ITEMS``): what is left is framed on the next turn, once the pipe
    #: took the frame
    frame_items = FRAME_ITEMS

    @property
    def _log(self) -> logging.Logger:
        """The logger of what this pipe carries (``dhow.payload_log``, ``dhow.tracing``)."""
        return logging.getLogger(f"dhow.{self.what.replace(' ', '_')}")

    def __init__(
        self,
        command: Sequence[str],
        settings: dict[str, Any],
        *,
        capacity: int,
        registry: CollectorRegistry | None,
        close_timeout_s: float,
    ) -> None:
        self.capacity = capacity
        self.close_timeout_s = close_timeout_s
        self._queue: collections.deque[Any] = collections.deque()
        self._scheduled = False
        #: the timer of the scheduled hand-over (``_put``), or the next turn's (what a frame left, ``_flush``): a
        #: subclass that hands over before it cancels it
        self._timer: asyncio.Handle | None = None
        #: held while the queue is taken, framed and written: by ``_flush`` on the event loop, by ``close`` in the
        #: thread the server closes it from (a timer due meanwhile must neither take items twice nor interleave its
        #: frame's bytes with the close's in the pipe); the close writes after it let go, once ``_closing`` keeps
        #: the loop from writing
        self._handing = threading.Lock()
        #: items the ``_frame`` running could not make (it counted them failed): not handed over (``_framed``, under
        #: ``_handing``)
        self._unframed = 0
        self._last_unframed = float("-inf")
        #: bytes of a frame the pipe did not take yet (the writer is behind): nothing more is written meanwhile (a
        #: view: a frame of many MB goes into a pipe of 1 MiB in as many writes, each without copying the rest)
        self._unsent: bytes | memoryview = b""
        self._loop: asyncio.AbstractEventLoop | None = None
        self._closing = False
        #: the loop's removal of its watch on the pipe came after the close stopped waiting for it: the removal
        #: closes the pipe's number, once it ran (``_release_pipe``); both under ``_releasing``
        self._released_by_removal = False
        self._releasing = threading.Lock()
        self._gone = False
        self._last_failure = 0.0
        self._process = subprocess.Popen(list(command), stdin=subprocess.PIPE, stdout=subprocess.PIPE)
        assert self._process.stdin is not None and self._process.stdout is not None
        self._in, self._out = self._process.stdin.fileno(), self._process.stdout.fileno()
        os.write(self._in, frame(orjson.dumps({**settings, "capacity": capacity, "close_timeout_s": close_timeout_s})))
        self._answers = bytearray()
        first = self._first_answer()
        if "error" in first:
            self._process.wait(10)
            raise InvalidInput(str(first["error"]))
        self.kind = str(first["ready"])
        self._logged, self._dropped, self._failed, self._queued = self._metrics(registry)
        #: items handed to the writer (framed for its pipe), and items its reports counted (logged, dropped,
        #: failed): the difference is what it holds or has not reported yet, failed if it dies (``_settle``);
        #: both under ``_tally``, with ``_gone``, and ``_settled`` once its pipe closed and that was counted
        self._handed = 0
        self._reported = 0
        self._settled = False
        self._tally = threading.Lock()
        os.set_blocking(self._in, False)
        # a frame of ``FLUSH_S`` under load (at 4,500 requests a second, 100-160 KB: payload events of ~580 bytes) is
        # more than a default pipe's 64 KiB, and a frame the pipe cannot take whole goes in pieces, each a turn of the
        # event loop here and a wake-up of the writer
        widen_pipe(self._in)
        self._reader = threading.Thread(target=self._read_counts, name=f"dhow-{self.what}-{self.kind}", daemon=True)
        self._reader.start()

    #: the counter's name and help, the gauge's (what the writer holds), the counter's outcome labels (logged,
    #: dropped, failed), and whether both are labelled by the sink's kind
    metrics: tuple[str, str, str, str] = ("", "", "", "")
    outcomes = ("logged", "dropped", "failed")
    by_sink = False

    def _metrics(self, registry: CollectorRegistry | None) -> tuple[Counter, Counter, Counter, Gauge]:
        counted, counted_help, held, held_help = self.metrics
        sink = (self.kind,) if self.by_sink else ()
        labels = ["sink"] if self.by_sink else []
        counter = Counter(counted, counted_help, [*labels, "outcome"], registry=registry)
        gauge = Gauge(held, held_help, labels, registry=registry, multiprocess_mode="livesum")
        logged, dropped, failed = (counter.labels(*sink, outcome) for outcome in self.outcomes)
        return logged, dropped, failed, gauge.labels(*sink) if sink else gauge

    def _frame(self, items: list[Any]) -> bytes:
        """The frame of what was queued (and of anything else the writer must learn first)."""
        raise NotImplementedError

    def _took(self, items: list[Any], everything: bool) -> None:
        """``items`` were taken off the queue (``everything``: all it held): a subclass that counts what its queue
        holds counts them out."""

    def _first_answer(self) -> dict[str, Any]:
        deadline = time.monotonic() + _START_TIMEOUT_S
        # (not ``select.select``: a server with many connections numbers its new pipes past 1024, which it refuses)
        poller = select.poll()
        poller.register(self._out, select.POLLIN)
        while (left := deadline - time.monotonic()) > 0:
            if poller.poll(left * 1000 + 1):
                chunk = os.read(self._out, 1 << 16)
                if not chunk:
                    break
                self._answers += chunk
                frames = decode_frames(self._answers)
                if frames:
                    answer: dict[str, Any] = frames[0]
                    return answer
        self._process.kill()
        raise InvalidInput(f"the {self.what}'s writer process did not start (exit code {self._process.wait()})")

    # -- the request's path (the event loop's thread) --

    def _refused(self, count: int = 1) -> bool:
        """Whether the queue cannot take another item (counted dropped, or failed when the writer is gone)."""
        if len(self._queue) < self.capacity and not self._gone:
            return False
        self._refuse(count)
        return True

    def _refuse(self, count: int = 1) -> None:
        """Count items not queued: failed when the writer is gone, else dropped (the queue was full)."""
        (self._failed if self._gone else self._dropped).inc(count)

    def _put(self, item: Any) -> None:
        """Queue an item (``_refused`` said there is room); written within ``flush_s``."""
        self._queue.append(item)
        if not self._scheduled:
            self._schedule()

    def _schedule(self) -> None:
        """The hand-over of what is queued, ``flush_s`` from now (a subclass that queues by itself calls it
        unless ``_scheduled``)."""
        self._scheduled = True
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:  # not on an event loop: written now
            self._flush()
            return
        self._loop = loop
        self._timer = loop.call_later(self.flush_s, self._flush)

    def _flush(self) -> None:
        """Write the queued items in one frame (unless the pipe has not taken the last one yet; ``frame_items`` at
        most, the rest on the loop's next turn), in place of the timer that was due to (cancelled: a flush when the
        pipe drained, or an early one, leaves none behind to write a stray frame, and ``_put`` starts one chain of
        timers, not a second). Not once ``close`` began: it hands over what is left itself, from another thread
        (``_handing``)."""
        self._scheduled = False
        timer, self._timer = self._timer, None
        if timer is not None:
            timer.cancel()
        with self._handing:
            if self._closing:
                if self._settled:  # (queued after the close ended: failed, as ``_refused`` counts it now)
                    self._fail_queued()
                return
            queue = self._queue
            if self._unsent or not queue:
                return
            if self._gone:  # (nothing to frame for: failed, all of it, as ``_hand`` would count each chunk)
                self._fail_queued()
                return
            try:
                loop: asyncio.AbstractEventLoop | None = asyncio.get_running_loop()
            except RuntimeError:  # not on a loop: no next turn to leave the rest to
                loop = None
            if len(queue) <= self.frame_items or loop is None:
                items = list(queue)
                queue.clear()
                self._took(items, everything=True)
            else:  # (a writer behind: a chunk this turn, the rest on the next ones)
                items = [queue.popleft() for _ in range(self.frame_items)]
                self._took(items, everything=False)
            framed = self._framed(items)
            if framed is not None and self._hand(framed[1]):
                self._write(framed[0])
            if queue and not self._unsent and loop is not None:
                # what is left, on the loop's next turn (a pipe that did not take the frame calls ``_flush`` itself
                # once it drained: ``_write_more``)
                self._scheduled = True
                self._timer = loop.call_soon(self._flush)

    def _framed(self, items: list[Any]) -> tuple[bytes, int] | None:
        """``_frame`` of ``items`` and how many it made (those it could not, it counted failed); None when it
        failed whole: every item not counted yet is counted failed (logged), and the others go on (under
        ``_handing``)."""
        try:
            data = self._frame(items)
        except Exception:
            failed, self._unframed = len(items) - self._unframed, 0
            self._failed.inc(failed)
            now = time.monotonic()
            if now - self._last_unframed > 10:  # one line per 10 s: a frame failing each time must not flood the log
                self._last_unframed = now
                self._log.exception("%s: %d item(s) could not be written: counted failed", self.what, failed)
            return None
        made, self._unframed = len(items) - self._unframed, 0
        return data, made

    def _hand(self, count: int) -> bool:
        """Count ``count`` items as handed to the writer: False (and failed) when it is gone."""
        with self._tally:
            if not self._gone:
                self._handed += count
                return True
        self._failed.inc(count)
        return False

    def _write(self, data: bytes) -> None:
        try:
            written = os.write(self._in, data)
        except BlockingIOError:
            written = 0
        except OSError as exc:  # the writer is gone: what it was handed is failed once its pipe closes (``_settle``)
            self._writer_gone(repr(exc))
            return
        if written < len(data):
            self._unsent = memoryview(data)[written:]
            if self._loop is not None and not self._closing:
                self._loop.add_writer(self._in, self._write_more)

    def _write_more(self) -> None:
        with self._handing:  # (the close writes what is left itself: the rest never twice)
            if self._closing:  # (a call the close's removal, scheduled on this thread, did not come before)
                self._stop_writing()
                return
            try:
                written = os.write(self._in, self._unsent)
            except BlockingIOError:
                return
            except OSError as exc:  # the writer is gone: what waits behind the rest, whose timer may have come and
                # gone, is counted failed by the flush below, not left queued until the close
                self._unsent = b""
                self._stop_writing()
                self._writer_gone(repr(exc))
            else:
                self._unsent = self._unsent[written:]
                if self._unsent:
                    return
                self._stop_writing()
        self._flush()

    def _stop_writing(self, stopped: threading.Event | None = None) -> None:
        """Stop the loop's watch on the pipe (``_write_more``), on the loop's thread: its methods are not
        thread-safe. From another thread (the close's) it is scheduled there, unless the loop no longer runs (then
        nothing else touches it; a closed one has no watch left). ``stopped`` is set once it is done (and the pipe
        closed, when the close left that to it: ``_release_pipe``)."""
        loop = self._loop
        try:
            here = asyncio.get_running_loop() is loop
        except RuntimeError:
            here = False
        if loop is not None and not here and loop.is_running():
            try:
                loop.call_soon_threadsafe(self._stop_writing, stopped)
                return
            except RuntimeError:  # (closed meanwhile)
                pass
        elif loop is not None and not loop.is_closed():
            with contextlib.suppress(Exception):
                loop.remove_writer(self._in)
        if stopped is not None:
            with self._releasing:
                stopped.set()
                late = self._released_by_removal
            if late:  # (the close left the pipe's number to this removal: ``_release_pipe``)
                self._close_stdin()

    def _writer_gone(self, reason: str) -> None:
        with self._tally:
            was_gone, self._gone = self._gone, True
        if not was_gone and not self._closing:
            self._log.error(
                "%s: the writer process stopped (%s, exit code %s): what it is handed is counted failed",
                self.what, reason, self._process.poll())  # fmt: skip

    def _settle(self) -> None:
        """The writer's pipe closed (it exited, died or was killed): what it was handed and did not report is
        counted failed, once (its last report may have missed what it delivered since: counted failed too, as
        the server cannot know). A writer that reported more than it was handed counted some twice, which would
        hide as many it lost: said in the log."""
        with self._tally:
            self._gone = True
            lost, self._reported = self._handed - self._reported, self._handed
            self._settled = True
        if lost > 0:
            self._failed.inc(lost)
        elif lost < 0:
            self._log.error(
                "%s: the writer reported %d item(s) more than it was handed: some were counted twice (a bug in its "
                "%s sink), and as many it lost may not be counted failed", self.what, -lost, self.kind)  # fmt: skip
        self._queued.set(0)

    # -- the counts, from the writer process (the reader's thread) --

    def _read_counts(self) -> None:
        affinity.as_helper()  # (off the event loop's CPU, with ``--cpu-affinity auto``)
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
        self._writer_gone("its pipe closed")
        self._settle()

    def _count(self, report: dict[str, Any]) -> None:
        with self._tally:
            if self._settled:  # (counted failed already)
                return
            self._reported += report.get("logged", 0) + report.get("dropped", 0) + report.get("failed", 0)
        if report.get("logged"):
            self._logged.inc(report["logged"])
        if report.get("dropped"):
            self._dropped.inc(report["dropped"])
        if report.get("failed"):
            self._failed.inc(report["failed"])
        self._queued.set(int(report.get("queued", 0)))  # (what the writer holds, as its last report said)
        reason = report.get("reason")
        now = time.monotonic()
        if reason and now - self._last_failure > 10:  # one line per 10 s: a sink that is down must not flood the log
            self._last_failure = now
            self._log.warning("%s: item(s) to the %s sink failed: %s", self.what, self.kind, reason)

    def close(self, timeout_s: float | None = None) -> None:
        """Hand over what is queued, then let the writer deliver what it holds, within about ``timeout_s``; a writer
        that does not take the last frames within it (it stopped reading: a hung sink, a stopped process) is killed,
        and what it was handed is counted failed (``_settle``)."""
        timeout = self.close_timeout_s if timeout_s is None else timeout_s
        deadline = time.monotonic() + timeout
        stopped = threading.Event()
        with self._handing:  # (a flush the loop began meanwhile writes its frame whole first)
            if self._closing:  # closed already: the pipe's number may be another's by now, never touched again
                return
            self._closing = True  # (from now on neither ``_flush`` nor ``_write_more`` writes: the pipe is ours)
            self._stop_writing(stopped)
            data, self._unsent = bytes(self._unsent), b""
            if self._queue:
                # taken item by item (``popleft`` holds the interpreter lock throughout): an item the loop queues
                # meanwhile is taken too or stays queued, for ``_fail_queued``; never cleared unseen
                queue = self._queue
                items = [queue.popleft() for _ in range(len(queue))]
                self._took(items, everything=True)
                framed = self._framed(items)
                if framed is not None and self._hand(framed[1]):
                    data += framed[0]
        # written outside ``_handing``: a timer of the loop's due meanwhile returns at once instead of waiting on it
        if not self._gone and not self._write_last(data, deadline):
            self._log.error(
                "%s: the writer process did not take its last frames within %g s (it stopped reading): killed, and "
                "what it was handed and did not report is counted failed", self.what, timeout)  # fmt: skip
            self._process.kill()
        self._release_pipe(stopped)
        try:
            self._process.wait(timeout + 10)
        except subprocess.TimeoutExpired:
            self._process.kill()
            self._process.wait()
        self._reader.join(5)
        # (the reader settles once the pipe closes: this is for a reader still waiting on a pipe some other process
        # holds open)
        self._settle()
        # what the loop queued after the close took the queue (a request that ended meanwhile) is failed, counted
        # once: ``_flush`` hands nothing over once the close began, and from now on (``_gone``) ``_refused`` counts it
        # so. An item the loop was queuing meanwhile (its test passed before ``_gone``) may be queued after this:
        # the hand-over its queuing scheduled (or one due already) counts it (``_flush``)
        self._fail_queued()

    def _release_pipe(self, stopped: threading.Event) -> None:
        """Close the pipe (the writer reads its end) once the loop's watch on it is gone (``stopped``): its number,
        once free, may be a new connection's, whose watch a removal that came later would take. A loop that did not
        remove it within a second (it hangs) finds a stand-in under that number, closed by the removal when it comes
        (``_stop_writing``): the writer reads its end now all the same. The stand-in is a copy of the counts' pipe
        (nothing writes through it): a descriptor already held, so that a server out of descriptors (many
        connections) still gives the pipe up."""
        if not stopped.wait(1):
            with self._releasing:
                if not stopped.is_set():
                    os.dup2(self._out, self._in, inheritable=False)
                    self._released_by_removal = True
                    return
        self._close_stdin()

    def _close_stdin(self) -> None:
        with contextlib.suppress(OSError):
            assert self._process.stdin is not None
            self._process.stdin.close()

    def _fail_queued(self) -> None:
        """Count failed what is queued after the close (and take it: each once)."""
        left = 0
        with contextlib.suppress(IndexError):
            while True:
                self._queue.popleft()
                left += 1
        self._took([], everything=True)
        if left:
            self._failed.inc(left)

    def _write_last(self, data: bytes, deadline: float) -> bool:
        """Write the close's ``data`` into the pipe as it takes it, never waiting past ``deadline``: False when the
        writer did not take it all by then. A writer gone meanwhile is True: its reader settles what it was handed."""
        view = memoryview(data)
        poller = select.poll()  # (not ``select.select``: a server's descriptors may be numbered past its 1024)
        poller.register(self._in, select.POLLOUT)
        while view:
            try:
                view = view[os.write(self._in, view) :]
            except BlockingIOError:  # the pipe is full: wait for room, not past the deadline
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                poller.poll(left * 1000 + 1)
            except OSError:  # the writer is gone (its pipe closed)
                return True
        return True
