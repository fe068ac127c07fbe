"""The registry store on real databases: SQLite in a temporary folder and PostgreSQL in a fresh database."""

from __future__ import annotations

import socket
import sqlite3
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from datetime import datetime, timedelta
from functools import partial
from pathlib import Path
from typing import Any

import psycopg
import pytest

from dhow.core.errors import Conflict, DhowError, InvalidInput, NotFound, Unavailable
from dhow.rollouts import store as store_module
from dhow.rollouts.store import Deployment, Migration, RegistryStore
from tests.conftest import PG_ADMIN_URL, store_opener

PINNED_1: dict[str, Any] = {"kind": "pinned", "version": 1}
PINNED_2: dict[str, Any] = {"kind": "pinned", "version": 2}
CANARY: dict[str, Any] = {"kind": "canary", "primary": 1, "canary": 2, "steps": [5, 25, 50, 100], "step": 0}


def _closed_port() -> int:
    """A local port nothing listens on (bound once, then released)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture
def registry_url(database_url: str) -> str:
    return database_url


@pytest.fixture
def open_store(registry_url: str) -> Iterator[Callable[[], RegistryStore]]:
    with store_opener(RegistryStore.open, registry_url) as opener:
        yield opener


@pytest.fixture
def store(open_store: Callable[[], RegistryStore]) -> RegistryStore:
    return open_store()


def _create(store: RegistryStore, name: str, policy: dict[str, Any] = PINNED_1) -> Deployment:
    return store.put(name, policy, expected_revision=0, actor="alice", action="create", reason="first")


def _is_utc_iso(text: str) -> bool:
    return datetime.fromisoformat(text).utcoffset() == timedelta(0) and text.endswith("+00:00")


# -- create, read, edit ------------------------------------------------------------------------------


def test_create_get_and_list(store: RegistryStore) -> None:
    assert store.get("fraud") is None
    assert store.list() == []
    created = _create(store, "fraud")
    assert created.name == "fraud"
    assert created.policy == PINNED_1
    assert created.revision == 1
    assert created.updated_by == "alice"
    assert _is_utc_iso(created.updated_at)
    assert store.get("fraud") == created
    _create(store, "churn", CANARY)
    _create(store, "ads")
    assert [d.name for d in store.list()] == ["ads", "churn", "fraud"]
    assert store.get("churn") is not None
    assert store.get("churn").policy == CANARY  # type: ignore[union-attr]
    assert created.as_dict() == {
        "name": "fraud",
        "policy": PINNED_1,
        "revision": 1,
        "updated_at": created.updated_at,
        "updated_by": "alice",
    }


def test_returned_policy_is_a_copy(store: RegistryStore) -> None:
    policy = dict(PINNED_1)
    created = _create(store, "fraud", policy)
    policy["version"] = 9
    assert created.policy == PINNED_1
    assert store.get("fraud").policy == PINNED_1  # type: ignore[union-attr]


def test_edits_increment_the_revision(store: RegistryStore) -> None:
    _create(store, "fraud")
    second = store.put("fraud", PINNED_2, expected_revision=1, actor="bob", action="edit", reason="v2")
    assert (second.revision, second.policy, second.updated_by) == (2, PINNED_2, "bob")
    third = store.put("fraud", CANARY, expected_revision=2, actor="carol", action="edit", reason="canary")
    assert third.revision == 3
    assert store.get("fraud") == third


def test_stale_revision_is_a_conflict_and_changes_nothing(store: RegistryStore) -> None:
    _create(store, "fraud")
    for revision in (2, 3, 4):
        store.put(
            "fraud",
            {"kind": "pinned", "version": revision},
            expected_revision=revision - 1,
            actor="a",
            action="edit",
            reason="",
        )
    generation = store.generation()
    with pytest.raises(Conflict) as caught:
        store.put("fraud", PINNED_1, expected_revision=3, actor="a", action="edit", reason="")
    assert caught.value.message == "deployment 'fraud' is at revision 4, not 3: read it again and retry"
    assert store.get("fraud").revision == 4  # type: ignore[union-attr]
    assert len(store.history("fraud")) == 4
    assert store.generation() == generation


def test_create_of_an_existing_one_is_a_conflict(store: RegistryStore) -> None:
    _create(store, "fraud")
    with pytest.raises(Conflict, match="deployment 'fraud' is at revision 1, not 0"):
        _create(store, "fraud", PINNED_2)
    assert store.get("fraud").policy == PINNED_1  # type: ignore[union-attr]


def test_edit_or_delete_of_a_missing_one_is_not_found(store: RegistryStore) -> None:
    with pytest.raises(NotFound) as caught:
        store.put("fraud", PINNED_1, expected_revision=3, actor="a", action="edit", reason="")
    assert caught.value.message == "no deployment 'fraud'"
    with pytest.raises(NotFound, match="no deployment 'fraud'"):
        store.delete("fraud", expected_revision=1, actor="a", reason="")
    assert store.list() == []
    assert store.history("fraud") == []


@pytest.mark.parametrize("name", ["", "a/b", "x" * 201])
def test_bad_names_are_refused(store: RegistryStore, name: str) -> None:
    with pytest.raises(InvalidInput, match="deployment name"):
        store.put(name, PINNED_1, expected_revision=0, actor="a", action="create", reason="")
    with pytest.raises(InvalidInput):
        store.get(name)
    with pytest.raises(InvalidInput):
        store.add_event(name, "rollback", {})


def test_longest_name_is_accepted(store: RegistryStore) -> None:
    name = "n" * 200
    assert _create(store, name).name == name
    assert store.get(name) is not None


@pytest.mark.parametrize("revision", [-1, True, "1", 1.0])
def test_bad_revisions_are_refused(store: RegistryStore, revision: Any) -> None:
    with pytest.raises(InvalidInput, match="revision"):
        store.put("fraud", PINNED_1, expected_revision=revision, actor="a", action="create", reason="")


def test_policies_must_be_json_objects(store: RegistryStore) -> None:
    with pytest.raises(InvalidInput, match="JSON object"):
        store.put("fraud", [1, 2], expected_revision=0, actor="a", action="create", reason="")  # type: ignore[arg-type]
    with pytest.raises(InvalidInput, match="not JSON"):
        store.put("fraud", {"x": object()}, expected_revision=0, actor="a", action="create", reason="")
    assert store.get("fraud") is None


# -- delete and history -------------------------------------------------------------------------------


def test_history_records_every_change_and_survives_delete(store: RegistryStore) -> None:
    _create(store, "fraud")
    store.put("fraud", CANARY, expected_revision=1, actor="bob", action="edit", reason="try v2")
    with pytest.raises(Conflict):
        store.delete("fraud", expected_revision=1, actor="carol", reason="stale")
    store.delete("fraud", expected_revision=2, actor="carol", reason="retired")
    assert store.get("fraud") is None
    assert store.list() == []

    rows = store.history("fraud")
    assert [(r.revision, r.actor, r.action, r.reason) for r in rows] == [
        (1, "alice", "create", "first"),
        (2, "bob", "edit", "try v2"),
        (3, "carol", "delete", "retired"),
    ]
    assert [(r.before, r.after) for r in rows] == [(None, PINNED_1), (PINNED_1, CANARY), (CANARY, None)]
    assert all(_is_utc_iso(r.at) for r in rows)
    assert [r.at for r in rows] == sorted(r.at for r in rows)
    assert rows[1].as_dict() == {
        "name": "fraud",
        "revision": 2,
        "at": rows[1].at,
        "actor": "bob",
        "action": "edit",
        "reason": "try v2",
        "before": PINNED_1,
        "after": CANARY,
    }

    again = _create(store, "fraud", PINNED_2)
    assert again.revision == 1
    assert [r.action for r in store.history("fraud")] == ["create", "edit", "delete", "create"]
    assert store.history("other") == []


# -- events -------------------------------------------------------------------------------------------


def test_events_are_kept_in_order(store: RegistryStore) -> None:
    assert store.events("fraud") == []
    first = store.add_event("fraud", "rollback", {"error_rate": 0.2, "guard": "max_error_rate"})
    second = store.add_event("fraud", "advance", {"step": 1})
    store.add_event("churn", "advance", {"step": 2})
    assert first.kind == "rollback" and first.details == {"error_rate": 0.2, "guard": "max_error_rate"}
    assert _is_utc_iso(first.at)
    assert store.events("fraud") == [first, second]
    assert second.as_dict() == {"name": "fraud", "at": second.at, "kind": "advance", "details": {"step": 1}}
    with pytest.raises(InvalidInput):
        store.add_event("fraud", "", {})
    with pytest.raises(InvalidInput):
        store.add_event("fraud", "x", ["not", "an", "object"])  # type: ignore[arg-type]


# -- generation and sharing ---------------------------------------------------------------------------


def test_generation_changes_on_every_change_and_is_shared(open_store: Callable[[], RegistryStore]) -> None:
    one, two = open_store(), open_store()
    seen = [one.generation()]
    assert two.generation() == seen[-1]

    def changed() -> None:
        now = one.generation()
        assert now != seen[-1]
        assert two.generation() == now
        seen.append(now)

    _create(one, "fraud")
    changed()
    two.put("fraud", PINNED_2, expected_revision=1, actor="b", action="edit", reason="")
    changed()
    _create(two, "churn")
    changed()
    one.delete("fraud", expected_revision=2, actor="c", reason="")
    changed()
    assert len(set(seen)) == len(seen)

    # refused edits and events do not count as changes
    with pytest.raises(Conflict):
        two.put("churn", PINNED_2, expected_revision=7, actor="b", action="edit", reason="")
    one.add_event("churn", "advance", {})
    assert one.generation() == two.generation() == seen[-1]
    assert two.get("fraud") is None
    assert [d.name for d in two.list()] == ["churn"]


def test_data_survives_reopening(open_store: Callable[[], RegistryStore]) -> None:
    first = open_store()
    _create(first, "fraud")
    first.add_event("fraud", "advance", {"step": 1})
    first.close()
    second = open_store()
    assert second.get("fraud") is not None
    assert len(second.history("fraud")) == 1
    assert len(second.events("fraud")) == 1
    assert second.migrations_applied == ()


def test_a_closed_store_refuses_calls(store: RegistryStore) -> None:
    store.close()
    store.close()
    with pytest.raises(Unavailable, match="closed"):
        store.list()


# -- concurrency --------------------------------------------------------------------------------------


def _race(calls: list[Callable[[], object]]) -> tuple[list[object], list[BaseException]]:
    """Runs the calls in threads released together; answers what they returned and raised."""
    barrier = threading.Barrier(len(calls))
    results: list[object] = []
    errors: list[BaseException] = []
    guard = threading.Lock()

    def run(call: Callable[[], object]) -> None:
        barrier.wait()
        try:
            value = call()
        except BaseException as err:
            with guard:
                errors.append(err)
        else:
            with guard:
                results.append(value)

    threads = [threading.Thread(target=run, args=(call,)) for call in calls]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    return results, errors


def test_concurrent_writers_one_wins(open_store: Callable[[], RegistryStore]) -> None:
    stores = [open_store() for _ in range(4)]
    rounds = 10
    # create: one of four wins
    results, errors = _race(
        [
            partial(
                s.put,
                "fraud",
                {"kind": "pinned", "version": i},
                expected_revision=0,
                actor=f"w{i}",
                action="create",
                reason="",
            )
            for i, s in enumerate(stores)
        ]
    )
    assert len(results) == 1, errors
    assert len(errors) == 3 and all(isinstance(e, Conflict) for e in errors), errors
    # edits with the same expected revision: one of four wins, every round
    for revision in range(1, rounds + 1):
        results, errors = _race(
            [
                partial(
                    s.put,
                    "fraud",
                    {"kind": "pinned", "version": i},
                    expected_revision=revision,
                    actor=f"w{i}",
                    action="edit",
                    reason="",
                )
                for i, s in enumerate(stores)
            ]
        )
        assert len(results) == 1, errors
        assert len(errors) == 3 and all(isinstance(e, Conflict) for e in errors), errors
        winner = results[0]
        assert isinstance(winner, Deployment) and winner.revision == revision + 1
        assert stores[0].get("fraud") == winner
    history = stores[1].history("fraud")
    assert [r.revision for r in history] == list(range(1, rounds + 2))
    # each row's "before" is the previous row's "after": no lost update
    assert all(history[i].before == history[i - 1].after for i in range(1, len(history)))


def test_threads_share_one_store(store: RegistryStore) -> None:
    names = [f"model-{i}" for i in range(8)]
    _, errors = _race([partial(_create, store, n) for n in names])
    assert errors == []
    assert [d.name for d in store.list()] == sorted(names)
    _, errors = _race(
        [partial(store.put, n, PINNED_2, expected_revision=1, actor="b", action="edit", reason="") for n in names]
    )
    assert errors == []
    assert all(d.revision == 2 for d in store.list())


def test_concurrent_opens_migrate_once(registry_url: str) -> None:
    results, errors = _race([partial(RegistryStore.open, registry_url) for _ in range(4)])
    stores = [s for s in results if isinstance(s, RegistryStore)]
    try:
        assert errors == []
        assert sum(len(s.migrations_applied) for s in stores) == len(store_module.MIGRATIONS)
        assert all(s.schema_version() == 1 for s in stores)
    finally:
        for s in stores:
            s.close()


# -- migrations ---------------------------------------------------------------------------------------


def _migration_rows(store: RegistryStore) -> list[tuple[Any, ...]]:
    with store._read() as session:
        return session.all("SELECT version, description, applied_at FROM dhow_schema_migrations ORDER BY version")


def test_an_added_migration_is_applied_once(
    open_store: Callable[[], RegistryStore], monkeypatch: pytest.MonkeyPatch
) -> None:
    first = open_store()
    assert first.schema_version() == 1
    assert first.migrations_applied == (1,)
    _create(first, "fraud")
    first.close()

    # not idempotent on purpose: applying it twice would fail or add a second row
    statements = ("CREATE TABLE dhow_test_extra (note TEXT NOT NULL)", "INSERT INTO dhow_test_extra VALUES ('once')")
    extra = Migration(2, "a test table", sqlite=statements, postgresql=statements)
    monkeypatch.setattr(store_module, "MIGRATIONS", [*store_module.MIGRATIONS, extra])

    second = open_store()
    assert second.migrations_applied == (2,)
    assert second.schema_version() == 2
    rows = _migration_rows(second)
    assert [(r[0], r[1]) for r in rows] == [(1, store_module.MIGRATIONS[0].description), (2, "a test table")]
    assert all(_is_utc_iso(r[2]) for r in rows)
    assert second.get("fraud") is not None
    second.close()

    third = open_store()
    assert third.migrations_applied == ()
    assert _migration_rows(third) == rows
    with third._read() as session:
        assert session.all("SELECT note FROM dhow_test_extra") == [("once",)]


def test_a_failing_migration_leaves_no_trace(
    open_store: Callable[[], RegistryStore], monkeypatch: pytest.MonkeyPatch
) -> None:
    open_store().close()
    statements = ("CREATE TABLE dhow_test_half (x INTEGER)", "INSERT INTO dhow_no_such_table VALUES (1)")
    broken = Migration(2, "half of it fails", sqlite=statements, postgresql=statements)
    monkeypatch.setattr(store_module, "MIGRATIONS", [*store_module.MIGRATIONS, broken])
    with pytest.raises(DhowError, match="migration 2 \\(half of it fails\\) of the registry failed"):
        open_store()

    monkeypatch.setattr(store_module, "MIGRATIONS", store_module.MIGRATIONS[:1])
    store = open_store()
    assert store.schema_version() == 1
    with pytest.raises((sqlite3.Error, psycopg.Error)), store._read() as session:
        session.all("SELECT x FROM dhow_test_half")


def test_migration_versions_must_be_distinct(
    open_store: Callable[[], RegistryStore], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(store_module, "MIGRATIONS", [*store_module.MIGRATIONS, store_module.MIGRATIONS[0]])
    with pytest.raises(DhowError, match="distinct versions"):
        open_store()


# -- URLs ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "url",
    ["", "registry.sqlite3", "sqlite://relative/registry.sqlite3", "sqlite:///", "mysql://u@h/db", "http://x/y"],
)
def test_bad_urls_are_refused(url: str) -> None:
    with pytest.raises(InvalidInput) as caught:
        RegistryStore.open(url)
    assert "sqlite:///" in caught.value.message and "postgresql://" in caught.value.message


def test_refused_url_hides_the_password() -> None:
    with pytest.raises(InvalidInput) as caught:
        RegistryStore.open("mysql://root:hunter2@db/registry")
    assert "hunter2" not in caught.value.message


def test_sqlite_urls_with_three_or_four_slashes(tmp_path: Path) -> None:
    for url in (f"sqlite://{tmp_path}/a/r.sqlite3", f"sqlite:///{tmp_path}/b/r.sqlite3"):
        store = RegistryStore.open(url)
        try:
            assert store.dialect == "sqlite"
            _create(store, "fraud")
        finally:
            store.close()
    assert (tmp_path / "a" / "r.sqlite3").is_file()
    assert (tmp_path / "b" / "r.sqlite3").is_file()
    with sqlite3.connect(tmp_path / "a" / "r.sqlite3") as conn:
        assert conn.execute("PRAGMA journal_mode").fetchone() == ("wal",)
    conn.close()


def test_sqlite_that_cannot_be_opened_is_unavailable(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("not a folder")
    with pytest.raises(Unavailable, match="cannot open the registry"):
        RegistryStore.open(f"sqlite://{tmp_path}/file/registry.sqlite3")


@pytest.mark.parametrize("scheme", ["postgresql", "postgres"])
def test_unreachable_postgresql_is_unavailable(scheme: str) -> None:
    port = _closed_port()
    with pytest.raises(Unavailable) as caught:
        RegistryStore.open(f"{scheme}://postgres:s3cret@127.0.0.1:{port}/test")
    message = caught.value.message
    assert f"{scheme}://postgres:***@127.0.0.1:{port}/test" in message
    assert "s3cret" not in message
    assert isinstance(caught.value, DhowError)


def test_postgres_scheme_is_accepted(pg_database: str) -> None:
    store = RegistryStore.open(pg_database.replace("postgresql://", "postgres://", 1))
    try:
        assert store.dialect == "postgresql"
        assert store.schema_version() == 1
    finally:
        store.close()


def test_postgresql_reconnects_after_the_connection_drops(pg_database: str) -> None:
    store = RegistryStore.open(pg_database)
    try:
        _create(store, "fraud")
        database = pg_database.rpartition("/")[2]
        with psycopg.connect(PG_ADMIN_URL, autocommit=True) as admin:
            admin.execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = %s AND pid <> pg_backend_pid()",
                (database,),
            )
        with pytest.raises(Unavailable):
            store.list()
        assert [d.name for d in store.list()] == ["fraud"]
    finally:
        store.close()


def test_two_processes_write_to_one_database(registry_url: str) -> None:
    """Separate processes (SQLite: separate file locks) edit one database; no write is lost or refused."""
    script = (
        "import sys\n"
        "from dhow.rollouts.store import RegistryStore\n"
        "store = RegistryStore.open(sys.argv[1])\n"
        "for i in range(25):\n"
        "    name = f'{sys.argv[2]}-{i}'\n"
        "    for revision, version in ((0, 1), (1, 2)):\n"
        "        store.put(name, {'kind': 'pinned', 'version': version}, expected_revision=revision,\n"
        "                  actor='p', action='edit', reason='')\n"
        "store.close()\n"
    )
    store = RegistryStore.open(registry_url)
    try:
        before = store.generation()
        processes = [
            subprocess.Popen([sys.executable, "-c", script, registry_url, prefix], stderr=subprocess.PIPE)
            for prefix in ("a", "b")
        ]
        for process in processes:
            _, stderr = process.communicate(timeout=120)
            assert process.returncode == 0, stderr.decode()
        deployments = store.list()
        assert len(deployments) == 50
        assert all(d.revision == 2 and d.policy == PINNED_2 for d in deployments)
        assert store.generation() != before
    finally:
        store.close()
