"""Which offsets of each partition may be committed: those below the first record that is not done.

Records of a partition finish out of order (batches run concurrently); the committed offset only ever moves to
just past the longest run of done records from the start, so a crash re-reads every record that had no
acknowledged reply (at-least-once) and no more than the records in flight.

The Kafka source hands it a poll's records of a partition as one entry, their last offset: they are done
together (a batch's replies are acknowledged together), so the bookkeeping is per poll, not per message.

Thread-safe: the Kafka client's rebalance callbacks run on its polling thread while replies finish on the
event loop's.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from dataclasses import dataclass, field

__all__ = ["OffsetTracker"]

#: a partition as the tracker keys it
Partition = tuple[str, int]


@dataclass(slots=True)
class _Partition:
    #: offsets handed out and not yet committable, in the order read (increasing)
    taken: deque[int] = field(default_factory=deque)
    done: set[int] = field(default_factory=set)
    #: the next offset to read from: what a commit records (None: nothing read since the last commit)
    ready: int | None = None


class OffsetTracker:
    def __init__(self) -> None:
        self._partitions: dict[Partition, _Partition] = {}
        self._lock = threading.Condition()

    def take(self, partition: Partition, offset: int) -> None:
        with self._lock:
            self._partitions.setdefault(partition, _Partition()).taken.append(offset)

    def done(self, partition: Partition, offset: int) -> None:
        """A record finished; one of a partition this consumer no longer holds is forgotten."""
        with self._lock:
            state = self._partitions.get(partition)
            if state is None:
                return
            state.done.add(offset)
            while state.taken and state.taken[0] in state.done:
                first = state.taken.popleft()
                state.done.discard(first)
                state.ready = first + 1
            self._lock.notify_all()

    def committable(self, partitions: list[Partition] | None = None) -> dict[Partition, int]:
        """The offsets to commit (past the done records) that moved since the last call, and forget them."""
        with self._lock:
            chosen = self._partitions if partitions is None else partitions
            found = {}
            for partition in chosen:
                state = self._partitions.get(partition)
                if state is not None and state.ready is not None:
                    found[partition], state.ready = state.ready, None
            return found

    def restore(self, offsets: dict[Partition, int]) -> None:
        """Offsets whose commit failed: committed with the next ones (unless a later one was found since)."""
        with self._lock:
            for partition, offset in offsets.items():
                state = self._partitions.get(partition)
                if state is not None and state.ready is None:
                    state.ready = offset

    def in_flight(self, partitions: list[Partition] | None = None) -> int:
        with self._lock:
            chosen = self._partitions.keys() if partitions is None else partitions
            return sum(len(self._partitions[p].taken) for p in chosen if p in self._partitions)

    def wait_drained(self, partitions: list[Partition], timeout_s: float) -> bool:
        """Wait until every record of ``partitions`` is done (a partition revoked finishes its work first)."""
        deadline = time.monotonic() + timeout_s
        with self._lock:
            while any(self._partitions[p].taken for p in partitions if p in self._partitions):
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._lock.wait(left)
            return True

    def forget(self, partitions: list[Partition]) -> None:
        with self._lock:
            for partition in partitions:
                self._partitions.pop(partition, None)
