"""The tamper-evident audit trail: admin actions, authorization denials and inference metadata, hash-chained.

Every record carries the hash of the one before it (``hash = sha256(prev_hash + canonical JSON of the record)``),
so ``AuditStore.verify`` finds a record that was edited, deleted or moved, and names it. A chain cannot tell on its
own that the newest records were cut off, that someone rewrote the whole tail and recomputed every hash after it,
or that someone with write access to the database appended forged records: ``verify`` prints the head (seq and
hash) so that operators can anchor it elsewhere (a ticket, a WORM bucket, another team's database) and later check
it with ``verify(expect_head=...)``. The records are stored in blocks, a transaction's records to a row
(``audit_blocks.py``); a trail written before the blocks keeps its first records in a row each, and its chain goes
on in the blocks.

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
from typing import IO, Any

import orjson

from dhow.core.errors import InvalidInput
from dhow.core.model_config import DEFAULT_TENANT
from dhow.governance.audit_blocks import (
    BLOCK_MIGRATION,
    block_lines,
    encode_blocks,
    key_value,
    line_hashes,
    missing_keys,
)
from dhow.governance.audit_chain import GENESIS_HASH, ChainCheck, VerifyReport
from dhow.governance.audit_lines import plain_lines, second_text
from dhow.registry.database import Database, Migration, Session

__all__ = ["GENESIS_HASH", "MIGRATIONS", "AuditRecord", "AuditRow", "AuditStore", "VerifyReport"]

log = logging.getLogger("dhow.audit")

#: key of the PostgreSQL advisory lock that serialises appends ("dhowaudt" in ASCII)
PG_AUDIT_LOCK = 0x64686F7761756474
#: rows of the first schema's table, and blocks, fetched at a time by verify, export and read (memory stays flat
#: however long the trail is; a block holds up to ``audit_blocks.BLOCK_RECORDS`` records)
PAGE_ROWS = 5000
PAGE_BLOCKS = 8
#: most rows one ``read`` answers
MAX_READ = 10_000
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
    ),
    Migration(2, "the records in blocks (audit_blocks.py)", sqlite=BLOCK_MIGRATION[0], postgresql=BLOCK_MIGRATION[1]),
]


@dataclass(slots=True)
class AuditRecord:
    """One audited event: who did what to which model, when, and how it ended; never a raw payload."""

    kind: str  # "admin" | "inference" | "denial"
    action: str  # "infer", "model.load", "deployment.put", "key.revoke", ...
    actor: str  # the principal: "key:ci-bot", "jwt:alice@example.com", "cert:svc-a", "anonymous"
    tenant: str = DEFAULT_TENANT
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
        last = _last_second = (second, second_text(second))
    return f"{last[1]}.{micros:06d}+00:00"


def _when(at_s: object) -> str:
    """``_iso_utc``, or the time's own text when it is not one (not a number, or past the calendar's years): a
    record that cannot be written would hold every record after it in the writer's queue."""
    try:
        return _iso_utc(float(at_s))  # type: ignore[arg-type]
    except (TypeError, ValueError, OverflowError, OSError):
        try:
            return _text(repr(at_s))
        except ValueError:  # (an int past Python's 4,300 digits has no text)
            return f"<{type(at_s).__name__} too long to write>"


def _text(value: object) -> str:
    """A record's text as it is stored: a string kept as it is, a NUL included (its line, canonical JSON, holds it as
    ``\\u0000``, and a block's key escapes it: ``audit_blocks.key_value``), save a lone surrogate, which no UTF-8 and
    no JSON that orjson reads can hold: it is written as its Python escape, the six characters ``\\ud800``, so that
    the record says what came (a filter given such a text is looked up the same way: ``read``). Anything else, as its
    ``str``."""
    text = value if isinstance(value, str) else str(value)
    if text.isascii():
        return text
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return text.encode("utf-8", "backslashreplace").decode("utf-8")
    return text


def _details(details: Mapping[str, Any]) -> str:
    if isinstance(details, dict) and not details:
        return "{}"
    try:
        try:
            return orjson.dumps(dict(details), default=_str, option=_DETAILS_JSON).decode()
        except TypeError:  # a lone surrogate, an integer past 64 bits: written as they can be, the rest as it is
            return orjson.dumps(writable(dict(details)), default=_str, option=_DETAILS_JSON).decode()
    except (TypeError, ValueError, RecursionError):  # keep the record rather than block the queue with it
        return orjson.dumps({"unencodable_details": _text(repr(details))[:2000]}).decode()


def _str(value: object) -> str:
    return _text(str(value))


def writable(value: Any) -> Any:
    """``value`` (details, a record's row) with what JSON cannot hold made text: a lone surrogate (in a key too) as
    ``_text`` writes it, an integer past 64 bits as its digits; anything else as it is."""
    if isinstance(value, str):
        return _text(value)
    if isinstance(value, int) and not isinstance(value, bool) and not -(2**63) <= value < 2**64:
        return str(value)
    if isinstance(value, Mapping):
        return {_text(key) if isinstance(key, str) else key: writable(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [writable(item) for item in value]
    return value


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
        try:  # 3 decimals survive every float column; + 0.0 turns -0.0 into 0.0, which SQLite would do on reading
            latency = round(float(latency), 3) + 0.0
        except (TypeError, ValueError, OverflowError):  # not a number (or past floats): kept as none, not held
            latency = None
        latency = latency if latency is not None and math.isfinite(latency) else None
    texts: tuple[Any, ...] = _TEXTS(row)  # action, actor, kind, model, outcome, region, request_id, tenant, version
    at, details = row[11], row[10]
    details = "{}" if type(details) is dict and not details else _details(details)
    try:
        # a time formatted here and empty details are plain (below): the usual record checks its texts alone
        joined = "".join((*texts, at, details)) if at or details != "{}" else "".join(texts)
    except TypeError:  # not all strings: each is repaired below
        joined = "\x00"
    at = at or _when(row[12])
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
    """sha256 of the previous hash and the canonical JSON of every stored field (seq included): how a record of the
    first schema's table (a column a field) is checked."""
    return hashlib.sha256(prev_hash.encode() + orjson.dumps(fields, option=orjson.OPT_SORT_KEYS)).hexdigest()


def _record_json(seq: int, content: Sequence[Any]) -> bytes:
    """The canonical JSON of ``_content``'s fields at ``seq`` (the JSON orjson writes of them, keys sorted, no
    spaces): what the record's hash covers after the previous hash, and what a block stores as the record's line.
    Written here when no text needs escaping, else by orjson."""
    action, actor, at, details, kind, _latency, model, outcome, region, request_id, tenant, version, json_latency = (
        content
    )
    if json_latency is None:
        fields = dict(zip(_SORTED, content[:-1], strict=True), seq=seq)
        return orjson.dumps(fields, option=orjson.OPT_SORT_KEYS)
    return (
        f'{{"action":"{action}","actor":"{actor}","at":"{at}","details":"{details}","kind":"{kind}",'
        f'"latency_ms":{json_latency},"model":"{model}","outcome":"{outcome}","region":"{region}",'
        f'"request_id":"{request_id}","seq":{seq},"tenant":"{tenant}","version":"{version}"}}'
    ).encode()


#: ``_content``'s field names, in its order
_SORTED = ("action", "actor", "at", "details", "kind", "latency_ms", "model", "outcome", "region", "request_id",
           "tenant", "version")  # fmt: skip


#: the fields of ``_content`` that a block's keys hold: actor, kind, model, outcome, tenant
_KEYED = operator.itemgetter(1, 4, 6, 7, 10)


def _lines(rows: Sequence[Sequence[Any]], seq: int) -> tuple[list[bytes], Sequence[Sequence[str]]]:
    """The lines (``_record_json``) of rows that follow record ``seq``, and their actor, kind, model, outcome and
    tenant columns: column by column for a batch of usual records (``audit_lines.py``), else record by record."""
    made = plain_lines(rows, seq)
    if made is not None:
        return made
    contents = [_content(row) for row in rows]
    lines = [_record_json(at, content) for at, content in enumerate(contents, seq + 1)]
    return lines, list(zip(*map(_KEYED, contents), strict=True)) if contents else [[], [], [], [], []]


def _as_dict(row: Sequence[Any]) -> dict[str, Any]:
    """A record of the first schema's table as ``read`` and ``export_jsonl`` give it."""
    record = dict(zip((*_NAMES, "prev_hash", "hash"), row, strict=True))
    record["seq"] = int(record["seq"])
    record["details"] = orjson.loads(record["details"])
    return record


def _line_dict(line: bytes, placed: int, prev_hash: str, stored_hash: str) -> dict[str, Any]:
    """A record of a block as ``read`` and ``export_jsonl`` give it (as ``_as_dict`` gives one of the first table);
    a line that is not a record (edited by hand: ``verify`` names it) as its text, at the seq its place gives."""
    try:
        fields = orjson.loads(line)
        record = {name: fields[name] for name in _NAMES}
        record["details"] = orjson.loads(record["details"])
    except (orjson.JSONDecodeError, KeyError, TypeError):
        record = {"seq": placed, "unreadable": line.decode("utf-8", "replace")}
    record["prev_hash"], record["hash"] = prev_hash, stored_hash
    return record


#: the newest record of each table
_BLOCKS_HEAD = "SELECT last_seq, hash FROM dhow_audit_blocks ORDER BY first_seq DESC LIMIT 1"
_ROWS_HEAD = "SELECT seq, hash FROM dhow_audit ORDER BY seq DESC LIMIT 1"
_INSERT_BLOCK = "INSERT INTO dhow_audit_blocks (first_seq, last_seq, prev_hash, hash, hashes, records) " \
    "VALUES (?, ?, ?, ?, ?, ?)"  # fmt: skip
_INSERT_KEY = "INSERT INTO dhow_audit_keys (name, value, first_seq) VALUES (?, ?, ?)"


#: the columns of a block that ``read`` and ``export_jsonl`` use, and those ``verify`` checks
_READ = "first_seq, prev_hash, hashes, records"
_VERIFIED = f"{_READ}, last_seq, hash"


def _more(row: Sequence[Any]) -> tuple[Any, ...]:
    """``verify``'s columns of a block (last_seq, hash) as numbers and text, whichever database read them."""
    return (int(row[0]), str(row[1])) if row else ()


def _head(session: Session) -> tuple[int, str]:
    """The newest record's seq and hash: the last block's, else (a store not written since its blocks began) the
    first table's last row's."""
    row = session.one(_BLOCKS_HEAD) or session.one(_ROWS_HEAD)
    return (int(row[0]), str(row[1])) if row else (0, GENESIS_HASH)


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
        with self._write(lock_key=PG_AUDIT_LOCK) as session:
            # under the lock (PostgreSQL) or BEGIN IMMEDIATE (SQLite) no other process moves the head meanwhile
            seq, prev_hash = _head(session)
            lines, keyed = _lines(rows, seq)
            hashes = line_hashes(lines, prev_hash)
            blocks, keys = encode_blocks(lines, hashes, keyed, seq, prev_hash)
            for block in blocks:
                session.execute(_INSERT_BLOCK, block)
            if keys:
                session.executemany(_INSERT_KEY, keys)
        return seq + len(lines)

    def head(self) -> tuple[int, str]:
        """The newest record's seq and hash; ``(0, GENESIS_HASH)`` for an empty trail."""
        with self._read() as session:
            return _head(session)

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
        filters = {name: _text(value) for name, value in filters.items()}  # as a record's texts are stored
        where = "".join(f" AND {name} = ?" for name in sorted(filters))
        params = [filters[name] for name in sorted(filters)]
        rows: list[tuple[Any, ...]] = []
        if not any("\x00" in value for value in params):  # (the first table holds no NUL: PostgreSQL's cannot)
            with self._read() as session:
                rows = session.all(
                    f"SELECT {_COLUMNS}, prev_hash, hash FROM dhow_audit WHERE seq > ?{where} ORDER BY seq LIMIT ?",
                    (since_seq, *params, limit),
                )
        records = [_as_dict(row) for row in rows]
        if len(records) < limit:
            records += self._read_blocks(since_seq, limit - len(records), filters)
        return records

    def _read_blocks(self, since_seq: int, limit: int, filters: Mapping[str, str]) -> list[dict[str, Any]]:
        """``read`` in the blocks: those holding a record of each filter's value (``dhow_audit_keys``), then their
        records that match."""
        names = sorted(filters)
        # a block's keys name each value it holds: one subquery a filter
        where = "".join(
            " AND first_seq IN (SELECT first_seq FROM dhow_audit_keys WHERE name = ? AND value = ?)" for _ in names
        )
        params = [part for name in names for part in (name, key_value(filters[name]))]
        found: list[dict[str, Any]] = []
        for page in self._block_pages(since_seq, where, params):
            for first_seq, prev_hash, hashes, records in page:
                for seq, placed, before, stored, line in block_lines(first_seq, prev_hash, hashes, records):
                    if seq <= since_seq:
                        continue
                    record = _line_dict(line, placed, before, stored)
                    if all(record.get(name) == filters[name] for name in names):
                        found.append(record)
                        if len(found) == limit:
                            return found
        return found

    def _pages(self, since_seq: int) -> Iterator[list[tuple[Any, ...]]]:
        """Every row of the first schema's table after ``since_seq`` in seq order, a page at a time; the lock is
        free between pages."""
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

    def _block_pages(
        self, since_seq: int, where: str = "", params: Sequence[object] = (), columns: str = _READ
    ) -> Iterator[list[tuple[Any, ...]]]:
        """Every block holding a record after ``since_seq`` (and meeting ``where``), in order, a page at a time:
        (first_seq, prev_hash, hashes, records), then ``verify``'s last_seq and hash. Paged by first_seq (its key),
        which only grows: a block whose last_seq was edited is read once, never again and again."""
        after = -1
        while True:
            with self._read() as session:
                blocks = session.all(
                    f"SELECT {columns} FROM dhow_audit_blocks "
                    f"WHERE last_seq > ? AND first_seq > ?{where} ORDER BY first_seq LIMIT ?",
                    (since_seq, after, *params, PAGE_BLOCKS),
                )
            if blocks:
                yield [(int(row[0]), str(row[1]), str(row[2]), str(row[3]), *_more(row[4:])) for row in blocks]
            if len(blocks) < PAGE_BLOCKS:
                return
            after = int(blocks[-1][0])

    def verify(self, expect_head: tuple[int, str] | None = None) -> VerifyReport:
        """Checks the whole chain, page by page; ``expect_head`` is a (seq, hash) anchored earlier.

        The chain alone misses a truncated or wholly rehashed tail (see the module's docstring): anchor the head
        this reports somewhere else and pass it back as ``expect_head`` to catch those.
        """
        check = ChainCheck(expect_head)
        for page in self._pages(0):
            for row in page:  # a record of the first schema's table: its columns, prev_hash, hash
                prev_hash, stored_hash = str(row[-2]), str(row[-1])
                digest = _digest(prev_hash, dict(zip(_NAMES, row, strict=False)))
                check.check(int(row[0]), prev_hash, stored_hash, digest)
        for blocks in self._block_pages(0, columns=_VERIFIED):
            intact = {int(block[0]): check.feed_block(*block) for block in blocks}
            with self._read() as session:
                missing = missing_keys(session, intact)
            for first_seq, name, value in missing:
                check.missing_key(first_seq, name, value)
        return check.report()

    def export_jsonl(self, out: IO[str], since_seq: int = 0) -> int:
        """Writes the records after ``since_seq`` as JSON lines (hashes included); answers how many."""
        count = 0
        since_seq = int(since_seq)
        for page in self._pages(since_seq):
            out.write("".join(orjson.dumps(_as_dict(row)).decode() + "\n" for row in page))
            count += len(page)
        for blocks in self._block_pages(since_seq):
            lines = [
                orjson.dumps(_line_dict(line, placed, before, stored)).decode() + "\n"
                for block in blocks
                for seq, placed, before, stored, line in block_lines(*block)
                if seq > since_seq
            ]
            out.write("".join(lines))
            count += len(lines)
        return count
