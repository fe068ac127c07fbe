"""A record the store refuses (a poison record) neither stops the trail nor is lost: real SQLite and PostgreSQL,
their refusals real (a trigger, a PostgreSQL database whose encoding cannot hold a character)."""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import hashlib
import json
import logging
import math
import os
import sqlite3
import struct
from collections.abc import Callable
from pathlib import Path
from typing import Any

import orjson
import psycopg
import pytest

from dhow.core.errors import Unavailable
from dhow.governance.audit import AuditRecord, AuditStore
from dhow.governance.audit_refusals import UNWRITABLE_KIND, Appending, RefusingAll, record_digest
from dhow.governance.audit_trail import AuditTrail
from tests.conftest import PG_ADMIN_URL


def _refuse(url: str, *values: str, instead: bool = False) -> None:
    """Make the store refuse a record whose keys hold one of ``values`` (a trigger, as a DBA could add);
    ``instead``: of what it refused until now, in one transaction (a writer retrying meanwhile sees one or the
    other)."""
    listed = ", ".join(f"'{value}'" for value in values)
    if url.startswith("sqlite://"):
        conn = sqlite3.connect(url[len("sqlite://") :], isolation_level=None)
        try:
            conn.executescript(
                "BEGIN; "
                + ("DROP TRIGGER refuse; " if instead else "")
                + f"CREATE TRIGGER refuse BEFORE INSERT ON dhow_audit_keys WHEN NEW.value IN ({listed}) "
                "BEGIN SELECT RAISE(ABORT, 'refused by the test''s trigger'); END; COMMIT;"
            )
        finally:
            conn.close()
        return
    with psycopg.connect(url, autocommit=True) as pg:
        pg.execute(
            "CREATE OR REPLACE FUNCTION refuse() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN "
            f"IF NEW.value IN ({listed}) THEN RAISE EXCEPTION 'refused by the test''s trigger'; END IF; "
            "RETURN NEW; END $$"
        )
        if not instead:
            pg.execute("CREATE TRIGGER refuse BEFORE INSERT ON dhow_audit_keys FOR EACH ROW EXECUTE FUNCTION refuse()")


def _allow(url: str) -> None:
    if url.startswith("sqlite://"):
        with sqlite3.connect(url[len("sqlite://") :]) as conn:
            conn.execute("DROP TRIGGER refuse")
        return
    with psycopg.connect(url, autocommit=True) as pg:
        pg.execute("DROP TRIGGER refuse ON dhow_audit_keys")


def _record(actor: str, request_id: str) -> AuditRecord:
    return AuditRecord("inference", "infer", actor, model="m", request_id=request_id, latency_ms=1.5)


def _batch() -> list[AuditRecord]:
    """Twenty records, the eighth and the fifteenth refused."""
    return [_record("key:poison" if i in (7, 14) else "key:good", f"r{i}") for i in range(20)]


def _check_replaced(store: AuditStore, records: list[AuditRecord]) -> list[dict[str, Any]]:
    """Every record once, in order, each refused one as an ``audit.unwritable`` record that holds it."""
    rows = store.read(limit=1000)
    assert [row["seq"] for row in rows] == list(range(1, len(records) + 1))
    for row, record in zip(rows, records, strict=True):
        if record.actor == "key:poison":
            assert row["kind"] == UNWRITABLE_KIND and row["actor"] == "dhow:audit-writer"
            original = orjson.loads(row["details"]["record"])
            assert original["actor"] == "key:poison" and original["request_id"] == record.request_id
            assert "refused by the test's trigger" in row["details"]["error"]
        else:
            assert (row["kind"], row["request_id"], row["actor"]) == ("inference", record.request_id, "key:good")
    assert store.verify().ok
    return rows


@pytest.mark.parametrize("writer", ["process", "thread"])
def test_a_refused_record_in_a_batch_holds_none_after_it(
    database_url: str, writer: str, caplog: pytest.LogCaptureFixture
) -> None:
    """The poison records are in the middle of one transaction's batch: the good ones are written once each, in
    order, each refused one replaced by a record that holds it; the server logs each and counts them."""
    store = AuditStore.open(database_url)
    _refuse(database_url, "key:poison")
    trail = AuditTrail({"ae": store}, "ae", writer=writer, commit_s=0.5, flush_interval_s=0.5)  # type: ignore[arg-type]
    told: list[int] = []
    trail.on_unwritable = told.append  # (the server's metric, dhow_audit_unwritable_records_total)
    records = _batch()

    async def scenario() -> None:
        await trail.start()
        for record in records[:-1]:
            trail.record(record)
        await asyncio.wait_for(trail.record_now(records[-1]), 30)  # durable once it returns, as are all before it
        assert trail.pending == 0
        await trail.close()

    try:
        with caplog.at_level(logging.ERROR, logger="dhow.audit"):
            asyncio.run(scenario())
        _check_replaced(store, records)
        assert _blocks(database_url) > 1  # (one batch, split to find the refused records)
        assert trail.unwritable == 2 and sum(told) == 2 and trail.written == 20 and trail.failures == 0
        logged = [r.getMessage() for r in caplog.records if "audit.unwritable" in r.getMessage()]
        assert len(logged) == 2 and "refused by the test's trigger" in logged[0]
    finally:
        store.close()


def _blocks(url: str) -> int:
    if url.startswith("sqlite://"):
        with sqlite3.connect(url[len("sqlite://") :]) as conn:
            return int(conn.execute("SELECT count(*) FROM dhow_audit_blocks").fetchone()[0])
    with psycopg.connect(url) as pg:
        row = pg.execute("SELECT count(*) FROM dhow_audit_blocks").fetchone()
        assert row is not None
        return int(row[0])


def test_a_store_that_refuses_the_stand_in_too_is_retried_and_nothing_is_replaced(database_url: str) -> None:
    """A store refusing even the ``audit.unwritable`` record is broken, not the record: the write fails as when it
    is down, what came before the refused record is written once, and the rest goes on from there later."""
    store = AuditStore.open(database_url)
    _refuse(database_url, "key:poison", "dhow:audit-writer")
    records = _batch()
    job = Appending([record.as_tuple() for record in records])
    try:
        with pytest.raises(RefusingAll, match="refused by the test's trigger"):
            job.run(store)
        assert job.done == 7 and job.refusals == [] and store.head()[0] == 7
        _allow(database_url)  # the DBA mended it: the retry writes the rest, the poison as itself
        assert job.run(store) == 20 and job.refusals == []
        assert [row["request_id"] for row in store.read()] == [record.request_id for record in records]
        assert store.verify().ok
    finally:
        store.close()


def _limit_rows(url: str, size: int) -> None:
    """Make the store refuse a block whose records take more than ``size`` bytes (as a DBA could limit a row's
    size): a trigger on PostgreSQL, its equivalent on SQLite."""
    message = "a row of the audit trail may hold at most 64 KB"
    if url.startswith("sqlite://"):
        with sqlite3.connect(url[len("sqlite://") :]) as conn:
            conn.execute(
                f"CREATE TRIGGER limited BEFORE INSERT ON dhow_audit_blocks WHEN length(CAST(NEW.records AS BLOB)) "
                f"> {size} BEGIN SELECT RAISE(ABORT, '{message}'); END"
            )
        return
    with psycopg.connect(url, autocommit=True) as pg:
        pg.execute(
            "CREATE FUNCTION limited() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN "
            f"IF octet_length(NEW.records) > {size} THEN RAISE EXCEPTION '{message}'; END IF; RETURN NEW; END $$"
        )
        pg.execute("CREATE TRIGGER limited BEFORE INSERT ON dhow_audit_blocks FOR EACH ROW EXECUTE FUNCTION limited()")


def test_a_stand_in_too_big_for_the_store_is_written_without_the_record(database_url: str) -> None:
    """A store that limits a row to 64 KB refuses a 65 KB record, and its stand-in, which holds it as text, is
    bigger still: a smaller stand-in goes in its place (the tenant, region and request id, the record's length and
    SHA-256, the start of the error), not an outage that fills the backlog; the chain verifies."""
    store = AuditStore.open(database_url)
    _limit_rows(database_url, 65_536)
    big = AuditRecord(
        "inference", "infer", "key:good", tenant="t1", region="eu", request_id="big", details={"x": "x" * 66_000}
    )
    records = [_record("key:good", f"r{i}") for i in range(3)] + [big, _record("key:good", "r4")]
    job = Appending([record.as_tuple() for record in records])
    try:
        assert job.run(store) == 5 and [seq for seq, _ in job.refusals] == [4]
        rows = store.read()
        assert [row["request_id"] for row in rows] == ["r0", "r1", "r2", "big", "r4"]
        stand_in = rows[3]
        assert (stand_in["kind"], stand_in["tenant"], stand_in["region"]) == (UNWRITABLE_KIND, "t1", "eu")
        assert stand_in["at"] == big.when() and "record" not in stand_in["details"]
        assert "at most 64 KB" in stand_in["details"]["error"] and len(stand_in["details"]["error"]) <= 200
        text = json.dumps(dict(zip(_FIELDS, big.as_tuple(), strict=True)), ensure_ascii=True, default=repr)
        assert len(text) > 65_536 and stand_in["details"]["record_chars"] == len(text)
        assert stand_in["details"]["record_sha256"] == hashlib.sha256(text.encode()).hexdigest()
        assert store.verify().ok
    finally:
        store.close()


def test_record_sha256_is_over_the_text_the_docs_give_with_its_fallbacks() -> None:
    """What an auditor recomputes (docs/security.md): ``json.dumps`` with ``default=repr`` for a value JSON has no
    form for; ``ascii(row)`` where ``json.dumps`` fails (here a cycle)."""
    row = list(_record("key:good", "r1").as_tuple())
    row[10] = {"odd": {1, 2}}
    text = json.dumps(dict(zip(_FIELDS, row, strict=True)), ensure_ascii=True, default=repr)
    assert '"{1, 2}"' in text and record_digest(row) == (len(text), hashlib.sha256(text.encode()).hexdigest())
    cycle: dict[str, Any] = {}
    cycle["self"] = cycle
    row[10] = cycle
    assert record_digest(row) == (len(ascii(row)), hashlib.sha256(ascii(row).encode()).hexdigest())


#: a record's fields as a stand-in's ``details.record`` names them (``AuditRecord.as_tuple``'s order)
_FIELDS = ("kind", "action", "actor", "tenant", "outcome", "model", "version", "request_id", "region", "latency_ms",
           "details", "at", "at_s")  # fmt: skip


@pytest.mark.parametrize("writer", ["process", "thread"])
def test_a_store_that_refuses_even_the_smallest_stand_in_is_said_once_and_shown_while_it_lasts(
    database_url: str, writer: str, caplog: pytest.LogCaptureFixture
) -> None:
    """The store refuses a record and every stand-in for it: the trail waits for it as in an outage (nothing
    replaced), says why once however often it retries, and shows it (``refusing_all``: the server's gauge) until a
    write works; the record replaced once the store takes its stand-in is counted once, as a replaced record (the
    episode before it is not a second count)."""
    # how many times the writer tried the refused record: a writer thread's failures (one a retry); a writer
    # process's, counted by PostgreSQL, or on SQLite (which keeps no trace of a transaction rolled back) its opens
    # of the store's file (it opens the store again at each retry), as Linux's inotify tells
    sqlite_process = writer == "process" and database_url.startswith("sqlite://")
    if sqlite_process and not _Opens.available():
        pytest.skip("a writer process's tries on SQLite are counted by inotify, which this system has not")
    store = AuditStore.open(database_url)
    _refuse(database_url, "key:poison", "dhow:audit-writer")
    trail = AuditTrail({"ae": store}, "ae", writer=writer, commit_s=0.1, flush_interval_s=0.1)  # type: ignore[arg-type]
    told: list[int] = []
    trail.on_unwritable = told.append  # (the server's metric, dhow_audit_unwritable_records_total)
    records = [_record("key:poison" if i == 3 else "key:good", f"r{i}") for i in range(6)]
    opens = _Opens(database_url[len("sqlite://") :]) if sqlite_process else None
    tries: Callable[[], int] = (lambda: trail.failures) if writer == "thread" else opens or _counted_tries(database_url)

    async def scenario() -> None:
        await trail.start()
        for record in records:
            trail.record(record)
        await _until(lambda: trail.refusing_all)
        # held while the writer retries several times (0.1 s, then 0.2 s, 0.4 s …): each retry must say nothing new
        await _until(lambda: tries() >= 4)
        if writer == "process":  # each error answer of the writer raises once in ``acknowledged``: one answer
            assert trail.failures == 1
        assert told == [] and trail.refusing_all and trail.pending >= 3 and store.head()[0] == 3
        said = [r.getMessage() for r in caplog.records if "smallest audit.unwritable stand-in" in r.getMessage()]
        assert len(said) == 1, said
        _refuse(database_url, "key:poison", instead=True)  # the DBA lets the writer's own records in
        await _written_again(trail)

    try:
        with caplog.at_level(logging.ERROR, logger="dhow.audit"):
            asyncio.run(scenario())
        rows = store.read()
        assert [row["request_id"] for row in rows] == [f"r{i}" for i in range(7)] and store.verify().ok
        assert rows[3]["kind"] == UNWRITABLE_KIND and told == [1] and trail.unwritable == 1
        said = [r.getMessage() for r in caplog.records if "smallest audit.unwritable stand-in" in r.getMessage()]
        assert len(said) == 1 and "refused by the test's trigger" in said[0] and "'r3'" in said[0]
    finally:
        store.close()
        if opens is not None:
            opens.close()


def test_the_regions_of_a_store_refusing_everything_are_told(tmp_path: Path) -> None:
    """The server's gauge has a series per data region: the regions whose records go to the store that refuses
    everything (two sharing it) are told, when it starts and when it ends; the other region's store is not."""
    urls = {name: f"sqlite://{tmp_path}/{name}.sqlite3" for name in ("ae", "eu")}
    stores = {name: AuditStore.open(url) for name, url in urls.items()}
    _refuse(urls["eu"], "key:poison", "dhow:audit-writer")
    trail = AuditTrail({"ae": stores["ae"], "eu": stores["eu"], "us": stores["eu"]}, "ae", flush_interval_s=0.1)
    told: list[tuple[str, bool]] = []
    trail.on_refusing_all = lambda region, refusing: told.append((region, refusing))

    async def scenario() -> None:
        await trail.start()
        trail.record(AuditRecord("inference", "infer", "key:poison", region="eu", request_id="r1"))
        await _until(lambda: trail.refusing_all)
        assert trail.refusing_regions == {"eu", "us"} and sorted(told) == [("eu", True), ("us", True)]
        await asyncio.wait_for(trail.record_now(_record("key:good", "r2")), 30)  # (the region ae writes)
        assert len(told) == 2
        _allow(urls["eu"])
        await asyncio.wait_for(trail.record_now(AuditRecord("admin", "x", "key:good", region="us")), 30)
        assert trail.refusing_regions == set() and sorted(told[2:]) == [("eu", False), ("us", False)]
        await trail.close()

    try:
        asyncio.run(scenario())
    finally:
        for store in stores.values():
            store.close()


def test_a_gauge_that_fails_for_one_region_is_still_set_for_the_others_and_said_once(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The server's gauge callback raises for one region of a store refusing everything: the other region sharing
    that store is told all the same, when it starts and when it ends, and the failure is logged once."""
    urls = {name: f"sqlite://{tmp_path}/{name}.sqlite3" for name in ("ae", "eu")}
    stores = {name: AuditStore.open(url) for name, url in urls.items()}
    _refuse(urls["eu"], "key:poison", "dhow:audit-writer")
    trail = AuditTrail({"ae": stores["ae"], "eu": stores["eu"], "us": stores["eu"]}, "ae", flush_interval_s=0.1)
    told: list[tuple[str, bool]] = []

    def gauge(region: str, refusing: bool) -> None:
        if region == "eu":  # (the lane's first region: its failure must not keep "us" from being set)
            raise ValueError("the gauge is broken")
        told.append((region, refusing))

    trail.on_refusing_all = gauge

    async def scenario() -> None:
        await trail.start()
        trail.record(AuditRecord("inference", "infer", "key:poison", region="eu", request_id="r1"))
        await _until(lambda: trail.refusing_all)
        assert told == [("us", True)]
        _allow(urls["eu"])
        await asyncio.wait_for(trail.record_now(AuditRecord("admin", "x", "key:good", region="us")), 30)
        assert told == [("us", True), ("us", False)]
        await trail.close()

    try:
        with caplog.at_level(logging.ERROR, logger="dhow.audit"):
            asyncio.run(scenario())
    finally:
        for store in stores.values():
            store.close()
    said = [r.getMessage() for r in caplog.records if "dhow_audit_refusing_all" in r.getMessage()]
    assert len(said) == 1 and "the gauge is broken" in said[0], said


def test_a_store_refusing_everything_after_an_outage_is_said_and_shown(
    pg_database: str, caplog: pytest.LogCaptureFixture
) -> None:
    """A writer process answered an outage (a read-only database) once; back, the store refuses a record and its
    smallest stand-in: the writer says so too (the state it answered changed), so the server logs and shows it."""
    store = AuditStore.open(pg_database)  # (its tables made: a read-only database could not)
    _refuse(pg_database, "key:poison", "dhow:audit-writer")
    name = pg_database.rpartition("/")[2]
    with psycopg.connect(PG_ADMIN_URL, autocommit=True) as pg:
        pg.execute(f'ALTER DATABASE "{name}" SET default_transaction_read_only = on')  # the writer's sessions
    trail = AuditTrail({"ae": store}, "ae", writer="process", commit_s=0.1)
    told: list[int] = []
    trail.on_unwritable = told.append
    records = [_record("key:poison" if i == 3 else "key:good", f"r{i}") for i in range(6)]

    async def scenario() -> None:
        await trail.start()
        for record in records:
            trail.record(record)
        await _until(lambda: trail.failures >= 1)  # the outage, answered
        with psycopg.connect(PG_ADMIN_URL, autocommit=True) as pg:
            pg.execute(f'ALTER DATABASE "{name}" RESET default_transaction_read_only')  # the writer's next session
        await _until(lambda: trail.refusing_all)
        assert told == [] and trail.pending == 6 and store.head()[0] == 3  # (what came before r3 is written)
        _allow(pg_database)
        await _written_again(trail)

    try:
        with caplog.at_level(logging.ERROR, logger="dhow.audit"):
            asyncio.run(scenario())
        assert [row["request_id"] for row in store.read()] == [f"r{i}" for i in range(7)] and store.verify().ok
        logged = [r.getMessage() for r in caplog.records]
        assert any("read-only" in line and "retrying until it works" in line for line in logged), logged
        said = [line for line in logged if "smallest audit.unwritable stand-in" in line]
        assert len(said) == 1 and "'r3'" in said[0]
    finally:
        store.close()


def _counted_tries(url: str) -> Callable[[], int]:
    """How many times the writer tried the poison record alone (once a retry, as it splits the batch to find the
    refused record), counted by PostgreSQL in a sequence, which no rollback undoes."""
    with psycopg.connect(url, autocommit=True) as pg:
        pg.execute("CREATE SEQUENCE poison_alone")
        pg.execute(
            "CREATE FUNCTION poison_alone() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN "
            "IF NEW.first_seq = NEW.last_seq AND position('key:poison' in NEW.records) > 0 "
            "AND position('audit.unwritable' in NEW.records) = 0 THEN PERFORM nextval('poison_alone'); END IF; "
            "RETURN NEW; END $$"
        )
        pg.execute(
            "CREATE TRIGGER poison_alone BEFORE INSERT ON dhow_audit_blocks FOR EACH ROW EXECUTE FUNCTION "
            "poison_alone()"
        )

    def tries() -> int:
        with psycopg.connect(url, autocommit=True) as pg:
            row = pg.execute("SELECT CASE WHEN is_called THEN last_value ELSE 0 END FROM poison_alone").fetchone()
            assert row is not None
            return int(row[0])

    return tries


class _Opens:
    """How many times a file was opened since (by any process), as Linux's inotify tells: events of opens and
    closes, which alternate, so that the kernel merges none (it merges an event with an identical one unread)."""

    IN_OPEN, IN_CLOSE = 0x20, 0x08 | 0x10

    @staticmethod
    def _libc() -> Any:
        return ctypes.CDLL(None, use_errno=True)

    @classmethod
    def available(cls) -> bool:
        """Whether this system has inotify (Linux's C library: ``inotify_init1``)."""
        try:
            return hasattr(cls._libc(), "inotify_init1")
        except (OSError, TypeError):  # (TypeError: Windows has no CDLL(None))
            return False

    def __init__(self, path: str) -> None:
        libc = self._libc()
        self._fd = libc.inotify_init1(os.O_NONBLOCK | os.O_CLOEXEC)
        if self._fd < 0 or libc.inotify_add_watch(self._fd, path.encode(), self.IN_OPEN | self.IN_CLOSE) < 0:
            raise OSError(ctypes.get_errno(), f"inotify on {path}")
        self._count = 0

    def __call__(self) -> int:
        with contextlib.suppress(BlockingIOError):
            while events := os.read(self._fd, 1 << 16):
                # struct inotify_event: wd, mask, cookie, len (0: a watched file has no name), 16 bytes each
                for (mask,) in struct.iter_unpack("4xI8x", events):
                    self._count += bool(mask & self.IN_OPEN)
        return self._count

    def close(self) -> None:
        os.close(self._fd)


async def _until(condition: Callable[[], bool], timeout_s: float = 30.0) -> None:
    """Wait until ``condition`` holds (a writer retries with backoff: 0.1 s doubling to 5 s); fail after a while."""
    for _ in range(int(timeout_s / 0.1)):
        if condition():
            return
        await asyncio.sleep(0.1)
    raise AssertionError(f"not within {timeout_s} s")


async def _written_again(trail: AuditTrail) -> None:
    """Once the store takes the writer's records again: a new record is written, the state ends, the trail closes."""
    await asyncio.wait_for(trail.record_now(_record("key:good", "r6")), 30)
    assert not trail.refusing_all
    await trail.close()


def test_a_stand_in_keeps_the_tenant_unless_the_store_refuses_it_too(database_url: str) -> None:
    """A tenant's auditor reads only its tenant's records: the stand-in keeps the refused record's tenant, region
    and request id as the record held them; when that is what the store refuses, it keeps none, in no tenant."""
    store = AuditStore.open(database_url)
    _refuse(database_url, "t:poison", "key:poison")
    records = [
        AuditRecord("inference", "infer", "key:poison", tenant="t\x00\u00e9", region="eu", request_id="r1"),
        AuditRecord("inference", "infer", "key:good", tenant="t:poison", request_id="r2"),
    ]
    job = Appending([record.as_tuple() for record in records])
    try:
        assert job.run(store) == 2 and len(job.refusals) == 2
        first, second = store.read()
        assert (first["kind"], first["tenant"], first["region"], first["request_id"]) == (
            UNWRITABLE_KIND, "t\x00\u00e9", "eu", "r1"
        )  # fmt: skip
        assert first["at"] == records[0].when()  # (when it happened, not when its stand-in was written)
        assert (second["kind"], second["tenant"], second["request_id"]) == (UNWRITABLE_KIND, "", "")
        assert orjson.loads(second["details"]["record"])["tenant"] == "t:poison" and store.verify().ok
    finally:
        store.close()


def test_a_value_the_database_cannot_encode_is_kept_as_escaped_text(latin1_database: str) -> None:
    """A model or key name with an emoji on a LATIN1 database: refused by PostgreSQL itself (not a trigger); its
    stand-in is ASCII, the records after it are written."""
    store = AuditStore.open(latin1_database)
    records = [_record("key:good", "a"), _record("key:\U0001f600", "b"), _record("key:good", "c")]
    trail = AuditTrail({"ae": store}, "ae", writer="process")

    async def scenario() -> None:
        await trail.start()
        for record in records:
            trail.record(record)
        await trail.close()

    try:
        asyncio.run(scenario())
        rows = store.read()
        assert [row["request_id"] for row in rows] == ["a", "b", "c"] and rows[1]["kind"] == UNWRITABLE_KIND
        assert "\\ud83d\\ude00" in rows[1]["details"]["record"] and "latin-1" in rows[1]["details"]["error"]
        assert orjson.loads(rows[1]["details"]["record"])["actor"] == "key:\U0001f600"
        assert store.verify().ok and trail.unwritable == 1
    finally:
        store.close()


def test_a_statement_past_a_postgresql_limit_is_a_refusal_not_an_outage(pg_database: str) -> None:
    """PostgreSQL's "program limit exceeded" (an index entry too big, say) is an OperationalError, as an outage is;
    retried, it fails again: the record is replaced, the rest written."""
    store = AuditStore.open(pg_database)
    with psycopg.connect(pg_database, autocommit=True) as pg:
        pg.execute(
            "CREATE FUNCTION too_big() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN IF NEW.value = 'key:poison' "
            "THEN RAISE EXCEPTION 'index row too big' USING ERRCODE = 'program_limit_exceeded'; END IF; RETURN NEW; "
            "END $$"
        )
        pg.execute("CREATE TRIGGER too_big BEFORE INSERT ON dhow_audit_keys FOR EACH ROW EXECUTE FUNCTION too_big()")
    job = Appending([record.as_tuple() for record in _batch()])
    try:
        assert job.run(store) == 20 and [seq for seq, _ in job.refusals] == [8, 15]
        assert "index row too big" in job.refusals[0][1] and store.verify().ok
    finally:
        store.close()


def test_many_refused_records_are_split_out_without_trying_the_rest_again_each_time(tmp_path: Path) -> None:
    """Each refused record used to start the split again over every record after it (a user the store refuses,
    busy, took the writer under a few hundred records a second): the rows tried now stay within n (log2 n + 2)."""
    url = f"sqlite:///{tmp_path}/audit.db"
    store = AuditStore.open(url)
    _refuse(url, "key:poison")
    records = [_record("key:poison" if n % 16 == 5 else "key:good", f"r{n}") for n in range(512)]
    tried: list[int] = []
    append = store.append_rows

    def counted(rows: Any) -> int:
        tried.append(len(rows))
        return append(rows)

    store.append_rows = counted  # type: ignore[method-assign]
    job = Appending([record.as_tuple() for record in records])
    try:
        assert job.run(store) == 512 and len(job.refusals) == 32
        assert sum(tried) <= 512 * (math.log2(512) + 2), (sum(tried), len(tried))
        read = store.read(limit=1000)
        assert [row["request_id"] for row in read] == [f"r{n}" for n in range(512)] and store.verify().ok
    finally:
        store.close()


def test_a_read_only_postgresql_is_down_for_the_writer_not_a_refusal(pg_database: str) -> None:
    """A standby during a failover (or default_transaction_read_only) refuses every write with 25006, which psycopg
    raises as an InternalError: it is an outage, retried, and no record is replaced by a stand-in."""
    store = AuditStore.open(pg_database)  # (its tables made: a read-only database could not)
    job = Appending([_record("key:good", "r1").as_tuple()])
    try:
        with psycopg.connect(pg_database, autocommit=True) as pg:
            name = pg.execute("SELECT current_database()").fetchone()[0]  # type: ignore[index]
            pg.execute(f'ALTER DATABASE "{name}" SET default_transaction_read_only = on')
            # the store's session ends: its next one is read-only
            pg.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = %s AND pid <> "
                       "pg_backend_pid()", (name,))  # fmt: skip
        with pytest.raises(Unavailable):  # the session that ended
            job.run(store)
        with pytest.raises(Unavailable, match="read-only"):
            job.run(store)
        assert job.done == 0 and job.refusals == []
    finally:
        store.close()
