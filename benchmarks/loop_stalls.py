"""Where does p99 go with monitoring on? Stalls of the server's event loop and CPU bursts of its threads and writers.

    PYTHONPATH=src .venv/bin/python benchmarks/loop_stalls.py [--only ae] [--rounds 3] [--seconds 6]

Starts the servers of benchmarks/monitoring_overhead.py (its configurations, by letter: (a) all off ... (e) drift +
payload log + tracing) with benchmarks/loop_stalls_hook on their PYTHONPATH and ``DHOW_LOOP_STALLS`` set: each
server's event loop gets a 1 ms heartbeat and a watchdog thread that, while a beat is late by more than 1 ms, samples
the loop thread's stack and counts the stall's milliseconds to it (``loop_watch``). Drives them in alternating rounds
with monitoring_overhead's load (c=16) and, during each measured run, samples every thread of the server and of its
writer processes from /proc (``schedstat``: CPU ns, every ``--interval``) in a process of its own: a thread's burst is
a run of intervals in which it was on a core at least half the interval, and its CPU is counted.

Prints, per configuration (all rounds together, per second of load): p99, the loop's late beats by lateness, the ms of
stall by the loop's callback and by its innermost stacks, and per thread its CPU, its bursts >= 2 and >= 5 ms and the
longest. Wall-clock figures move with the machine: compare configurations of one invocation, and counts over times.
Servers of one worker only (``loop_watch`` watches one process's first loop: with ``DHOW_WORKERS`` > 1 that is the
supervisor's, which serves nothing), so it refuses to run with ``DHOW_WORKERS`` set past 1.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from monitoring_overhead import Config, configurations, generator_option, measure
from security_overhead import build_models, start_server

HOOK = Path(__file__).resolve().parent / "loop_stalls_hook"
BURSTS_MS = (2.0, 5.0)


@dataclass
class Watched:
    config: Config
    stalls: Path
    seconds: float = 0.0
    p99: list[float] = field(default_factory=list)
    late: collections.Counter[str] = field(default_factory=collections.Counter)
    split: collections.Counter[str] = field(default_factory=collections.Counter)
    #: per thread: CPU ms in the intervals the loop's thread was on a core less than a quarter of
    starving: collections.Counter[str] = field(default_factory=collections.Counter)
    preempted: collections.Counter[str] = field(default_factory=collections.Counter)
    roots: collections.Counter[str] = field(default_factory=collections.Counter)
    stacks: collections.Counter[str] = field(default_factory=collections.Counter)
    beats: int = 0
    #: per thread ("process/thread"): CPU ms, bursts' CPU ms
    cpu: collections.Counter[str] = field(default_factory=collections.Counter)
    bursts: dict[str, list[float]] = field(default_factory=dict)


def tree(root: int) -> list[int]:
    """A process and every process below it."""
    found, todo = [], [root]
    while todo:
        pid = todo.pop()
        found.append(pid)
        for task in Path(f"/proc/{pid}/task").glob("*"):
            with contextlib.suppress(OSError):
                todo += [int(child) for child in (task / "children").read_text().split()]
    return found


def role(pid: int) -> str:
    try:
        words = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return str(pid)
    module = next((w.decode() for w in words if w.startswith(b"dhow.")), "")
    return {"dhow.cli": "server"}.get(module, module.rsplit(".", 1)[-1] or words[0].decode())


def switches(key: str) -> int:
    """A thread's nonvoluntary context switches so far (``pid/tid``; 0 once gone)."""
    pid, tid = key.split("/")
    try:
        status = Path(f"/proc/{pid}/task/{tid}/status").read_text()
    except OSError:
        return 0
    return int(status.split("nonvoluntary_ctxt_switches:")[1].split()[0])


def sample(root: int, seconds: float, interval: float, out: Path) -> None:
    """``--sample``: every thread's CPU (schedstat) every ``interval`` for ``seconds``, its bursts, into ``out``."""
    tasks: dict[str, tuple[int, str]] = {}  # "pid/tid": (fd, name)
    last: dict[str, int] = {}
    busy: dict[str, float] = {}
    bursts: dict[str, list[float]] = collections.defaultdict(list)
    total: collections.Counter[str] = collections.Counter()
    starving: collections.Counter[str] = collections.Counter()
    loop = f"{root}/{root}"
    names: dict[str, str] = {}
    #: nonvoluntary context switches (preempted) at the first look
    preempted: dict[str, int] = {}
    listed = 0.0
    start = time.monotonic()
    previous = start
    while (now := time.monotonic()) - start < seconds:
        if now - listed > 0.5:
            listed = now
            for pid in [*tree(root), os.getppid()]:
                for task in Path(f"/proc/{pid}/task").glob("*"):
                    key = f"{pid}/{task.name}"
                    if key not in tasks:
                        try:
                            tasks[key] = (os.open(task / "schedstat", os.O_RDONLY), (task / "comm").read_text().strip())
                        except OSError:
                            continue
                        names[key] = f"{'loadgen' if pid == os.getppid() else role(pid)}/{tasks[key][1]}"
                        preempted[key] = switches(key)
        span = (now - previous) * 1e9
        previous = now
        deltas = {}
        for key, (fd, _) in list(tasks.items()):
            try:
                ns = int(os.pread(fd, 128, 0).split()[0])
            except (OSError, IndexError, ValueError):
                os.close(fd)
                del tasks[key]
                continue
            delta = deltas[key] = ns - last.get(key, ns)
            last[key] = ns
            total[key] += delta
            if delta >= span / 2:
                busy[key] = busy.get(key, 0.0) + delta
            elif key in busy:
                bursts[key].append((busy.pop(key) + delta) / 1e6)
        if deltas.get(loop, span) < span / 4:
            starving.update(deltas)
        time.sleep(max(interval - (time.monotonic() - now), 0))
    for key, ns in busy.items():
        bursts[key].append(ns / 1e6)
    data = {key: {"name": names[key], "cpu_ms": total[key] / 1e6, "bursts": bursts.get(key, []),
                  "starving_ms": starving[key] / 1e6, "preempted": switches(key) - preempted[key]}
            for key in names}  # fmt: skip
    out.write_text(json.dumps(data))


def stall_counts(watched: Watched) -> dict[str, Any]:
    path = watched.stalls / f"{watched.config.pid}.json"
    for _ in range(50):
        try:
            return dict(json.loads(path.read_text()))
        except (OSError, ValueError):
            time.sleep(0.1)
    return {"beats": 0, "late": {}, "stacks": {}, "roots": {}, "split": {}, "threads": {}}


def run(watched: Watched, args: argparse.Namespace, work: Path) -> None:
    before = stall_counts(watched)
    cpu_out = work / "cpu.json"
    sampler = subprocess.Popen([sys.executable, __file__, "--sample", str(watched.config.pid), str(args.warmup +
                                args.seconds), str(args.interval), str(cpu_out)])  # fmt: skip
    result, cpu_us = measure(watched.config, args)
    sampler.wait(60)
    time.sleep(1.1)  # the watchdog writes its counts every second
    after = stall_counts(watched)
    seconds = args.warmup + args.seconds
    watched.seconds += seconds
    watched.p99.append(result.percentile(99))
    watched.beats += after["beats"] - before["beats"]
    for name in ("late", "roots", "stacks", "split"):
        counter: collections.Counter[str] = getattr(watched, name)
        counter.update({k: v - before[name].get(k, 0) for k, v in after[name].items()})
    threads = after["threads"]
    for key, found in json.loads(cpu_out.read_text()).items():
        name = found["name"]
        tid = key.split("/")[1]
        if tid in threads:
            name = f"{name.split('/')[0]}/{threads[tid]}"
        watched.cpu[name] += found["cpu_ms"]
        watched.bursts.setdefault(name, []).extend(found["bursts"])
        watched.starving[name] += found["starving_ms"]
        watched.preempted[name] += max(found["preempted"], 0)
    late = sum(after["late"].values()) - sum(before["late"].values())
    print(f"  {watched.config.label}: {result.throughput:,.0f} infer/s, p99 {result.percentile(99):.2f} ms, server CPU "
          f"{cpu_us:.0f} µs/request, late beats {late / seconds:.0f}/s", flush=True)  # fmt: skip


def report(watched: Watched, top: int) -> str:
    s = watched.seconds
    lines = [f"## {watched.config.label}: p99 by round {', '.join(f'{p:.2f}' for p in watched.p99)} ms",
             f"beats {watched.beats / s:.0f}/s; late beats a second: " + ", ".join(
                 f"{k} {v / s:.1f}" for k, v in sorted(watched.late.items(), key=lambda kv: float(kv[0][2:-2]))),
             f"stall ms a second by the loop's callback (total {sum(watched.roots.values()) / s:.1f}):"]  # fmt: skip
    lines += [f"  {ms / s:7.2f}  {root}" for root, ms in watched.roots.most_common(top) if ms > 0]
    lines.append("the loop's thread in its stalls, ms a second: " + ", ".join(f"{k} {v / s:.1f}" for k, v in
                                                                              watched.split.items()))  # fmt: skip
    lines.append("stall ms a second by stack (innermost first):")
    lines += [f"  {ms / s:7.2f}  {stack}" for stack, ms in watched.stacks.most_common(top) if ms > 0]
    lines.append(f"threads: CPU ms a second, of it while the loop's thread starved, preempted a second, bursts >= "
                 f"{BURSTS_MS[0]:g} / >= {BURSTS_MS[1]:g} ms a second, longest ms")  # fmt: skip
    for name, ms in watched.cpu.most_common():
        bursts = watched.bursts.get(name, [])
        if ms / s < 1:
            continue
        counts = " / ".join(f"{sum(b >= limit for b in bursts) / s:5.1f}" for limit in BURSTS_MS)
        starved = watched.starving[name] / s
        preempted = watched.preempted[name] / s
        longest = max(bursts, default=0)
        lines.append(f"  {ms / s:7.1f}  {starved:6.1f}  {preempted:6.0f}  {counts}  {longest:6.1f}  {name}")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", default="ae", help="monitoring_overhead's configurations, by letter (default ae)")
    parser.add_argument(
        "--writer-policy",
        action="append",
        default=[],
        choices=["batch", "normal"],
        help="also run (e) with its writer processes under this scheduling policy (an experiment)",
    )
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=6.0)
    parser.add_argument("--warmup", type=float, default=2.0)
    parser.add_argument("--concurrency", type=int, default=16)
    generator_option(parser)
    parser.add_argument("--interval", type=float, default=0.005, help="the threads' sampling interval (s)")
    parser.add_argument("--top", type=int, default=12)
    parser.add_argument(
        "--before",
        type=Path,
        help="also run each configuration from this source tree (its src/, "
        "e.g. `git archive HEAD src | tar -x -C /tmp/before`): before against after in one run",
    )
    parser.add_argument("--out", type=Path, help="also write the report here")
    parser.add_argument("--sample", nargs=4, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.sample:
        root, seconds, interval, out = args.sample
        sample(int(root), float(seconds), float(interval), Path(out))
        return
    if not args.only or set(args.only) - set("abcde"):
        parser.error(f"--only {args.only!r}: expected some of the letters a, b, c, d, e (e.g. --only ae)")
    workers = os.environ.get("DHOW_WORKERS", "").strip()
    if workers.isdigit() and int(workers) > 1:
        parser.error("DHOW_WORKERS is set past 1: the loop watched would be the supervisor's, which serves nothing")
    work = Path(tempfile.mkdtemp(prefix="dhow-bench-stalls-"))
    models = build_models(work)
    setups, receiver = configurations(work, models)
    servers: list[subprocess.Popen[bytes]] = []
    environ = dict(os.environ)
    try:
        watched = []
        source = environ.get("PYTHONPATH", "")
        runs = [(label, setup, "", source) for label, setup in setups.items() if label[1] in args.only]
        runs += [(f"(e) writers {policy}", setups[next(iter(k for k in setups if k[1] == "e"))], policy, source)
                 for policy in args.writer_policy]  # fmt: skip
        if args.before:
            before = str(args.before.resolve() / "src")
            runs += [(f"{label} [before]", setup, policy, before) for label, setup, policy, _ in runs]
        for index, (label, (repository, extra), policy, path) in enumerate(runs):
            stalls = work / f"stalls-{index}"
            os.environ["DHOW_LOOP_STALLS"] = str(stalls)
            if policy:
                os.environ["DHOW_STALLS_WRITER_POLICY"] = policy
            os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(HOOK), path]))
            try:
                server, port = start_server(work, f"server-{index}", repository, "--auth", "none", *extra)
            finally:
                os.environ.clear()
                os.environ.update(environ)
            servers.append(server)
            watched.append(Watched(Config(label, port, server.pid), stalls))
        for round_ in range(args.rounds):
            print(f"round {round_ + 1}", flush=True)
            for each in watched[round_ % len(watched) :] + watched[: round_ % len(watched)]:
                run(each, args, work)
    finally:
        for server in servers:
            server.terminate()
            server.wait(30)
        receiver.terminate()
    text = "\n\n".join(report(each, args.top) for each in watched) + "\n"
    print(text)
    if args.out:
        args.out.write_text(text)
    shutil.rmtree(work)


if __name__ == "__main__":
    main()
