"""The source and sinks of a stream, by the scheme of each endpoint (``kafka://``, ``kinesis://``), connected.

Each transport's client library is imported only when a stream uses it (``confluent-kafka`` for Kafka,
``boto3`` for Kinesis: ``pip install 'dhow[kafka]'`` or ``'dhow[kinesis]'``).
"""

from __future__ import annotations

import importlib.util
from typing import TYPE_CHECKING

from dhow.core.errors import InvalidInput, Unsupported
from dhow.streaming.carry import DEAD_LETTER
from dhow.streaming.endpoints import Endpoint
from dhow.streaming.records import Sink, Source
from dhow.streaming.shards import ShardStoreOpener
from dhow.streaming.spec import StreamSpec

if TYPE_CHECKING:
    from dhow.streaming.kafka import KafkaSink
    from dhow.streaming.kinesis import KinesisSink

__all__ = ["open_transports"]


async def open_transports(
    spec: StreamSpec, client_id: str, shard_stores: ShardStoreOpener | None
) -> tuple[Source, Sink, Sink | None]:
    """The stream's source, replies and dead letters, started (brokers answer, topics and streams exist)."""
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
        return kinesis, replies, dead_letters
    from dhow.streaming.kafka import KafkaSource

    kafka = KafkaSource(spec.source, spec.group, client_id=client_id)
    await kafka.start()
    return kafka, replies, dead_letters


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
