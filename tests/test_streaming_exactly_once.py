"""`dhow stream run --exactly-once` against a real broker: replies and offsets committed together, and after
kill -9 and a restart every request answered exactly once for a read_committed reader.

The last part holds only where the broker hides aborted and abandoned transactions from read_committed
readers: tansu, the other stream tests' broker, does not, so these run on noida-db's Kafka service
(``start_transactional_broker``), and the test first checks that it does (``_broker_hides_aborted``).
"""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson
import pytest

from tests.conftest import wait_until
from tests.kafka_broker import Broker, start_transactional_broker
from tests.stream_processes import headers_of, replies_by_key, start_stream, stop
from tests.test_streaming import _doubler

COUNT = 2000
_IN_FLIGHT = 200


@pytest.fixture(scope="module")
def broker() -> Iterator[Broker]:
    yield from start_transactional_broker()


_ABANDON = """
import os, sys
from confluent_kafka import Producer
producer = Producer({"bootstrap.servers": sys.argv[1], "transactional.id": sys.argv[2]})
producer.init_transactions(10)
producer.begin_transaction()
producer.produce(sys.argv[3], b"abandoned", b"abandoned")
producer.flush(10)
os._exit(0)  # killed with its transaction open
"""


def _broker_hides_aborted(broker: Broker) -> str:
    """'' when read_committed readers of this broker see neither an aborted transaction's messages nor those of
    one whose producer died and whose transactional id was taken up again; else what they saw."""
    from confluent_kafka import Producer

    topic = "probe.transactions"
    broker.create_topics(topic, partitions=1)
    subprocess.run([sys.executable, "-c", _ABANDON, broker.servers, "probe-abandoned", topic], check=True, timeout=60)
    producer = Producer({"bootstrap.servers": broker.servers, "transactional.id": "probe-abandoned"})
    producer.init_transactions(30)  # fences the dead producer: its open transaction is aborted
    producer.begin_transaction()
    producer.produce(topic, b"aborted", b"aborted")
    producer.abort_transaction(30)
    producer.begin_transaction()
    producer.produce(topic, b"committed", b"committed")
    producer.commit_transaction(30)
    tail = broker.tail(topic)
    try:
        keys = {m.key() for m in tail.until_keys({b"committed"}, timeout=30)}
    finally:
        tail.close()
    if keys == {b"committed"}:
        return ""
    return f"a read_committed reader saw {sorted(keys)} where only b'committed' was committed"


@dataclass
class _Run:
    #: the positions (partition, offset) of the replies a read_committed reader saw after the kill
    answered_at_kill: set[tuple[int, int]]
    #: the group's committed offset of each partition after the kill
    committed_at_kill: dict[int, int]
    #: every reply after the restart, by key
    by_key: dict[int, list[Any]]


def _kill_and_restart(broker: Broker, tmp_path: Path, name: str) -> _Run:
    repository = _doubler(tmp_path, seconds_per_batch=0.01, max_batch_size=8)
    source, sink, dead = f"{name}.requests", f"{name}.replies", f"{name}.dead"
    broker.create_topics(source, sink, dead)
    broker.produce(source, [(str(i).encode(), orjson.dumps({"x": [float(i)]}), []) for i in range(COUNT)])
    data = tmp_path / "data"
    # a stable transactional id per consumer: the restarted one fences the killed one's open transaction at once;
    # and a stable group member (static membership): the restarted one takes the killed one's place (noida-db
    # never evicts a killed member that led its group, so a new member would wait for it forever)
    args = [
        "--source", f"{broker.url(source, group_options=True)}&group.instance.id=dhow-{name}-0", "--group", name,
        "--sink", f"{broker.url(sink)}?transactional.id=dhow-{name}-0", "--dead-letter", broker.url(dead),
        "--model", "slow", "--max-in-flight", str(_IN_FLIGHT), "--exactly-once",
    ]  # fmt: skip
    replies_seen = broker.tail(sink)  # read_committed (librdkafka's default): committed transactions only
    first = start_stream(repository, data, broker, *args)
    try:
        wait_until(lambda: replies_seen.count() >= 300, 60, "some replies")
    finally:
        first.kill()  # SIGKILL: its transaction in progress is left open
        first.wait()
    # the kill froze what a read_committed reader can see (the transactions it committed, each with its replies
    # and its offsets) until the restart fences its open one: read until each committed offset's reply was seen,
    # however slowly the tail reads (or the time ran out: the tests' checks say what is missing)
    deadline = time.monotonic() + 60
    while True:
        committed = _committed(broker, name, source)
        at_kill = {(p, o) for p, upto in committed.items() for o in range(upto)}
        if at_kill <= {_position(m) for m in replies_seen.messages} or time.monotonic() > deadline:
            break
        replies_seen.count()
    assert len(replies_seen.messages) < COUNT, "the consumer finished before it was killed: nothing was proved"
    answered = {_position(m) for m in replies_seen.messages}
    second = start_stream(repository, data, broker, *args)
    try:
        replies_seen.until_keys({str(i).encode() for i in range(COUNT)})
    finally:
        code = stop(second)
    try:
        replies = replies_seen.to_end()  # all it answered, twice included: it has stopped, its transactions ended
    finally:
        replies_seen.close()
    assert code == 0, (data / "stream.log").read_text()
    by_key = replies_by_key(replies)
    assert sorted(by_key) == list(range(COUNT)), f"lost: {sorted(set(range(COUNT)) - set(by_key))[:20]}"
    assert all(orjson.loads(m.value())["y"] == [2.0 * i] for i, v in by_key.items() for m in v)
    return _Run(answered, committed, by_key)


def test_offsets_commit_with_their_replies_and_a_kill_repeats_one_batch_at_most(broker: Broker, tmp_path: Path) -> None:
    run = _kill_and_restart(broker, tmp_path, "once")
    # every offset the killed consumer committed has its reply: offsets never run ahead of replies
    committed = {(p, o) for p, upto in run.committed_at_kill.items() for o in range(upto)}
    assert committed and committed <= run.answered_at_kill
    # answered again: only the batch whose transaction the kill left open (on a broker that hides it from
    # read_committed readers, not even that: the next test)
    twice = sum(len(found) - 1 for found in run.by_key.values())
    assert twice <= _IN_FLIGHT, twice


def test_nothing_is_answered_twice_for_a_read_committed_reader(broker: Broker, tmp_path: Path) -> None:
    leak = _broker_hides_aborted(broker)
    assert not leak, f"this broker cannot prove exactly-once: {leak}"
    run = _kill_and_restart(broker, tmp_path, "once-read")
    assert run.answered_at_kill == {(p, o) for p, upto in run.committed_at_kill.items() for o in range(upto)}
    twice = sorted(key for key, found in run.by_key.items() if len(found) > 1)
    assert not twice, f"answered twice: {twice[:20]}"


def _position(message: Any) -> tuple[int, int]:
    headers = headers_of(message)
    return int(headers["dhow-source-partition"]), int(headers["dhow-source-offset"])


def test_exactly_once_needs_the_dead_letters_on_the_sinks_brokers(broker: Broker, tmp_path: Path) -> None:
    from tests.stream_processes import run_stream

    result = run_stream(
        tmp_path / "models", tmp_path / "data", broker, "--source", broker.url("x.requests"), "--sink",
        broker.url("x.replies"), "--dead-letter", "kafka://127.0.0.1:1/x.dead", "--exactly-once",
    )  # fmt: skip
    assert result.returncode != 0 and "must be on the sink's brokers" in result.stderr


def _committed(broker: Broker, group: str, topic: str) -> dict[int, int]:
    from confluent_kafka import Consumer, TopicPartition

    consumer = Consumer({"bootstrap.servers": broker.servers, "group.id": group, "enable.auto.commit": False})
    try:
        partitions = consumer.list_topics(topic, 10).topics[topic].partitions
        found = consumer.committed([TopicPartition(topic, p) for p in partitions], 10)
        return {tp.partition: max(tp.offset, 0) for tp in found}
    finally:
        consumer.close()
