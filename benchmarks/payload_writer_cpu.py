"""CPU time of the payload log's writer process per event, fed as a loaded server feeds it, for source trees in turn.

    python benchmarks/payload_writer_cpu.py                                     # this tree, paced and unpaced
    python benchmarks/payload_writer_cpu.py --src /tmp/before/src --src src --rounds 3

The writer's parts, timed warm in one process, are not its cost on a small machine: a process woken every 50 ms
wakes with cold caches, and each of its threads' wake-ups (the pipe's read, each paced render step, a report)
costs it more CPU than a few events. This starts the writer as the server does (``python -m
dhow.serving.payload_writer``, each ``--src`` tree's, its settings as ``writer_pipe.WriterPipe`` sends them) with a
file sink in a scratch folder, and feeds its pipe frames of ``--per`` events as that tree's own event loop makes
them: ``tabular`` requests over REST (the JSON body ``monitoring_overhead.py`` sends; outputs ``label`` and
``probabilities``, as the REST door's JSON answer in trees since 2026-12-07's, as arrays before) answered to its
``PayloadLog`` and framed by it, in a child process with that tree on its path (trees since ``PayloadLog.answered``,
2026-12-07):

- ``paced``: a frame every ``--interval`` (``writer_pipe.FLUSH_S``: 100 events every 10 ms is 10,000 requests a
  second; the figures of 2026-12-06 were taken at 350 every 50 ms, the hand-over then), for ``--seconds``;
- ``unpaced``: the same frames as fast as the pipe takes them, into a queue that holds them all (the pure cost:
  no wake-ups, no pauses; the paced figure less this one is what the wake-ups cost).

Once every event is reported logged (a few warm-up frames first, not counted), it prints the process's CPU time per
event (its threads' ``/proc/<pid>/task/*/schedstat``, to the nanosecond; and user + system time from ``stat``, in
ticks), its context switches per frame (voluntary and not, from each thread's ``status``), its page faults per frame,
and each thread's CPU per event and voluntary switches per frame (the sink's thread, the reader, the reporter), each
tree in turn, ``--rounds`` times (the machine's speed moves: compare trees within a round).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))  # (monitoring_units: a tree's payload log, without its writer process)
if "--frames" not in sys.argv:  # (the child that makes a tree's frames has that tree's own sources on its path)
    sys.path.insert(0, str(HERE.parent / "src"))

from dhow.core.frames import decode_frames, widen_pipe  # noqa: E402
from dhow.monitoring.payload_log import encode_frame  # noqa: E402

_WARM_FRAMES = 10
ROW = [0.1 * i for i in range(32)]
#: the body ``monitoring_overhead.py`` sends (``security_overhead.BODY``), as the client wrote it
BODY = (
    b'{"inputs": [{"name": "input", "shape": [1, 32], "datatype": "FP32", "data": ['
    + ", ".join(map(str, ROW)).encode()
    + b"]}]}"
)


def frames(count: int, per: int) -> list[bytes]:
    """``count`` frames of ``per`` events as the event loop of the tree on the path makes them (``--frames``):
    ``tabular`` requests answered over REST to its ``PayloadLog`` (``monitoring_units.answered_log``: its
    ``answered``, and the REST door's JSON answer put in the item where the tree takes it), framed by its
    ``_frame`` every ``per`` (the masking handed over with the first)."""
    from monitoring_units import answered_log

    log, answer = answered_log(BODY)
    written = []
    for _ in range(count):
        for _ in range(per):
            answer()
        written.append(log._frame(list(log._queue)))
        log._queue.clear()
    return written


def tree_frames(tree: Path, count: int, per: int) -> list[bytes]:
    """``frames`` made by ``tree``'s own code (a child with that tree on its path: each tree's writer reads the
    frames its own server writes)."""
    env = dict(os.environ, PYTHONPATH=str(tree), OMP_NUM_THREADS="1")
    command = [sys.executable, __file__, "--frames", str(count), "--per", str(per)]
    done = subprocess.run(command, env=env, capture_output=True)
    if done.returncode:
        raise SystemExit(f"{tree}: its frames could not be made:\n{done.stderr.decode(errors='replace')[-3000:]}")
    data = done.stdout
    made, at = [], 0
    while at < len(data):  # (each frame: its 4-byte big-endian length, then that many bytes)
        end = at + 4 + int.from_bytes(data[at : at + 4], "big")
        made.append(data[at:end])
        at = end
    return made


def thread_times(pid: int) -> dict[str, tuple[float, int, int]]:
    """Each thread's time on a CPU (seconds: ``schedstat``, to the nanosecond, where ``stat``'s user and system time
    are scaled from 10 ms ticks) and its voluntary and involuntary context switches, by thread id."""
    found = {}
    for task in os.listdir(f"/proc/{pid}/task"):
        try:
            with open(f"/proc/{pid}/task/{task}/schedstat") as schedstat:
                cpu = int(schedstat.read().split()[0]) / 1e9
            with open(f"/proc/{pid}/task/{task}/status") as status:
                lines = dict(line.split(":", 1) for line in status.read().splitlines() if ":" in line)
        except FileNotFoundError:
            continue
        found[task] = (cpu, int(lines["voluntary_ctxt_switches"]), int(lines["nonvoluntary_ctxt_switches"]))
    return found


def user_system(pid: int) -> tuple[float, int]:
    """The process's user and system CPU time (seconds), as ``/proc/<pid>/stat`` counts it (in ticks), and its minor
    page faults (memory the allocator took from the system again: each a trap and a zeroed page)."""
    with open(f"/proc/{pid}/stat") as stat:
        fields = stat.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK"), int(fields[7])


class WriterProcess:
    """A writer process of ``src`` (``module``: ``dhow.serving.payload_writer`` or ``trace_writer``, given
    ``settings``), and a thread summing what it reports (its counts, and how many reports)."""

    def __init__(self, src: Path, module: str, settings: dict[str, Any]) -> None:
        env = dict(os.environ, PYTHONPATH=str(src), OMP_NUM_THREADS="1")
        self.process = subprocess.Popen(
            [sys.executable, "-m", module], stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=env
        )
        assert self.process.stdin is not None and self.process.stdout is not None
        self.stdin, self.stdout = self.process.stdin, self.process.stdout
        widen_pipe(self.stdin.fileno())  # as the server does: a frame in one read
        self.stdin.write(encode_frame(settings))
        self.stdin.flush()
        self.counts = {"logged": 0, "dropped": 0, "failed": 0}
        self.reports = 0
        self.ready = threading.Event()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        if not self.ready.wait(60):
            raise RuntimeError("the writer did not start")

    def _read(self) -> None:
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
        """Until the writer reported ``count`` items (logged, dropped or failed)."""
        deadline = time.monotonic() + 60
        while sum(self.counts.values()) < count:
            if time.monotonic() > deadline:
                raise RuntimeError(f"the writer reported {self.counts} of {count}")
            time.sleep(0.01)

    def close(self) -> None:
        self.stdin.close()
        self.process.wait(30)
        self._reader.join(5)


def run(src: Path, framed: list[bytes], per: int, interval: float | None) -> dict[str, Any]:
    """The writer's CPU per event (µs), its context switches per frame and each thread's CPU per event, after the
    warm-up frames: paced at ``interval`` or, None, as fast as the pipe takes them."""
    with tempfile.TemporaryDirectory() as scratch:
        settings = {"url": f"file://{scratch}/payloads.jsonl", "source": "dhow://bench",
                    "capacity": 10_000 if interval else len(framed) * per, "close_timeout_s": 5.0}  # fmt: skip
        writer = WriterProcess(src, "dhow.serving.payload_writer", settings)
        pid = writer.process.pid
        for data in framed[:_WARM_FRAMES]:
            writer.send(data)
            time.sleep(interval or 0)
        writer.wait_counted(_WARM_FRAMES * per)
        time.sleep(0.3)
        before, threads_before = user_system(pid), thread_times(pid)
        start = time.monotonic()
        measured = framed[_WARM_FRAMES:]
        for n, data in enumerate(measured):
            if interval:
                delay = start + n * interval - time.monotonic()
                if delay > 0:
                    time.sleep(delay)
            writer.send(data)
        writer.wait_counted(len(framed) * per)
        after, threads_after = user_system(pid), thread_times(pid)
        counts = dict(writer.counts)
        writer.close()
    events = len(measured) * per
    switches = [0, 0]
    shares = []
    for task, (cpu, voluntary, involuntary) in threads_after.items():
        old = threads_before.get(task, (0.0, 0, 0))
        switches[0] += voluntary - old[1]
        switches[1] += involuntary - old[2]
        shares.append(((cpu - old[0]) / events * 1e6, (voluntary - old[1]) / len(measured)))
    return {
        "us": sum(share for share, _ in shares),
        "ticks": (after[0] - before[0]) / events * 1e6,
        "faults": (after[1] - before[1]) / len(measured),
        "voluntary": switches[0] / len(measured),
        "involuntary": switches[1] / len(measured),
        "threads": sorted(shares, reverse=True),
        "counts": counts,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--src", type=Path, action="append", help="a source tree (repeatable); default: this one's")
    parser.add_argument("--per", type=int, default=100, help="events a frame")
    parser.add_argument("--interval", type=float, default=0.01, help="seconds between two frames (paced)")
    parser.add_argument("--seconds", type=float, default=15.0, help="of paced feed")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--mode", choices=("paced", "unpaced", "both"), default="both")
    parser.add_argument("--frames", type=int, help=argparse.SUPPRESS)  # (the child of ``tree_frames``)
    args = parser.parse_args()
    if args.frames is not None:
        sys.stdout.buffer.write(b"".join(frames(args.frames, args.per)))
        return
    trees = args.src or [HERE.parent / "src"]
    count = _WARM_FRAMES + int(args.seconds / args.interval)
    framed = {tree: tree_frames(tree, count, args.per) for tree in trees}
    modes = {"paced": [args.interval], "unpaced": [None], "both": [args.interval, None]}[args.mode]
    for round_ in range(1, args.rounds + 1):
        for interval in modes:
            for tree in trees:
                found = run(tree, framed[tree], args.per, interval)
                threads = " ".join(f"{us:.2f} ({woken:.1f})" for us, woken in found["threads"] if us > 0.005)
                mode = "paced" if interval else "unpaced"
                print(
                    f"round {round_} {mode} {tree}: {found['us']:.2f} µs an event (user+system {found['ticks']:.2f}), "
                    f"context switches a frame {found['voluntary']:.1f} voluntary + {found['involuntary']:.1f} "
                    f"involuntary, page faults {found['faults']:.0f}; threads: µs an event (voluntary switches a "
                    f"frame) {threads}",
                    flush=True,
                )
                if found["counts"]["dropped"] or found["counts"]["failed"]:
                    print(f"  (not all logged: {found['counts']})", flush=True)


if __name__ == "__main__":
    main()
