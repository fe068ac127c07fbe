"""The source and sinks of a stream, by the scheme of each endpoint (``kafka://``, ``kinesis://``), connected;
with ``--exactly-once`` (Kafka only: ``StreamSpec`` refuses it with a Kinesis endpoint) a Kafka source and the
transactions that write its replies and dead letters and commit its offsets, in place of the sinks.

Each transport's client library is imported only when a stream uses it (``confluent-kafka`` for Kafka,
``boto3`` for Kinesis: ``pip install 'dhow[kafka]'`` or ``'dhow[kinesis]'``).
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from typing import TYPE_CHECKING

from dhow.core.errors import InvalidInput, Unsupported
from dhow.streaming.carry import DEAD_LETTER
from dhow.streaming.endpoints import Endpoint
from dhow.streaming.records import Sink, Source, Transactions
from dhow.streaming.shards import ShardStoreOpener
from dhow.streaming.spec import StreamSpec

if TYPE_CHECKING:
    from dhow.streaming.kafka import KafkaSink
    from dhow.streaming.kinesis import KinesisSink

__all__ = ["Transports", "open_transports"]


@dataclass(frozen=True, slots=True)
class Transports:
    """A stream's connected ends: the sinks, or (``--exactly-once``) the transactions that stand for them."""

    source: Source
    replies: Sink | None
    dead_letters: Sink | None
    transactions: Transactions | None = None


async def open_transports(spec: StreamSpec, client_id: str, shard_stores: ShardStoreOpener | None) -> Transports:
    """The stream's source and where its answers go, started (brokers answer, topics and streams exist)."""
    if spec.exactly_once:
        return await _transactional(spec, client_id)
    replies = _sink(spec.sink, spec.format, client_id)
    dead_letters = _sink(spec.dead_letter, DEAD_LETTER, client_id) if spec.dead_letter is not None else None
    for sink in (replies, dead_letters):
        if sink is not None:
            await sink.start()
    if spec.source.scheme == "kinesis":
        if shard_stores is None:
            raise InvalidInput(f"stream {spec.name}: a Kinesis source keeps its checkpoints in the registry, "
                               "and this process was given none")  # fmt: skip
        _need_boto3()
        from dhow.streaming.kinesis import KinesisSource

        kinesis = KinesisSource(spec.source, spec.group, shard_stores, carry=spec.format)
        await kinesis.start()
        return Transports(kinesis, replies, dead_letters)
    from dhow.streaming.kafka import KafkaSource

    kafka = KafkaSource(spec.source, spec.group, client_id=client_id)
    await kafka.start()
    return Transports(kafka, replies, dead_letters)


async def _transactional(spec: StreamSpec, client_id: str) -> Transports:
    from dhow.streaming.kafka import KafkaSource
    from dhow.streaming.kafka_transactions import KafkaTransactions

    source = KafkaSource(spec.source, spec.group, client_id=client_id, transactional=True)
    transactions = KafkaTransactions(source, spec.sink, spec.dead_letter, spec.group, client_id=client_id)
    await transactions.start()
    await source.start()
    return Transports(source, None, None, transactions)


def _sink(endpoint: Endpoint, carry: str, client_id: str) -> KafkaSink | KinesisSink:
    if endpoint.scheme == "kinesis":
        _need_boto3()
        from dhow.streaming.kinesis import KinesisSink

        return KinesisSink(endpoint, carry=carry)
    from dhow.streaming.kafka import KafkaSink

    return KafkaSink(endpoint, client_id=client_id)


def _need_boto3() -> None:
    if importlib.util.find_spec("boto3") is None:
        raise Unsupported("Kinesis streams need boto3: pip install 'dhow[kinesis]'")
