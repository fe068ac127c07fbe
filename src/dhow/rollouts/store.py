"""The registry store: deployments, their history and events, in SQLite or PostgreSQL.

One connection per store, guarded by a lock (callers use worker threads). Edits are optimistic: each names
the revision it was based on, and a stale one is refused with ``Conflict``. Every change writes the
deployment row, a history row and bumps the registry's generation in one transaction.

The schema is versioned: ``MIGRATIONS`` is an ordered list of numbered steps, each applied once, in its own
transaction, when a store opens (under an advisory lock on PostgreSQL, under SQLite's write lock on SQLite).
Adding a schema change is adding one ``Migration`` entry at the end.
"""

from __future__ import annotations

import builtins
import sqlite3
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal
from urllib.parse import unquote, urlsplit, urlunsplit

import orjson
import psycopg

from dhow.core.errors import Conflict, DhowError, InvalidInput, NotFound, Unavailable

Dialect = Literal["sqlite", "postgresql"]

#: longest deployment name accepted
MAX_NAME_LENGTH = 200
#: seconds a SQLite writer waits for another process's write lock before giving up
SQLITE_BUSY_TIMEOUT_S = 30.0
#: seconds to wait for a PostgreSQL server to answer a connection attempt
PG_CONNECT_TIMEOUT_S = 5
#: key of the PostgreSQL advisory lock held while migrating ("dhow" in ASCII)
PG_MIGRATION_LOCK = 0x64686F77

_URL_FORMS = "sqlite:///absolute/path/registry.sqlite3 or postgresql://user@host:port/database"


@dataclass(frozen=True, slots=True)
class Migration:
    """One numbered schema change; each dialect's SQL is a sequence of single statements."""

    version: int
    description: str
    sqlite: tuple[str, ...]
    postgresql: tuple[str, ...]

    def statements(self, dialect: Dialect) -> tuple[str, ...]:
        return self.sqlite if dialect == "sqlite" else self.postgresql


#: the schema, oldest first; append new entries, never edit applied ones
MIGRATIONS: list[Migration] = [
    Migration(
        1,
        "deployments, their history and events; the registry generation",
        sqlite=(
            """CREATE TABLE dhow_deployments (
                name TEXT PRIMARY KEY,
                policy TEXT NOT NULL,
                revision INTEGER NOT NULL,
                updated_at TEXT NOT NULL,
                updated_by TEXT NOT NULL
            )""",
            """CREATE TABLE dhow_deployment_history (
                id INTEGER PRIMARY KEY AUTOINCREMENT,
                name TEXT NOT NULL,
                revision INTEGER NOT NULL,
                changed_at TEXT NOT NULL,
                actor TEXT NOT NULL,
                action TEXT NOT NULL,
                reason TEXT NOT NULL,
                before_policy TEXT,
                after_policy TEXT
            )""",
            "CREATE INDEX dhow_deployment_history_by_name ON dhow_deployment_history (name, id)",
            """CREATE TABLE dhow_deployment_events (
                id INTEGER PRIMARY KEY AUTOINCREMENT,
                name TEXT NOT NULL,
                happened_at TEXT NOT NULL,
                kind TEXT NOT NULL,
                details TEXT NOT NULL
            )""",
            "CREATE INDEX dhow_deployment_events_by_name ON dhow_deployment_events (name, id)",
            """CREATE TABLE dhow_registry_state (
                id INTEGER PRIMARY KEY CHECK (id = 1),
                generation INTEGER NOT NULL
            )""",
            "INSERT INTO dhow_registry_state (id, generation) VALUES (1, 0)",
        ),
        postgresql=(
            """CREATE TABLE dhow_deployments (
                name TEXT PRIMARY KEY,
                policy TEXT NOT NULL,
                revision BIGINT NOT NULL,
                updated_at TEXT NOT NULL,
                updated_by TEXT NOT NULL
            )""",
            """CREATE TABLE dhow_deployment_history (
                id BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
                name TEXT NOT NULL,
                revision BIGINT NOT NULL,
                changed_at TEXT NOT NULL,
                actor TEXT NOT NULL,
                action TEXT NOT NULL,
                reason TEXT NOT NULL,
                before_policy TEXT,
                after_policy TEXT
            )""",
            "CREATE INDEX dhow_deployment_history_by_name ON dhow_deployment_history (name, id)",
            """CREATE TABLE dhow_deployment_events (
                id BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
                name TEXT NOT NULL,
                happened_at TEXT NOT NULL,
                kind TEXT NOT NULL,
                details TEXT NOT NULL
            )""",
            "CREATE INDEX dhow_deployment_events_by_name ON dhow_deployment_events (name, id)",
            """CREATE TABLE dhow_registry_state (
                id INTEGER PRIMARY KEY CHECK (id = 1),
                generation BIGINT NOT NULL
            )""",
            "INSERT INTO dhow_registry_state (id, generation) VALUES (1, 0)",
        ),
    ),
]

_MIGRATIONS_TABLE = """CREATE TABLE IF NOT EXISTS dhow_schema_migrations (
    version INTEGER PRIMARY KEY,
    description TEXT NOT NULL,
    applied_at TEXT NOT NULL
)"""


@dataclass(frozen=True, slots=True)
class Deployment:
    """A deployment as stored: its policy and the revision an edit must name."""

    name: str
    policy: dict[str, Any]
    revision: int
    updated_at: str
    updated_by: str

    def as_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "policy": self.policy,
            "revision": self.revision,
            "updated_at": self.updated_at,
            "updated_by": self.updated_by,
        }


@dataclass(frozen=True, slots=True)
class HistoryRow:
    """One change of a deployment: the revision it produced and the policy before and after."""

    name: str
    revision: int
    at: str
    actor: str
    action: str
    reason: str
    before: dict[str, Any] | None
    after: dict[str, Any] | None

    def as_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "revision": self.revision,
            "at": self.at,
            "actor": self.actor,
            "action": self.action,
            "reason": self.reason,
            "before": self.before,
            "after": self.after,
        }


@dataclass(frozen=True, slots=True)
class Event:
    """Something that happened to a deployment (an analysis decision, with its figures)."""

    name: str
    at: str
    kind: str
    details: dict[str, Any]

    def as_dict(self) -> dict[str, Any]:
        return {"name": self.name, "at": self.at, "kind": self.kind, "details": self.details}


def utc_now() -> str:
    """The current time as UTC ISO 8601 with microseconds."""
    return datetime.now(UTC).isoformat(timespec="microseconds")


def redact_url(url: str) -> str:
    """The URL without its password, for messages and logs."""
    try:
        parts = urlsplit(url)
        if parts.password is None:
            return url
        netloc = parts.hostname or ""
        if parts.username:
            netloc = f"{parts.username}:***@{netloc}"
        if parts.port is not None:
            netloc = f"{netloc}:{parts.port}"
        return urlunsplit(parts._replace(netloc=netloc))
    except ValueError:
        return "<unparsable registry URL>"


def check_name(name: object) -> str:
    """A valid deployment name, or ``InvalidInput``."""
    if not isinstance(name, str) or not name:
        raise InvalidInput("a deployment name must be a non-empty string")
    if len(name) > MAX_NAME_LENGTH:
        raise InvalidInput(f"a deployment name must be at most {MAX_NAME_LENGTH} characters, not {len(name)}")
    if "/" in name:
        raise InvalidInput(f"a deployment name must not contain '/': {name!r}")
    return name


def _check_revision(expected_revision: object) -> int:
    if isinstance(expected_revision, bool) or not isinstance(expected_revision, int) or expected_revision < 0:
        raise InvalidInput(f"a revision must be an integer >= 0, not {expected_revision!r}")
    return expected_revision


def _encode(value: object, what: str) -> str:
    if not isinstance(value, dict):
        raise InvalidInput(f"{what} must be a JSON object, not {type(value).__name__}")
    try:
        return orjson.dumps(value).decode()
    except TypeError as err:
        raise InvalidInput(f"{what} is not JSON: {err}") from None


def _decode(text: str | None) -> dict[str, Any] | None:
    if text is None:
        return None
    value = orjson.loads(text)
    if not isinstance(value, dict):
        raise DhowError(f"the registry holds a policy that is not a JSON object: {text[:80]!r}")
    return value


def _decode_object(text: str) -> dict[str, Any]:
    value = _decode(text)
    assert value is not None
    return value


#: SQLite primary result codes that mean the database cannot be used now (locked, I/O, full, unopenable)
_SQLITE_OUTAGES = frozenset(
    {sqlite3.SQLITE_BUSY, sqlite3.SQLITE_LOCKED, sqlite3.SQLITE_READONLY, sqlite3.SQLITE_IOERR}
    | {sqlite3.SQLITE_FULL, sqlite3.SQLITE_CANTOPEN, sqlite3.SQLITE_PROTOCOL}
)


def _is_outage(err: sqlite3.OperationalError | psycopg.OperationalError) -> bool:
    """Whether the error means the database is unreachable or busy, rather than a fault in a statement."""
    if isinstance(err, psycopg.OperationalError):
        return True
    return (err.sqlite_errorcode & 0xFF) in _SQLITE_OUTAGES


def _stale(name: str, current: int, expected: int) -> Conflict:
    return Conflict(f"deployment {name!r} is at revision {current}, not {expected}: read it again and retry")


def _missing(name: str) -> NotFound:
    return NotFound(f"no deployment {name!r}")


class _Session:
    """Statements on one cursor; SQL is written with ``?`` placeholders and adapted to the dialect."""

    def __init__(self, cursor: sqlite3.Cursor | psycopg.Cursor[Any], dialect: Dialect) -> None:
        self._cursor = cursor
        self._dialect = dialect

    def _sql(self, sql: str) -> str:
        return sql if self._dialect == "sqlite" else sql.replace("?", "%s")

    def execute(self, sql: str, params: Sequence[object] = ()) -> int:
        """Runs a statement; answers the number of rows it changed."""
        self._cursor.execute(self._sql(sql), params)
        return int(self._cursor.rowcount)

    def one(self, sql: str, params: Sequence[object] = ()) -> tuple[Any, ...] | None:
        self._cursor.execute(self._sql(sql), params)
        row = self._cursor.fetchone()
        return None if row is None else tuple(row)

    def all(self, sql: str, params: Sequence[object] = ()) -> builtins.list[tuple[Any, ...]]:
        self._cursor.execute(self._sql(sql), params)
        return [tuple(row) for row in self._cursor.fetchall()]


def _sqlite_wal(conn: sqlite3.Connection) -> None:
    """Puts the database in WAL mode (persistent), retrying while other processes hold it.

    Switching the journal mode needs an exclusive lock, and SQLite does not always call the busy handler for it
    (e.g. when several connections open a new file at once), so "database is locked" is retried here.
    """
    deadline = time.monotonic() + SQLITE_BUSY_TIMEOUT_S
    while True:
        try:
            row = conn.execute("PRAGMA journal_mode").fetchone()
            if row is not None and str(row[0]).lower() == "wal":
                return
            conn.execute("PRAGMA journal_mode = WAL")
            return  # WAL, or the mode this file system allows
        except sqlite3.OperationalError as err:
            if (err.sqlite_errorcode & 0xFF) not in (sqlite3.SQLITE_BUSY, sqlite3.SQLITE_LOCKED):
                raise
            if time.monotonic() > deadline:
                raise
            time.sleep(0.01)


def _parse_url(url: str) -> tuple[Dialect, str]:
    """The dialect and what to open: a file path for SQLite, the URL itself for PostgreSQL."""
    if not isinstance(url, str):
        raise InvalidInput(f"the registry URL must be a string: {_URL_FORMS}")
    if url.startswith("sqlite://"):
        rest = url[len("sqlite://") :]
        if not rest.startswith("/") or rest.strip("/") == "" or "?" in rest or "#" in rest:
            raise InvalidInput(f"the registry URL {url!r} is not accepted: use {_URL_FORMS}")
        return "sqlite", "/" + unquote(rest).lstrip("/")
    if url.startswith(("postgresql://", "postgres://")):
        return "postgresql", url
    raise InvalidInput(f"the registry URL {redact_url(url)!r} is not accepted: use {_URL_FORMS}")


class RegistryStore:
    """Deployments, their history and events in one database; safe to call from several threads."""

    def __init__(self, dialect: Dialect, target: str, url: str) -> None:
        """Use ``RegistryStore.open``; this only connects."""
        self.dialect: Dialect = dialect
        self.url = redact_url(url)
        self._target = target
        self._lock = threading.Lock()
        self._closed = False
        self._sqlite: sqlite3.Connection | None = None
        self._pg: psycopg.Connection[Any] | None = None
        #: the migration versions this store applied when it opened (empty when the schema was current)
        self.migrations_applied: tuple[int, ...] = ()
        self._connect()

    @classmethod
    def open(cls, url: str) -> RegistryStore:
        """Connects to ``sqlite:///path`` or ``postgresql://...`` and brings the schema up to date."""
        dialect, target = _parse_url(url)
        store = cls(dialect, target, url)
        try:
            store._migrate()
        except BaseException:
            store.close()
            raise
        return store

    # -- connections and transactions ---------------------------------------------------------------

    def _connect(self) -> None:
        if self.dialect == "sqlite":
            try:
                Path(self._target).parent.mkdir(parents=True, exist_ok=True)
                conn = sqlite3.connect(
                    self._target, timeout=SQLITE_BUSY_TIMEOUT_S, check_same_thread=False, isolation_level=None
                )
            except (OSError, sqlite3.Error) as err:
                raise Unavailable(f"cannot open the registry at {self.url}: {err}") from None
            try:
                conn.execute(f"PRAGMA busy_timeout = {int(SQLITE_BUSY_TIMEOUT_S * 1000)}")
                _sqlite_wal(conn)
            except sqlite3.Error as err:
                conn.close()
                raise Unavailable(f"cannot open the registry at {self.url}: {err}") from None
            self._sqlite = conn
        else:
            try:
                self._pg = psycopg.connect(self._target, autocommit=True, connect_timeout=PG_CONNECT_TIMEOUT_S)
            except psycopg.Error as err:
                raise Unavailable(f"cannot reach the registry at {self.url}: {self._describe(err)}") from None

    def _describe(self, err: BaseException) -> str:
        text = " ".join(str(err).split())
        password = urlsplit(self._target).password if self.dialect == "postgresql" else None
        return text.replace(password, "***") if password else text

    def _ensure_connected(self) -> None:
        if self._closed:
            raise Unavailable("the registry store is closed")
        if self.dialect == "postgresql" and (self._pg is None or self._pg.closed or self._pg.broken):
            # the server restarted or the network dropped: reconnect (``Unavailable`` until it answers)
            if self._pg is not None:
                self._pg.close()
                self._pg = None
            self._connect()

    @contextmanager
    def _read(self) -> Iterator[_Session]:
        """A session for reads, outside any transaction."""
        with self._lock:
            self._ensure_connected()
            try:
                if self._sqlite is not None:
                    cursor = self._sqlite.cursor()
                    try:
                        yield _Session(cursor, "sqlite")
                    finally:
                        cursor.close()
                else:
                    assert self._pg is not None
                    with self._pg.cursor() as pg_cursor:
                        yield _Session(pg_cursor, "postgresql")
            except (sqlite3.OperationalError, psycopg.OperationalError) as err:
                if _is_outage(err):
                    raise Unavailable(f"the registry at {self.url} failed: {self._describe(err)}") from None
                raise

    @contextmanager
    def _write(self, *, migration_lock: bool = False) -> Iterator[_Session]:
        """A session inside one transaction: committed on success, rolled back on any exception.

        SQLite takes the database's write lock at the start (``BEGIN IMMEDIATE``), so writers from any
        process are serialised; PostgreSQL relies on row locks, plus an advisory lock when migrating.
        """
        with self._lock:
            self._ensure_connected()
            try:
                if self._sqlite is not None:
                    conn = self._sqlite
                    cursor = conn.cursor()
                    try:
                        cursor.execute("BEGIN IMMEDIATE")
                        try:
                            yield _Session(cursor, "sqlite")
                            cursor.execute("COMMIT")
                        except BaseException:
                            if conn.in_transaction:
                                conn.rollback()
                            raise
                    finally:
                        cursor.close()
                else:
                    assert self._pg is not None
                    with self._pg.transaction(), self._pg.cursor() as pg_cursor:
                        session = _Session(pg_cursor, "postgresql")
                        if migration_lock:
                            session.execute("SELECT pg_advisory_xact_lock(?)", (PG_MIGRATION_LOCK,))
                        yield session
            except (sqlite3.OperationalError, psycopg.OperationalError) as err:
                if _is_outage(err):
                    raise Unavailable(f"the registry at {self.url} failed: {self._describe(err)}") from None
                raise

    def close(self) -> None:
        """Closes the connection; later calls raise ``Unavailable``."""
        with self._lock:
            self._closed = True
            if self._sqlite is not None:
                self._sqlite.close()
                self._sqlite = None
            if self._pg is not None:
                self._pg.close()
                self._pg = None

    # -- migrations ---------------------------------------------------------------------------------

    def _migrate(self) -> None:
        migrations = sorted(MIGRATIONS, key=lambda m: m.version)
        versions = [m.version for m in migrations]
        if len(set(versions)) != len(versions) or any(v < 1 for v in versions):
            raise DhowError(f"the registry migrations must have distinct versions >= 1, not {versions}")
        with self._write(migration_lock=True) as session:
            session.execute(_MIGRATIONS_TABLE)
            applied = {int(row[0]) for row in session.all("SELECT version FROM dhow_schema_migrations")}
        done: builtins.list[int] = []
        for migration in migrations:
            if migration.version in applied:
                continue
            try:
                with self._write(migration_lock=True) as session:
                    # another process may have applied it since the first look
                    if session.one("SELECT 1 FROM dhow_schema_migrations WHERE version = ?", (migration.version,)):
                        continue
                    for statement in migration.statements(self.dialect):
                        session.execute(statement)
                    session.execute(
                        "INSERT INTO dhow_schema_migrations (version, description, applied_at) VALUES (?, ?, ?)",
                        (migration.version, migration.description, utc_now()),
                    )
            except (sqlite3.Error, psycopg.Error) as err:
                raise DhowError(
                    f"registry migration {migration.version} ({migration.description}) failed at {self.url}: "
                    f"{self._describe(err)}"
                ) from err
            done.append(migration.version)
        self.migrations_applied = tuple(done)

    def schema_version(self) -> int:
        """The highest migration applied to the database."""
        with self._read() as session:
            row = session.one("SELECT MAX(version) FROM dhow_schema_migrations")
        return int(row[0]) if row and row[0] is not None else 0

    # -- deployments --------------------------------------------------------------------------------

    _DEPLOYMENT_COLUMNS = "name, policy, revision, updated_at, updated_by"

    @staticmethod
    def _deployment(row: tuple[Any, ...]) -> Deployment:
        return Deployment(
            name=row[0], policy=_decode_object(row[1]), revision=int(row[2]), updated_at=row[3], updated_by=row[4]
        )

    def get(self, name: str) -> Deployment | None:
        """The deployment, or None when there is none by that name."""
        check_name(name)
        with self._read() as session:
            row = session.one(f"SELECT {self._DEPLOYMENT_COLUMNS} FROM dhow_deployments WHERE name = ?", (name,))
        return None if row is None else self._deployment(row)

    def list(self) -> builtins.list[Deployment]:
        """Every deployment, sorted by name."""
        with self._read() as session:
            rows = session.all(f"SELECT {self._DEPLOYMENT_COLUMNS} FROM dhow_deployments ORDER BY name")
        return sorted((self._deployment(row) for row in rows), key=lambda d: d.name)

    def _current(self, session: _Session, name: str) -> tuple[int, str] | None:
        """The revision and policy text of a deployment, locked until the transaction ends (PostgreSQL)."""
        lock = " FOR UPDATE" if self.dialect == "postgresql" else ""
        row = session.one(f"SELECT revision, policy FROM dhow_deployments WHERE name = ?{lock}", (name,))
        return None if row is None else (int(row[0]), str(row[1]))

    def _bump_generation(self, session: _Session) -> None:
        session.execute("UPDATE dhow_registry_state SET generation = generation + 1 WHERE id = 1")

    def _record(
        self,
        session: _Session,
        name: str,
        revision: int,
        at: str,
        actor: str,
        action: str,
        reason: str,
        before: str | None,
        after: str | None,
    ) -> None:
        session.execute(
            "INSERT INTO dhow_deployment_history"
            " (name, revision, changed_at, actor, action, reason, before_policy, after_policy)"
            " VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
            (name, revision, at, actor, action, reason, before, after),
        )

    def put(
        self,
        name: str,
        policy: dict[str, Any],
        *,
        expected_revision: int,
        actor: str,
        action: str,
        reason: str,
    ) -> Deployment:
        """Creates (``expected_revision`` 0) or edits a deployment; answers it at its new revision."""
        check_name(name)
        expected = _check_revision(expected_revision)
        text = _encode(policy, "a policy")
        at = utc_now()
        with self._write() as session:
            current = self._current(session, name)
            if expected == 0:
                if current is not None:
                    raise _stale(name, current[0], expected)
                before = None
                self._bump_generation(session)
                changed = session.execute(
                    "INSERT INTO dhow_deployments (name, policy, revision, updated_at, updated_by)"
                    " VALUES (?, ?, 1, ?, ?) ON CONFLICT (name) DO NOTHING",
                    (name, text, at, actor),
                )
            else:
                if current is None:
                    raise _missing(name)
                if current[0] != expected:
                    raise _stale(name, current[0], expected)
                before = current[1]
                self._bump_generation(session)
                changed = session.execute(
                    "UPDATE dhow_deployments SET policy = ?, revision = ?, updated_at = ?, updated_by = ?"
                    " WHERE name = ? AND revision = ?",
                    (text, expected + 1, at, actor, name, expected),
                )
            if changed != 1:
                # another writer got there between our look and our write
                now = self._current(session, name)
                if now is None:
                    raise _missing(name)
                raise _stale(name, now[0], expected)
            self._record(session, name, expected + 1, at, actor, action, reason, before, text)
        return Deployment(
            name=name, policy=_decode_object(text), revision=expected + 1, updated_at=at, updated_by=actor
        )

    def delete(self, name: str, *, expected_revision: int, actor: str, reason: str) -> None:
        """Deletes a deployment at ``expected_revision``; its history stays, and a new one starts at 1."""
        check_name(name)
        expected = _check_revision(expected_revision)
        at = utc_now()
        with self._write() as session:
            current = self._current(session, name)
            if current is None:
                raise _missing(name)
            if current[0] != expected:
                raise _stale(name, current[0], expected)
            self._bump_generation(session)
            changed = session.execute("DELETE FROM dhow_deployments WHERE name = ? AND revision = ?", (name, expected))
            if changed != 1:
                now = self._current(session, name)
                if now is None:
                    raise _missing(name)
                raise _stale(name, now[0], expected)
            self._record(session, name, expected + 1, at, actor, "delete", reason, current[1], None)

    def history(self, name: str) -> builtins.list[HistoryRow]:
        """Every change of the deployment by that name, oldest first (deleted ones included)."""
        check_name(name)
        with self._read() as session:
            rows = session.all(
                "SELECT name, revision, changed_at, actor, action, reason, before_policy, after_policy"
                " FROM dhow_deployment_history WHERE name = ? ORDER BY id",
                (name,),
            )
        return [
            HistoryRow(
                name=row[0],
                revision=int(row[1]),
                at=row[2],
                actor=row[3],
                action=row[4],
                reason=row[5],
                before=_decode(row[6]),
                after=_decode(row[7]),
            )
            for row in rows
        ]

    # -- events -------------------------------------------------------------------------------------

    def add_event(self, name: str, kind: str, details: dict[str, Any]) -> Event:
        """Records an event for the deployment by that name (it need not exist any more)."""
        check_name(name)
        if not isinstance(kind, str) or not kind:
            raise InvalidInput("an event kind must be a non-empty string")
        text = _encode(details, "event details")
        at = utc_now()
        with self._write() as session:
            session.execute(
                "INSERT INTO dhow_deployment_events (name, happened_at, kind, details) VALUES (?, ?, ?, ?)",
                (name, at, kind, text),
            )
        return Event(name=name, at=at, kind=kind, details=_decode_object(text))

    def events(self, name: str) -> builtins.list[Event]:
        """The events of the deployment by that name, oldest first."""
        check_name(name)
        with self._read() as session:
            rows = session.all(
                "SELECT name, happened_at, kind, details FROM dhow_deployment_events WHERE name = ? ORDER BY id",
                (name,),
            )
        return [Event(name=row[0], at=row[1], kind=row[2], details=_decode_object(row[3])) for row in rows]

    # -- change detection ---------------------------------------------------------------------------

    def generation(self) -> int:
        """A counter that every create, edit and delete raises, by any process sharing the database."""
        with self._read() as session:
            row = session.one("SELECT generation FROM dhow_registry_state WHERE id = 1")
        return int(row[0]) if row else 0
