"""The loop of a writer process of the server's own (the payload log's, tracing's): its side of
``dhow.monitoring.writer_pipe``.

It reads frames on stdin: first the settings, answered ``{"ready": kind}`` once the writer is open (or
``{"error": …}``, and it exits); then frames it hands to the writer's ``take``. Counts go back on stdout, as frames,
through ``answer``. When stdin closes (the server stops, or died), the writer is closed (it delivers what it holds)
and the process exits. SIGINT and SIGTERM are ignored: a Ctrl-C or a stop of the whole process group must not lose
what the server handed over.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import sys
import threading
import traceback
from collections.abc import Callable, Collection
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Protocol

import orjson

from dhow.core import affinity
from dhow.core.errors import DhowError
from dhow.core.frames import split_frames
from dhow.core.heap import settle_heap
from dhow.monitoring.payload_log import encode_frame

__all__ = ["Answer", "Taker", "serve"]

#: sends a frame back to the server (from any thread)
Answer = Callable[[Any], None]

#: glibc's ``mallopt`` parameters (malloc.h) and what they are set to: freed memory kept (up to 64 MiB at the top of
#: a heap, and blocks up to 16 MiB from the heaps, not each its own mapping). By default a frame's memory (its read,
#: ~150 KB, its events, its rendered lines) goes back to the system once freed and comes again for the next frame,
#: page by page, each page a fault and zeroed: ~95 faults a frame of 350 events, ~0.4 µs an event of the writer's
#: CPU (``benchmarks/payload_writer_cpu.py``, 2026-12-06); kept, ~1 a frame. A writer holds what one frame or one
#: backlog of its bounded queue took at most (blocks over 16 MiB are still given back, a heap's top past 64 MiB
#: trimmed): measured after a burst of 2,800 events of ~100 KB bodies, 119 MiB resident against 136 without, and
#: 331 against 133 when none of them could be rendered. A pod's memory limit must leave room for that peak.
_MALLOPT = ((-1, 64 << 20), (-3, 16 << 20))  # M_TRIM_THRESHOLD, M_MMAP_THRESHOLD


def _keep_freed_memory() -> None:
    """Ask glibc's allocator to keep freed memory for the next frame (``_MALLOPT``); elsewhere nothing changes."""
    with contextlib.suppress(OSError, AttributeError, TypeError):  # (TypeError: Windows has no CDLL(None))
        mallopt = ctypes.CDLL(None).mallopt
        for parameter, value in _MALLOPT:
            mallopt(parameter, value)


def _yield_cpu(keep: Collection[int] = ()) -> None:
    """Run this process's threads (all but ``keep``'s native ids; those started later inherit it) at Linux's lowest CPU
    priority, ``SCHED_IDLE`` (``--writer-priority idle``, the default): the writer takes a CPU only when nothing else
    wants it, and a thread of the serving path that wakes (the event loop, the model's, the load's) takes the CPU back
    at once instead of waiting behind a render step. On 2 vCPUs, ``tabular`` over REST at c=16 with drift, the payload
    log and tracing on (``monitoring_overhead.py --compare``, two runs): p99 against all off from 1.17-1.28x to
    0.94-0.98x (paired), all on's own throughput +3-5%; ``nice 19`` left the p99 at 1.18x. A machine busy with serving
    leaves the writer almost no CPU: its bounded queue fills and events are dropped and counted
    (``dhow_payload_log_events_total{outcome="dropped"}``), never waited for. The close is not left to that: it runs on
    a thread kept at the normal priority (``serve``), as the writer's reporter does (``kept_threads``); a Kafka sink's
    own threads (librdkafka's) do not, so its last deliveries wait for a CPU as its others. Not the audit trail's
    writer: it drops no record, so the server's answers would wait for it once its pipe filled. Elsewhere (no
    ``SCHED_IDLE``, or refused), nothing changes."""
    if not hasattr(os, "SCHED_IDLE"):
        return
    # every thread, not only this one (a policy is a thread's own): the writer's, a sink library's, numpy's BLAS pool;
    # again until none is new (one a library started meanwhile, from a thread not set yet)
    done = set(keep)
    while True:
        try:
            threads = {int(thread) for thread in os.listdir("/proc/self/task")}
        except OSError:  # (no /proc mounted: Python's own threads; a library's are left as they are)
            threads = {thread.native_id or 0 for thread in threading.enumerate()}
        if threads <= done:
            return
        for thread in threads - done:
            with contextlib.suppress(OSError):  # (a thread that ended meanwhile; a refusal)
                os.sched_setscheduler(thread, os.SCHED_IDLE, os.sched_param(0))
        done |= threads


class Taker(Protocol):
    #: what ``ready`` names (a sink's kind: file, kafka, http, otlp)
    kind: str

    def take(self, frame: Any) -> None: ...

    def close(self, timeout_s: float) -> None: ...

    def kept_threads(self) -> set[int]:
        """Native ids of its threads that must keep the normal priority (``_yield_cpu``)."""


def serve(
    open_writer: Callable[[dict[str, Any], Answer], Taker], flag: str, decode: Callable[[bytes], Any] = orjson.loads
) -> int:
    """Run a writer process: ``open_writer`` (given the settings and how to answer) opens its writer; an error it
    raises is the server's (``flag`` names the option in an unexpected one). The frames after the settings are
    read by ``decode`` (JSON unless the writer has a format of its own)."""
    for stop in (signal.SIGINT, signal.SIGTERM):
        signal.signal(stop, signal.SIG_IGN)
    affinity.as_helper()  # (off the event loop's CPU, with ``--cpu-affinity auto``)
    _keep_freed_memory()
    source, answers = sys.stdin.fileno(), sys.stdout.buffer
    lock = threading.Lock()

    def answer(document: Any) -> None:
        with lock:
            try:
                answers.write(encode_frame(document))
                answers.flush()
            except OSError:  # the server is gone: what it handed over is written all the same
                pass

    buffer = bytearray()
    frames: list[bytes] = []
    while not frames:
        chunk = os.read(source, 1 << 20)
        if not chunk:
            return 2
        buffer += chunk
        frames = split_frames(buffer)
    settings = orjson.loads(frames.pop(0))
    # the close's thread, started now: it keeps the normal priority when the others yield the CPU (``_write``), so
    # that at a stop what the writer holds is written at it (leaving SCHED_IDLE needs a privilege)
    with ThreadPoolExecutor(1, thread_name_prefix="close") as closer:
        closer.submit(threading.get_native_id).result()  # (its thread is started now, before any other)
        return _write(open_writer, settings, answer, flag, decode, buffer, frames, closer)


def _write(
    open_writer: Callable[[dict[str, Any], Answer], Taker],
    settings: dict[str, Any],
    answer: Answer,
    flag: str,
    decode: Callable[[bytes], Any],
    buffer: bytearray,
    frames: list[bytes],
    closer: ThreadPoolExecutor,
) -> int:
    """Open the writer, hand it every frame until the server closes the pipe, then close it on ``closer``'s one
    thread."""
    source = sys.stdin.fileno()
    try:
        writer = open_writer(settings, answer)
    except DhowError as exc:
        answer({"error": exc.message})
        return 2
    except Exception as exc:
        answer({"error": f"{flag}: {type(exc).__name__}: {exc}"})
        return 2
    if settings.get("priority", "idle") == "idle":  # (before the first frame: every thread the writer started too)
        _yield_cpu(keep={closer.submit(threading.get_native_id).result(), *writer.kept_threads()})
    answer({"ready": writer.kind})
    # What the process holds from now on is what it is handed, and none of it lives long: the objects of its start
    # (its modules, a sink's library) are left out of the collector's full passes. What it is handed waits in its
    # queue long enough to reach the oldest generation, so full passes come every few seconds under load, each
    # walking every object of the start (~10 ms): ~3 µs of CPU a traced request at 700 a second
    # (``trace_writer_cpu.py``), 6.0-6.4 -> 5.5-5.7 µs an event of the payload writer's (``payload_writer_cpu.py``,
    # 350 events every 50 ms). Collected first: the start's cyclic garbage, frozen, would never be freed (the young
    # threshold is left as it is).
    settle_heap(young_threshold=None)
    code = 0
    try:
        for body in frames:  # none: the server waits for the answer before it hands anything over
            writer.take(decode(body))
        while True:
            chunk = os.read(source, 1 << 20)
            if not chunk:
                break
            buffer += chunk
            for body in split_frames(buffer):
                writer.take(decode(body))
    except Exception:  # a frame that cannot be read (a server's bug): said now (the close may take its time), and
        # what was taken before it still written and reported; what follows it is the server's to count failed
        traceback.print_exc()
        code = 1
    closer.submit(writer.close, float(settings.get("close_timeout_s", 5.0))).result()
    return code
