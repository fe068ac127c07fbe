"""The stream consumer's CPU per message as instructions, which other load on the machine does not change.

    PYTHONPATH=src python benchmarks/stream_instructions.py [--format json] [--messages 5000] [--warm-up 2000]

Starts tansu (as ``streaming.py`` does), writes ``--warm-up`` one-row requests of the demo ``tabular`` model to a
topic of 4 partitions, and starts one ``dhow stream run`` process (one worker, no ``--workers``) on it under
``valgrind --tool=callgrind --instr-atstart=no`` (its child processes, the audit writer's, too). Once the warm-up
is answered it switches counting on (``callgrind_control -i on``), writes ``--messages`` more requests (from this
process, outside the count; the consumer, fifty times slower under valgrind, reads them as a backlog: full
polls, as under load), waits for every reply, and switches counting off. Printed: instructions per message of
all the consumer's threads and processes (the event loop's, librdkafka's, the runtime's, the audit writer's),
the share of each shared object and of each thread. With ``--out FILE`` the callgrind files (``FILE.PID-THREAD``)
stay for ``callgrind_annotate``. ``--cprofile FILE`` runs the consumer under cProfile instead (its event loop's
thread, the whole run with start-up: the Python calls a message). OMP_NUM_THREADS=1.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT))

from instructions import by_object  # noqa: E402

from tests.kafka_broker import start_broker  # noqa: E402

#: group timeouts a consumer slowed fifty-fold by valgrind keeps its membership with
_SLOW_GROUP = "session.timeout.ms=120000&heartbeat.interval.ms=5000&max.poll.interval.ms=1200000"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--format", choices=("json", "v2-json"), default="json")
    parser.add_argument("--messages", type=int, default=5000, help="messages counted")
    parser.add_argument("--warm-up", type=int, default=2000, help="messages answered before counting")
    parser.add_argument("--max-in-flight", type=int, default=0, help="dhow stream run --max-in-flight N")
    parser.add_argument("--out", type=Path, help="keep the callgrind files under this name")
    parser.add_argument("--cprofile", type=Path, help="profile the event loop's thread with cProfile into this file "
                        "(the whole run, warm-up included) instead of valgrind")  # fmt: skip
    parser.add_argument("--src", type=Path, default=ROOT / "src", help="the dhow sources to run")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="dhow-stream-instructions-") as scratch:
        print(measure(args, Path(scratch)))


def _messages(count: int, form: str, first: int) -> list[tuple[bytes | None, bytes, list[tuple[str, bytes]]]]:
    import numpy as np

    rows = np.random.default_rng(first).normal(size=(count, 32)).astype(np.float32)
    if form == "json":
        bodies = [json.dumps({"input": row.tolist()}).encode() for row in rows]
    else:
        bodies = [
            json.dumps(
                {"inputs": [{"name": "input", "datatype": "FP32", "shape": [1, 32], "data": row.tolist()}]}
            ).encode()
            for row in rows
        ]
    return [(str(first + i).encode(), body, []) for i, body in enumerate(bodies)]


def measure(args: argparse.Namespace, scratch: Path) -> str:
    from dhow.demo import build_demo_repository

    build_demo_repository(scratch / "models")
    out = args.out or scratch / "callgrind.out"
    broker_run = start_broker()
    broker = next(broker_run)
    consumer = None
    try:
        broker.create_topics("requests", "replies", "dead")
        broker.produce("requests", _messages(args.warm_up, args.format, 0))
        valgrind = ["valgrind", "--tool=callgrind", "--instr-atstart=no", "--separate-threads=yes",
                    "--trace-children=yes", f"--callgrind-out-file={out}.%p", sys.executable]  # fmt: skip
        if args.cprofile:
            valgrind = [sys.executable, "-m", "cProfile", "-o", str(args.cprofile)]
        command = [
            *valgrind, "-m", "dhow.cli", "stream", "run",
            "--repository", str(scratch / "models"), "--data-dir", str(scratch / "data"), "--model", "tabular",
            "--format", args.format, "--source", f"{broker.url('requests')}?{_SLOW_GROUP}",
            "--sink", broker.url("replies"), "--dead-letter", broker.url("dead"),
        ]  # fmt: skip
        if args.max_in_flight:
            command += ["--max-in-flight", str(args.max_in_flight)]
        env = {**os.environ, "PYTHONPATH": str(args.src), "OMP_NUM_THREADS": "1", "DHOW_AUTH": "on"}
        with open(scratch / "consumer.log", "wb") as log:
            consumer = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT)
        tail = broker.tail("replies")
        try:
            _wait_for(tail, args.warm_up, consumer, 1800)
            time.sleep(1)  # the warm-up's last acknowledgements and commits
            if not args.cprofile:
                _counting("on", consumer.pid)
            broker.produce("requests", _messages(args.messages, args.format, args.warm_up))
            _wait_for(tail, args.warm_up + args.messages, consumer, 1800)
            if not args.cprofile:
                _counting("off", consumer.pid)
        finally:
            tail.close()
        dead = broker.read_all("dead", 0, timeout=1)
    except BaseException:
        print((scratch / "consumer.log").read_text(errors="replace")[-3000:], file=sys.stderr)
        raise
    finally:
        if consumer is not None:
            consumer.send_signal(signal.SIGTERM)
            try:
                consumer.wait(300)
            except subprocess.TimeoutExpired:
                consumer.kill()
                consumer.wait()
        broker_run.close()
    if args.cprofile:
        return _profile(args.cprofile, args.warm_up + args.messages)
    return _summary(args, out, consumer.pid, len(dead))


def _profile(path: Path, messages: int) -> str:
    """Python calls per message on the event loop's thread, the costliest (own time) first."""
    import pstats

    stats = pstats.Stats(str(path)).stats  # type: ignore[attr-defined]  # not in typeshed
    rows = sorted(((own, count, f"{file.split('/src/')[-1]}:{line}:{name}")
                   for (file, line, name), (_, count, own, *_) in stats.items()), reverse=True)  # fmt: skip
    lines = [
        f"python calls per message: {sum(count for _, count, _ in rows) / messages:.1f}; own time, calls a message:"
    ]
    lines += [f"  {own / messages * 1e6:7.2f} us  {count / messages:6.2f}  {where}" for own, count, where in rows[:40]]
    return "\n".join(lines)


def _wait_for(tail: object, count: int, consumer: subprocess.Popen[bytes], seconds: float) -> None:
    deadline = time.monotonic() + seconds
    while tail.count() < count:  # type: ignore[attr-defined]
        if consumer.poll() is not None or time.monotonic() > deadline:
            raise SystemExit(f"only {tail.count()} of {count} replies came")  # type: ignore[attr-defined]


def _counting(switch: str, pid: int) -> None:
    for each in (pid, *_children(pid)):
        subprocess.run(["callgrind_control", "-i", switch, str(each)], check=True, capture_output=True)


def _children(pid: int) -> list[int]:
    found = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            found += [int(child) for child in (task / "children").read_text().split()]
        except OSError:
            continue
    return found


def _summary(args: argparse.Namespace, out: Path, pid: int, dead: int) -> str:
    files = list(out.parent.glob(f"{out.name}.*-*"))
    by_process: dict[int, dict[int, collections.Counter[str]]] = collections.defaultdict(dict)
    for file in files:
        process, _, thread = file.name.removeprefix(f"{out.name}.").partition("-")
        by_process[int(process)][int(thread)] = by_object(file)
    per_thread = by_process.pop(pid, {})
    objects: collections.Counter[str] = sum(per_thread.values(), collections.Counter())
    children = {child: sum(sum(c.values()) for c in threads.values()) for child, threads in by_process.items()}
    n = args.messages
    total, in_children = sum(objects.values()) / n, sum(children.values()) / n
    lines = [f"stream {args.format}: {total + in_children:,.0f} instructions per message over {n} messages "
             f"(consumer {total:,.0f}, its child processes {in_children:,.0f}); {dead} dead letters"]  # fmt: skip
    for name, cost in objects.most_common(10):
        lines.append(f"  {cost / n:10,.0f}  {name}")
    lines.append("per thread (1: the event loop's), with its costliest objects:")
    for number, costs in sorted(per_thread.items()):
        if (cost := sum(costs.values())) >= n * 10:
            top = ", ".join(f"{name} {part / n:,.0f}" for name, part in costs.most_common(3))
            lines.append(f"  thread {number}: {cost / n:10,.0f}  ({top})")
    for child, cost in sorted(children.items()):
        if cost >= n * 10:
            lines.append(f"  child process {child}: {cost / n:10,.0f}")
    if args.out is None:
        for file in files:
            file.unlink()
    return "\n".join(lines)


if __name__ == "__main__":
    main()
