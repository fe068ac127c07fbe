"""The stream door's vocabulary: a record read from a source, a message written to a sink, and the small
protocols a transport implements: ``Source`` and ``Sink`` (Kafka, Kinesis), ``Transactions`` (Kafka only).

Plain data only: the consumer never sees a broker client's objects, so it runs the same over any transport.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from dataclasses import dataclass
from typing import NamedTuple, Protocol

__all__ = ["DeliveryFailed", "Header", "Outgoing", "Position", "Record", "Sink", "Source", "Transactions"]

#: a message header as Kafka carries it: a name and raw bytes (None: a header with no value)
Header = tuple[str, bytes | None]


class DeliveryFailed(Exception):
    """The broker did not take a reply or a dead letter (after the client's own retries)."""


class Position(NamedTuple):
    """Where a record was read: topic (stream), partition (shard) and offset (sequence number). A tuple, not a
    frozen dataclass: one is made for every message read, and a tuple is made in a quarter of the time."""

    topic: str
    partition: int | str
    offset: int

    def __str__(self) -> str:
        return f"{self.topic}/{self.partition}@{self.offset}"


@dataclass(slots=True)
class Record:
    """One message as read from a source, with the bytes exactly as they came."""

    value: bytes
    key: bytes | None
    headers: list[Header]
    position: Position
    #: when the producer wrote it (milliseconds since the epoch; 0 when the source does not say)
    timestamp_ms: int = 0

    def header(self, name: str) -> bytes | None:
        """The last value of a header, its name compared without case (None when absent)."""
        lowered = name.lower()
        for key, value in reversed(self.headers):
            if key.lower() == lowered:
                return value
        return None


class Outgoing(NamedTuple):
    """A message for a sink: a reply or a dead letter. A tuple: a producer takes it as it is, (value, key,
    headers), with no copy into another shape per message."""

    value: bytes
    key: bytes | None
    headers: list[Header]


class Source(Protocol):
    """Records from partitions (shards), at least once: a record is committed only after ``done`` was called for
    it and for every record before it in its partition."""

    async def poll(self, max_records: int, timeout_s: float, *, paused: bool) -> list[Record]:
        """The next records, at most ``max_records``; ``paused``: fetch nothing new (backpressure), but keep the
        membership (group, leases) alive and hand over what was fetched already."""
        ...

    def done_batch(self, records: Sequence[Record]) -> None:
        """The records of one poll (all of them) are finished: their replies and dead letters were acknowledged."""
        ...

    async def commit(self, *, wait: bool = False) -> None:
        """Record the position up to which every record is done (``wait``: until the broker confirmed it)."""
        ...

    def lag(self) -> dict[str, int]:
        """Records behind the end of each assigned partition (``"topic/partition"``), as last measured."""
        ...

    def assignment(self) -> list[str]:
        """The partitions this consumer reads now (``"topic/partition"``)."""
        ...

    async def close(self) -> None: ...


class Sink(Protocol):
    """Writes messages to one destination (topic, stream) and says when the broker has them."""

    #: the destination, as written on the command line (for logs and status)
    url: str

    async def send_batch(self, messages: Sequence[Outgoing]) -> asyncio.Future[None]:
        """Queue the messages (waiting while the client's queue is full); the future is done when the broker
        acknowledged all of them, or fails (``DeliveryFailed``) with the reason one of them was refused."""
        ...

    async def close(self) -> None:
        """Deliver what is queued, then let go of the connection."""
        ...


class Transactions(Protocol):
    """Replies, dead letters and the source's offsets of a batch committed together (``--exactly-once``)."""

    url: str

    async def commit(self, records: Sequence[Record], replies: Sequence[Outgoing], letters: Sequence[Outgoing]) -> None:
        """All or nothing; on failure (``DeliveryFailed``) the source is rewound to read the batch again."""
        ...

    async def close(self) -> None: ...
