"""A stream source's pause (its in-flight bound reached) against the group's rebalances, on a real broker: a
partition that was paused when the group took it away comes back paused (the client keeps the application's pause
with the partition), so the source says its current state again to every partition the group gives it."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Iterator

import pytest

from dhow.streaming.endpoints import parse_endpoint
from dhow.streaming.kafka import KafkaSource
from dhow.streaming.records import Record
from tests.kafka_broker import Broker, start_broker

#: a bound for a loaded machine (a rebalance of this broker takes some seconds), not a measure of speed
SAFETY_S = 90.0


@pytest.fixture(scope="module")
def broker() -> Iterator[Broker]:
    yield from start_broker()


async def _poll_until(
    sources: dict[KafkaSource, bool], condition: Callable[[list[Record]], bool], what: str
) -> list[Record]:
    """Poll each source (paused as given) until ``condition`` holds of the records the first one read meanwhile."""
    deadline = time.monotonic() + SAFETY_S
    read: list[Record] = []
    while not condition(read):
        assert time.monotonic() < deadline, f"never: {what}"
        for source, paused in sources.items():
            records = await source.poll(100, 0.1, paused=paused)
            source.done_batch(records)
            if source is next(iter(sources)):
                read += records
    return read


def test_a_partition_paused_when_the_group_took_it_is_read_again_once_it_is_back(broker: Broker) -> None:
    topic = "pause.back"
    broker.create_topics(topic, partitions=2)
    endpoint = parse_endpoint(broker.url(topic), "--source")

    async def scenario() -> list[Record]:
        first, second = KafkaSource(endpoint, "pause-back", client_id="first"), None
        await first.start()
        try:
            await _poll_until({first: False}, lambda _: len(first.assignment()) == 2, "both partitions assigned")
            await first.poll(100, 0.1, paused=True)  # its bound reached: both paused
            second = KafkaSource(endpoint, "pause-back", client_id="second")
            await second.start()
            await _poll_until(
                {first: True, second: False},
                lambda _: len(first.assignment()) == 1 and len(second.assignment()) == 1,
                "one partition each",
            )
            await first.poll(100, 0.1, paused=False)  # room again: it resumes the partition it has
            await second.close()
            second = None
            await _poll_until({first: False}, lambda _: len(first.assignment()) == 2, "both partitions back")
            broker.produce(topic, ((str(n).encode(), b"%d" % n, []) for n in range(40)))  # (on both partitions)
            return await _poll_until({first: False}, lambda read: len(read) >= 40, "every record read")
        finally:
            if second is not None:
                await second.close()
            await first.close()

    read = asyncio.run(scenario())
    assert sorted(int(record.value) for record in read) == list(range(40))
    assert len({record.position.partition for record in read}) == 2  # (the premise: records on both partitions)
