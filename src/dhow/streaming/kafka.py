"""Kafka through librdkafka (``confluent-kafka``): a consumer-group source and a producer sink.

At-least-once is a property of the order of three calls: a reply is produced, the broker acknowledges it
(the producer's delivery report), and only then is its offset committed. Offsets are never committed by the
client on its own (``enable.auto.commit`` off): the ``OffsetTracker`` says how far every record is done, and
the consumer commits that, every ``commit_interval_s``, when partitions are revoked, and when it stops.

The client's calls block, so each runs on a thread of its own: the consumer's polls (and with them the
group's rebalance callbacks) on one, the producer's delivery reports on another; the event loop only hands
them work and gets futures back: one per poll, one per batch of replies (its reports counted on the reports'
thread, settled on the loop in one hop when the last came), not one per message. Offsets too are kept per
poll and partition, not per message (``OffsetTracker``).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import functools
import logging
from collections.abc import Sequence
from typing import Any

import orjson
from confluent_kafka import Consumer, KafkaError, KafkaException, Message, Producer, TopicPartition

from dhow.core import affinity
from dhow.core.errors import InvalidInput, Unavailable
from dhow.core.kafka import KafkaProducer
from dhow.streaming.endpoints import Endpoint
from dhow.streaming.offsets import OffsetTracker
from dhow.streaming.records import DeliveryFailed, Header, Outgoing, Position, Record

__all__ = ["DeliveryFailed", "KafkaSink", "KafkaSource", "check_topic", "log_error"]

log = logging.getLogger("dhow.streaming")

#: a NamedTuple made from a tuple in C: ``Position(...)`` runs its Python ``__new__``, per message
_position = tuple.__new__

#: how long to look for a broker and a topic at start before saying so
_CONNECT_S = 10.0
#: how long a revoked partition may take to finish its records before its offsets are committed as they are
_REVOKE_WAIT_S = 10.0


class KafkaSource:
    """A consumer-group member: reads the topic's partitions the group gives it, commits what is done."""

    def __init__(self, endpoint: Endpoint, group: str, *, client_id: str = "dhow", transactional: bool = False) -> None:
        """``transactional``: offsets are committed in the producer's transactions (``KafkaTransactions``), never
        by this consumer."""
        self.endpoint = endpoint
        self.transactional = transactional
        self.offsets = OffsetTracker()
        config: dict[str, Any] = {
            "bootstrap.servers": endpoint.servers,
            "group.id": group,
            "client.id": client_id,
            "enable.auto.commit": False,
            "auto.offset.reset": "earliest",
            # librdkafka's default, said here: requests of aborted transactions are never read
            "isolation.level": "read_committed",
            # a dead consumer's partitions move on after 10 s (Kafka's default before 3.0; 45 s since)
            "session.timeout.ms": 10000,
            "heartbeat.interval.ms": 1000,
            # the consumer's prefetch is the only buffer below the in-flight bound: keep it small
            "queued.max.messages.kbytes": 8192,
            # and fetch again soon once it fell below that: librdkafka's default waits 1 s before it looks again,
            # so a consumer faster than ~8 MB a second drains its prefetch and then sits idle for the rest of it
            "fetch.queue.backoff.ms": 10,
            "statistics.interval.ms": 2000,
            "stats_cb": self._on_statistics,
            "error_cb": log_error,
            **endpoint.options,
        }
        # librdkafka's threads (rdk:main, a thread per broker) start here: off the pinned loop's CPU (``placed``)
        self._consumer = affinity.placed(lambda: Consumer(config))
        #: the group's rebalances add partitions to the assignment (``incremental_assign``) rather than replace it
        self._incremental = _incremental(config)
        self._thread = concurrent.futures.ThreadPoolExecutor(
            1, thread_name_prefix="dhow-kafka-poll", initializer=affinity.as_any
        )
        self._lag: dict[str, int] = {}
        self._assigned: list[str] = []
        #: the application's state in its latest poll: partitions the group gives meanwhile come in it (``_on_assign``)
        self._paused = False
        #: the group gave partitions since the state (paused or not) was last said to the assignment (``_poll``)
        self._reassigned = False

    async def start(self) -> None:
        """Check that the broker answers and the topic exists, then join the group."""
        await check_topic(self._consumer, self.endpoint, "--source")
        self._consumer.subscribe(
            [self.endpoint.topic], on_assign=self._on_assign, on_revoke=self._on_revoke, on_lost=self._on_lost
        )

    async def poll(self, max_records: int, timeout_s: float, *, paused: bool) -> list[Record]:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._thread, self._poll, max(max_records, 1), timeout_s, paused)

    def _poll(self, max_records: int, timeout_s: float, paused: bool) -> list[Record]:
        if paused or self._paused or self._reassigned:
            # said to every partition assigned now, and again once the group gave some: the client keeps the
            # application's pause with a partition taken away, so one paused then comes back paused, whatever was
            # said meanwhile to the others (a resume said while a rebalance left nothing assigned waits for them)
            assignment = self._consumer.assignment()
            if assignment:
                (self._consumer.pause if paused else self._consumer.resume)(assignment)
                self._reassigned = False
            self._paused = paused
        # what is there already, at once (consume waits for a full batch or its timeout); else wait for one
        messages = self._consumer.consume(max_records, 0)
        if not messages:
            first = self._consumer.poll(timeout_s)
            messages = [first, *self._consumer.consume(max_records - 1, 0)] if first is not None else []
        records = []
        last: dict[tuple[str, int], int] = {}
        for message in messages:  # per message: what a record needs, read in one pass (this thread holds the GIL)
            error = message.error()
            if error is not None:
                if error.code() != KafkaError._PARTITION_EOF:
                    log.warning("stream source %s: %s", self.endpoint, error)
                continue
            topic, partition, offset = message.topic(), message.partition(), message.offset()
            assert topic is not None and partition is not None and offset is not None
            last[topic, partition] = offset
            raw = message.headers()
            position = _position(Position, (topic, partition, offset))
            stamp = message.timestamp()[1]  # -1: none; a comparison, not max(): max builds an iterator per call
            records.append(Record(message.value() or b"", message.key(), _headers(raw) if raw else [], position,
                                  stamp if stamp > 0 else 0))  # fmt: skip
        # the poll is one batch, done as a whole (``done_batch``): a partition's last offset stands for its records
        for key, offset in last.items():
            self.offsets.take(key, offset)
        return records

    def done_batch(self, records: Sequence[Record]) -> None:
        # a poll's records of a partition are taken and done together: its last offset stands for them all
        last = {(r.position.topic, r.position.partition): r.position.offset for r in records}
        for (topic, partition), offset in last.items():
            self.offsets.done((topic, int(partition)), offset)

    async def commit(self, *, wait: bool = False) -> None:
        offsets = self.offsets.committable()
        if not offsets or self.transactional:
            return
        partitions = [TopicPartition(topic, partition, offset) for (topic, partition), offset in offsets.items()]
        # on the polling thread: the client's calls wait for each other, and the event loop must not
        loop = asyncio.get_running_loop()
        try:
            await loop.run_in_executor(self._thread, functools.partial(self._consumer.commit, offsets=partitions,
                                                                       asynchronous=not wait))  # fmt: skip
        except KafkaException as exc:
            # not lost: committed with the next ones; a crash meanwhile re-reads them (at-least-once)
            log.warning("stream source %s: commit failed, kept for the next one: %s", self.endpoint, exc)
            self.offsets.restore(offsets)

    def group_metadata(self) -> Any:
        """The consumer's group generation, for offsets committed in a producer's transaction."""
        return self._consumer.consumer_group_metadata()

    async def rewind(self, records: Sequence[Record]) -> None:
        """Read the records again from the first of each partition (a transaction that wrote them was aborted)."""
        first: dict[tuple[str, int], int] = {}
        for record in records:
            first.setdefault((record.position.topic, int(record.position.partition)), record.position.offset)
        loop = asyncio.get_running_loop()
        for (topic, partition), offset in first.items():
            try:
                await loop.run_in_executor(self._thread, self._consumer.seek, TopicPartition(topic, partition, offset))
            except KafkaException as exc:  # no longer assigned: its next owner reads from the committed offset
                log.warning("stream source %s: cannot rewind %s/%d: %s", self.endpoint, topic, partition, exc)

    def lag(self) -> dict[str, int]:
        return dict(self._lag)

    def assignment(self) -> list[str]:
        return list(self._assigned)

    async def close(self) -> None:
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(self._thread, self._consumer.close)
        self._thread.shutdown(wait=True)

    # -- the group's callbacks (on the polling thread) --------------------------------------------------

    def _on_assign(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        self._reassigned = True
        if self._paused:
            # the client fetches a partition once it is assigned, and this callback runs inside a poll that goes on
            # waiting for records: the partitions are assigned here (the binding would, after the callback) and
            # paused before any fetch of theirs can return, else this poll would read them despite the pause
            (consumer.incremental_assign if self._incremental else consumer.assign)(partitions)
            consumer.pause(partitions)
        self._assigned = sorted({*self._assigned, *(f"{p.topic}/{p.partition}" for p in partitions)})
        log.info("stream source %s: assigned %s (member %s)", self.endpoint, ", ".join(self._assigned) or "nothing",
                 consumer.memberid())  # fmt: skip

    def _on_revoke(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        """Finish the revoked partitions' records (for a while), commit what is done, let them go: the next
        owner starts where this one stopped, and re-reads only what was not answered."""
        keys = [(p.topic, p.partition) for p in partitions if p.topic is not None]
        names = ", ".join(f"{topic}/{partition}" for topic, partition in keys) or "nothing"
        log.info("stream source %s: revoked %s (member %s)", self.endpoint, names, consumer.memberid())
        if not self.offsets.wait_drained(keys, _REVOKE_WAIT_S):
            log.warning("stream source %s: revoked partitions still had records in flight", self.endpoint)
        offsets = self.offsets.committable(keys)
        if offsets and not self.transactional:
            try:
                consumer.commit(offsets=[TopicPartition(t, p, o) for (t, p), o in offsets.items()], asynchronous=False)
            except KafkaException as exc:
                log.warning("stream source %s: commit on revoke failed (re-read by the next owner): %s",
                            self.endpoint, exc)  # fmt: skip
        self._forget(keys)

    def _on_lost(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        """Partitions taken away without a revoke (the session timed out): another member may own them now, so
        nothing is committed for them; their records in flight will be read again by it."""
        names = ", ".join(f"{p.topic}/{p.partition}" for p in partitions) or "nothing"
        log.warning("stream source %s: lost %s (member %s)", self.endpoint, names, consumer.memberid())
        self._forget([(p.topic, p.partition) for p in partitions if p.topic is not None])

    def _forget(self, keys: list[tuple[str, int]]) -> None:
        self.offsets.forget(keys)
        gone = {f"{topic}/{partition}" for topic, partition in keys}
        self._assigned = [p for p in self._assigned if p not in gone]
        for name in gone:
            self._lag.pop(name, None)

    def _on_statistics(self, text: str) -> None:
        statistics = orjson.loads(text)
        lag = {}
        for topic, data in (statistics.get("topics") or {}).items():
            for number, partition in (data.get("partitions") or {}).items():
                name = f"{topic}/{number}"
                if number != "-1" and name in self._assigned and partition.get("consumer_lag", -1) >= 0:
                    lag[name] = int(partition["consumer_lag"])
        self._lag = lag


class KafkaSink:
    """A producer writing to one topic; a batch's messages are queued in one pass and acknowledged together."""

    def __init__(self, endpoint: Endpoint, *, client_id: str = "dhow") -> None:
        self.endpoint = endpoint
        self.url = endpoint.url
        config: dict[str, Any] = {
            "bootstrap.servers": endpoint.servers,
            "client.id": client_id,
            # acks=all, retries without duplicates or reordering: an acknowledged reply is on every replica
            "enable.idempotence": True,
            "linger.ms": 2,
            "error_cb": log_error,
            **endpoint.options,
        }
        self._producer = affinity.placed(lambda: KafkaProducer(config, what=f"sink {endpoint}"))

    async def start(self) -> None:
        await check_topic(self._producer.client, self.endpoint, "sink")
        # the reports settle each batch's acknowledgement off the event loop: one hop to it per batch
        # (on the stream's path: the acknowledgements free the in-flight bound; every CPU, as the poll's thread)
        affinity.placed(lambda: self._producer.serve_reports("dhow-kafka-deliver"))

    async def send_batch(self, messages: Sequence[Outgoing]) -> asyncio.Future[None]:
        loop = asyncio.get_running_loop()
        acknowledged = _Acknowledged(loop, len(messages), self.url)
        rows = messages  # each a (value, key, headers) tuple, as the producer takes it
        while rows:
            try:
                queued = self._producer.produce_many(self.endpoint.topic, rows, acknowledged.report)
            except KafkaException as exc:  # refused outright (too large, ...): the rest will never be reported
                acknowledged.refuse(str(exc))
                break
            rows = rows[queued:]
            if rows:  # the client's queue is full: the broker is slower than we are
                await asyncio.sleep(0.005)
        return acknowledged.future

    async def close(self) -> None:
        left = await asyncio.to_thread(self._producer.close, 30.0)
        if left:
            log.error("stream sink %s: %d messages not delivered at close", self.url, left)


class _Acknowledged:
    """A batch's acknowledgement: the broker's reports counted on the reports' thread (the only one serving
    them), the batch's future settled on the event loop once, when the last came."""

    __slots__ = ("error", "future", "left", "loop", "url")

    def __init__(self, loop: asyncio.AbstractEventLoop, count: int, url: str) -> None:
        self.loop = loop
        self.future: asyncio.Future[None] = loop.create_future()
        self.left = count
        self.url = url
        self.error: str | None = None

    def report(self, error: KafkaError | None, _: Message) -> None:
        if error is not None and self.error is None:
            self.error = str(error)
        self.left -= 1
        if self.left == 0:
            self.loop.call_soon_threadsafe(self._settle)

    def refuse(self, reason: str) -> None:
        self.error = self.error or reason
        self._settle()

    def _settle(self) -> None:
        if self.future.done():
            return
        if self.error is None:
            self.future.set_result(None)
        else:
            self.future.set_exception(DeliveryFailed(f"{self.url}: {self.error}"))


def _incremental(config: dict[str, Any]) -> bool:
    """Whether the client's rebalance protocol is librdkafka's COOPERATIVE (what it decides from these two)."""
    strategy = str(config.get("partition.assignment.strategy", "")).lower()
    return "cooperative" in strategy or str(config.get("group.protocol", "classic")).lower() == "consumer"


def _headers(raw: Any) -> list[Header]:
    pairs = raw.items() if isinstance(raw, dict) else raw
    return [(name, value.encode() if isinstance(value, str) else value) for name, value in pairs]


async def check_topic(client: Consumer | Producer, endpoint: Endpoint, what: str) -> None:
    try:
        metadata = await asyncio.to_thread(client.list_topics, endpoint.topic, _CONNECT_S)
    except KafkaException as exc:
        raise Unavailable(f"{what} {endpoint}: no broker answered at {endpoint.servers} ({exc})") from None
    topic = metadata.topics.get(endpoint.topic)
    if topic is None or topic.error is not None or not topic.partitions:
        raise InvalidInput(
            f"{what} {endpoint}: the broker has no topic {endpoint.topic!r}; create it first "
            f"(kafka-topics.sh --create --topic {endpoint.topic} --partitions N --bootstrap-server {endpoint.servers})"
        )


def log_error(error: KafkaError) -> None:
    log.warning("kafka: %s", error)
