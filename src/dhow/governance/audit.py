"""The tamper-evident audit trail: admin actions, authorization denials and inference metadata, hash-chained.

Every record carries the hash of the one before it (``hash = sha256(prev_hash + canonical JSON of the record)``),
so ``AuditStore.verify`` finds a record that was edited, deleted or moved, and names it. A chain cannot tell on its
own that the newest records were cut off, that someone rewrote the whole tail and recomputed every hash after it,
or that someone with write access to the database appended forged records: ``verify`` prints the head (seq and
hash) so that operators can anchor it elsewhere (a ticket, a WORM bucket, another team's database) and later check
it with ``verify(expect_head=...)``.

``AuditTrail`` is the server's side: ``record`` only queues (the inference hot path), a task per store writes the
queue in batches from a worker thread, keeps a failed batch and retries it, and refuses new work once too much is
pending, so that nothing is served unaudited. Raw payloads never belong here; a masked sample may go in ``details``.
"""

from __future__ import annotations

import hashlib
import logging
import math
import operator
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import IO, Any

import orjson

from dhow.core.errors import InvalidInput
from dhow.registry.database import Database, Migration

__all__ = ["GENESIS_HASH", "MIGRATIONS", "AuditRecord", "AuditRow", "AuditStore", "VerifyReport"]

log = logging.getLogger("dhow.audit")

#: the prev_hash of the first record
GENESIS_HASH = "0" * 64
#: key of the PostgreSQL advisory lock that serialises appends ("dhowaudt" in ASCII)
PG_AUDIT_LOCK = 0x64686F7761756474
#: rows fetched at a time by verify and export (memory stays flat however long the trail is)
PAGE_ROWS = 5000
#: most rows one ``read`` answers
MAX_READ = 10_000
#: problems listed by ``verify``; the rest are counted
MAX_PROBLEMS = 50
#: seconds between retries of a failed write: doubles from the first to the last

_COLUMNS = "seq, at, kind, action, actor, tenant, model, version, outcome, latency_ms, request_id, region, details"
_NAMES = tuple(_COLUMNS.split(", "))
_FILTERS = frozenset({"actor", "model", "kind", "outcome", "tenant"})
_DETAILS_JSON = orjson.OPT_SORT_KEYS | orjson.OPT_NON_STR_KEYS | orjson.OPT_SERIALIZE_NUMPY


_TABLE = """CREATE TABLE dhow_audit (
    seq {seq} PRIMARY KEY, at TEXT NOT NULL, kind TEXT NOT NULL, action TEXT NOT NULL, actor TEXT NOT NULL,
    tenant TEXT NOT NULL, model TEXT NOT NULL, version TEXT NOT NULL, outcome TEXT NOT NULL, latency_ms {real},
    request_id TEXT NOT NULL, region TEXT NOT NULL, details TEXT NOT NULL, prev_hash TEXT NOT NULL, hash TEXT NOT NULL
)"""
_INDEXES = (
    "CREATE INDEX dhow_audit_by_actor ON dhow_audit (actor, seq)",
    "CREATE INDEX dhow_audit_by_model ON dhow_audit (model, seq)",
)
#: the schema, oldest first; append new entries, never edit applied ones
MIGRATIONS = [
    Migration(
        1,
        "the hash-chained audit trail",
        sqlite=(_TABLE.format(seq="INTEGER", real="REAL"), *_INDEXES),
        postgresql=(_TABLE.format(seq="BIGINT", real="DOUBLE PRECISION"), *_INDEXES),
    )
]


@dataclass(slots=True)
class AuditRecord:
    """One audited event: who did what to which model, when, and how it ended; never a raw payload."""

    kind: str  # "admin" | "inference" | "denial"
    action: str  # "infer", "model.load", "deployment.put", "key.revoke", ...
    actor: str  # the principal: "key:ci-bot", "jwt:alice@example.com", "cert:svc-a", "anonymous"
    tenant: str = "default"
    outcome: str = "success"  # or the error code, e.g. "PERMISSION_DENIED"
    model: str = ""
    version: str = ""
    request_id: str = ""
    region: str = ""  # the data region of the request; picks the store it goes to
    latency_ms: float | None = None
    details: Mapping[str, Any] = field(default_factory=dict)  # JSON-able: reasons, before/after, masked sample
    #: when, as UTC ISO 8601; "" = from ``at_s`` (formatted by the writer: a clock read costs the hot path less)
    at: str = ""
    at_s: float = field(default_factory=time.time)

    def when(self) -> str:
        return self.at or _iso_utc(self.at_s)

    def as_tuple(self) -> AuditRow:
        """The fields in order, as plain data (what crosses to a writer process)."""
        return (
            self.kind, self.action, self.actor, self.tenant, self.outcome, self.model, self.version,
            self.request_id, self.region, self.latency_ms, dict(self.details), self.at, self.at_s,
        )  # fmt: skip


#: a record's fields in ``AuditRecord``'s order, as ``AuditRecord.as_tuple`` gives them: what crosses to a writer
#: process, and what the inference path makes without building an ``AuditRecord`` (``AuditRecord(*row)`` is one)
AuditRow = tuple[Any, ...]


#: the last whole second formatted by ``_iso_utc`` (a batch's records mostly share their second)
_last_second: tuple[int, str] = (-1, "")


def _iso_utc(at_s: float) -> str:
    """``datetime.fromtimestamp(at_s, UTC).isoformat(timespec="microseconds")``, the date and time formatted once
    per second rather than once per record."""
    global _last_second
    fraction, whole = math.modf(at_s)  # rounded as datetime rounds it: the fraction, half to even
    micros, second = round(fraction * 1e6), int(whole)
    if micros >= 1_000_000:
        micros, second = micros - 1_000_000, second + 1
    elif micros < 0:
        micros, second = micros + 1_000_000, second - 1
    last = _last_second  # one read: writer threads of several stores may replace it meanwhile
    if second != last[0]:
        last = _last_second = (second, datetime.fromtimestamp(second, UTC).strftime("%Y-%m-%dT%H:%M:%S"))
    return f"{last[1]}.{micros:06d}+00:00"


def _text(value: object) -> str:
    """A string every database accepts: no NUL, no lone surrogate (either would block the queue forever)."""
    text = value if isinstance(value, str) else str(value)
    if text.isascii():
        return text.replace("\x00", "\ufffd")
    return text.replace("\x00", "\ufffd").encode("utf-8", "replace").decode("utf-8")


def _details(details: Mapping[str, Any]) -> str:
    if isinstance(details, dict) and not details:
        return "{}"
    try:
        return orjson.dumps(dict(details), default=str, option=_DETAILS_JSON).decode()
    except (TypeError, ValueError):  # keep the record rather than block the queue with it
        return orjson.dumps({"unencodable_details": _text(repr(details))[:2000]}).decode()


#: the texts of a stored record, in the order of their names sorted (the order of the hash's canonical JSON)
_TEXTS = operator.itemgetter(1, 2, 0, 5, 4, 8, 7, 3, 6)


def _content(row: Sequence[Any]) -> tuple[Any, ...]:
    """The stored fields of a record given as ``AuditRecord.as_tuple`` gives it (what crosses to the writer
    process), exactly as they will read back (the hash covers these): action, actor, at, details, kind,
    latency_ms, model, outcome, region, request_id, tenant, version (the names sorted, the order of the hash's
    canonical JSON; seq is ``_chain``'s), then the latency as it is in that JSON, or None when some text needs
    escaping there (``_chain`` then has orjson write it)."""
    latency = row[9]
    if latency is not None:
        # 3 decimals survive every float column; + 0.0 turns -0.0 into 0.0, which SQLite would do on reading
        latency = round(float(latency), 3) + 0.0
        latency = latency if math.isfinite(latency) else None
    texts: tuple[Any, ...] = _TEXTS(row)  # action, actor, kind, model, outcome, region, request_id, tenant, version
    at, details = row[11], row[10]
    details = "{}" if type(details) is dict and not details else _details(details)
    try:
        # a time formatted here and empty details are plain (below): the usual record checks its texts alone
        joined = "".join((*texts, at, details)) if at or details != "{}" else "".join(texts)
    except TypeError:  # not all strings: each is repaired below
        joined = "\x00"
    at = at or _iso_utc(row[12])
    # the usual record: printable ASCII without a quote or backslash, as its canonical JSON has it verbatim
    plain = joined.isascii() and joined.isprintable() and '"' not in joined and "\\" not in joined
    if not plain:  # (a given time too: one with a NUL or a lone surrogate would block the queue)
        texts, at = tuple(_text(text) for text in texts), _text(at)
    action, actor, kind, model, outcome, region, request_id, tenant, version = texts
    # orjson writes such a float as repr does (checked by the tests); 0.001 is the least after rounding
    json_latency = "null" if latency is None else repr(latency) if latency == 0 or 1e-3 <= latency < 1e16 else None
    return (action, actor, at, details, kind, latency, model, outcome, region, request_id, tenant, version,
            json_latency if plain else None)  # fmt: skip


def _digest(prev_hash: str, fields: Mapping[str, object]) -> str:
    """sha256 of the previous hash and the canonical JSON of every stored field (seq included)."""
    return hashlib.sha256(prev_hash.encode() + orjson.dumps(fields, option=orjson.OPT_SORT_KEYS)).hexdigest()


def _canonical(prev_hash: str, seq: int, content: Sequence[Any]) -> bytes:
    """What ``_digest`` hashes for ``_content``'s fields at ``seq``: written here when no text needs escaping (the
    JSON orjson would write, keys sorted, no spaces), else by orjson."""
    action, actor, at, details, kind, _latency, model, outcome, region, request_id, tenant, version, json_latency = (
        content
    )
    if json_latency is None:
        fields = dict(zip(_SORTED, content[:-1], strict=True), seq=seq)
        return prev_hash.encode() + orjson.dumps(fields, option=orjson.OPT_SORT_KEYS)
    return (
        f'{prev_hash}{{"action":"{action}","actor":"{actor}","at":"{at}","details":"{details}","kind":"{kind}",'
        f'"latency_ms":{json_latency},"model":"{model}","outcome":"{outcome}","region":"{region}",'
        f'"request_id":"{request_id}","seq":{seq},"tenant":"{tenant}","version":"{version}"}}'
    ).encode()


#: ``_content``'s field names, in its order
_SORTED = ("action", "actor", "at", "details", "kind", "latency_ms", "model", "outcome", "region", "request_id",
           "tenant", "version")  # fmt: skip
#: the values to insert (the columns of ``_COLUMNS``, prev_hash, hash) per record
_WIDTH = len(_NAMES) + 2


def _chain(contents: Sequence[Sequence[Any]], seq: int, prev_hash: str) -> list[object]:
    """The values to insert after record ``seq`` whose hash is ``prev_hash``, ``_WIDTH`` a record, one after the
    other: its columns (``_COLUMNS``), prev_hash, hash. ``contents`` are ``_content``'s."""
    values: list[object] = []
    sha256, canonical = hashlib.sha256, _canonical
    for content in contents:
        seq += 1
        digest = sha256(canonical(prev_hash, seq, content)).hexdigest()
        action, actor, at, details, kind, latency, model, outcome, region, request_id, tenant, version, _ = content
        values += (seq, at, kind, action, actor, tenant, model, version, outcome, latency, request_id, region, details,
                   prev_hash, digest)  # fmt: skip
        prev_hash = digest
    return values


#: rows a statement inserts at most (one statement per chunk: fewer steps than one per row), and its SQL
_CHUNK = 64
_INSERT = f"INSERT INTO dhow_audit ({_COLUMNS}, prev_hash, hash) VALUES "
_ONE_ROW = "(" + ", ".join("?" * _WIDTH) + ")"


def _chunks(count: int) -> Iterator[int]:
    """``count`` rows as chunks of ``_CHUNK`` rows, then of powers of two: a handful of statements, each prepared
    once (and fewer than 999 values in each, SQLite's oldest limit)."""
    while count:
        size = min(_CHUNK, 1 << (count.bit_length() - 1))
        yield size
        count -= size


@dataclass(frozen=True, slots=True)
class VerifyReport:
    """What ``verify`` found: the records read, the head to anchor elsewhere, and each problem by seq."""

    count: int
    head_seq: int
    head_hash: str
    problems: list[str]
    #: problems found beyond the ``MAX_PROBLEMS`` listed
    omitted: int = 0

    @property
    def ok(self) -> bool:
        return not self.problems and not self.omitted

    def describe(self) -> str:
        head = f"{self.count} records, head seq {self.head_seq} hash {self.head_hash}"
        if self.ok:
            return f"audit trail ok: {head}"
        total = len(self.problems) + self.omitted
        lines = [f"audit trail NOT ok: {total} problem{'s' if total != 1 else ''} in {head}"]
        lines += [f"  {problem}" for problem in self.problems]
        if self.omitted:
            lines.append(f"  ... and {self.omitted} more")
        return "\n".join(lines)


class _ChainCheck:
    """Walks the rows in seq order once, remembering only the previous record."""

    def __init__(self, expect_head: tuple[int, str] | None) -> None:
        self.count = self.last_seq = 0
        self.last_hash = GENESIS_HASH
        self.problems: list[str] = []
        self.omitted = 0
        self.expect = expect_head
        self.anchor_seen = False

    def _problem(self, text: str) -> None:
        if len(self.problems) < MAX_PROBLEMS:
            self.problems.append(text)
        else:
            self.omitted += 1

    def feed(self, row: Sequence[Any]) -> None:
        seq, prev_hash, stored_hash = int(row[0]), str(row[-2]), str(row[-1])
        in_place = self._check_place(seq)
        if _digest(prev_hash, dict(zip(_NAMES, row, strict=False))) != stored_hash:
            self._problem(f"record {seq} was edited: its content does not match its hash")
        elif in_place and prev_hash != self.last_hash:
            before = f"record {seq - 1}" if seq > 1 else "the start of the chain"
            self._problem(
                f"record {seq} does not follow {before}: records were reordered, or one before it was deleted "
                "or rewritten"
            )
        if self.expect is not None and seq == self.expect[0]:
            self.anchor_seen = True
            if stored_hash != self.expect[1]:
                self._problem(
                    f"the anchored record {seq} differs: its hash is now {stored_hash}, not {self.expect[1]}; "
                    "the trail up to it was rewritten"
                )
        self.count += 1
        self.last_seq, self.last_hash = seq, stored_hash

    def _check_place(self, seq: int) -> bool:
        """Whether the record comes right after the previous one; reports the gap if not."""
        expected = self.last_seq + 1
        if seq == expected + 1:
            self._problem(f"record {expected} is missing: deleted?")
        elif seq > expected:
            self._problem(f"records {expected} to {seq - 1} are missing: deleted?")
        elif seq < expected:
            self._problem(f"record {seq} should not exist: sequence numbers start at 1")
        return seq == expected

    def report(self) -> VerifyReport:
        if self.expect is not None and not self.anchor_seen:
            seq = self.expect[0]
            if seq > self.last_seq:
                self._problem(
                    f"the anchored record {seq} is gone: the trail ends at record {self.last_seq}, "
                    "so its newest records were truncated"
                )
            else:
                self._problem(f"the anchored record {seq} is gone: deleted")
        return VerifyReport(self.count, self.last_seq, self.last_hash, self.problems, self.omitted)


def _as_dict(row: Sequence[Any]) -> dict[str, Any]:
    record = dict(zip((*_NAMES, "prev_hash", "hash"), row, strict=True))
    record["seq"] = int(record["seq"])
    record["details"] = orjson.loads(record["details"])
    return record


class AuditStore(Database):
    """The audit trail in SQLite or PostgreSQL; several processes may append to one store at once."""

    migrations_table = "dhow_audit_migrations"

    @classmethod
    def open(cls, url: str) -> AuditStore:
        """Connects to ``sqlite:///path`` or ``postgresql://...`` and brings the schema up to date."""
        return cls._open(url, MIGRATIONS, "audit store")

    def append(self, records: Sequence[AuditRecord]) -> int:
        """Chains the records after the current head in one transaction; answers the last seq."""
        return self.append_rows([record.as_tuple() for record in records])

    def append_rows(self, rows: Sequence[Sequence[Any]]) -> int:
        """``append`` for records given as ``AuditRecord.as_tuple`` gives them (the audit writer process's)."""
        contents = [_content(row) for row in rows]
        with self._write(lock_key=PG_AUDIT_LOCK) as session:
            # under the lock (PostgreSQL) or BEGIN IMMEDIATE (SQLite) no other process moves the head meanwhile
            head = session.one("SELECT seq, hash FROM dhow_audit ORDER BY seq DESC LIMIT 1")
            seq, prev_hash = (int(head[0]), str(head[1])) if head else (0, GENESIS_HASH)
            values = _chain(contents, seq, prev_hash)
            start = 0
            for size in _chunks(len(contents)):
                end = start + size * _WIDTH
                session.execute(_INSERT + ", ".join((_ONE_ROW,) * size), values[start:end])
                start = end
        return seq + len(contents)

    def head(self) -> tuple[int, str]:
        """The newest record's seq and hash; ``(0, GENESIS_HASH)`` for an empty trail."""
        with self._read() as session:
            row = session.one("SELECT seq, hash FROM dhow_audit ORDER BY seq DESC LIMIT 1")
        return (int(row[0]), str(row[1])) if row else (0, GENESIS_HASH)

    def read(self, since_seq: int = 0, limit: int = 1000, **filters: str) -> list[dict[str, Any]]:
        """Records after ``since_seq``, oldest first, optionally only those of one actor, model, kind or outcome."""
        unknown = sorted(set(filters) - _FILTERS)
        if unknown:
            raise InvalidInput(f"cannot filter the audit trail by {unknown[0]!r}: use {', '.join(sorted(_FILTERS))}")
        if any(not isinstance(value, str) for value in filters.values()):
            raise InvalidInput("audit trail filters must be strings")
        if isinstance(limit, bool) or not isinstance(limit, int) or not 1 <= limit <= MAX_READ:
            raise InvalidInput(f"the limit must be an integer from 1 to {MAX_READ}, not {limit!r}")
        if isinstance(since_seq, bool) or not isinstance(since_seq, int) or since_seq < 0:
            raise InvalidInput(f"since_seq must be an integer >= 0 (a record's seq), not {since_seq!r}")
        where = "".join(f" AND {name} = ?" for name in sorted(filters))
        params = [filters[name] for name in sorted(filters)]
        with self._read() as session:
            rows = session.all(
                f"SELECT {_COLUMNS}, prev_hash, hash FROM dhow_audit WHERE seq > ?{where} ORDER BY seq LIMIT ?",
                (since_seq, *params, limit),
            )
        return [_as_dict(row) for row in rows]

    def _pages(self, since_seq: int) -> Iterator[list[tuple[Any, ...]]]:
        """Every row after ``since_seq`` in seq order, a page at a time; the lock is free between pages."""
        while True:
            with self._read() as session:
                rows = session.all(
                    f"SELECT {_COLUMNS}, prev_hash, hash FROM dhow_audit WHERE seq > ? ORDER BY seq LIMIT ?",
                    (since_seq, PAGE_ROWS),
                )
            if rows:
                yield rows
            if len(rows) < PAGE_ROWS:
                return
            since_seq = int(rows[-1][0])

    def verify(self, expect_head: tuple[int, str] | None = None) -> VerifyReport:
        """Checks the whole chain, page by page; ``expect_head`` is a (seq, hash) anchored earlier.

        The chain alone misses a truncated or wholly rehashed tail (see the module's docstring): anchor the head
        this reports somewhere else and pass it back as ``expect_head`` to catch those.
        """
        check = _ChainCheck(expect_head)
        for page in self._pages(0):
            for row in page:
                check.feed(row)
        return check.report()

    def export_jsonl(self, out: IO[str], since_seq: int = 0) -> int:
        """Writes the records after ``since_seq`` as JSON lines (hashes included); answers how many."""
        count = 0
        for page in self._pages(int(since_seq)):
            out.write("".join(orjson.dumps(_as_dict(row)).decode() + "\n" for row in page))
            count += len(page)
        return count
