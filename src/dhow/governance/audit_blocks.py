"""How the audit trail stores its records: in blocks, one row of a table per transaction's records.

A record's hash is what it always was (``sha256(prev_hash + the canonical JSON of its stored fields)``, see
``audit.py``), and that canonical JSON is what a block stores: the records of a block are its lines (orjson writes no
newline byte), their hashes one string of 64 hex digits each, in order. Verifying a record hashes its line as it is,
read back byte for byte, so nothing is parsed and written again to check it; reading one parses its line.

Why blocks and not a row per record, as the first schema had (``dhow_audit``, still read, no longer written to): a
row per record cost the writer process more than the rest of its work together: thirteen values bound a record, and
three B-trees changed (the table, an index by actor, one by model). A block is one row, and the filters ``read``
offers (actor, model, kind, outcome, tenant) find their blocks through ``dhow_audit_keys``, a row for each distinct
value a block holds (a handful a block, not two index entries a record); ``read`` then picks the records inside.

A store in blocks refuses rows in ``dhow_audit`` (a trigger): a server of a release before the blocks, writing there
beside one that writes blocks, would start a second chain from the old head; it is told to upgrade instead, and its
writer keeps its records and retries (none is lost).
"""

from __future__ import annotations

import hashlib
import itertools
from collections.abc import Iterable, Iterator, Mapping, Sequence

import orjson

from dhow.registry.database import Session

__all__ = [
    "BLOCK_MIGRATION",
    "BLOCK_RECORDS",
    "HASH_DIGITS",
    "KEY_CHARS",
    "block_lines",
    "encode_blocks",
    "key_value",
    "line_hash",
    "line_hashes",
    "missing_keys",
    "seq_of",
]

#: the most records one block holds (a bigger transaction writes several): a page of blocks stays a few MB
BLOCK_RECORDS = 1024
#: the length of a hash in hex digits
HASH_DIGITS = 64

_REFUSAL = (
    "this audit store keeps its records in blocks (dhow_audit_blocks) since its schema version 2: "
    "a dhow release from before it cannot append to it; upgrade dhow"
)
_BLOCKS = """CREATE TABLE dhow_audit_blocks (
    first_seq {seq} PRIMARY KEY, last_seq {seq} NOT NULL, prev_hash TEXT NOT NULL, hash TEXT NOT NULL,
    hashes TEXT NOT NULL, records TEXT NOT NULL
)"""
_KEYS = "CREATE TABLE dhow_audit_keys (name TEXT NOT NULL, value TEXT NOT NULL, first_seq {seq} NOT NULL, " \
    "PRIMARY KEY (name, value, first_seq)){rowid}"  # fmt: skip
#: schema version 2 of the audit store (``audit.MIGRATIONS``): SQLite's statements, then PostgreSQL's
BLOCK_MIGRATION = (
    (
        _BLOCKS.format(seq="INTEGER"),
        _KEYS.format(seq="INTEGER", rowid=" WITHOUT ROWID"),
        f"CREATE TRIGGER dhow_audit_in_blocks BEFORE INSERT ON dhow_audit BEGIN SELECT RAISE(ABORT, '{_REFUSAL}'); END",
    ),
    (
        _BLOCKS.format(seq="BIGINT"),
        _KEYS.format(seq="BIGINT", rowid=""),
        "CREATE FUNCTION dhow_audit_in_blocks() RETURNS trigger LANGUAGE plpgsql AS "
        f"$body$ BEGIN RAISE EXCEPTION '{_REFUSAL}'; END $body$",
        "CREATE TRIGGER dhow_audit_in_blocks BEFORE INSERT ON dhow_audit FOR EACH ROW "
        "EXECUTE FUNCTION dhow_audit_in_blocks()",
    ),
)

#: the fields ``read`` filters by (``encode_blocks``'s columns)
_KEYED = ("actor", "kind", "model", "outcome", "tenant")
#: the characters of a value a key holds: a longer one is cut (``read`` checks each record's whole value anyway),
#: since an index entry has a limit (PostgreSQL's ~2,700 bytes: a longer value would fail every append and
#: hold the trail's queue; a character is at most 4 bytes)
KEY_CHARS = 256


def key_value(value: str) -> str:
    """What a key holds of a value (and what a filter looks it up by): its first ``KEY_CHARS`` characters, a NUL
    among them written ``\\u0000`` as JSON writes it (PostgreSQL's text cannot hold a NUL: such a key failed every
    append, and held the trail's queue; SQLite's keys are written the same way, so that one store's trail reads as
    the other's). A key needs not be exact: ``read`` checks each record's whole value."""
    value = value[:KEY_CHARS]
    return value.replace("\x00", "\\u0000") if "\x00" in value else value


def encode_blocks(
    lines: Sequence[bytes], hashes: Sequence[str], keyed: Sequence[Sequence[str]], seq: int, prev_hash: str
) -> tuple[list[tuple[int, int, str, str, str, str]], list[tuple[str, str, int]]]:
    """The rows of ``dhow_audit_blocks`` (first_seq, last_seq, prev_hash, hash, hashes, records) for records chained
    after record ``seq`` whose hash is ``prev_hash``, and those of ``dhow_audit_keys`` (name, value, first_seq).

    ``lines``: each record's canonical JSON (what its hash covers after ``prev_hash``), ``hashes`` theirs,
    ``keyed`` their actor, kind, model, outcome and tenant, a column each."""
    blocks: list[tuple[int, int, str, str, str, str]] = []
    keys: list[tuple[str, str, int]] = []
    for start in range(0, len(lines), BLOCK_RECORDS):
        end = min(start + BLOCK_RECORDS, len(lines))
        first = seq + start + 1
        before = prev_hash if start == 0 else hashes[start - 1]
        records = b"\n".join(lines[start:end]).decode()
        blocks.append((first, seq + end, before, hashes[end - 1], "".join(hashes[start:end]), records))
        for name, column in zip(_KEYED, keyed, strict=True):
            values = set(column[start:end])
            if any(len(value) > KEY_CHARS or "\x00" in value for value in values):
                values = set(map(key_value, values))
            keys += zip(itertools.repeat(name), values, itertools.repeat(first))
    return blocks, keys


def seq_of(line: bytes) -> int | None:
    """The seq a record's line names (None: it names none, so it was edited): its ``"seq"`` key, the only place
    ``,"seq":`` can stand (in a string a quote is escaped)."""
    at = line.find(b',"seq":')
    if at < 0:
        return None
    end = line.find(b",", at + 7)
    digits = line[at + 7 : end if end >= 0 else len(line)]
    return int(digits) if digits.isdigit() else None


def block_lines(
    first_seq: int, prev_hash: str, hashes: str, records: str
) -> Iterator[tuple[int, int, str, str, bytes]]:
    """Each record of a block: (its seq: the one its line names, else the one its place gives; the seq its place
    gives; its prev_hash; its stored hash; its line). A block whose hashes do not match its lines in number yields
    its lines with the hashes it has (``""`` past them): each such record then fails its check."""
    lines = records.encode().split(b"\n") if records else []
    before = prev_hash
    for index, line in enumerate(lines):
        stored = hashes[index * HASH_DIGITS : (index + 1) * HASH_DIGITS]
        named, placed = seq_of(line), first_seq + index
        yield placed if named is None else named, placed, before, stored, line
        before = stored


def line_hash(prev_hash: str, line: bytes) -> str:
    """A record's hash from its line (its canonical JSON) and the hash before it."""
    return hashlib.sha256(prev_hash.encode() + line).hexdigest()


def line_hashes(lines: Sequence[bytes], prev_hash: str) -> list[str]:
    """The hashes of records whose lines follow a record whose hash is ``prev_hash``: ``line_hash`` of each, chained
    (written out: the writer process hashes every record, and a call a record cost it ~40% more)."""
    hashes: list[str] = []
    add, sha256, before = hashes.append, hashlib.sha256, prev_hash.encode()
    for line in lines:
        digest = sha256(before + line).hexdigest()
        add(digest)
        before = digest.encode()
    return hashes


#: values looked up in one statement by ``missing_keys`` (well under any database's limit on parameters)
_KEYS_AT_ONCE = 500


def missing_keys(session: Session, lines: Mapping[int, Iterable[bytes]]) -> list[tuple[int, str, str]]:
    """The keys that blocks' records need and ``dhow_audit_keys`` lacks, as (first_seq, name, value): ``read``'s
    filters find a block by them, so a deleted key hides its records from a filter while every hash still matches.
    ``lines``: each block's intact records (by first_seq). Looked up by the table's key (name, value, first_seq),
    not by scanning it."""
    needed: set[tuple[int, str, str]] = set()
    for first_seq, records in lines.items():
        for line in records:
            fields = orjson.loads(line)
            needed.update(
                (first_seq, name, key_value(value)) for name in _KEYED if isinstance(value := fields.get(name), str)
            )
    found: set[tuple[int, str, str]] = set()
    firsts = sorted(lines)
    for name in _KEYED:
        values = sorted({value for _, named, value in needed if named == name})
        for start in range(0, len(values), _KEYS_AT_ONCE):
            chunk = values[start : start + _KEYS_AT_ONCE]
            values_in, firsts_in = ", ".join("?" * len(chunk)), ", ".join("?" * len(firsts))
            rows = session.all(
                "SELECT value, first_seq FROM dhow_audit_keys "
                f"WHERE name = ? AND value IN ({values_in}) AND first_seq IN ({firsts_in})",
                (name, *chunk, *firsts),
            )
            found.update((int(first_seq), name, str(value)) for value, first_seq in rows)
    return sorted(needed - found)
