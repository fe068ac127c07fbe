"""Stream checkpoints and shard leases in the registry's database (SQLite or PostgreSQL).

A Kinesis stream has no consumer groups of its own: where each group stands in each shard, and which member
reads it, are kept here, so that a restarted consumer, or a second one sharing the registry, continues where the
last one stopped. One row per (group, stream, shard): the checkpoint (the sequence number up to which every record
is answered, '' before the first), whether the shard was read to its end (a closed parent of a reshard), and its
lease (the owning member, and until when: a member renews its leases, and a lease not renewed may be taken).
One row per (group, stream, member) says which members are alive, so that they split the shards between them.

Every change is a compare-and-set on the owner (and the lease's expiry when taking one over): two members never
both believe they hold a shard past a renewal.
"""

from __future__ import annotations

import builtins
from dataclasses import dataclass
from typing import Any

from dhow.registry.database import Database, Migration, utc_now

__all__ = ["MIGRATIONS", "CheckpointStore", "ShardRow"]


def _tables(real: str) -> tuple[str, ...]:
    return (
        f"""CREATE TABLE dhow_stream_shards (
            consumer_group TEXT NOT NULL,
            stream TEXT NOT NULL,
            shard TEXT NOT NULL,
            sequence TEXT NOT NULL,
            finished INTEGER NOT NULL,
            owner TEXT NOT NULL,
            lease_until {real} NOT NULL,
            updated_at TEXT NOT NULL,
            PRIMARY KEY (consumer_group, stream, shard)
        )""",
        f"""CREATE TABLE dhow_stream_members (
            consumer_group TEXT NOT NULL,
            stream TEXT NOT NULL,
            owner TEXT NOT NULL,
            alive_until {real} NOT NULL,
            PRIMARY KEY (consumer_group, stream, owner)
        )""",
    )


MIGRATIONS = [
    Migration(1, "stream shard checkpoints, leases and members", _tables("REAL"), _tables("DOUBLE PRECISION"))
]

_KEY = "consumer_group = ? AND stream = ?"


@dataclass(frozen=True, slots=True)
class ShardRow:
    shard: str
    #: the sequence number up to which every record is answered ('' when none is)
    sequence: str
    finished: bool
    owner: str
    lease_until: float


class CheckpointStore(Database):
    """Checkpoints, leases and members of stream consumer groups; safe to call from several threads."""

    migrations_table = "dhow_stream_migrations"

    @classmethod
    def open(cls, url: str) -> CheckpointStore:
        return cls._open(url, MIGRATIONS, "checkpoint store")

    def heartbeat(self, group: str, stream: str, owner: str, now: float, until: float) -> int:
        """Say that ``owner`` is alive until ``until``; the number of members alive at ``now`` (itself included)."""
        with self._write() as session:
            changed = session.execute(
                f"UPDATE dhow_stream_members SET alive_until = ? WHERE {_KEY} AND owner = ?",
                (until, group, stream, owner),
            )
            if not changed:
                session.execute(
                    "INSERT INTO dhow_stream_members (consumer_group, stream, owner, alive_until) VALUES (?, ?, ?, ?)",
                    (group, stream, owner, until),
                )
            session.execute(f"DELETE FROM dhow_stream_members WHERE {_KEY} AND alive_until < ?", (group, stream, now))
            row = session.one(f"SELECT COUNT(*) FROM dhow_stream_members WHERE {_KEY}", (group, stream))
        return int(row[0]) if row else 1

    def shards(self, group: str, stream: str, names: builtins.list[str]) -> dict[str, ShardRow]:
        """The rows of the shards ``names`` (made for those seen the first time), and of any others known."""
        with self._write() as session:
            known = {
                row[0] for row in session.all(f"SELECT shard FROM dhow_stream_shards WHERE {_KEY}", (group, stream))
            }
            fresh = [(group, stream, name, "", 0, "", 0.0, utc_now()) for name in names if name not in known]
            if fresh:
                session.executemany(
                    "INSERT INTO dhow_stream_shards (consumer_group, stream, shard, sequence, finished, owner, "
                    "lease_until, updated_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                    fresh,
                )
            rows = session.all(
                f"SELECT shard, sequence, finished, owner, lease_until FROM dhow_stream_shards WHERE {_KEY}",
                (group, stream),
            )
        return {row[0]: _row(row) for row in rows}

    def renew(self, group: str, stream: str, owner: str, until: float) -> set[str]:
        """Extend ``owner``'s leases; the shards it still holds."""
        with self._write() as session:
            session.execute(
                f"UPDATE dhow_stream_shards SET lease_until = ? WHERE {_KEY} AND owner = ?",
                (until, group, stream, owner),
            )
            rows = session.all(
                f"SELECT shard FROM dhow_stream_shards WHERE {_KEY} AND owner = ?", (group, stream, owner)
            )
        return {row[0] for row in rows}

    def take(self, group: str, stream: str, shard: str, owner: str, until: float, seen: tuple[str, float]) -> bool:
        """Take the lease of a shard as it was ``seen`` (its owner and lease then: free or expired); False when
        another member was quicker."""
        with self._write() as session:
            return (
                session.execute(
                    f"UPDATE dhow_stream_shards SET owner = ?, lease_until = ?, updated_at = ? WHERE {_KEY} "
                    "AND shard = ? AND owner = ? AND lease_until = ? AND finished = 0",
                    (owner, until, utc_now(), group, stream, shard, *seen),
                )
                == 1
            )

    def checkpoint(
        self, group: str, stream: str, shard: str, owner: str, sequence: str | None, *, finished: bool = False,
        release: bool = False,
    ) -> bool:  # fmt: skip
        """Record how far ``shard`` is answered (``sequence``; None: unchanged), whether it was read to its end, and
        let its lease go (``release``, implied by ``finished``); False when ``owner`` no longer holds it."""
        sets, params = ["updated_at = ?"], [utc_now()]
        if sequence is not None:
            sets.append("sequence = ?")
            params.append(sequence)
        if finished:
            sets.append("finished = 1")
        if finished or release:
            sets.append("owner = '', lease_until = 0")
        with self._write() as session:
            return (
                session.execute(
                    f"UPDATE dhow_stream_shards SET {', '.join(sets)} WHERE {_KEY} AND shard = ? AND owner = ?",
                    (*params, group, stream, shard, owner),
                )
                == 1
            )

    def leave(self, group: str, stream: str, owner: str) -> None:
        """``owner`` stops: its leases are free at once and it is no longer a member."""
        with self._write() as session:
            session.execute(
                f"UPDATE dhow_stream_shards SET owner = '', lease_until = 0 WHERE {_KEY} AND owner = ?",
                (group, stream, owner),
            )
            session.execute(f"DELETE FROM dhow_stream_members WHERE {_KEY} AND owner = ?", (group, stream, owner))

    def read(self, group: str, stream: str) -> builtins.list[ShardRow]:
        """Every shard's row of a group's stream, by shard."""
        with self._read() as session:
            rows = session.all(
                f"SELECT shard, sequence, finished, owner, lease_until FROM dhow_stream_shards WHERE {_KEY} "
                "ORDER BY shard",
                (group, stream),
            )
        return [_row(row) for row in rows]


def _row(row: tuple[Any, ...]) -> ShardRow:
    return ShardRow(str(row[0]), str(row[1]), bool(row[2]), str(row[3]), float(row[4]))
