"""Which shards of a Kinesis stream this member reads: leases in the registry's database, split fairly, parents
before children.

Every ``renew_s`` a member says it is alive (``heartbeat``), renews its leases, and counts the members: each
should hold about ``ceil(open shards / members)``. One that holds fewer takes free or expired leases; one that
holds more lets the extra ones go once their records are answered and checkpointed (a newcomer gets its share
without waiting for anyone to die). A shard is readable when every parent it came from (a split or a merge) was
read to its end and checkpointed as finished: a key's records are then answered in the order they were written
across a reshard.

The store is the ``CheckpointStore`` of the registry (``ShardStore`` here, so that this package needs no more
of the registry than these calls).
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Protocol

__all__ = ["LeaseDecision", "ShardInfo", "ShardStore", "ShardStoreOpener", "decide"]

log = logging.getLogger("dhow.streaming")


class StoredShard(Protocol):
    @property
    def shard(self) -> str: ...
    @property
    def sequence(self) -> str: ...
    @property
    def finished(self) -> bool: ...
    @property
    def owner(self) -> str: ...
    @property
    def lease_until(self) -> float: ...


class ShardStore(Protocol):
    """The calls of ``dhow.registry.checkpoints.CheckpointStore`` a Kinesis source makes (from one thread)."""

    def heartbeat(self, group: str, stream: str, owner: str, now: float, until: float) -> int: ...

    def shards(self, group: str, stream: str, names: list[str]) -> Mapping[str, StoredShard]: ...

    def renew(self, group: str, stream: str, owner: str, until: float) -> set[str]: ...

    def take(self, group: str, stream: str, shard: str, owner: str, until: float, seen: tuple[str, float]) -> bool: ...

    def checkpoint(
        self, group: str, stream: str, shard: str, owner: str, sequence: str | None, *, finished: bool = False,
        release: bool = False,
    ) -> bool: ...  # fmt: skip

    def leave(self, group: str, stream: str, owner: str) -> None: ...

    def close(self) -> None: ...


#: how a process opens its store (the registry's URL is the process's business, not the stream's)
ShardStoreOpener = Callable[[], ShardStore]


@dataclass(frozen=True, slots=True)
class ShardInfo:
    """A shard as the stream lists it."""

    shard: str
    parents: tuple[str, ...]
    #: the last sequence number of a closed shard (a reshard's parent); None while it is open
    ending: int | None


@dataclass(slots=True)
class LeaseDecision:
    #: shards taken now: read from their checkpoint (the stored sequence; '' = from the oldest record)
    taken: dict[str, str]
    #: shards held beyond this member's share: to let go once answered
    extra: list[str]
    #: shards this member believed it held and no longer does (their records are read again by the new owner)
    lost: list[str]


def decide(
    store: ShardStore, group: str, stream: str, owner: str, listed: list[ShardInfo], held: set[str], lease_s: float
) -> LeaseDecision:
    """One round of the lease protocol (see the module's docstring)."""
    now = time.time()
    until = now + lease_s
    members = store.heartbeat(group, stream, owner, now, until)
    rows = store.shards(group, stream, [info.shard for info in listed])
    still = store.renew(group, stream, owner, until)
    lost = sorted(held - still)
    finished = {name for name, row in rows.items() if row.finished}
    ready = [
        info for info in listed
        if info.shard not in finished and all(p in finished or p not in rows for p in info.parents)
    ]  # fmt: skip
    share = math.ceil(len(ready) / max(members, 1))
    mine = [info.shard for info in ready if info.shard in still]
    taken: dict[str, str] = {}
    for info in ready:
        if len(mine) + len(taken) >= share:
            break
        row = rows.get(info.shard)
        if row is None or row.owner == owner or (row.owner and row.lease_until >= now):
            continue
        if store.take(group, stream, info.shard, owner, until, (row.owner, row.lease_until)):
            taken[info.shard] = row.sequence
            if row.owner:
                log.info("stream source %s: took over shard %s from %s (lease expired)", stream, info.shard, row.owner)
    extra = mine[share:] if len(mine) > share else []
    return LeaseDecision(taken, extra, lost)
