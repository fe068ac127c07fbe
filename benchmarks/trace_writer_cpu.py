"""CPU time of tracing's writer process per traced request, fed as a loaded server feeds it, for source trees in turn.

    python benchmarks/trace_writer_cpu.py                                   # this tree
    python benchmarks/trace_writer_cpu.py --src /tmp/before/src --src src --rounds 3

The trace writer's render, timed warm (``monitoring_units.py --units spans``), is a few µs a traced request; on a
small machine its wake-ups cost more (each of its threads woken with cold caches: the pipe's reader, the sink's
thread for each frame and each post, the reporter). This starts the writer as the server does (``python -m
dhow.serving.trace_writer``, each ``--src`` tree's, its settings as ``writer_pipe.WriterPipe`` sends them) against an
OTLP/HTTP receiver in this process (it answers 200 to every post, as ``monitoring_overhead.py``'s does), and feeds
its pipe the frames that tree's event loop hands over: ``--rate`` traced requests a second (700: ``tabular`` over
REST at ~7,000 requests a second, ratio 0.1), one frame every flush interval of that tree (``Tracing.flush_s``, else
``writer_pipe.FLUSH_S``), its records made by that tree's own code (``Tracing.begin``, ``record_batch`` with 2 traced
requests in a batch of 16, ``RequestTrace.finish``, ``Tracing._frame``: in a child process run with that tree on its
path, ``--frames``).

After a few warm-up frames, once every traced request of them is reported exported, it feeds ``--seconds`` of frames
and waits until all are reported exported, then prints the writer's CPU time per traced request (its threads'
``/proc/<pid>/task/*/schedstat``, to the nanosecond), its voluntary context switches a second (its wake-ups), the
reports it sent a second (each wakes the server's reader thread too), the posts a second, and each thread's CPU per
traced request, each tree in turn, ``--rounds`` times (the machine's speed moves: compare trees within a round).
"""

from __future__ import annotations

import argparse
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
#: in a frame's records: the requests of a batch and those of them traced (the first's batch span links them)
_BATCH, _TRACED_A_BATCH = 16, 2


def made_frames(seconds: float, rate: float) -> dict[str, Any]:
    """``--frames``, run with a tree on the path: the frames its event loop hands its writer over ``seconds`` at
    ``rate`` traced requests a second, and its flush interval."""
    import collections

    from dhow.monitoring import writer_pipe
    from dhow.monitoring.tracing import Tracing, record_batch

    interval = float(getattr(Tracing, "flush_s", writer_pipe.FLUSH_S))
    tracing = Tracing.__new__(Tracing)  # as the event loop finds it, without its writer process
    tracing._queue, tracing.capacity, tracing._gone, tracing._scheduled = collections.deque(), 1 << 30, False, True
    tracing.ratio, tracing.monotonic_offset = 1.0, time.time_ns() - time.monotonic_ns()
    label = {"dhow.model": "tabular", "dhow.version": "1", "dhow.batch.rows": _BATCH}
    per = max(1, round(rate * interval))
    frames, served = [], 0
    for _ in range(max(1, round(seconds / interval))):
        for n in range(0, per, _TRACED_A_BATCH):
            now = time.time_ns()
            traces: list[Any] = [None] * _BATCH
            for k in range(min(_TRACED_A_BATCH, per - n)):
                sampled = tracing.sample(None)
                served += 1
                times = (now - 400_000, now - 380_000, now - 300_000)
                traces[k * _BATCH // _TRACED_A_BATCH] = tracing.begin(sampled, "tabular", f"{served:08d}-c0ffee", times)
            start = time.monotonic_ns()
            record_batch(traces, label, start - 200_000, start, [150_000] * _BATCH)
            for trace in traces:
                if trace is not None:
                    trace.finish("1", time.time_ns() - 20_000)
        frames.append(tracing._frame(list(tracing._queue)).hex())
        tracing._queue.clear()
    return {"interval": interval, "per": per, "frames": frames}


class _Receiver(http.server.BaseHTTPRequestHandler):
    posts = 0

    def do_POST(self) -> None:
        self.rfile.read(int(self.headers["content-length"]))
        _Receiver.posts += 1
        self.send_response(200)
        self.send_header("content-length", "0")
        self.end_headers()

    def log_message(self, *args: object) -> None:
        pass


def _threads(pid: int) -> dict[str, tuple[float, int]]:
    """Each thread's time on a CPU (seconds, ``schedstat``) and its voluntary context switches, by thread id."""
    found = {}
    for task in os.listdir(f"/proc/{pid}/task"):
        try:
            with open(f"/proc/{pid}/task/{task}/schedstat") as schedstat:
                cpu = int(schedstat.read().split()[0]) / 1e9
            with open(f"/proc/{pid}/task/{task}/status") as status:
                lines = dict(line.split(":", 1) for line in status.read().splitlines() if ":" in line)
        except FileNotFoundError:
            continue
        found[task] = (cpu, int(lines["voluntary_ctxt_switches"]))
    return found


def _faults(pid: int) -> int:
    """The process's minor page faults (memory the allocators took from the system again: each a trap and a zeroed
    page)."""
    with open(f"/proc/{pid}/stat") as stat:
        return int(stat.read().rsplit(")", 1)[1].split()[7])


class _Writer:
    """A trace writer process of ``src`` posting to ``url``, and a thread summing what it reports."""

    def __init__(self, src: Path, url: str) -> None:
        from dhow.core.frames import frame, widen_pipe  # (this tree's: the framing is every tree's)

        env = dict(os.environ, PYTHONPATH=str(src), OMP_NUM_THREADS="1")
        self.process = subprocess.Popen([sys.executable, "-m", "dhow.serving.trace_writer"], stdin=subprocess.PIPE,
                                        stdout=subprocess.PIPE, env=env)  # fmt: skip
        assert self.process.stdin is not None and self.process.stdout is not None
        self.stdin, self.stdout = self.process.stdin, self.process.stdout
        widen_pipe(self.stdin.fileno())
        settings = {"url": url, "service": "dhow", "capacity": 8192, "close_timeout_s": 5.0}
        self.send(frame(json.dumps(settings).encode()))
        self.counts = {"logged": 0, "dropped": 0, "failed": 0}
        self.reports = 0
        self.ready = threading.Event()
        threading.Thread(target=self._read, daemon=True).start()
        if not self.ready.wait(60):
            raise RuntimeError("the writer did not start")

    def _read(self) -> None:
        from dhow.core.frames import decode_frames

        buffer = bytearray()
        while chunk := os.read(self.stdout.fileno(), 1 << 16):
            buffer += chunk
            for answer in decode_frames(buffer):
                if "ready" in answer:
                    self.ready.set()
                    continue
                self.reports += 1
                for outcome in self.counts:
                    self.counts[outcome] += int(answer.get(outcome, 0))

    def send(self, data: bytes) -> None:
        self.stdin.write(data)
        self.stdin.flush()

    def wait_counted(self, count: int) -> None:
        deadline = time.monotonic() + 60
        while sum(self.counts.values()) < count:
            if time.monotonic() > deadline:
                raise RuntimeError(f"the writer reported {self.counts} of {count} traced requests")
            time.sleep(0.01)

    def close(self) -> None:
        self.stdin.close()
        self.process.wait(30)


def run(src: Path, made: dict[str, Any], url: str) -> dict[str, Any]:
    """The writer's CPU per traced request (µs), its wake-ups, reports and posts a second, each thread's share."""
    interval, per = made["interval"], made["per"]
    framed = [bytes.fromhex(data) for data in made["frames"]]
    warm = max(1, round(_WARM_S / interval))
    writer = _Writer(src, url)
    pid = writer.process.pid
    for data in framed[:warm]:
        writer.send(data)
        time.sleep(interval)
    writer.wait_counted(warm * per)
    time.sleep(0.5)
    threads_before, reports, posts, faults = _threads(pid), writer.reports, _Receiver.posts, _faults(pid)
    start = time.monotonic()
    for n, data in enumerate(framed[warm:]):
        delay = start + n * interval - time.monotonic()
        if delay > 0:
            time.sleep(delay)
        writer.send(data)
    writer.wait_counted(len(framed) * per)
    seconds = time.monotonic() - start
    threads_after, reports, posts = _threads(pid), writer.reports - reports, _Receiver.posts - posts
    faults = _faults(pid) - faults
    counts = dict(writer.counts)
    writer.close()
    requests = (len(framed) - warm) * per
    # the process's first thread reads the pipe; the writer then starts the sink's thread and the reporter
    names = dict(zip(sorted(threads_after, key=int), ("reader", "sink", "reporter"), strict=False))
    shares, woken = [], 0
    for task, (cpu, voluntary) in threads_after.items():
        old = threads_before.get(task, (0.0, 0))
        woken += voluntary - old[1]
        shares.append(((cpu - old[0]) / requests * 1e6, names.get(task, "other")))
    return {
        "us": sum(us for us, _ in shares),
        "woken": woken / seconds,
        "reports": reports / seconds,
        "posts": posts / seconds,
        "faults": faults / seconds,
        "threads": sorted(shares, reverse=True),
        "counts": counts,
        "interval": interval,
        "per": per,
    }


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
            found = run(tree, made[tree], url)
            threads = " ".join(f"{name} {us:.2f}" for us, name in found["threads"] if us > 0.005)
            print(
                f"round {round_} {tree} (a frame of {found['per']} every {found['interval']:g} s): {found['us']:.2f} "
                f"µs a traced request; a second: {found['woken']:.1f} wake-ups, {found['reports']:.1f} reports, "
                f"{found['posts']:.1f} posts, {found['faults']:.0f} page faults; µs a traced request by thread: "
                f"{threads}",
                flush=True,
            )
            if found["counts"]["dropped"] or found["counts"]["failed"]:
                print(f"  (not all exported: {found['counts']})", flush=True)
    receiver.shutdown()


if __name__ == "__main__":
    main()
