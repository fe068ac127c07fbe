"""The audit trail's blocks beside the first schema's table: a trail written before the blocks goes on in them, and
the old release's way of writing is refused. On real databases: SQLite and PostgreSQL."""

from __future__ import annotations

import hashlib
import io
import math
from collections.abc import Callable, Iterator
from typing import Any

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dhow.core.errors import DhowError
from dhow.governance import audit as audit_module
from dhow.governance.audit import GENESIS_HASH, AuditRecord, AuditStore
from dhow.governance.audit_blocks import line_hash, line_hashes
from dhow.governance.audit_lines import plain_lines
from tests.conftest import store_opener
from tests.test_audit import _block, _records, _rewrite_block, _sql

_LEGACY_INSERT = (
    "INSERT INTO dhow_audit (seq, at, kind, action, actor, tenant, model, version, outcome, latency_ms, request_id, "
    "region, details, prev_hash, hash) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
)


@pytest.fixture
def open_store(database_url: str) -> Iterator[Callable[[], AuditStore]]:
    with store_opener(AuditStore.open, database_url) as opener:
        yield opener


def _legacy_trail(url: str, records: list[AuditRecord]) -> str:
    """A trail as the release before the blocks wrote it (schema version 1, a row a record); answers its head hash."""
    old = AuditStore._open(url, audit_module.MIGRATIONS[:1], "audit store")
    try:
        with old._write() as session:
            prev_hash = GENESIS_HASH
            for seq, record in enumerate(records, 1):
                content = audit_module._content(record.as_tuple())
                line = audit_module._record_json(seq, content)
                digest = hashlib.sha256(prev_hash.encode() + line).hexdigest()
                action, actor, at, details, kind, latency, model, outcome, region, request_id, tenant, version, _ = (
                    content
                )
                session.execute(
                    _LEGACY_INSERT,
                    (seq, at, kind, action, actor, tenant, model, version, outcome, latency, request_id, region,
                     details, prev_hash, digest),
                )  # fmt: skip
                prev_hash = digest
    finally:
        old.close()
    return prev_hash


def test_a_trail_of_the_first_schema_goes_on_in_blocks(database_url: str, open_store: Callable[[], AuditStore]) -> None:
    legacy_head = _legacy_trail(database_url, _records(5, "old"))
    store = open_store()  # the upgrade: schema version 2
    assert store.head() == (5, legacy_head)
    assert store.append(_records(3, "new")) == 8
    report = store.verify()
    assert report.ok and report.count == 8 and report.head_seq == 8
    rows = store.read()
    assert [row["seq"] for row in rows] == list(range(1, 9))
    assert rows[5]["prev_hash"] == legacy_head  # the chain goes on from the old table's last row
    assert [row["request_id"] for row in store.read(actor="key:new")] == ["new-0", "new-1", "new-2"]
    assert [row["request_id"] for row in store.read(since_seq=3, limit=3)] == ["old-3", "old-4", "new-0"]
    out = io.StringIO()
    assert store.export_jsonl(out) == 8
    exported = [orjson.loads(line) for line in out.getvalue().splitlines()]
    assert exported == rows
    # the same fields, in the same order, whichever table holds the record
    assert list(exported[0]) == list(exported[7])
    # an export still carries what an offline check needs, across the two tables
    prev_hash = GENESIS_HASH
    for row in exported:
        fields = {name: row[name] for name in row if name not in ("prev_hash", "hash")}
        fields["details"] = orjson.dumps(row["details"], option=orjson.OPT_SORT_KEYS).decode()
        assert row["prev_hash"] == prev_hash
        prev_hash = hashlib.sha256(prev_hash.encode() + orjson.dumps(fields, option=orjson.OPT_SORT_KEYS)).hexdigest()
        assert row["hash"] == prev_hash


def test_an_edited_row_of_the_first_schema_is_still_named(
    database_url: str, open_store: Callable[[], AuditStore]
) -> None:
    _legacy_trail(database_url, _records(5, "old"))
    store = open_store()
    store.append(_records(3, "new"))
    _sql(database_url, "UPDATE dhow_audit SET actor = 'key:mallory' WHERE seq = 4")
    assert store.verify().problems == ["record 4 was edited: its content does not match its hash"]
    _sql(database_url, "UPDATE dhow_audit SET actor = 'key:old' WHERE seq = 4")
    _sql(database_url, "DELETE FROM dhow_audit WHERE seq = 5")
    assert store.verify().problems == ["record 5 is missing: deleted?"]


def test_a_release_from_before_the_blocks_is_refused_a_row(
    database_url: str, open_store: Callable[[], AuditStore]
) -> None:
    """Its writer would start a second chain from the old table's head: it is told to upgrade (and keeps its
    records to retry)."""
    store = open_store()
    store.append(_records(2))
    with pytest.raises(Exception, match="a dhow release from before it cannot append to it; upgrade dhow"):
        _sql(database_url, _LEGACY_INSERT, (3, "", "inference", "infer", "key:x", "default", "m", "1", "success",
                                              None, "r", "", "{}", GENESIS_HASH, "0" * 64))  # fmt: skip
    assert store.verify().ok and store.head()[0] == 2


def test_read_finds_a_filters_records_through_the_blocks_keys(open_store: Callable[[], AuditStore]) -> None:
    store = open_store()
    store.append(_records(4, "a"))
    store.append(_records(4, "b"))
    store.append([AuditRecord("denial", "model.load", "key:a", outcome="PERMISSION_DENIED", model="churn", tenant="t")])
    store.append(_records(4, "a"))
    assert [row["seq"] for row in store.read(actor="key:a")] == [1, 2, 3, 4, 9, 10, 11, 12, 13]
    assert [row["seq"] for row in store.read(actor="key:a", kind="inference", limit=5)] == [1, 2, 3, 4, 10]
    assert [row["seq"] for row in store.read(actor="key:a", since_seq=2, limit=3)] == [3, 4, 9]
    assert [row["seq"] for row in store.read(tenant="t")] == [9]
    assert [row["seq"] for row in store.read(outcome="PERMISSION_DENIED", model="churn")] == [9]
    assert store.read(actor="key:b", model="churn") == []


def test_a_line_edited_into_no_record_is_named_and_exported_as_its_text(
    database_url: str, open_store: Callable[[], AuditStore]
) -> None:
    store = open_store()
    store.append(_records(4))
    lines, hashes = _block(database_url)
    lines[1] = "not a record"
    _rewrite_block(database_url, lines, hashes)
    assert store.verify().problems == [
        "record 2 was edited: its content does not match its hash (or record 1 was rewritten with its hash made again)"
    ]
    out = io.StringIO()
    assert store.export_jsonl(out) == 4
    second: dict[str, Any] = orjson.loads(out.getvalue().splitlines()[1])
    assert second == {"seq": 2, "unreadable": "not a record", "prev_hash": hashes[0], "hash": hashes[1]}


def test_an_empty_append_writes_no_block(database_url: str, open_store: Callable[[], AuditStore]) -> None:
    store = open_store()
    assert store.append([]) == 0
    assert _sql(database_url, "SELECT COUNT(*) FROM dhow_audit_blocks") == [(0,)]
    with pytest.raises(DhowError, match="cannot filter the audit trail by 'region'"):
        store.read(region="eu")


# -- the usual records, column by column -----------------------------------------------------------------

_PRINTABLE = st.text(alphabet=st.characters(min_codepoint=0x20, max_codepoint=0x7E), max_size=10)
_ROW = st.tuples(
    *[_PRINTABLE] * 9,
    st.floats(min_value=0, max_value=1e17)
    | st.integers(min_value=0, max_value=10**6)
    | st.sampled_from([4.9e-4, 5e-4, 0.001, 1e15 + 0.125, 9999999999999998.0, 1e16]),  # (the bounds orjson writes)
    st.just({}),
    st.just(""),
    st.floats(min_value=0, max_value=253_402_300_799)
    | st.sampled_from([0.5e-6, 1.5e-6, 0.9999995, 1796434089.9999999]),
)


@settings(max_examples=300, deadline=None)
@given(rows=st.lists(_ROW, min_size=1, max_size=6), seq=st.integers(min_value=0, max_value=2**53))
def test_usual_records_made_by_column_are_made_as_one_by_one(rows: list[tuple[Any, ...]], seq: int) -> None:
    """The writer's column path writes the bytes ``_record_json(_content(row))`` writes, or declines the batch."""
    made = plain_lines(rows, seq)
    expected = [audit_module._record_json(at, audit_module._content(row)) for at, row in enumerate(rows, seq + 1)]
    if made is None:  # a text with a quote or a backslash, a latency orjson writes: record by record
        assert any('"' in text or "\\" in text for row in rows for text in row[:9]) or any(
            not (round(float(row[9]), 3) == 0 or 1e-3 <= round(float(row[9]), 3) < 1e16) for row in rows
        )
        return
    assert made[0] == expected
    assert [list(column) for column in made[1]] == [[row[i] for row in rows] for i in (2, 0, 5, 4, 3)]


#: texts a batch's records share more often than not, ``%`` among them (a shared one goes into the batch's template)
_SHARED_TEXT = st.sampled_from(["infer", "key:a", "%s", "50%", "%%d", ""])
_SHARED_ROW = st.tuples(
    *[_SHARED_TEXT] * 7, st.sampled_from(["r1", "r%d"]), _SHARED_TEXT, st.sampled_from([0.8, 1.25, -1e-4]),
    st.just({}), st.just(""), st.sampled_from([1.7e9, 1.7e9 + 0.25, 1796434089.9999999]),
)  # fmt: skip


@settings(max_examples=200, deadline=None)
@given(rows=st.lists(_SHARED_ROW, min_size=1, max_size=6), seq=st.integers(min_value=0, max_value=2**53))
def test_texts_shared_by_a_batch_are_made_as_one_by_one(rows: list[tuple[Any, ...]], seq: int) -> None:
    """A column whose text every record of the batch shares is written once into the batch's template: its ``%``
    are the text's, not conversions."""
    made = plain_lines(rows, seq)
    assert made is not None
    expected = [audit_module._record_json(at, audit_module._content(row)) for at, row in enumerate(rows, seq + 1)]
    assert made[0] == expected


@settings(max_examples=50, deadline=None)
@given(lines=st.lists(st.binary(max_size=40), max_size=5), prev_hash=st.sampled_from([GENESIS_HASH, "ab" * 32]))
def test_a_batch_is_hashed_as_a_chain_of_its_lines(lines: list[bytes], prev_hash: str) -> None:
    """The writer hashes a batch in one loop: each record's hash as ``verify`` makes it from the one before."""
    expected, before = [], prev_hash
    for line in lines:
        before = line_hash(before, line)
        expected.append(before)
    assert line_hashes(lines, prev_hash) == expected


@pytest.mark.parametrize(
    "row_change",
    [
        {9: None},  # no latency: JSON's null
        {9: math.nan},
        {10: {"reason": "x"}},
        {11: "2026-01-02T03:04:05.678901+00:00"},
        {2: "key:é"},
        {2: "key:\x00"},
        {2: "key:\x7f"},  # DEL: ASCII, not printable
        {2: 7},
        {12: -1.5},
        {12: 10**400},  # past a float: a text, as _when writes it
        {12: 10**5000},  # past the digits an int's text may have: a placeholder text, not a refused record
        {9: 10**400},  # a latency past a float: none, as one record alone is written
    ],
)
def test_a_batch_with_an_unusual_record_goes_one_by_one(row_change: dict[int, Any]) -> None:
    usual = ("inference", "infer", "key:a", "default", "success", "m", "1", "r1", "", 1.5, {}, "", 1.7e9)
    unusual = tuple(row_change.get(at, value) for at, value in enumerate(usual))
    assert plain_lines([usual, usual], 0) is not None
    assert plain_lines([usual, unusual], 0) is None
    lines, _ = audit_module._lines([usual, unusual], 0)
    assert lines[1] == audit_module._record_json(2, audit_module._content(unusual))


# -- what read and export go by is verified too ------------------------------------------------------------


def _three_blocks(open_store: Callable[[], AuditStore]) -> AuditStore:
    store = open_store()
    for name in ("a", "b", "c"):
        store.append(_records(4, name))  # blocks from records 1, 5 and 9
    return store


@pytest.mark.parametrize(
    ("first_seq", "column", "value"),
    [
        (5, "last_seq", 5),  # read(since_seq=5) and export --since 5 would skip records 6 to 8
        (9, "hash", "f" * 64),  # head() would answer a forged hash, the next append would chain to it
        (5, "hashes", None),  # a hash too many
    ],
)
def test_a_blocks_edited_columns_are_named(
    database_url: str, open_store: Callable[[], AuditStore], first_seq: int, column: str, value: object
) -> None:
    """``read``, ``export_jsonl`` and ``head`` go by a block's first_seq, last_seq and hash columns: an edit of one
    that leaves every line and hash intact must still fail ``verify``, not only what relies on it."""
    store = _three_blocks(open_store)
    if value is None:
        _sql(database_url, f"UPDATE dhow_audit_blocks SET {column} = {column} || ? WHERE first_seq = ?",
             ("0" * 64, first_seq))  # fmt: skip
    else:
        _sql(database_url, f"UPDATE dhow_audit_blocks SET {column} = ? WHERE first_seq = ?", (value, first_seq))
    if column == "last_seq":
        assert [row["seq"] for row in store.read(since_seq=5)] == [9, 10, 11, 12]  # what the edit hides
    assert store.verify().problems == [
        f"the block from record {first_seq} was edited: its {column} does not match its records"
    ]


def test_a_deleted_key_of_a_block_is_named(database_url: str, open_store: Callable[[], AuditStore]) -> None:
    """``read``'s filters find a block by its keys: a key deleted hides its records from them, with every line and
    hash intact."""
    store = _three_blocks(open_store)
    _sql(database_url, "DELETE FROM dhow_audit_keys WHERE name = 'actor' AND value = 'key:b'")
    assert store.read(actor="key:b") == []  # what the deletion hides
    assert store.verify().problems == [
        "the block from record 5 lacks its key actor 'key:b' (dhow_audit_keys): read by actor skips its records"
    ]
    # an edited record is named as such, not again for a key it never had
    _sql(database_url, "INSERT INTO dhow_audit_keys (name, value, first_seq) VALUES ('actor', 'key:b', 5)")
    lines, hashes = _block(database_url, 5)
    lines[1] = orjson.dumps({**orjson.loads(lines[1]), "actor": "key:mallory"}, option=orjson.OPT_SORT_KEYS).decode()
    _rewrite_block(database_url, lines, hashes, 5)
    assert store.verify().problems == [
        "record 6 was edited: its content does not match its hash (or record 5 was rewritten with its hash made again)"
    ]


def test_a_long_value_is_keyed_by_its_start_and_read_by_the_whole(open_store: Callable[[], AuditStore]) -> None:
    """(An index entry has a limit: PostgreSQL's is ~2,700 bytes; a longer key would fail every append.)"""
    store = open_store()
    long_actor = "jwt:" + "é" * 3000
    almost = long_actor[:-1] + "e"  # the same first KEY_CHARS characters
    store.append([AuditRecord("inference", "infer", long_actor), AuditRecord("inference", "infer", almost)])
    assert [row["seq"] for row in store.read(actor=long_actor)] == [1]
    assert [row["seq"] for row in store.read(actor=almost)] == [2]
    assert store.verify().ok


def test_a_record_with_no_time_or_latency_that_makes_sense_is_still_written(
    open_store: Callable[[], AuditStore],
) -> None:
    """A record the writer could not write would hold every record after it in the queue: it is written as it can
    be (its time as text, no latency), and the records after it too."""
    store = open_store()
    odd = [
        AuditRecord("inference", "infer", "key:a", latency_ms="slow", at_s=math.inf),  # type: ignore[arg-type]
        AuditRecord("inference", "infer", "key:a", at_s=1e20),
        AuditRecord("inference", "infer", "key:a", at_s="soon"),  # type: ignore[arg-type]
        AuditRecord("inference", "infer", "key:a", latency_ms=2.5),
    ]
    assert store.append(odd) == 4
    rows = store.read()
    assert [row["at"] for row in rows[:3]] == ["inf", "1e+20", "'soon'"]
    assert rows[0]["latency_ms"] is None and rows[3]["latency_ms"] == 2.5
    assert store.verify().ok
