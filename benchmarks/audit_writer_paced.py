"""CPU time of the audit writer process per record under a steady feed, for one or more source trees side by side.

    python benchmarks/audit_writer_paced.py                                  # this tree, 5,000 records a second
    python benchmarks/audit_writer_paced.py --src /tmp/before/src --src src --rounds 3 --rate 10000

``audit_writer_units.py`` counts instructions, and the writer's instructions are not its cost on a small machine:
a writer that sleeps a few milliseconds between bursts wakes with cold caches, and its wake-ups (each commit, each
read of the pipe) cost it more than its records. This runs the writer (``python -m dhow.governance.audit_writer``,
each ``--src`` tree's) on a scratch SQLite store and feeds its pipe as a loaded server does: a frame of ``--per``
inference records (``audit_writer_units._frames``) every ``per / rate`` seconds, for ``--seconds``; it prints the
writer's user and system CPU time per record (from /proc), each tree in turn, ``--rounds`` times (the machine's
speed moves: compare trees within a round).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import orjson

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent / "src"))

from audit_writer_units import _frames  # noqa: E402

from dhow.governance.audit_writer import encode_frame  # noqa: E402


def _cpu(pid: int) -> tuple[float, float]:
    with open(f"/proc/{pid}/stat") as stat:
        fields = stat.read().rsplit(")", 1)[1].split()
    ticks = os.sysconf("SC_CLK_TCK")
    return int(fields[11]) / ticks, int(fields[12]) / ticks


def run(
    src: Path, frames: list[bytes], per: int, rate: float, seconds: float, commit_ms: int | None
) -> tuple[float, float]:
    """The writer's user and system CPU time per record, in µs, over ``seconds`` of feed."""
    with tempfile.TemporaryDirectory() as scratch:
        env = dict(os.environ, PYTHONPATH=str(src), OMP_NUM_THREADS="1")
        writer = subprocess.Popen(
            [sys.executable, "-m", "dhow.governance.audit_writer"], stdin=subprocess.PIPE, stdout=subprocess.DEVNULL,
            env=env,
        )  # fmt: skip
        assert writer.stdin is not None
        url = f"sqlite:///{scratch}/audit.sqlite3"
        writer.stdin.write(encode_frame(url if commit_ms is None else [url, commit_ms / 1000]))
        writer.stdin.flush()
        time.sleep(1.0)  # started, the store open
        user, system = _cpu(writer.pid)
        start, sent, interval = time.monotonic(), 0, per / rate
        for n, frame in enumerate(frames):
            delay = start + n * interval - time.monotonic()
            if delay > 0:
                time.sleep(delay)
            writer.stdin.write(frame)
            writer.stdin.flush()
            sent += per
            if time.monotonic() - start > seconds:
                break
        time.sleep(0.5)  # the last commit
        user_after, system_after = _cpu(writer.pid)
        writer.stdin.close()
        writer.wait()
    return (user_after - user) / sent * 1e6, (system_after - system) / sent * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--src", type=Path, action="append", help="a source tree (repeatable); default: this one's")
    parser.add_argument("--rate", type=float, default=5000, help="records a second")
    parser.add_argument("--per", type=int, default=7, help="records a frame (a pass of the server's event loop)")
    parser.add_argument("--seconds", type=float, default=8.0)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--commit-ms", type=int, help="the writer's commit window (default: the writer's own)")
    args = parser.parse_args()
    trees = args.src or [HERE.parent / "src"]
    rows = [orjson.loads(frame)[0] for frame in _frames(int(args.rate * args.seconds) + 2 * args.per)]
    frames = [encode_frame(rows[at : at + args.per]) for at in range(0, len(rows) - args.per, args.per)]
    for round_ in range(1, args.rounds + 1):
        for tree in trees:
            user, system = run(tree, frames, args.per, args.rate, args.seconds, args.commit_ms)
            print(f"round {round_} {tree}: user {user:.1f} + system {system:.1f} = {user + system:.1f} µs a record",
                  flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
