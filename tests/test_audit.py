"""The audit trail on real databases: SQLite in a temporary folder and PostgreSQL in a fresh database."""

from __future__ import annotations

import argparse
import asyncio
import fcntl
import hashlib
import io
import itertools
import logging
import math
import os
import signal
import socket
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import orjson
import psycopg
import pytest
import uvloop
from hypothesis import given, settings
from hypothesis import strategies as st

from dhow.access.actions import ACTIONS
from dhow.access.authenticator import Authenticator, Credentials
from dhow.access.permissions import ALL_TENANTS, Grant, Principal
from dhow.access.ratelimit import LocalRateLimiter
from dhow.commands.audit import add_parser, run
from dhow.core.errors import DhowError, ErrorCode, InvalidInput, Unavailable
from dhow.core.frames import PIPE_BYTES
from dhow.governance import audit as audit_module
from dhow.governance.audit import GENESIS_HASH, AuditRecord, AuditStore
from dhow.governance.audit_blocks import BLOCK_RECORDS, line_hashes, seq_of
from dhow.governance.audit_chain import MAX_PROBLEMS
from dhow.governance.audit_trail import AuditTrail
from dhow.governance.masking import Masker, parse_masking
from dhow.governance.writer_process import SOCKET_BYTES, WriterProcess
from dhow.serving.guard import AccessGuard, Admission
from dhow.settings import resolve_settings
from tests.conftest import PG_ADMIN_URL, store_opener

#: the sources, for a child process that runs the audit trail
SRC = str(Path(__file__).resolve().parents[1] / "src")
FIELDS = ("at", "kind", "action", "actor", "tenant", "model", "version", "outcome", "latency_ms", "request_id")


@pytest.fixture
def audit_url(database_url: str) -> str:
    return database_url


@pytest.fixture
def open_store(audit_url: str) -> Iterator[Callable[[], AuditStore]]:
    with store_opener(AuditStore.open, audit_url) as opener:
        yield opener


@pytest.fixture
def store(open_store: Callable[[], AuditStore]) -> AuditStore:
    return open_store()


def _sql(url: str, statement: str, params: Sequence[object] = ()) -> list[tuple[Any, ...]]:
    """Runs plain SQL on the database behind the store's back, as someone tampering with it would."""
    if url.startswith("sqlite://"):
        with sqlite3.connect(url[len("sqlite://") :]) as conn:
            return conn.execute(statement, params).fetchall()
    with psycopg.connect(url, autocommit=True) as pg:
        cursor = pg.execute(statement.replace("?", "%s"), params)
        return cursor.fetchall() if cursor.description else []


def _records(count: int, prefix: str = "r", region: str = "") -> list[AuditRecord]:
    return [
        AuditRecord(
            kind="inference",
            action="infer",
            actor=f"key:{prefix}",
            model="fraud",
            version="2",
            request_id=f"{prefix}-{i}",
            region=region,
            latency_ms=1.25 + i,
            details={"sample": {"amount": "***"}, "i": i},
        )
        for i in range(count)
    ]


def _request_ids(store: AuditStore) -> list[str]:
    return [row["request_id"] for row in store.read(limit=10_000)]


def _expected_hash(prev_hash: str, row: dict[str, Any]) -> str:
    """The hash as the task defines it, computed here independently of the module."""
    fields = {name: row[name] for name in (*FIELDS, "seq", "region")}
    fields["details"] = orjson.dumps(row["details"], option=orjson.OPT_SORT_KEYS).decode()
    return hashlib.sha256(prev_hash.encode() + orjson.dumps(fields, option=orjson.OPT_SORT_KEYS)).hexdigest()


# -- the chain -----------------------------------------------------------------------------------------


def test_appended_batches_form_one_verified_chain(store: AuditStore) -> None:
    assert store.head() == (0, GENESIS_HASH)
    assert store.verify().ok and store.verify().count == 0
    assert store.append(_records(1, "a")) == 1
    assert store.append(_records(10, "b")) == 11
    assert store.append(_records(25, "c")) == 36
    rows = store.read(limit=100)
    assert [row["seq"] for row in rows] == list(range(1, 37))
    assert rows[0]["prev_hash"] == GENESIS_HASH
    for before, row in zip([None, *rows], rows, strict=False):
        prev_hash = GENESIS_HASH if before is None else before["hash"]
        assert row["prev_hash"] == prev_hash
        assert row["hash"] == _expected_hash(prev_hash, row)
    assert store.head() == (36, rows[-1]["hash"])
    report = store.verify()
    assert report.ok and report.problems == [] and report.count == 36
    assert (report.head_seq, report.head_hash) == store.head()
    assert report.describe() == f"audit trail ok: 36 records, head 36:{rows[-1]['hash']}"


def test_stored_values_read_back_as_recorded(store: AuditStore) -> None:
    record = AuditRecord(
        kind="admin",
        action="key.revoke",
        actor="jwt:alice@example.com",
        tenant="acme",
        outcome="success",
        request_id="req-1",
        region="ae",
        latency_ms=12.34567,
        details={"reason": "rotated", "before": {"state": "active"}, "z": [1, 2.5]},
    )
    store.append([record])
    (row,) = store.read()
    assert row["latency_ms"] == 12.346  # stored rounded to 3 decimals
    assert row["details"] == {"reason": "rotated", "before": {"state": "active"}, "z": [1, 2.5]}
    assert {name: row[name] for name in ("kind", "action", "actor", "tenant", "region", "at")} == {
        "kind": "admin",
        "action": "key.revoke",
        "actor": "jwt:alice@example.com",
        "tenant": "acme",
        "region": "ae",
        "at": record.when(),
    }
    assert datetime.fromisoformat(row["at"]).tzinfo == UTC


def test_odd_values_are_kept_and_still_verify(store: AuditStore) -> None:
    odd = [
        AuditRecord("inference", "infer", "key:\x00nul", latency_ms=math.nan, details={"when": datetime.now(UTC)}),
        AuditRecord("inference", "infer", "key:\ud800lone", latency_ms=-0.0, details={1: {2, 3}}),  # type: ignore[dict-item]
        AuditRecord("inference", "infer", "anonymous", latency_ms=7.0, details={"huge": 10**40}),
        AuditRecord("denial", "infer", "anonymous", outcome="PERMISSION_DENIED", latency_ms=1e-9),
    ]
    assert store.append(odd) == 4
    rows = store.read()
    assert rows[0]["actor"] == "key:\x00nul" and rows[0]["latency_ms"] is None
    assert rows[1]["actor"] == "key:\\ud800lone"  # the six characters of its escape
    assert isinstance(rows[0]["details"]["when"], str)
    assert rows[1]["details"]["1"] in ("{2, 3}", "{3, 2}")
    assert rows[2]["details"] == {"huge": str(10**40)}
    assert rows[3]["latency_ms"] == 0.0
    assert store.verify().ok


_NUL = "jwt:al\x00ice"


def test_a_nul_or_a_lone_surrogate_is_kept_and_found_by_read_s_filters(audit_url: str, store: AuditStore) -> None:
    """A JWT's claims (sub, tenant), a key's name, a request id may hold a NUL or a lone surrogate: PostgreSQL's text
    holds no NUL, orjson writes no lone surrogate. Each is written as it came (the surrogate as its escape), a key of
    its block escapes the NUL, and ``read``'s filters find exactly its records, on both stores."""
    odd = [
        AuditRecord("inference", "infer", _NUL, tenant="t\x00", model="m\x00", request_id="r\x00"),
        AuditRecord("inference", "infer", "jwt:alice", tenant="t", model="m", request_id="plain"),
        AuditRecord("denial", "infer", "jwt:\udc80", tenant="t\ud800", outcome="DENIED\x00", details={"e": "\ud800"}),
        AuditRecord("inference", "infer", "jwt:al\\u0000ice", request_id="escaped"),  # its key is _NUL's
    ]
    assert store.append(odd) == 4
    assert store.read(actor=_NUL)[0]["request_id"] == "r\x00" and len(store.read(actor=_NUL)) == 1
    assert [row["request_id"] for row in store.read(tenant="t\x00", model="m\x00")] == ["r\x00"]
    assert [row["request_id"] for row in store.read(actor="jwt:al\\u0000ice")] == ["escaped"]
    denial = store.read(actor="jwt:\udc80")  # a filter given the surrogate finds it as it was stored
    assert len(denial) == 1 and denial[0]["tenant"] == "t\\ud800" and denial[0]["details"] == {"e": "\\ud800"}
    assert store.read(outcome="DENIED\x00") == denial
    assert ("actor", "jwt:al\\u0000ice") in _sql(audit_url, "SELECT name, value FROM dhow_audit_keys")
    assert store.verify().ok
    out = io.StringIO()
    store.export_jsonl(out)
    assert orjson.loads(out.getvalue().splitlines()[0])["actor"] == _NUL


def test_a_field_that_is_not_a_string_is_stored_as_its_text(store: AuditStore) -> None:
    record = AuditRecord("inference", "infer", "anonymous", model="m", version=3)  # type: ignore[arg-type]
    store.append([record])
    assert store.read()[0]["version"] == "3" and store.verify().ok


_PLAIN_TEXT = st.text(alphabet=st.characters(min_codepoint=0x20, max_codepoint=0x7E), max_size=12)
_ANY_TEXT = st.one_of(
    _PLAIN_TEXT, st.text(max_size=12), st.sampled_from(["", '"', "\\", "\x00", "\x7f", "é", "\ud800"])
)
_DETAILS = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | _ANY_TEXT,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(_ANY_TEXT, inner, max_size=3),
    max_leaves=6,
)


@settings(max_examples=400, deadline=None)
@given(
    texts=st.lists(st.one_of(_PLAIN_TEXT, _ANY_TEXT), min_size=9, max_size=9),
    latency=st.none() | st.floats() | st.sampled_from([0.0, -0.0, 1e-3, 4.9e-4, 5e-4, 1e15, 1e16 - 2, 1e16, -1.5]),
    details=st.one_of(st.just({}), st.dictionaries(_ANY_TEXT, _DETAILS, max_size=3)),
    at=st.one_of(st.just(""), _ANY_TEXT),
    at_s=st.floats(min_value=-1e10, max_value=1e10),
    seq=st.integers(min_value=0, max_value=2**53),
)
def test_the_hashed_json_is_the_canonical_json_of_the_stored_fields(
    texts: list[str], latency: float | None, details: dict[str, Any], at: str, at_s: float, seq: int
) -> None:
    """The chain writes a plain record's JSON itself: it must hash what ``verify`` hashes (orjson, keys sorted)."""
    kind, action, actor, tenant, outcome, model, version, request_id, region = texts
    row = (kind, action, actor, tenant, outcome, model, version, request_id, region, latency, details, at, at_s)
    content = audit_module._content(row)
    line = audit_module._record_json(seq + 1, content)
    (digest,) = line_hashes([line], "ab" * 32)
    stored = orjson.loads(line)  # the record as a block stores it
    assert stored["seq"] == seq + 1
    assert line == orjson.dumps(stored, option=orjson.OPT_SORT_KEYS)  # what an offline check of an export hashes
    assert digest == audit_module._digest("ab" * 32, stored)  # ... and how a row of the first schema is checked
    assert audit_module._lines([row], seq)[0] == [line]  # whichever way the writer makes it


def test_the_hash_of_a_record_is_the_one_every_earlier_writer_gave_it(store: AuditStore) -> None:
    """The chain's hash is a stored fact: trails written by earlier releases must still verify, and a faster writer
    must write the same hashes (a plain record, whose JSON the writer writes itself; one that orjson writes; one
    whose latency orjson writes)."""
    store.append(
        [
            AuditRecord("inference", "infer", "key:ci#k1", "default", "success", "m", "1", "5f3a9c0100000001", "",
                        1.2345, {}, "2026-01-02T03:04:05.678901+00:00"),
            AuditRecord("denial", "infer", 'key:"q"é', "t", "PERMISSION_DENIED", "m", "", "r2", "eu", None,
                        {"reason": "no"}, "2026-01-02T03:04:05.678902+00:00"),
            AuditRecord("inference", "infer", "key:ci#k1", "default", "success", "m", "1", "r3", "", 1e17, {}, "",
                        1767323045.5),
        ]
    )  # fmt: skip
    assert [row["hash"] for row in store.read()] == [
        "e79d542b2973af615eea2fbd2c8c33bc57489351ca2926e4764d834a42ae5e8b",
        "72872714476b6cc104c9d36773b3ab0aae420aa63f96ea960659e6d251e8f929",
        "ec93f061a83299a7580396237bb7b6fc1f12854220c330ca7c74e117b49120fb",
    ]


def test_the_usual_inference_record_takes_the_written_json() -> None:
    """(Else the property above would test orjson against itself.)"""
    row = ("inference", "infer", "key:ci", "default", "success", "m", "1", "5f3a9c0100000001", "", 1.2345, {}, "", 1e9)
    assert audit_module._content(row)[-1] == "1.234"
    assert audit_module._content((*row[:10], {"reason": "x"}, *row[11:]))[-1] is None  # quotes: orjson writes it


@pytest.mark.parametrize(
    "at_s",
    [0.0, 1e-7, 0.5e-6, 1.5e-6, 2.5e-6, 0.9999995, 0.99999951, -0.5e-6, -1.0, -1e9 - 0.25e-6, 1796434089.5168486,
     1796434089.4976895, 1796434089.0517945, 1796434089.9999999, 4102444800.0000005],
)  # fmt: skip
def test_the_time_of_a_record_reads_as_datetime_writes_it(at_s: float) -> None:
    """Formatted once per second and rounded as datetime rounds (half a microsecond to even, on the fraction)."""
    expected = datetime.fromtimestamp(at_s, UTC).isoformat(timespec="microseconds")
    assert AuditRecord("inference", "infer", "anonymous", at_s=at_s).when() == expected
    assert AuditRecord("inference", "infer", "anonymous", at_s=at_s + 1.0).when() != expected


def _block(url: str, first_seq: int = 1) -> tuple[list[str], list[str]]:
    """A block's lines and hashes, read behind the store's back."""
    ((hashes, records),) = _sql(url, "SELECT hashes, records FROM dhow_audit_blocks WHERE first_seq = ?", (first_seq,))
    return records.split("\n"), [hashes[at : at + 64] for at in range(0, len(hashes), 64)]


def _rewrite_block(url: str, lines: list[str], hashes: list[str], first_seq: int = 1) -> None:
    """Writes a block's lines and hashes back, as someone tampering with the database would (its head too, and its
    last_seq the one its last line names, as ``verify`` checks it)."""
    last = seq_of(lines[-1].encode()) or first_seq + len(lines) - 1
    _sql(
        url,
        "UPDATE dhow_audit_blocks SET records = ?, hashes = ?, last_seq = ?, hash = ? WHERE first_seq = ?",
        ("\n".join(lines), "".join(hashes), last, hashes[-1], first_seq),
    )


def _edited(line: str, **fields: object) -> str:
    record = orjson.loads(line)
    record.update(fields)
    return orjson.dumps(record, option=orjson.OPT_SORT_KEYS).decode()


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("actor", "key:mallory"),
        ("outcome", "INTERNAL"),
        ("at", "2020-01-01T00:00:00.000000+00:00"),
        ("latency_ms", 0.5),
        ("details", '{"i":7}'),
        ("region", "eu"),
        ("hash", "f" * 64),
    ],
)
def test_an_edited_field_is_named(audit_url: str, store: AuditStore, field: str, value: object) -> None:
    store.append(_records(12))
    lines, hashes = _block(audit_url)
    if field == "hash":
        hashes[7] = str(value)
    else:
        lines[7] = _edited(lines[7], **{field: value})
    _rewrite_block(audit_url, lines, hashes)
    report = store.verify()
    assert not report.ok
    assert report.problems[0] == (
        "record 8 was edited: its content does not match its hash (or record 7 was rewritten with its hash made again)"
    )
    # record 9 is intact, but follows the hash record 8 had: an edited hash also breaks the link
    assert report.problems[1:] == (
        ["record 9 does not follow record 8: records were reordered, or one before it was deleted or rewritten"]
        if field == "hash"
        else []
    )
    assert report.count == 12


def test_the_first_record_of_a_block_edited_is_named(audit_url: str, store: AuditStore) -> None:
    store.append(_records(3))
    store.append(_records(3, "s"))
    lines, hashes = _block(audit_url, 4)
    _rewrite_block(audit_url, [_edited(lines[0], actor="key:mallory"), *lines[1:]], hashes, 4)
    assert store.verify().problems == ["record 4 was edited: its content does not match its hash"]


def test_a_deleted_record_is_named(audit_url: str, store: AuditStore) -> None:
    store.append(_records(12))
    lines, hashes = _block(audit_url)
    _rewrite_block(audit_url, lines[:6] + lines[7:], hashes[:6] + hashes[7:])
    assert store.verify().problems == ["record 7 is missing: deleted?"]
    lines, hashes = _block(audit_url)
    _rewrite_block(audit_url, lines[:2] + lines[5:], hashes[:2] + hashes[5:])
    report = store.verify()
    assert report.problems == ["records 3 to 5 are missing: deleted?", "record 7 is missing: deleted?"]
    assert report.count == 8 and report.head_seq == 12


def test_a_deleted_block_is_named(audit_url: str, store: AuditStore) -> None:
    for _ in range(3):
        store.append(_records(4))
    _sql(audit_url, "DELETE FROM dhow_audit_blocks WHERE first_seq = 5")
    report = store.verify()
    assert report.problems == ["records 5 to 8 are missing: deleted?"] and report.count == 8


def test_swapped_records_are_named(audit_url: str, store: AuditStore) -> None:
    store.append(_records(10))
    lines, hashes = _block(audit_url)
    lines[4], lines[5], hashes[4], hashes[5] = lines[5], lines[4], hashes[5], hashes[4]
    _rewrite_block(audit_url, lines, hashes)
    assert store.verify().problems == [
        "record 5 is missing: deleted?",
        "record 5 is out of place: it comes after record 6",
        "record 7 was edited: its content does not match its hash (or record 6 was rewritten with its hash made again)",
    ]


def test_a_rewritten_record_with_its_own_hash_recomputed_is_caught_at_the_next(
    audit_url: str, store: AuditStore
) -> None:
    store.append(_records(12))
    lines, hashes = _block(audit_url)
    lines[7] = _edited(lines[7], actor="key:mallory")
    hashes[7] = hashlib.sha256(hashes[6].encode() + lines[7].encode()).hexdigest()
    _rewrite_block(audit_url, lines, hashes)
    assert store.verify().problems == [
        "record 9 was edited: its content does not match its hash (or record 8 was rewritten with its hash made again)",
        # (the forger did not add a key for the actor it wrote: a hint at which of the two was rewritten)
        "the block from record 1 lacks its key actor 'key:mallory' (dhow_audit_keys): read by actor skips its records",
    ]


def test_an_anchored_head_that_was_truncated_away_is_reported(audit_url: str, store: AuditStore) -> None:
    store.append(_records(20))
    anchor = (store.verify().head_seq, store.verify().head_hash)
    assert store.verify(expect_head=anchor).ok
    lines, hashes = _block(audit_url)
    _rewrite_block(audit_url, lines[:17], hashes[:17])
    assert store.verify().ok  # the chain alone cannot tell
    assert store.verify(expect_head=anchor).problems == [
        "the anchored record 20 is gone: the trail ends at record 17, so its newest records were truncated"
    ]
    wrong = (17, "e" * 64)
    assert store.verify(expect_head=wrong).problems == [
        f"the anchored record 17 differs: its hash is now {store.head()[1]}, not {'e' * 64}; "
        "the trail up to it was rewritten"
    ]


def test_verify_keeps_going_and_caps_the_list(audit_url: str, store: AuditStore) -> None:
    store.append(_records(MAX_PROBLEMS + 30))
    lines, hashes = _block(audit_url)
    _rewrite_block(audit_url, [_edited(line, actor="key:mallory") for line in lines], hashes)
    report = store.verify()
    assert len(report.problems) == MAX_PROBLEMS and report.omitted == 30 and report.count == MAX_PROBLEMS + 30
    assert report.problems[-1].startswith(f"record {MAX_PROBLEMS} was edited: its content does not match its hash")
    assert report.describe().endswith("  ... and 30 more")
    assert report.describe().startswith(f"audit trail NOT ok: {MAX_PROBLEMS + 30} problems in {MAX_PROBLEMS + 30}")


def test_verify_and_export_read_page_by_page(
    audit_url: str, store: AuditStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(audit_module, "PAGE_BLOCKS", 2)
    for start in range(0, 50, 7):
        store.append(_records(50)[start : start + 7])
    assert store.verify().count == 50 and store.verify().ok
    _sql(audit_url, "DELETE FROM dhow_audit_blocks WHERE first_seq = 15")  # on a page boundary
    assert store.verify().problems == ["records 15 to 21 are missing: deleted?"]
    out = io.StringIO()
    assert store.export_jsonl(out) == 43
    assert store.export_jsonl(io.StringIO(), since_seq=10) == 33


def test_a_block_holds_at_most_its_limit_of_records(audit_url: str, store: AuditStore) -> None:
    """(A page of blocks stays small however large a transaction was.)"""
    store.append(_records(BLOCK_RECORDS + 5))
    blocks = _sql(audit_url, "SELECT first_seq, last_seq FROM dhow_audit_blocks ORDER BY first_seq")
    assert blocks == [(1, BLOCK_RECORDS), (BLOCK_RECORDS + 1, BLOCK_RECORDS + 5)]
    assert store.verify().ok and store.verify().count == BLOCK_RECORDS + 5


def test_two_connections_appending_at_once_keep_one_chain(open_store: Callable[[], AuditStore]) -> None:
    stores = [open_store(), open_store()]
    start = threading.Barrier(2)
    errors: list[BaseException] = []

    def writer(store: AuditStore, prefix: str) -> None:
        start.wait()
        try:
            records = _records(500, prefix)
            for i in range(0, 500, 10):
                store.append(records[i : i + 10])
                time.sleep(0.001)  # let the other writer in between batches
        except BaseException as err:  # surfaced by the assertion below
            errors.append(err)

    threads = [threading.Thread(target=writer, args=(s, p)) for s, p in zip(stores, "xy", strict=True)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    report = stores[0].verify()
    assert report.ok and report.count == 1000 and report.head_seq == 1000
    ids = _request_ids(stores[1])
    for prefix in "xy":
        assert [i for i in ids if i.startswith(prefix)] == [f"{prefix}-{n}" for n in range(500)]
    interleaved = sum(1 for a, b in itertools.pairwise(ids) if a[0] != b[0])
    assert interleaved > 1  # the writers really ran side by side


def test_read_filters_and_limits(store: AuditStore) -> None:
    store.append(_records(5, "a") + _records(3, "b"))
    store.append([AuditRecord("denial", "model.load", "key:b", outcome="PERMISSION_DENIED", model="churn")])
    assert [row["request_id"] for row in store.read(actor="key:b", kind="inference")] == ["b-0", "b-1", "b-2"]
    assert [row["seq"] for row in store.read(model="churn")] == [9]
    assert [row["seq"] for row in store.read(outcome="PERMISSION_DENIED")] == [9]
    assert [row["seq"] for row in store.read(since_seq=3, limit=2)] == [4, 5]
    assert store.read(actor="nobody") == []
    with pytest.raises(InvalidInput, match="cannot filter the audit trail by 'tenantx'"):
        store.read(tenantx="acme")
    with pytest.raises(InvalidInput, match="the limit must be an integer from 1 to 10000"):
        store.read(limit=0)


def test_export_jsonl_round_trips(store: AuditStore) -> None:
    store.append(_records(30))
    out = io.StringIO()
    assert store.export_jsonl(out) == 30
    lines = out.getvalue().splitlines()
    exported = [orjson.loads(line) for line in lines]
    assert exported == store.read()
    # an export carries what an offline check needs: each line's hash follows from the line before
    for before, row in zip([None, *exported], exported, strict=False):
        assert row["hash"] == _expected_hash(GENESIS_HASH if before is None else before["hash"], row)
    tail = io.StringIO()
    assert store.export_jsonl(tail, since_seq=25) == 5
    assert [orjson.loads(line)["seq"] for line in tail.getvalue().splitlines()] == [26, 27, 28, 29, 30]


# -- the trail: queued, batched, retried -------------------------------------------------------------


def test_trail_writes_every_record_in_order(store: AuditStore) -> None:
    trail = AuditTrail({"ae": store}, "ae", flush_interval_s=0.05, max_batch=700)
    records = _records(5000, "t")

    async def scenario() -> None:
        await trail.start()
        for record in records:
            trail.record(record)
        # record() only queues: nothing was written before the loop got a chance to run the writer
        assert trail.pending == 5000 and trail.written == 0
        await trail.close()

    asyncio.run(scenario())
    assert trail.pending == 0 and trail.written == 5000 and trail.failures == 0
    assert _request_ids(store) == [r.request_id for r in records]
    assert store.verify().ok
    with pytest.raises(Unavailable, match="the audit trail is closed"):
        trail.record(records[0])


def test_a_full_backlog_refuses_work(store: AuditStore) -> None:
    trail = AuditTrail({"ae": store}, "ae", max_pending=10)
    for record in _records(10):
        trail.record(record)  # not started: everything stays pending
    with pytest.raises(Unavailable) as refused:
        trail.record(_records(1)[0])
    assert refused.value.message == "the audit trail is 10 records behind; refusing work until it catches up"
    assert refused.value.retry_after == 1.0
    asyncio.run(trail.close())  # close starts the writer and flushes the backlog
    assert store.head()[0] == 10 and trail.pending == 0


def test_a_full_batch_is_written_before_the_interval(store: AuditStore) -> None:
    trail = AuditTrail({"ae": store}, "ae", flush_interval_s=60.0, max_batch=100)

    async def scenario() -> None:
        await trail.start()
        for record in _records(99, "a"):
            trail.record(record)
        await asyncio.sleep(0.2)
        assert (trail.written, trail.pending) == (0, 99)  # a partial batch waits for the interval
        for record in _records(31, "b"):
            trail.record(record)  # the 100th fills a batch: written at once, with what came after it
        deadline = time.monotonic() + 5
        while trail.pending and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        assert (trail.written, trail.pending) == (130, 0)
        await trail.close()

    asyncio.run(scenario())
    assert store.head()[0] == 130 and store.verify().ok


def test_record_now_returns_once_durable_and_keeps_order(store: AuditStore) -> None:
    trail = AuditTrail({"ae": store}, "ae", flush_interval_s=60.0)
    admin = AuditRecord("admin", "model.unload", "key:ops", model="fraud", version="1")

    async def scenario() -> None:
        with pytest.raises(Unavailable, match="not running"):
            await trail.record_now(admin)
        await trail.start()
        for record in _records(3):
            trail.record(record)
        await asyncio.wait_for(trail.record_now(admin), 5)
        assert store.head()[0] == 4
        await trail.close()

    asyncio.run(scenario())
    assert [row["action"] for row in store.read()] == ["infer", "infer", "infer", "model.unload"]


def test_records_go_to_their_regions_store(tmp_path: Path) -> None:
    ae = AuditStore.open(f"sqlite://{tmp_path / 'ae.sqlite3'}")
    eu = AuditStore.open(f"sqlite://{tmp_path / 'eu.sqlite3'}")
    try:
        trail = AuditTrail({"ae": ae, "eu": eu, "uae": ae}, "ae", flush_interval_s=0.05)
        assert trail.store_for("eu") is eu and trail.store_for("us") is ae and trail.store_for("") is ae
        mixed = [*_records(2, "eu", "eu"), *_records(2, "ae", "ae"), *_records(2, "none")]
        mixed += [*_records(2, "us", "us"), *_records(2, "uae", "uae")]
        asyncio.run(_record_all(trail, mixed))
        assert _request_ids(eu) == ["eu-0", "eu-1"]
        assert _request_ids(ae) == ["ae-0", "ae-1", "none-0", "none-1", "us-0", "us-1", "uae-0", "uae-1"]
        assert ae.verify().ok and eu.verify().ok
        with pytest.raises(InvalidInput, match="no audit store for the default region 'us'"):
            AuditTrail({"ae": ae}, "us")
    finally:
        ae.close()
        eu.close()


async def _record_all(trail: AuditTrail, records: Sequence[AuditRecord]) -> None:
    await trail.start()
    for record in records:
        trail.record(record)
    await trail.close()


class FlakyStore(AuditStore):
    """A real store whose first ``fail_times`` appends fail as if the database were down."""

    fail_times = 3
    attempts = 0

    def append_rows(self, rows: Sequence[Sequence[Any]]) -> int:
        self.attempts += 1
        if self.attempts <= self.fail_times:
            raise Unavailable(f"{self.what} at {self.url} failed: connection refused (attempt {self.attempts})")
        return super().append_rows(rows)


def test_a_failing_write_is_kept_retried_and_logged_once(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    store = FlakyStore.open(f"sqlite://{tmp_path / 'audit.sqlite3'}")
    assert isinstance(store, FlakyStore)
    trail = AuditTrail({"ae": store}, "ae", flush_interval_s=0.01, max_batch=40)
    try:
        with caplog.at_level(logging.INFO, logger="dhow.audit"):
            asyncio.run(_record_all(trail, _records(100)))
    finally:
        store.close()
    assert trail.failures == 3 and trail.written == 100 and trail.pending == 0
    assert store.attempts == 3 + 3  # 3 failures, then 3 batches of up to 40
    errors = [r for r in caplog.records if r.levelno == logging.ERROR]
    assert len(errors) == 1 and "retrying until it works" in errors[0].getMessage()
    assert sum("writable again" in r.getMessage() for r in caplog.records) == 1


def test_a_database_outage_keeps_the_records_until_it_is_back(
    pg_database: str, caplog: pytest.LogCaptureFixture
) -> None:
    store = AuditStore.open(pg_database)
    name = pg_database.rpartition("/")[2]
    trail = AuditTrail({"ae": store}, "ae", flush_interval_s=0.02)

    def outage(on: bool) -> None:
        with psycopg.connect(PG_ADMIN_URL, autocommit=True) as conn:
            conn.execute(f'ALTER DATABASE "{name}" ALLOW_CONNECTIONS {"false" if on else "true"}')
            if on:
                conn.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = %s", (name,))

    async def scenario() -> None:
        await trail.start()
        trail.record(_records(1, "before")[0])
        while trail.written < 1:
            await asyncio.sleep(0.01)
        await asyncio.to_thread(outage, True)
        for record in _records(300, "during"):
            trail.record(record)
        deadline = time.monotonic() + 5
        while trail.failures < 3 and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
        assert trail.failures >= 3 and trail.pending == 300
        await asyncio.to_thread(outage, False)
        await trail.close(timeout_s=10)

    try:
        with caplog.at_level(logging.INFO, logger="dhow.audit"):
            asyncio.run(scenario())
        assert trail.pending == 0 and store.head()[0] == 301
        assert _request_ids(store) == ["before-0", *(f"during-{i}" for i in range(300))]
        assert store.verify().ok
        assert sum(r.levelno == logging.ERROR for r in caplog.records) == 1
    finally:
        store.close()


# -- the command line ----------------------------------------------------------------------------------


def _cli(*argv: str) -> int:
    parser = argparse.ArgumentParser(prog="dhow")
    add_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(list(argv))
    assert args.command == "audit"
    return run(args)


def test_cli_verify_exit_codes_and_messages(
    audit_url: str, store: AuditStore, capsys: pytest.CaptureFixture[str]
) -> None:
    store.append(_records(5))
    seq, digest = store.head()
    assert _cli("audit", "verify", "--store", audit_url) == 0
    assert capsys.readouterr().out == f"audit trail ok: 5 records, head 5:{digest}\n"
    assert _cli("audit", "verify", "--store", audit_url, "--expect-head", f"{seq}:{digest}") == 0
    capsys.readouterr()
    lines, hashes = _block(audit_url)
    _rewrite_block(audit_url, [*lines[:2], _edited(lines[2], outcome="INTERNAL"), *lines[3:]], hashes)
    assert _cli("audit", "verify", "--store", audit_url) == 1
    out = capsys.readouterr().out
    assert out.startswith("audit trail NOT ok: 1 problem in 5 records")
    assert "  record 3 was edited: its content does not match its hash" in out
    _rewrite_block(audit_url, lines[:4], hashes[:4])  # the edit undone, the last record cut off
    assert _cli("audit", "verify", "--store", audit_url, "--expect-head", f"{seq}:{digest}") == 1
    assert "the anchored record 5 is gone" in capsys.readouterr().out


def test_cli_finds_the_store_like_the_server(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.delenv("DHOW_AUDIT_STORE", raising=False)
    monkeypatch.delenv("DHOW_DATA_DIR", raising=False)
    assert resolve_settings({}).audit_url() == f"sqlite:///{(Path('.dhow') / 'audit.sqlite3').resolve()}"
    assert _cli("audit", "verify", "--data-dir", str(tmp_path)) == 2
    assert f"no audit trail at {tmp_path / 'audit.sqlite3'}" in capsys.readouterr().err
    store = AuditStore.open(resolve_settings({"data_dir": tmp_path}).audit_url())
    try:
        store.append(_records(3))
    finally:
        store.close()
    assert _cli("audit", "verify", "--data-dir", str(tmp_path)) == 0
    monkeypatch.setenv("DHOW_DATA_DIR", str(tmp_path))
    assert _cli("audit", "verify") == 0
    monkeypatch.setenv("DHOW_AUDIT_STORE", f"sqlite://{tmp_path / 'other.sqlite3'}")
    assert _cli("audit", "verify") == 2
    assert "other.sqlite3" in capsys.readouterr().err
    assert _cli("audit", "verify", "--store", "mysql://x") == 2
    assert "is not accepted: use sqlite:///" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        _cli("audit", "verify", "--expect-head", "5:nothex")
    assert "expected SEQ:HASH" in capsys.readouterr().err


def test_cli_export_and_tail(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    url = f"sqlite://{tmp_path / 'audit.sqlite3'}"
    store = AuditStore.open(url)
    try:
        store.append(_records(4))
        store.append([AuditRecord("denial", "model.load", "key:eve", outcome="PERMISSION_DENIED")])
        rows = store.read()
    finally:
        store.close()
    assert _cli("audit", "export", "--store", url, "--since", "3") == 0
    assert [orjson.loads(line) for line in capsys.readouterr().out.splitlines()] == rows[3:]
    out = tmp_path / "trail.jsonl"
    assert _cli("audit", "export", "--store", url, "--out", str(out)) == 0
    assert capsys.readouterr().err == f"exported 5 records to {out}\n"
    assert [orjson.loads(line) for line in out.read_text().splitlines()] == rows
    assert _cli("audit", "tail", "--store", url, "-n", "2") == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == ["SEQ", "AT", "KIND", "ACTION", "ACTOR", "TENANT", "MODEL", "OUTCOME", "LATENCY"]
    assert lines[1].split()[:8] == ["4", rows[3]["at"], "inference", "infer", "key:r", "default", "fraud:2", "success"]
    assert lines[1].endswith("4.250 ms")
    assert lines[2].split() == [
        "5",
        rows[4]["at"],
        "denial",
        "model.load",
        "key:eve",
        "default",
        "-",
        "PERMISSION_DENIED",
    ]


def test_a_writer_process_writes_the_same_chain(audit_url: str) -> None:
    """The server's mode: batches cross to a writer process, which chains and writes them."""
    store = AuditStore.open(audit_url)
    trail = AuditTrail({"ae": store}, "ae", flush_interval_s=0.05, max_batch=300, writer="process")
    records = _records(1000, "p")

    async def scenario() -> None:
        await trail.start()
        for record in records[:-1]:
            trail.record(record)
        await trail.record_now(records[-1])  # durable once it returns, as are all before it
        assert trail.pending == 0
        await trail.close()

    try:
        asyncio.run(scenario())
        assert _request_ids(store) == [r.request_id for r in records]
        assert store.verify().ok and trail.written == 1000
    finally:
        store.close()


async def _three_records(trail: AuditTrail, gap_s: float, *, each_written: bool = False) -> None:
    """Three records ``gap_s`` apart (each written before the next when ``each_written``), then the trail closed."""
    await trail.start()
    for record in _records(3, "w"):
        trail.record(record)
        await asyncio.sleep(gap_s)
        while each_written and trail.pending:
            await asyncio.sleep(0.01)
    while trail.pending:
        await asyncio.sleep(0.01)
    await trail.close()


def test_a_writer_process_gathers_records_for_its_commit_window(audit_url: str) -> None:
    """``--audit-commit-ms``: records that come within the window are written in one transaction (one block)."""
    store = AuditStore.open(audit_url)
    trail = AuditTrail({"ae": store}, "ae", writer="process", commit_s=1.0)
    try:
        asyncio.run(_three_records(trail, 0.02))
        assert _request_ids(store) == ["w-0", "w-1", "w-2"] and store.verify().ok
        assert _sql(audit_url, "SELECT first_seq, last_seq FROM dhow_audit_blocks") == [(1, 3)]
    finally:
        store.close()


@pytest.mark.parametrize("commit_s", [1.0, 0.0])
def test_a_writer_thread_gathers_records_for_the_commit_window_too(audit_url: str, commit_s: float) -> None:
    """The thread writer (``dhow serve``'s first start) took ``flush_interval_s`` (0.2 s) for its window whatever
    ``--audit-commit-ms`` said: records within the window now share a transaction, and 0 writes each at once."""
    store = AuditStore.open(audit_url)
    trail = AuditTrail({"ae": store}, "ae", commit_s=commit_s)
    try:
        asyncio.run(_three_records(trail, 0.1, each_written=not commit_s))
        assert _request_ids(store) == ["w-0", "w-1", "w-2"] and store.verify().ok
        blocks = _sql(audit_url, "SELECT first_seq, last_seq FROM dhow_audit_blocks ORDER BY first_seq")
        assert blocks == ([(1, 3)] if commit_s else [(1, 1), (2, 2), (3, 3)])
    finally:
        store.close()


@pytest.mark.skipif(not hasattr(fcntl, "F_GETPIPE_SZ"), reason="pipe sizes are Linux's")
@pytest.mark.parametrize("loop", ["asyncio", "uvloop"])
def test_the_channel_to_a_writer_process_is_widened(tmp_path: Path, loop: str) -> None:
    """By default it holds a few hundred records, which fill while the writer is in a transaction under load, and
    every answer then waits for it: asyncio's pipe is asked for PIPE_BYTES, uvloop's socket pair for as much of
    SOCKET_BYTES as net.core.wmem_max allows."""
    store = AuditStore.open(f"sqlite:///{tmp_path}/audit.db")
    trail = AuditTrail({"ae": store}, "ae", writer="process")

    async def scenario() -> int:
        await trail.start()
        try:
            process = trail._default.process
            assert process is not None and process._process is not None and process._process.stdin is not None
            transport = process._process.stdin.transport
            pipe = transport.get_extra_info("pipe")
            if pipe is not None:
                return int(fcntl.fcntl(pipe.fileno(), fcntl.F_GETPIPE_SZ))
            sock = transport.get_extra_info("socket")
            return int(sock.getsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF)) // 2  # the kernel doubles it
        finally:
            await trail.close()

    runner = asyncio.new_event_loop() if loop == "asyncio" else uvloop.new_event_loop()
    try:
        size = runner.run_until_complete(scenario())
    finally:
        runner.close()
        store.close()
    if loop == "asyncio":
        assert size >= PIPE_BYTES
    else:
        assert size >= min(SOCKET_BYTES, int(Path("/proc/sys/net/core/wmem_max").read_text()))


def test_records_leave_the_server_while_the_writer_waits_in_a_transaction(tmp_path: Path) -> None:
    """The writer drains its pipe while its transaction waits (here for a lock another connection holds): the
    server's answers do not wait for the database, though the pipe alone holds far fewer than these records."""
    path = tmp_path / "audit.db"
    store = AuditStore.open(f"sqlite:///{path}")
    trail = AuditTrail({"ae": store}, "ae", writer="process")
    records = _records(50_000, "t")
    blocker = sqlite3.connect(path, isolation_level=None)

    async def scenario() -> None:
        await trail.start()
        await trail.record_now(records[0])  # the writer runs
        blocker.execute("BEGIN IMMEDIATE")  # its next transaction waits for this one
        try:
            for record in records[1:]:
                trail.record(record)
            await asyncio.wait_for(trail.handed_over(records[-1]), 120)  # all in the writer's hands now
            assert trail.pending == len(records) - 1  # and none written yet
        finally:
            blocker.execute("ROLLBACK")
        await trail.close()

    try:
        asyncio.run(scenario())
        assert store.verify().ok and trail.pending == 0 and trail.written == len(records)
    finally:
        blocker.close()
        store.close()


def _writer_processes() -> list[int]:
    """This test process's audit writer children (their command names the writer module)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            command = (entry / "cmdline").read_bytes()
        except OSError:
            continue
        if int(stat[1]) == os.getpid() and b"dhow.governance.audit_writer" in command:
            found.append(int(entry.name))
    return found


async def _writer_killed(process: WriterProcess) -> int:
    """SIGKILLs the trail's writer process and returns once the server knows it is gone; its pid."""
    (writer,) = _writer_processes()
    os.kill(writer, signal.SIGKILL)
    while process.running:
        await asyncio.sleep(0.01)
    return writer


def test_a_record_the_pipe_cannot_take_is_waited_for_before_the_answer(audit_url: str) -> None:
    """With its writer behind (stopped here), a record that waits in the server's memory would die with the
    server's SIGKILL: ``record`` says so and ``handed_over`` returns only once the pipe has taken it."""
    store = AuditStore.open(audit_url)
    trail = AuditTrail({"ae": store}, "ae", flush_interval_s=0.05, writer="process")
    records = _records(20_000, "w")

    async def scenario() -> None:
        await trail.start()
        (writer,) = _writer_processes()
        os.kill(writer, signal.SIGSTOP)
        try:
            held = next((r for r in records if trail.record(r)), None)
            assert held is not None, "the pipe took 20,000 records from a stopped writer"
            waiting = asyncio.create_task(trail.handed_over(held))
            await asyncio.sleep(0.3)
            assert not waiting.done()  # nothing leaves while the writer reads nothing
        finally:
            os.kill(writer, signal.SIGCONT)
        await asyncio.wait_for(waiting, 30)
        await trail.close()

    try:
        asyncio.run(scenario())
        assert store.verify().ok and trail.pending == 0
    finally:
        store.close()


def test_a_backlog_the_writer_gathered_is_written_in_bounded_transactions() -> None:
    """What the drain thread read while the main thread was busy waits in memory, to be taken ``max_frames`` at
    a time: a transaction after an outage is not the whole backlog at once."""
    from dhow.governance.audit_writer import FrameReader, encode_frame

    read_end, write_end = os.pipe()
    reader = FrameReader(read_end)
    sent = 25_000

    def send() -> None:
        for i in range(sent):
            os.write(write_end, encode_frame([[i]]))
        os.close(write_end)

    writer = threading.Thread(target=send)
    writer.start()
    writer.join()
    batches = []
    while frames := reader.batch(max_frames=10_000):
        batches.append(frames)
    assert max(len(b) for b in batches) <= 10_000 and len(batches) >= 3
    assert [row for batch in batches for frame in batch for row in frame] == [[i] for i in range(sent)]
    os.close(read_end)


def test_frames_to_the_writer_are_lines_split_at_their_newlines_and_a_partial_one_stays() -> None:
    """A text with a newline in it is escaped inside its line; a frame not yet whole waits for its rest."""
    from dhow.governance.audit_writer import decode_lines, encode_frame

    urgent = encode_frame({"rows": [["x"]], "now": True})
    buffer = bytearray(encode_frame("sqlite:///a") + encode_frame([["a\nb", 1.5, {"k": None}]]) + urgent[:5])
    assert decode_lines(buffer, 10) == ["sqlite:///a", [["a\nb", 1.5, {"k": None}]]]
    assert buffer == urgent[:5]
    buffer += urgent[5:] + encode_frame([])
    assert decode_lines(buffer, 1) == [{"rows": [["x"]], "now": True}] and buffer == encode_frame([])


def test_the_records_of_one_pass_leave_in_one_write_before_any_is_answered(audit_url: str) -> None:
    """The inference path's records made in one pass of the event loop (a batch's requests end together) go to
    the writer as one frame, in the next pass, and their requests wait for it; a record written at once (a
    refusal) goes after those made before it: a store's records keep the order they were made in."""
    store = AuditStore.open(audit_url)
    trail = AuditTrail({"ae": store}, "ae", writer="process")
    batch, refusal, later = _records(50, "b"), _records(1, "d")[0], _records(2, "l")

    async def scenario() -> None:
        await trail.start()
        process = trail._default.process
        assert process is not None
        departures = [trail.record_before_answer(record.as_tuple()) for record in batch]
        departure = departures[0]
        assert departure is not None and all(d is departure for d in departures)  # one for the pass's records
        assert process.unacknowledged == 0 and not asyncio.ensure_future(departure).done()  # none written yet
        await departure
        assert process.unacknowledged == 1  # the 50 records in one frame
        waiting = [trail.record_before_answer(record.as_tuple()) for record in later]
        trail.record(refusal)  # written at once, after the records made before it (one frame of them)
        assert process.unacknowledged == 3
        await asyncio.gather(*(w for w in waiting if w is not None))
        assert process.unacknowledged == 3  # nothing more to send
        await trail.close()

    try:
        uvloop.run(scenario())
        expected = [r.request_id for r in batch] + [r.request_id for r in later] + [refusal.request_id]
        assert _request_ids(store) == expected
        assert store.verify().ok and trail.pending == 0 and trail.written == 53
    finally:
        store.close()


def test_a_record_json_cannot_hold_neither_hangs_nor_loses_the_records_of_its_pass(audit_url: str) -> None:
    """A record whose details no JSON holds (an integer past 64 bits in a payload sample) goes with the others of
    its pass, its details kept as their ``repr``: every request of the pass is answered, and every record written."""
    store = AuditStore.open(audit_url)
    trail = AuditTrail({"ae": store}, "ae", writer="process")
    good = AuditRecord("inference", "infer", "key:a", request_id="good")
    bad = AuditRecord("inference", "infer", "key:b", request_id="bad", details={"payload": {"y": [2**70]}})
    odd = AuditRecord("inference", "infer", "key:\ud800", request_id="odd")

    async def scenario() -> None:
        await trail.start()
        waiting = [trail.record_before_answer(record.as_tuple()) for record in (good, bad, odd)]
        await asyncio.wait_for(asyncio.gather(*(w for w in waiting if w is not None)), 10)
        later = trail.record_before_answer(AuditRecord("inference", "infer", "key:c", request_id="later").as_tuple())
        if later is not None:
            await asyncio.wait_for(later, 10)
        await trail.close()

    try:
        uvloop.run(scenario())
        assert _request_ids(store) == ["good", "bad", "odd", "later"]
        rows = {row["request_id"]: row for row in store.read()}
        assert rows["bad"]["details"] == {"payload": {"y": [str(2**70)]}} and rows["odd"]["actor"] == "key:\\ud800"
        assert store.verify().ok and trail.pending == 0 and trail.written == 4
    finally:
        store.close()


def test_a_record_made_alone_is_written_at_once(audit_url: str) -> None:
    """No other request in flight (``together=False``): nothing waits for the pass to end."""
    store = AuditStore.open(audit_url)
    trail = AuditTrail({"ae": store}, "ae", writer="process")
    (record,) = _records(1, "alone")

    async def scenario() -> None:
        await trail.start()
        process = trail._default.process
        assert process is not None
        assert trail.record_before_answer(record.as_tuple(), together=False) is None
        assert process.unacknowledged == 1
        await trail.close()

    try:
        uvloop.run(scenario())
        assert _request_ids(store) == [record.request_id]
    finally:
        store.close()


_ANSWERING_SERVER = """
import asyncio, sys
from dhow.governance.audit import AuditRecord, AuditStore
from dhow.governance.audit_trail import AuditTrail

async def main(url: str) -> None:
    trail = AuditTrail({"ae": AuditStore.open(url)}, "ae", writer="process")
    await trail.start()
    for batch in range(40):  # batches of 25 requests ending together, each answered once its record has left
        records = [AuditRecord("inference", "infer", "key:k", request_id=f"r-{batch}-{i}") for i in range(25)]
        departures = [trail.record_before_answer(record.as_tuple()) for record in records]
        for i, departure in enumerate(departures):
            await departure
            print(f"r-{batch}-{i}", flush=True)  # its answer
    print("all answered", flush=True)
    await asyncio.sleep(3600)  # SIGKILLed here, its records still on their way to the store

asyncio.run(main(sys.argv[1]))
"""


def test_no_answered_request_is_missing_after_the_server_is_killed(tmp_path: Path) -> None:
    """A server killed with SIGKILL right after its answers loses none of their records: each left the server's
    process (with the others of its pass, in one write) before its answer did; the writer writes them once the
    pipe closes."""
    url = f"sqlite:///{tmp_path}/audit.db"
    AuditStore.open(url).close()
    script = tmp_path / "server.py"
    script.write_text(_ANSWERING_SERVER)
    server = subprocess.Popen(
        [sys.executable, str(script), url], stdout=subprocess.PIPE, text=True, env={**os.environ, "PYTHONPATH": SRC}
    )
    assert server.stdout is not None
    answered = []
    for line in server.stdout:
        if line.strip() == "all answered":
            break
        answered.append(line.strip())
    server.send_signal(signal.SIGKILL)
    server.wait()
    store = AuditStore.open(url)
    try:
        deadline = time.monotonic() + 60
        while len(_request_ids(store)) < len(answered) and time.monotonic() < deadline:
            time.sleep(0.1)  # the orphaned writer writes what its pipe held, then exits
        assert len(set(answered)) == 1000
        assert set(_request_ids(store)) >= set(answered)
        assert store.verify().ok
    finally:
        store.close()


def _guard(trail: AuditTrail) -> AccessGuard:
    """The access guard as the server builds it, with authentication on (inference is audited)."""
    return AccessGuard(
        Authenticator(None, enabled=True),
        LocalRateLimiter(),
        trail,
        Masker(parse_masking(None, "audit"), b"k" * 32),
        lambda name: "default",
    )


def test_the_guard_sends_a_record_alone_at_once_and_with_others_in_flight_together(tmp_path: Path) -> None:
    """The access guard's inference records: while other requests are in flight (they may end in the same pass)
    a record waits for the pass's end and leaves with theirs; alone, it is written at once, with nothing to await."""
    store = AuditStore.open(f"sqlite:///{tmp_path}/audit.db")
    trail = AuditTrail({"default": store}, "default", writer="process")
    guard = _guard(trail)
    caller, infer = Principal("dhow:test", ALL_TENANTS, (Grant("invoker"),)), ACTIONS["infer"]

    async def scenario() -> None:
        await trail.start()
        process = trail._default.process
        assert process is not None
        first, second = (guard.admit(caller, infer, "fraud") for _ in range(2))
        assert isinstance(first, Admission) and isinstance(second, Admission)
        waiting = guard.finish(first), guard.finish(second)
        assert waiting[0] is not None and waiting[0] is waiting[1] and process.unacknowledged == 0
        await waiting[0]
        assert process.unacknowledged == 1  # both records in one frame
        alone = guard.admit(caller, infer, "fraud")
        assert isinstance(alone, Admission)
        assert guard.finish(alone) is None and process.unacknowledged == 2
        await trail.close()

    try:
        uvloop.run(scenario())
        assert [r["actor"] for r in store.read(limit=10)] == ["dhow:test"] * 3
    finally:
        store.close()


def test_a_request_cancelled_while_its_record_leaves_cancels_no_other(tmp_path: Path) -> None:
    """The requests of one pass share what they await: one cancelled meanwhile (its client left) gets its
    ``CancelledError`` alone, the others are answered, and every record is written."""
    store = AuditStore.open(f"sqlite:///{tmp_path}/audit.db")
    trail = AuditTrail({"ae": store}, "ae", writer="process")
    records = _records(2, "c")

    async def answer(record: AuditRecord) -> str:
        waiting = trail.record_before_answer(record.as_tuple())
        assert waiting is not None
        await waiting
        return record.request_id

    async def scenario() -> None:
        await trail.start()
        cancelled, answered = (asyncio.create_task(answer(record)) for record in records)
        await asyncio.sleep(0)  # both wait for the pass's frame
        cancelled.cancel()
        assert await answered == records[1].request_id
        with pytest.raises(asyncio.CancelledError):
            await cancelled
        await trail.close()

    try:
        uvloop.run(scenario())
        assert _request_ids(store) == [r.request_id for r in records]
    finally:
        store.close()


@pytest.mark.parametrize(
    ("who", "code", "actor"),
    [
        # a refusal by role
        (Principal("key:reader", ALL_TENANTS, (Grant("auditor"),)), ErrorCode.PERMISSION_DENIED, "key:reader"),
        # the first refusal of a window of a caller without valid credentials
        (Credentials(authorization="Bearer nope", source="10.0.0.9"), ErrorCode.UNAUTHENTICATED, "unauthenticated"),
    ],
    ids=["by-role-403", "unknown-caller-401"],
)
def test_a_refusal_whose_record_the_pipe_cannot_take_waits_for_it_like_an_answer(
    tmp_path: Path, who: Principal | Credentials, code: ErrorCode, actor: str
) -> None:
    """A refusal is answered as an allowed call is: only once its audit record has left this process. With the
    writer behind (stopped here, its pipe full), the refusal waits until the pipe has taken the record."""
    store = AuditStore.open(f"sqlite:///{tmp_path}/audit.db")
    trail = AuditTrail({"default": store}, "default", writer="process")
    guard = _guard(trail)

    async def scenario() -> None:
        await trail.start()
        (writer,) = _writer_processes()
        os.kill(writer, signal.SIGSTOP)
        try:
            held = next((r for r in _records(20_000, "w") if trail.record(r)), None)
            assert held is not None, "the pipe took 20,000 records from a stopped writer"
            try:
                refused = guard.admit(who, ACTIONS["infer"], "fraud")
            except DhowError:
                pytest.fail("the refusal was answered while its record waited in the server's memory")
            assert not isinstance(refused, Admission)
            waiting = asyncio.ensure_future(refused)
            await asyncio.sleep(0.3)
            assert not waiting.done()  # nothing leaves while the writer reads nothing
        finally:
            os.kill(writer, signal.SIGCONT)
        with pytest.raises(DhowError) as raised:
            await asyncio.wait_for(waiting, 30)
        assert raised.value.code is code
        guard.close()
        await trail.close()

    try:
        asyncio.run(scenario())
        denials = store.read(kind="denial")
        assert [(d["actor"], d["outcome"]) for d in denials] == [(actor, code.value)]
        assert store.verify().ok
    finally:
        store.close()


def test_while_the_writer_restarts_an_answer_waits_until_a_new_writer_takes_its_record(audit_url: str) -> None:
    """A writer that died leaves records only in the server's memory until another starts (after a backoff of up
    to 5 s): the answers of their requests wait for it, so a SIGKILL of the server meanwhile loses none of them."""
    store = AuditStore.open(audit_url)
    trail = AuditTrail({"ae": store}, "ae", writer="process")
    alone, together = _records(1, "alone")[0], _records(3, "pass")

    async def answers_wait_for_the_new_writer(process: WriterProcess) -> None:
        trail._default.backoff_s = 1.0  # the next writer starts 2 s after the death: the answers must wait for it
        first = await _writer_killed(process)
        waiting = trail.record_before_answer(alone.as_tuple(), together=False)
        assert waiting is not None, "answered while no writer had its record"
        departure = trail.record_before_answer(together[0].as_tuple())
        assert departure is not None
        for record in together[1:]:
            trail.record_before_answer(record.as_tuple())
        both = asyncio.ensure_future(asyncio.gather(waiting, departure))
        await asyncio.sleep(0)
        assert not both.done()
        await asyncio.wait_for(both, 30)
        assert process.running and _writer_processes() != [first]  # a new writer took them

    async def scenario() -> None:
        await trail.start()
        process = trail._default.process
        assert process is not None
        try:
            await answers_wait_for_the_new_writer(process)
        finally:
            await trail.close()

    try:
        asyncio.run(scenario())
        assert _request_ids(store) == [alone.request_id] + [r.request_id for r in together]
        assert store.verify().ok and trail.pending == 0
    finally:
        store.close()


def test_a_writer_dying_while_an_answer_waits_for_room_holds_the_answer_until_the_next_writer(tmp_path: Path) -> None:
    """The pipe is full (the writer stopped), an answer waits for room; the writer is killed: what the answer
    waited for is in the server's memory only, so it still waits, until a new writer has been sent it."""
    store = AuditStore.open(f"sqlite:///{tmp_path}/audit.db")
    trail = AuditTrail({"ae": store}, "ae", writer="process")

    async def scenario() -> None:
        await trail.start()
        process = trail._default.process
        assert process is not None
        (first,) = _writer_processes()
        os.kill(first, signal.SIGSTOP)
        try:
            held = next((r for r in _records(20_000, "w") if trail.record(r)), None)
            assert held is not None, "the pipe never filled"
            waiter = asyncio.ensure_future(trail.handed_over(held))
            await asyncio.sleep(0.2)
            assert not waiter.done()
        finally:
            os.kill(first, signal.SIGKILL)
        await asyncio.wait_for(waiter, 30)
        assert process.running and _writer_processes() != [first]  # released once a new writer took them
        await trail.close()

    try:
        uvloop.run(scenario())
        assert store.verify().ok and trail.pending == 0
    finally:
        store.close()


def test_no_writer_can_start_the_waiting_answers_fail_and_a_waiting_request_can_be_cancelled(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The writer died and no other can be started (here: its interpreter is gone): a request waiting for one
    fails with Unavailable (503) at the failed try, instead of waiting for ever; one cancelled while it waits
    ends at once, the others' wait untouched."""
    store = AuditStore.open(f"sqlite:///{tmp_path}/audit.db")
    trail = AuditTrail({"ae": store}, "ae", writer="process")

    async def scenario() -> None:
        await trail.start()
        process = trail._default.process
        assert process is not None
        monkeypatch.setattr(sys, "executable", str(tmp_path / "no-python"))
        await _writer_killed(process)
        kept, cancelled = (trail.record_before_answer(r.as_tuple(), together=False) for r in _records(2, "x"))
        assert kept is not None and cancelled is not None
        kept_task, cancelled_task = asyncio.ensure_future(kept), asyncio.ensure_future(cancelled)
        batched = trail.record_before_answer(_records(1, "b")[0].as_tuple())  # a pass's records: their departure
        assert batched is not None
        batched_task = asyncio.ensure_future(batched)
        await asyncio.sleep(0)
        cancelled_task.cancel()
        await asyncio.wait_for(asyncio.wait({cancelled_task}), 1)
        assert cancelled_task.cancelled() and not kept_task.done()
        for task in (kept_task, batched_task):  # each told the cause
            with pytest.raises(Unavailable, match="could not be started"):
                await asyncio.wait_for(task, 10)
        monkeypatch.undo()
        await trail.close(timeout_s=10)

    try:
        asyncio.run(scenario())
        assert len(_request_ids(store)) == 3  # nothing lost: the writer started once the interpreter is back wrote all
    finally:
        store.close()


def test_a_writer_that_died_idle_holds_no_answer(tmp_path: Path) -> None:
    """Nothing waits in the server for a writer that died with every frame acknowledged: a wait returns at once
    (no restart is due until a record comes)."""
    store = AuditStore.open(f"sqlite:///{tmp_path}/audit.db")
    trail = AuditTrail({"ae": store}, "ae", writer="process")

    async def scenario() -> None:
        await trail.start()
        process = trail._default.process
        assert process is not None
        await _writer_killed(process)
        assert not process.held
        await asyncio.wait_for(process.handed_over(), 1)
        await trail.close()

    try:
        uvloop.run(scenario())
    finally:
        store.close()
