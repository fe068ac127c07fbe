"""Where an event loop stalls: a heartbeat on the loop, a SIGALRM sampler of the loop's thread and a watchdog thread.

``install(folder)`` wraps the loop factories (uvloop's and asyncio's): the process's first loop gets a timer every
``BEAT_S`` (``_beat``, which also counts how late it fired). Every ``SAMPLE_S`` a SIGALRM runs ``_sampled`` in the
loop's thread, between two bytecodes: while a beat is late by more than ``LATE_S``, the time since the last sample
goes to the stack it interrupted and to the callback the loop called (the stack's root), less what of it the thread
spent waiting for a core (its schedstat), which goes to "(waiting for a core)". A stall in C (uvloop reading
sockets) is counted to the first Python frame after it. A daemon thread (``_watch``, every ``WATCH_S``) splits each
stall, from when it saw it to the next beat, into what the loop's thread ran, waited for a core, and neither
(blocked: the GIL, a lock). Every second the counts, cumulative, are written to ``folder/<pid>.json`` with the
process's threads (native id: name), for benchmarks/loop_stalls.py to diff.

One process, its first loop: a ``dhow serve`` of one worker. With ``--workers`` > 1 (``DHOW_WORKERS``) the first
loop of the ``dhow serve`` process is the supervisor's start-up (``asyncio.run`` of its preparations), which closes
at once and serves nothing; each worker, a fresh interpreter (spawned), hooks its own first loop and writes its own
``<pid>.json``, which loop_stalls.py does not read (it reads the server's pid, and takes its main thread for the
loop's): loop_stalls.py refuses to run so.
"""

from __future__ import annotations

import asyncio
import collections
import json
import os
import signal
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

BEAT_S = 0.001
#: a beat this much later than due is a stall
LATE_S = 0.001
WATCH_S = 0.001
SAMPLE_S = 0.001
#: the innermost frames kept of a sampled stack
DEPTH = 10
#: lateness buckets (ms): a late beat counts in the largest at or below its lateness
BUCKETS = (1, 2, 5, 10, 20, 50)


class _State:
    def __init__(self) -> None:
        self.last = time.perf_counter()
        self.beats = 0
        self.late = collections.Counter[str]()
        #: ms of stall by stack, by the callback's root
        self.stacks = collections.Counter[str]()
        self.roots = collections.Counter[str]()
        self.loop_thread = 0
        #: the loop thread's schedstat (its /proc file, open) and, per stall, what it did meanwhile (ms): ran, waited
        #: for a core (runnable), neither (blocked: the GIL, a lock, a system call that sleeps)
        self.schedstat = -1
        self.split = collections.Counter[str]()
        #: the last SIGALRM sample: when, and the loop thread's ns waiting for a core then
        self.sampled_at = time.perf_counter()
        self.sampled_waited = 0


_state = _State()


def _where(frame: Any) -> str:
    code = frame.f_code
    name = code.co_filename
    for marker in ("/site-packages/", "/src/", "/lib/python3"):
        if marker in name:
            name = name.split(marker, 1)[1]
            break
    return f"{name}:{code.co_name}:{frame.f_lineno}"


def _stack(frame: Any) -> tuple[str, str]:
    """The innermost ``DEPTH`` frames (innermost first) and the callback's root (the outermost frame below the
    runner: what the loop called)."""
    frames = []
    while frame is not None:
        frames.append(frame)
        frame = frame.f_back
    root = frames[-1]
    for index, each in enumerate(frames):
        if each.f_code.co_filename.endswith(("asyncio/runners.py", "asyncio/base_events.py")):
            root = frames[index - 1] if index else each
            break
    return " < ".join(_where(f) for f in frames[:DEPTH]), _where(root)


def _beat(loop: asyncio.AbstractEventLoop, due: float) -> None:
    now = time.perf_counter()
    late_ms = (now - due) * 1000
    if late_ms >= LATE_S * 1000:
        bucket = next((b for b in reversed(BUCKETS) if late_ms >= b), BUCKETS[0])
        _state.late[f">={bucket}ms"] += 1
    _state.beats += 1
    _state.last = now
    loop.call_at(loop.time() + BEAT_S, _beat, loop, now + BEAT_S)


def _watch(out: Path) -> None:
    written = time.monotonic()
    stalled: tuple[float, float, int, int] | None = None  # last beat, found, ran ns, waited ns
    while True:
        time.sleep(WATCH_S)
        now = time.perf_counter()
        if stalled is not None and _state.last != stalled[0]:  # over: what the loop's thread did since found
            ran, waited = _schedstat()
            ran, waited = (ran - stalled[2]) / 1e6, (waited - stalled[3]) / 1e6
            _state.split["ran"] += ran
            _state.split["waited for a core"] += waited
            _state.split["blocked"] += max((now - stalled[1]) * 1000 - ran - waited, 0)
            stalled = None
        if now - _state.last > BEAT_S + LATE_S and stalled is None:
            stalled = (_state.last, now, *_schedstat())
        if time.monotonic() - written >= 1.0:
            written = time.monotonic()
            threads = {str(t.native_id): t.name for t in threading.enumerate()}
            data = {"beats": _state.beats, "late": _state.late, "stacks": _state.stacks, "roots": _state.roots,
                    "split": _state.split, "threads": threads}  # fmt: skip
            (out / f"{os.getpid()}.json.tmp").write_text(json.dumps(data))
            os.replace(out / f"{os.getpid()}.json.tmp", out / f"{os.getpid()}.json")


def _schedstat() -> tuple[int, int]:
    """The loop thread's ns on a core and ns waiting for one, so far."""
    ran, waited, _ = os.pread(_state.schedstat, 128, 0).split()
    return int(ran), int(waited)


def _sampled(signum: int, frame: Any) -> None:
    """SIGALRM, every ``SAMPLE_S``, run by the loop's thread between two bytecodes: while a beat is late, the time
    since the last sample goes to the stack it interrupted, but what of it the thread spent waiting for a core (it
    was not running: no stack's doing)."""
    now = time.perf_counter()
    waited = _schedstat()[1]
    since, queued_ns = now - _state.sampled_at, waited - _state.sampled_waited
    _state.sampled_at, _state.sampled_waited = now, waited
    if now - _state.last <= BEAT_S + LATE_S or frame is None:
        return
    ms = min(since, now - _state.last) * 1000
    queued = min(queued_ns / 1e6, ms)
    stack, root = _stack(frame)
    _state.stacks[stack] += ms - queued
    _state.roots[root] += ms - queued
    _state.roots["(waiting for a core)"] += queued


def _start(loop: asyncio.AbstractEventLoop, out: Path) -> None:
    if _state.loop_thread:
        return
    _state.loop_thread = threading.get_ident()
    _state.schedstat = os.open(f"/proc/self/task/{threading.get_native_id()}/schedstat", os.O_RDONLY)
    _state.last = time.perf_counter()
    loop.call_soon(_beat, loop, time.perf_counter())
    signal.signal(signal.SIGALRM, _sampled)
    signal.setitimer(signal.ITIMER_REAL, SAMPLE_S, SAMPLE_S)
    threading.Thread(target=_watch, args=(out,), name="loop-watch", daemon=True).start()


def _wrapped(factory: Callable[[], asyncio.AbstractEventLoop], out: Path) -> Callable[[], asyncio.AbstractEventLoop]:
    def make() -> asyncio.AbstractEventLoop:
        loop = factory()
        loop.call_soon(_start, loop, out)
        return loop

    return make


def install(folder: str) -> None:
    out = Path(folder)
    out.mkdir(parents=True, exist_ok=True)
    try:
        import uvloop

        uvloop.new_event_loop = _wrapped(uvloop.new_event_loop, out)
    except ImportError:
        pass
    asyncio.new_event_loop = _wrapped(asyncio.new_event_loop, out)
    asyncio.events.new_event_loop = asyncio.new_event_loop
