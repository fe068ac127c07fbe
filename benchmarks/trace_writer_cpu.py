"""CPU time of tracing's writer process per traced request, fed as a loaded server feeds it, for source trees in turn.

    python benchmarks/trace_writer_cpu.py                                   # this tree
    python benchmarks/trace_writer_cpu.py --src /tmp/before/src --src src --rounds 3

The trace writer's render, timed warm (``monitoring_units.py --units spans``), is a few µs a traced request; on a
small machine its wake-ups cost more (each of its threads woken with cold caches: the pipe's reader, the sink's
thread for each frame and each post, the reporter). This starts the writer as the server does (``python -m
dhow.serving.trace_writer``, each ``--src`` tree's, its settings as ``writer_pipe.WriterPipe`` sends them) against an
OTLP/HTTP receiver in this process (HTTP/1.1, keeping the connection as a collector does; it answers 200 to every
post, as ``monitoring_overhead.py``'s does), and feeds its pipe the frames that tree's event loop hands over:
``--rate`` traced requests a second (700: ``tabular`` over REST at ~7,000 requests a second, ratio 0.1), handed over
by that tree's own ``Tracing`` (every flush interval, ``Tracing.flush_s`` else ``writer_pipe.FLUSH_S``, or sooner
where a full queue goes at once), its records made by that tree's own code (``Tracing.begin``, ``record_batch`` with 2
traced requests in a batch of 16, ``RequestTrace.finish``, ``Tracing._frame``: in a child process run with that tree
on its path, ``--frames``), each frame sent at the time that tree's loop would have written it.

After a second of warm-up frames, once every traced request of them is reported exported, it feeds ``--seconds`` of
frames, waits until all are reported exported and ``_DRAIN_S`` past the fed seconds (the same span for every tree:
a tree that reports or posts later is not flattered), then prints the writer's CPU time per traced request (its
threads' ``/proc/<pid>/task/*/schedstat``, to the nanosecond), its voluntary context switches a second (its
wake-ups), the reports it sent a second (each wakes the server's reader thread too), the posts a second, and each
thread's CPU per traced request, each tree in turn, ``--rounds`` times (the machine's speed moves: compare trees
within a round).
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import heapq
import http.server
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
_WARM_S = 1.0
#: counted after the last paced frame, for every tree alike: its last post and report (a second apart) within it
_DRAIN_S = 2.5
#: in a frame's records: the requests of a batch and those of them traced (the first's batch span links them)
_BATCH, _TRACED_A_BATCH = 16, 2


def made_frames(seconds: float, rate: float) -> dict[str, Any]:
    """``--frames``, run with a tree on the path: the frames its event loop hands its writer over ``seconds`` at
    ``rate`` traced requests a second (each as [when, traced requests, frame]), and its flush interval.

    Its own ``Tracing`` hands them over (``_put``, ``_flush``, whatever it does at a full queue), its writer
    process left out (``_hand``, ``_write`` keep the frames), on an event loop whose timers run on a clock of
    their own: a batch of ``_TRACED_A_BATCH`` traced requests a turn, at ``rate``, the timers due before a turn
    run before it, and what a turn schedules at once (``call_soon``) runs after it."""
    from dhow.monitoring import writer_pipe
    from dhow.monitoring.tracing import Tracing

    tracing = Tracing.__new__(Tracing)  # as the event loop finds it, without its writer process
    tracing._queue, tracing.capacity, tracing._gone, tracing._scheduled = collections.deque(), 1 << 30, False, False
    tracing._unsent, tracing._loop, tracing._closing = b"", None, False
    tracing._timer, tracing._soon = None, False  # (the early hand-over's, where the tree has one)
    tracing._handing = threading.Lock()  # (the close's and the flush's, where the tree has one)
    tracing.ratio, tracing.monotonic_offset = 1.0, time.time_ns() - time.monotonic_ns()
    tracing.skip = 1  # (every request its turn; sources before the count down draw by ``ratio``)
    clock = [0.0]
    frames: list[list[Any]] = []

    def hand(count: int) -> bool:
        frames.append([clock[0], count])
        return True

    def write(data: bytes) -> None:
        frames[-1].append(data.hex())

    tracing._hand, tracing._write = hand, write
    asyncio.run(_turns(tracing, seconds, rate, clock))
    return {"interval": float(getattr(Tracing, "flush_s", writer_pipe.FLUSH_S)), "frames": frames}


async def _turns(tracing: Any, seconds: float, rate: float, clock: list[float]) -> None:
    from dhow.monitoring.tracing import record_batch

    loop = asyncio.get_running_loop()
    timers: list[tuple[float, int, asyncio.TimerHandle]] = []

    def later(delay: float, callback: Any, *args: Any) -> asyncio.TimerHandle:
        handle = asyncio.TimerHandle(clock[0] + delay, callback, args, loop)
        heapq.heappush(timers, (clock[0] + delay, len(timers), handle))
        return handle

    def run_due(until: float) -> None:
        while timers and timers[0][0] <= until:
            when, _, handle = heapq.heappop(timers)
            clock[0] = when
            if not handle.cancelled():
                handle._callback(*handle._args)

    loop.call_later = later  # type: ignore[method-assign, assignment]
    label = {"dhow.model": "tabular", "dhow.version": "1", "dhow.batch.rows": _BATCH}
    turns = round(seconds * rate / _TRACED_A_BATCH)
    for turn in range(turns):
        run_due(turn * _TRACED_A_BATCH / rate)
        clock[0] = turn * _TRACED_A_BATCH / rate
        now = time.time_ns()
        traces: list[Any] = [None] * _BATCH
        for k in range(_TRACED_A_BATCH):
            times = (now - 400_000, now - 380_000, now - 300_000)
            request_id = f"{turn * _TRACED_A_BATCH + k:08d}-c0ffee"
            traces[k * _BATCH // _TRACED_A_BATCH] = tracing.begin(tracing.sample(None), "tabular", request_id, times)
        start = time.monotonic_ns()
        record_batch(traces, label, start - 200_000, start, [150_000] * _BATCH)
        for trace in traces:
            if trace is not None:
                trace.finish("1", time.time_ns() - 20_000)
        await asyncio.sleep(0)  # (the turn ends: what it scheduled at once runs)
    run_due(float("inf"))


class _Receiver(http.server.BaseHTTPRequestHandler):
    #: keeps the connection, as a collector does (HTTP/1.0 closed it after each post: a reconnection a post)
    protocol_version = "HTTP/1.1"
    posts = 0

    def do_POST(self) -> None:
        self.rfile.read(int(self.headers["content-length"]))
        _Receiver.posts += 1
        self.send_response(200)
        self.send_header("content-length", "0")
        self.end_headers()

    def log_message(self, *args: object) -> None:
        pass


def run(src: Path, made: dict[str, Any], url: str, seconds: float) -> dict[str, Any]:
    """The writer's CPU per traced request (µs), its wake-ups, reports and posts a second, each thread's share:
    counted from the first paced frame's time to the last's plus ``_DRAIN_S`` (the same span for every tree, the
    interval's and the reports' lag left out)."""
    framed = [(when, count, bytes.fromhex(data)) for when, count, data in made["frames"]]
    warm = [frame for frame in framed if frame[0] < _WARM_S]
    paced = framed[len(warm) :]
    # (imported here, not in the ``--frames`` child: it imports this tree's dhow, and each tree's frames are made by
    # its own hand-over)
    from payload_writer_cpu import WriterProcess, thread_times, user_system

    settings = {"url": url, "service": "dhow", "capacity": 8192, "close_timeout_s": 5.0}
    writer = WriterProcess(src, "dhow.serving.trace_writer", settings)
    pid = writer.process.pid
    begun = time.monotonic()
    for when, _, data in warm:
        _sleep_until(begun + when)
        writer.send(data)
    writer.wait_counted(sum(count for _, count, _ in warm))
    time.sleep(0.5)
    threads_before, reports, posts, faults = thread_times(pid), writer.reports, _Receiver.posts, user_system(pid)[1]
    start = time.monotonic()
    for when, _, data in paced:
        _sleep_until(start + when - _WARM_S)
        writer.send(data)
    writer.wait_counted(sum(count for _, count, _ in framed))
    late = time.monotonic() - (start + seconds + _DRAIN_S)
    _sleep_until(start + seconds + _DRAIN_S)
    threads_after, reports, posts = thread_times(pid), writer.reports - reports, _Receiver.posts - posts
    faults = user_system(pid)[1] - faults
    counts = dict(writer.counts)
    writer.close()
    requests = sum(count for _, count, _ in paced)
    span = seconds + _DRAIN_S
    # the process's first thread reads the pipe; the writer then starts the sink's thread and the reporter
    names = dict(zip(sorted(threads_after, key=int), ("reader", "sink", "reporter"), strict=False))
    shares, woken = [], 0
    for task, (cpu, voluntary, _) in threads_after.items():
        old = threads_before.get(task, (0.0, 0, 0))
        woken += voluntary - old[1]
        shares.append(((cpu - old[0]) / requests * 1e6, names.get(task, "other")))
    return {
        "us": sum(us for us, _ in shares),
        "woken": woken / span,
        "reports": reports / span,
        "posts": posts / span,
        "faults": faults / span,
        "threads": sorted(shares, reverse=True),
        "counts": counts,
        "interval": made["interval"],
        "frames": len(paced),
        "requests": requests,
        "late": late,
    }


def _sleep_until(moment: float) -> None:
    delay = moment - time.monotonic()
    if delay > 0:
        time.sleep(delay)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--src", type=Path, action="append", help="a source tree (repeatable); default: this one's")
    parser.add_argument("--rate", type=float, default=700.0, help="traced requests a second")
    parser.add_argument("--seconds", type=float, default=10.0, help="of paced feed")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--frames", type=float, metavar="SECONDS", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.frames is not None:
        json.dump(made_frames(args.frames, args.rate), sys.stdout)
        return
    sys.path.insert(0, str(HERE.parent / "src"))  # (not in ``--frames``: there the tree's own are on the path)
    trees = [tree.resolve() for tree in args.src or [HERE.parent / "src"]]
    made = {}
    for tree in trees:
        env = dict(os.environ, PYTHONPATH=str(tree))
        command = [sys.executable, __file__, "--frames", str(args.seconds + _WARM_S), "--rate", str(args.rate)]
        made[tree] = json.loads(subprocess.run(command, env=env, capture_output=True, check=True).stdout)
    receiver = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Receiver)
    threading.Thread(target=receiver.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{receiver.server_address[1]}"
    for round_ in range(1, args.rounds + 1):
        for tree in trees:
            found = run(tree, made[tree], url, args.seconds)
            threads = " ".join(f"{name} {us:.2f}" for us, name in found["threads"] if us > 0.005)
            print(
                f"round {round_} {tree} ({found['requests']} traced requests in {found['frames']} frames, every "
                f"{found['interval']:g} s at most): {found['us']:.2f} µs a traced request; a second of the "
                f"{args.seconds:g} s fed and {_DRAIN_S:g} s after: {found['woken']:.1f} wake-ups, "
                f"{found['reports']:.1f} reports, {found['posts']:.1f} posts, {found['faults']:.0f} page faults; µs "
                f"a traced request by thread: {threads}",
                flush=True,
            )
            if found["late"] > 0:
                print(f"  (all reported {found['late']:.1f} s past the span: its counts miss some)", flush=True)
            if found["counts"]["dropped"] or found["counts"]["failed"]:
                print(f"  (not all exported: {found['counts']})", flush=True)
    receiver.shutdown()


if __name__ == "__main__":
    main()
