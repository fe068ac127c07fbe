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


def test_partitions_the_group_gives_during_a_paused_poll_are_not_read_until_resumed(broker: Broker) -> None:
    """The group's callback runs inside a poll, which then goes on waiting for records: a partition it gives while
    the source is paused must be paused before that poll can read it (not only from the next poll on)."""
    topic = "pause.during"
    broker.create_topics(topic, partitions=2)
    endpoint = parse_endpoint(broker.url(topic), "--source")

    async def scenario() -> list[Record]:
        first = KafkaSource(endpoint, "pause-during", client_id="first")
        second: KafkaSource | None = KafkaSource(endpoint, "pause-during", client_id="second")
        await first.start()
        try:
            await second.start()
            await _poll_until(
                {first: False, second: False},
                lambda _: len(first.assignment()) == 1 and len(second.assignment()) == 1,
                "one partition each",
            )
            await first.poll(100, 0.1, paused=True)  # its bound reached: its own partition paused, never the other
            broker.produce(topic, ((str(n).encode(), b"%d" % n, []) for n in range(40)))  # (on both partitions)
            await second.close()  # (before it read any: nothing of its partition is committed)
            second = None
            # the group revokes the first's partition and then gives it both: the revoke is served by polls that
            # return at once, so that the assignment that follows waits, unserved, for the poll below
            deadline = time.monotonic() + SAFETY_S
            while first.assignment():
                assert time.monotonic() < deadline, "never: the first's partition revoked"
                await first.poll(100, 0, paused=True)
                await asyncio.sleep(0.05)
            while not broker.group_stable("pause-during"):
                assert time.monotonic() < deadline, "never: the group's rebalance over"
                await asyncio.sleep(0.05)
            # far longer than this broker takes to answer a fetch of the partition given at the poll's start
            read = await first.poll(100, 2.0, paused=True)
            assert len(first.assignment()) == 2  # (the premise: the group gave both during that poll)
            assert [f"{r.position.partition}:{r.position.offset}" for r in read] == [], "read while paused"
            return await _poll_until({first: False}, lambda read: len(read) >= 40, "every record read")
        finally:
            if second is not None:
                await second.close()
            await first.close()

    read = asyncio.run(scenario())
    assert sorted(int(record.value) for record in read) == list(range(40))  # nothing lost, nothing read twice
    assert len({record.position.partition for record in read}) == 2  # (the premise: records on both partitions)
