"""``--exactly-once``: each batch's replies, dead letters and consumed offsets in one Kafka transaction.

One transactional producer writes both the reply and the dead-letter topic; per batch it begins a transaction,
produces the batch's messages, adds the source's next offsets to it (``send_offsets_to_transaction`` with the
consumer's group metadata, so a member fenced by a rebalance cannot commit) and commits. Readers of the replies
with ``isolation.level=read_committed`` see a batch's replies once its offsets are committed, and never the
replies of an aborted one. A transaction that fails is aborted and the source rewound to the batch's first
offsets: the batch is read and answered again (its aborted replies stay invisible to such readers).

Batches run one at a time (a producer has one open transaction), so this mode trades throughput for the
guarantee. ``transactional.id`` is ``<group>.<host>.<pid>`` unless the sink's URL sets one
(``?transactional.id=…``): a stable id per consumer also fences a previous incarnation's open transaction at
start.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import os
import socket
from collections.abc import Sequence
from typing import Any

from confluent_kafka import KafkaException, TopicPartition

from dhow.core import affinity
from dhow.core.errors import Unsupported
from dhow.core.kafka import KafkaProducer
from dhow.streaming.endpoints import Endpoint
from dhow.streaming.kafka import KafkaSource, check_topic, log_error
from dhow.streaming.records import DeliveryFailed, Outgoing, Record

__all__ = ["KafkaTransactions"]

log = logging.getLogger("dhow.streaming")

_TIMEOUT_S = 30.0


class KafkaTransactions:
    """Replies and dead letters of a batch written, and the batch's offsets committed, in one transaction."""

    def __init__(
        self, source: KafkaSource, sink: Endpoint, dead_letter: Endpoint | None, group: str, *, client_id: str
    ) -> None:
        self.source = source
        self.sink = sink
        self.dead_letter = dead_letter
        self.url = sink.url
        config: dict[str, Any] = {
            "bootstrap.servers": sink.servers,
            "client.id": client_id,
            "transactional.id": f"{group}.{socket.gethostname()}.{os.getpid()}",
            "linger.ms": 2,
            "error_cb": log_error,
            **sink.options,
        }
        self._producer = affinity.placed(lambda: KafkaProducer(config, what=f"sink {sink}"))
        # the client's transactional calls block: they run on a thread of their own, one at a time
        self._thread = concurrent.futures.ThreadPoolExecutor(
            1, thread_name_prefix="dhow-kafka-txn", initializer=affinity.as_any
        )

    async def start(self) -> None:
        """Check the topics, then register the transactional id (refused where the broker has no transactions)."""
        await check_topic(self._producer.client, self.sink, "sink")
        if self.dead_letter is not None:
            await check_topic(self._producer.client, self.dead_letter, "--dead-letter")
        try:
            await self._run(self._producer.client.init_transactions, _TIMEOUT_S)
        except KafkaException as exc:
            raise Unsupported(
                f"--exactly-once: the broker at {self.sink.servers} does not support transactions ({exc}); "
                "run without --exactly-once (at-least-once), or use a broker with transactions (Kafka 2.5+)"
            ) from None

    async def commit(self, records: Sequence[Record], replies: Sequence[Outgoing], letters: Sequence[Outgoing]) -> None:
        """Write the batch and commit its offsets, all or nothing; on failure the source is rewound to the batch
        (read again by the next poll) and ``DeliveryFailed`` says why."""
        offsets = [TopicPartition(t, p, o) for (t, p), o in _next_offsets(records).items()]
        metadata = self.source.group_metadata()
        try:
            await self._run(self._transaction, replies, letters, offsets, metadata)
        except KafkaException as exc:
            await self.source.rewind(records)
            raise DeliveryFailed(
                f"{self.url}: the transaction was aborted, the batch will be read again: {exc}"
            ) from None

    def _transaction(
        self, replies: Sequence[Outgoing], letters: Sequence[Outgoing], offsets: list[TopicPartition], metadata: Any
    ) -> None:
        client = self._producer.client
        client.begin_transaction()
        try:
            self._produce(self.sink.topic, replies)
            if letters and self.dead_letter is not None:
                self._produce(self.dead_letter.topic, letters)
            client.send_offsets_to_transaction(offsets, metadata, _TIMEOUT_S)
            client.commit_transaction(_TIMEOUT_S)
        except KafkaException as exc:
            error = exc.args[0] if exc.args else None
            if error is not None and getattr(error, "fatal", lambda: False)():
                raise  # fenced or otherwise unusable: the consumer stops
            try:
                client.abort_transaction(_TIMEOUT_S)
            except KafkaException as aborted:
                log.error("stream sink %s: the transaction could not be aborted: %s", self.url, aborted)
            raise

    def _produce(self, topic: str, messages: Sequence[Outgoing]) -> None:
        rows = [(m.value, m.key, m.headers) for m in messages]
        while rows:
            queued = self._producer.produce_many(topic, rows, _ignore)
            rows = rows[queued:]
            if rows:  # the client's queue is full: serve its reports, then go on
                self._producer.poll(0.005)

    async def _run(self, call: Any, *args: Any) -> Any:
        return await asyncio.get_running_loop().run_in_executor(self._thread, call, *args)

    async def close(self) -> None:
        await self._run(self._producer.close, _TIMEOUT_S)
        self._thread.shutdown(wait=True)


def _next_offsets(records: Sequence[Record]) -> dict[tuple[str, int], int]:
    """Per partition, the offset after the batch's last record (what a commit records)."""
    return {(r.position.topic, int(r.position.partition)): r.position.offset + 1 for r in records}


def _ignore(error: Any, message: Any) -> None:
    """A transaction's outcome is its commit's: the delivery reports say nothing more."""
