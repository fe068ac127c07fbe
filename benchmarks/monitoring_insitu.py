"""What each piece of monitoring costs the event loop inside a loaded server: time per call, per request.

    python benchmarks/monitoring_insitu.py [--only e] [--rounds 4] [--seconds 6] [--compare SRC ...] [--out FILE]

``monitoring_overhead.py`` measures throughput, whose rounds move by 5-10% with this machine's speed (a 2-vCPU VM:
two servers running the same code read 4% apart in one run), more than most single changes to the monitoring move
it. ``monitoring_units.py`` counts a unit's instructions alone, with warm caches: in a server under load the same
code runs two to three times slower, its data cold (a request's objects, looked at again when its frame is made 10 ms
later). This measures the pieces where they run: a copy of the sources (this tree's, and each ``--compare`` tree's)
with each function of ``TARGETS`` wrapped in a timer (``time.perf_counter_ns`` around the call, summed per function
by the process; a wrapper adds about 0.1-0.3 µs inside what it measures), served as ``monitoring_overhead.py``
serves its configurations, loaded by wrk (REST, ``tabular``, c=16) in alternating rounds. It reports, per
configuration and tree: throughput (median round), the event loop thread's CPU a request, and each timed function's
calls a request (the requests the server counted, warm-ups included), time a call and time a request. The
functions a change leaves alone read up to ~6% apart between the two servers of one run (the machine's speed moves
between rounds): read a change by its own functions' figures, beside those of the functions it left alone.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import monitoring_overhead
import wrk_load
from security_overhead import BODY, build_models, start_server

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
#: (file under src, the line that starts the function, as written, its label): the request's path and the hand-overs
TARGETS = (
    ("dhow/monitoring/tracing.py", "    def sample(", "tracing.sample"),
    ("dhow/monitoring/tracing.py", "    def begin(", "tracing.begin"),
    ("dhow/monitoring/tracing.py", "    def finish(", "trace.finish"),
    ("dhow/monitoring/tracing.py", "def record_batch(", "tracing.record_batch"),
    ("dhow/monitoring/payload_log.py", "    def answered(", "payload.answered"),
    ("dhow/monitoring/payload_log.py", "    def _frame(self, items", "payload._frame"),
    ("dhow/monitoring/payload_log.py", "def frame_events(", "payload.frame_events"),
    ("dhow/monitoring/writer_pipe.py", "    def _flush(self)", "flush"),
    ("dhow/monitoring/writer_pipe.py", "    def _write(self, data", "write"),
    ("dhow/serving/watch.py", "    def observe(", "watch.observe"),
    ("dhow/serving/watch.py", "def _sample(", "watch._sample"),
)
#: the timer, added to each copy as ``dhow/_insitu.py``: a writer pipe's ``flush`` and ``write`` are told apart by
#: their ``what`` (payload log, tracing)
TIMER = '''"""Timers for benchmarks/monitoring_insitu.py (a copy of the sources only)."""
import functools, json, os, threading, time

_totals = {}


def timed(label):
    def wrap(function):
        @functools.wraps(function)
        def timed_call(*args, **kwargs):
            start = time.perf_counter_ns()
            try:
                return function(*args, **kwargs)
            finally:
                key = f"{label} ({args[0].what})" if label in ("flush", "write") else label
                total = _totals.get(key)
                if total is None:
                    total = _totals[key] = [0, 0]
                total[0] += 1
                total[1] += time.perf_counter_ns() - start
        return timed_call
    return wrap


def _write_totals(path):
    while True:
        time.sleep(0.5)
        with open(path + ".tmp", "w") as out:
            json.dump(_totals, out)
        os.replace(path + ".tmp", path)


if os.environ.get("DHOW_INSITU"):
    _path = f"{os.environ['DHOW_INSITU']}/{os.getpid()}.json"
    threading.Thread(target=_write_totals, args=(_path,), daemon=True).start()
'''


def instrumented(src: Path, into: Path) -> tuple[Path, list[str]]:
    """A copy of ``src`` with every target found wrapped in its timer; the labels of those not found (older trees)."""
    copy = into / "src"
    shutil.copytree(src, copy, ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    (copy / "dhow" / "_insitu.py").write_text(TIMER)
    missing = []
    for file, start, label in TARGETS:
        path = copy / file
        text = path.read_text() if path.exists() else ""
        if text.count("\n" + start) != 1:
            missing.append(label)
            continue
        indent = start[: len(start) - len(start.lstrip())]
        decorator = f'{indent}@__import__("dhow._insitu", fromlist=["timed"]).timed("{label}")\n'
        path.write_text(text.replace("\n" + start, "\n" + decorator + start))
    return copy, missing


def loop_cpu_seconds(pid: int) -> float:
    """The CPU time of the server's main thread (the event loop's)."""
    fields = Path(f"/proc/{pid}/task/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", default="e", help="configurations of monitoring_overhead.py (default e)")
    parser.add_argument("--rounds", type=int, default=4, help="at least 1 (default 4)")
    parser.add_argument("--seconds", type=int, default=6, help="measured seconds a round (after 2 s of warm-up)")
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--compare", type=Path, action="append", default=[], help="another tree's src (repeatable)")
    parser.add_argument("--out", type=Path, help="also write the table here")
    args = parser.parse_args()
    if not args.only or set(args.only) - set("abcde"):
        parser.error(f"--only {args.only!r}: letters of the configurations, a to e (e.g. --only ae)")
    if args.rounds < 1 or args.seconds < 1:
        parser.error("--rounds and --seconds must be at least 1")
    for src in args.compare:
        if not (src / "dhow").is_dir():
            parser.error(f"--compare {src}: not a source tree (no dhow package in it; give its src folder)")
    if not wrk_load.available():
        parser.error("wrk is not installed (`make bench-packages` installs Debian's wrk package)")
    work = Path(tempfile.mkdtemp(prefix="dhow-bench-insitu-"))
    timings = work / "timings"
    timings.mkdir()
    os.environ["DHOW_INSITU"] = str(timings)
    trees = []
    for index, src in enumerate([ROOT / "src", *args.compare]):
        copy, missing = instrumented(src, work / f"tree-{index}")
        trees.append((str(src), copy, missing))
    models = build_models(work)
    setups, receiver = monitoring_overhead.configurations(work, models)
    servers = []
    rows: list[tuple[str, int, int, list[float], list[float], list[int]]] = []
    try:
        for name, copy, _ in trees:
            for label, (repository, extra) in setups.items():
                if label[1] not in args.only:
                    continue
                extra = tuple(part.replace(".jsonl", f"-{len(rows)}.jsonl") for part in extra)
                server, port = start_server(work, f"server-{len(rows)}", repository, "--auth", "none",
                                            "--cpu-affinity", "off", *extra, src=copy)  # fmt: skip
                servers.append(server)
                rows.append((f"{label} [{name}]", port, server.pid, [], [], []))
        for round_ in range(args.rounds):
            for label, port, pid, rates, loop_us, failures in rows[round_ % len(rows) :] + rows[: round_ % len(rows)]:
                wrk_load.run("127.0.0.1", port, monitoring_overhead.PATH, BODY,
                             concurrency=args.concurrency, seconds=2)  # fmt: skip
                before = loop_cpu_seconds(pid)
                result = wrk_load.run("127.0.0.1", port, monitoring_overhead.PATH, BODY,
                                      concurrency=args.concurrency, seconds=args.seconds)  # fmt: skip
                rates.append(result.throughput)
                loop_us.append((loop_cpu_seconds(pid) - before) / result.requests * 1e6)
                failures.append(result.failures)
                print(f"round {round_ + 1} {label}: {result.throughput:,.0f} infer/s, loop {loop_us[-1]:.1f} µs a "
                      "request", flush=True)  # fmt: skip
        time.sleep(1)  # the timers' last totals written
        command = " ".join(["python", *sys.argv])
        lines = [f"`{command}`: {args.rounds} rounds of {args.seconds} s, c={args.concurrency}. A function's time "
                 "holds the time of those it calls (flush: the frame and the write; the frame: frame_events), each "
                 "timer adding ~0.1-0.3 µs: do not add a column up. A request: one the server counted, warm-ups and "
                 "failures included (the timed functions run on answered ones).", ""]  # fmt: skip
        for name, _, missing in trees:
            if missing:
                lines.append(f"{name}: not found there (not timed): {', '.join(missing)}")
        for label, port, pid, rates, loop_us, failures in rows:
            totals = json.loads((timings / f"{pid}.json").read_text()) if (timings / f"{pid}.json").exists() else {}
            # the server's own count of the requests it served (warm-ups included, as the totals are)
            served = monitoring_overhead.payload_counts(port)[1]
            lines += ["", f"**{label}**: {statistics.median(rates):,.0f} infer/s (median round), event loop "
                      f"{statistics.median(loop_us):.1f} µs CPU a request, {sum(failures)} failures", ""]  # fmt: skip
            if not totals or not served:
                lines.append("(no timings from this server)")
                continue
            lines += ["| function | calls a request | ns a call | ns a request |", "|---|---|---|---|"]
            for function, (calls, total_ns) in sorted(totals.items()):
                per_call, per_request = total_ns / calls, total_ns / served
                lines.append(f"| {function} | {calls / served:.3f} | {per_call:,.0f} | {per_request:,.0f} |")
        text = "\n".join(lines) + "\n"
        print(text)
        if args.out:
            args.out.write_text(text)
    except BaseException:
        print(f"failed: the servers' logs are in {work}", file=sys.stderr)
        raise
    finally:
        try:
            monitoring_overhead.stop(servers)
        finally:
            receiver.terminate()
    shutil.rmtree(work)


if __name__ == "__main__":
    main()
