"""One database of dhow's own (registry, access, audit) in SQLite or PostgreSQL, with numbered migrations.

One connection per ``Database``, guarded by a lock (callers use worker threads). ``read()`` gives a session
outside any transaction, ``write()`` one inside a transaction that SQLite starts with ``BEGIN IMMEDIATE`` (so
writers of every process are serialised) and PostgreSQL with row locks (plus an advisory lock on request).

The schema is versioned: a store passes an ordered list of ``Migration`` steps and the name of the table that
records them; each step is applied once, in its own transaction, when the store opens.
"""

from __future__ import annotations

import builtins
import contextlib
import os
import sqlite3
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal, TypeVar
from urllib.parse import unquote, urlsplit, urlunsplit

import psycopg

from dhow.core.errors import DhowError, InvalidInput, Unavailable

__all__ = ["Database", "Dialect", "Migration", "Session", "parse_url", "redact_url", "utc_now"]

Dialect = Literal["sqlite", "postgresql"]

#: seconds a SQLite writer waits for another process's write lock before giving up
SQLITE_BUSY_TIMEOUT_S = 30.0
#: seconds to wait for a PostgreSQL server to answer a connection attempt
PG_CONNECT_TIMEOUT_S = 5
#: key of the PostgreSQL advisory lock held while migrating ("dhow" in ASCII)
PG_MIGRATION_LOCK = 0x64686F77

_URL_FORMS = "sqlite:///absolute/path/file.sqlite3 or postgresql://user@host:port/database"


@dataclass(frozen=True, slots=True)
class Migration:
    """One numbered schema change; each dialect's SQL is a sequence of single statements."""

    version: int
    description: str
    sqlite: tuple[str, ...]
    postgresql: tuple[str, ...]

    def statements(self, dialect: Dialect) -> tuple[str, ...]:
        return self.sqlite if dialect == "sqlite" else self.postgresql


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
        return "<unparsable database URL>"


#: SQLite primary result codes that mean the database cannot be used now (locked, I/O, full, unopenable)
_SQLITE_OUTAGES = frozenset(
    {sqlite3.SQLITE_BUSY, sqlite3.SQLITE_LOCKED, sqlite3.SQLITE_READONLY, sqlite3.SQLITE_IOERR}
    | {sqlite3.SQLITE_FULL, sqlite3.SQLITE_CANTOPEN, sqlite3.SQLITE_PROTOCOL}
)


#: PostgreSQL SQLSTATEs that end the session or refuse any write whatever the statement, though psycopg raises them
#: as other classes than OperationalError: a read-only transaction (a standby during a failover), an idle or a
#: transaction timeout; and the classes of connection (08), transaction rollback (40), resources (53), intervention
#: (57) and system errors (58)
_PG_OUTAGE_STATES = frozenset({"25006", "25P03", "25P04"})
_PG_OUTAGE_CLASSES = frozenset({"08", "40", "53", "57", "58"})


def _is_outage(err: sqlite3.OperationalError | psycopg.Error) -> bool:
    """Whether the error means the database is unreachable, busy or cannot be written now, rather than a fault in a
    statement. PostgreSQL's "program limit exceeded" (class 54: an index entry or a statement too big) is a
    statement's: retried, it fails again, and a writer that retries an outage forever (the audit trail's) would stop
    on it; a session that ended with the error (a broken connection) is an outage whatever its class."""
    if isinstance(err, psycopg.Error):
        state = err.sqlstate or ""
        if state in _PG_OUTAGE_STATES or state[:2] in _PG_OUTAGE_CLASSES:
            return True
        if isinstance(err, psycopg.OperationalError):
            return not state.startswith("54")
        return False
    return (err.sqlite_errorcode & 0xFF) in _SQLITE_OUTAGES


class Session:
    """Statements on one cursor; SQL is written with ``?`` placeholders and adapted to the dialect."""

    def __init__(self, cursor: sqlite3.Cursor | psycopg.Cursor[Any], dialect: Dialect) -> None:
        self._cursor = cursor
        self.dialect = dialect

    def _sql(self, sql: str) -> str:
        return sql if self.dialect == "sqlite" else sql.replace("?", "%s")

    def execute(self, sql: str, params: Sequence[object] = ()) -> int:
        """Runs a statement; answers the number of rows it changed."""
        self._cursor.execute(self._sql(sql), params)
        return int(self._cursor.rowcount)

    def executemany(self, sql: str, rows: Sequence[Sequence[object]]) -> None:
        self._cursor.executemany(self._sql(sql), rows)

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


def _create_private(path: Path) -> None:
    """Create an absent database file with mode 0600, as the masking key is: it holds keys, tenants, audit records.

    SQLite would create it 0644 (less the umask), and gives its -wal and -shm files the database file's mode.
    An existing file keeps its mode: an operator may have chosen it.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    # O_EXCL, never an open of an existing file: closing any descriptor of a file drops every POSIX lock this
    # process holds on it, and SQLite's locks are POSIX locks (another store of this process may hold them)
    with contextlib.suppress(FileExistsError):
        os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600))


def parse_url(url: str, what: str = "database") -> tuple[Dialect, str]:
    """The dialect and what to open: a file path for SQLite, the URL itself for PostgreSQL."""
    if not isinstance(url, str):
        raise InvalidInput(f"the {what} URL must be a string: {_URL_FORMS}")
    if url.startswith("sqlite://"):
        rest = url[len("sqlite://") :]
        if not rest.startswith("/") or rest.strip("/") == "" or "?" in rest or "#" in rest:
            raise InvalidInput(f"the {what} URL {url!r} is not accepted: use {_URL_FORMS}")
        return "sqlite", "/" + unquote(rest).lstrip("/")
    if url.startswith(("postgresql://", "postgres://")):
        return "postgresql", url
    raise InvalidInput(f"the {what} URL {redact_url(url)!r} is not accepted: use {_URL_FORMS}")


_Store = TypeVar("_Store", bound="Database")


class Database:
    """One database connection, safe to call from several threads; subclasses add the domain's queries.

    ``what`` names the database in messages ("the registry", "the audit store").
    """

    #: the table recording this store's applied migrations (stores sharing a database use distinct tables)
    migrations_table = "dhow_schema_migrations"

    def __init__(self, dialect: Dialect, target: str, url: str, what: str = "the registry") -> None:
        """Use the subclass's ``open``; this only connects."""
        self.dialect: Dialect = dialect
        self.url = redact_url(url)
        self.what = what
        self._target = target
        self._lock = threading.Lock()
        self._closed = False
        self._sqlite: sqlite3.Connection | None = None
        self._pg: psycopg.Connection[Any] | None = None
        #: the migration versions this store applied when it opened (empty when the schema was current)
        self.migrations_applied: tuple[int, ...] = ()
        self._connect()

    @classmethod
    def _open(cls: type[_Store], url: str, migrations: Sequence[Migration], kind: str) -> _Store:
        """Connects to ``sqlite:///path`` or ``postgresql://...`` and brings the schema up to date.

        ``kind`` names the database in messages: "registry" gives "the registry URL ...", "the registry at ...".
        """
        dialect, target = parse_url(url, kind)
        store = cls(dialect, target, url, f"the {kind}")
        try:
            store._migrate(migrations)
        except BaseException:
            store.close()
            raise
        return store

    # -- connections and transactions ---------------------------------------------------------------

    def _connect(self) -> None:
        if self.dialect == "sqlite":
            try:
                _create_private(Path(self._target))
                conn = sqlite3.connect(
                    self._target, timeout=SQLITE_BUSY_TIMEOUT_S, check_same_thread=False, isolation_level=None
                )
            except (OSError, sqlite3.Error) as err:
                raise Unavailable(f"cannot open {self.what} at {self.url}: {err}") from None
            try:
                conn.execute(f"PRAGMA busy_timeout = {int(SQLITE_BUSY_TIMEOUT_S * 1000)}")
                _sqlite_wal(conn)
            except sqlite3.Error as err:
                conn.close()
                raise Unavailable(f"cannot open {self.what} at {self.url}: {err}") from None
            self._sqlite = conn
        else:
            try:
                self._pg = psycopg.connect(self._target, autocommit=True, connect_timeout=PG_CONNECT_TIMEOUT_S)
            except psycopg.Error as err:
                raise Unavailable(f"cannot reach {self.what} at {self.url}: {self._describe(err)}") from None

    @property
    def open_url(self) -> str:
        """The URL to open this database again (with its password: never log it; ``url`` is for messages)."""
        return f"sqlite:///{self._target}" if self.dialect == "sqlite" else self._target

    def _outage(self, err: sqlite3.OperationalError | psycopg.Error) -> bool:
        """``_is_outage``, or a PostgreSQL session the error left broken (whatever its class)."""
        return _is_outage(err) or (self._pg is not None and self._pg.broken)

    def _describe(self, err: BaseException) -> str:
        text = " ".join(str(err).split())
        password = urlsplit(self._target).password if self.dialect == "postgresql" else None
        return text.replace(password, "***") if password else text

    def _ensure_connected(self) -> None:
        if self._closed:
            raise Unavailable(f"{self.what} is closed")
        if self.dialect == "postgresql" and (self._pg is None or self._pg.closed or self._pg.broken):
            # the server restarted or the network dropped: reconnect (``Unavailable`` until it answers)
            if self._pg is not None:
                self._pg.close()
                self._pg = None
            self._connect()

    @contextmanager
    def _read(self) -> Iterator[Session]:
        """A session for reads, outside any transaction."""
        with self._lock:
            self._ensure_connected()
            try:
                if self._sqlite is not None:
                    cursor = self._sqlite.cursor()
                    try:
                        yield Session(cursor, "sqlite")
                    finally:
                        cursor.close()
                else:
                    assert self._pg is not None
                    with self._pg.cursor() as pg_cursor:
                        yield Session(pg_cursor, "postgresql")
            except (sqlite3.OperationalError, psycopg.Error) as err:
                if self._outage(err):
                    raise Unavailable(f"{self.what} at {self.url} failed: {self._describe(err)}") from None
                raise

    @contextmanager
    def _write(self, *, lock_key: int | None = None) -> Iterator[Session]:
        """A session inside one transaction: committed on success, rolled back on any exception.

        SQLite takes the database's write lock at the start (``BEGIN IMMEDIATE``), so writers from any
        process are serialised; PostgreSQL relies on row locks, plus the advisory lock ``lock_key`` if given.
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
                            yield Session(cursor, "sqlite")
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
                        session = Session(pg_cursor, "postgresql")
                        if lock_key is not None:
                            session.execute("SELECT pg_advisory_xact_lock(?)", (lock_key,))
                        yield session
            except (sqlite3.OperationalError, psycopg.Error) as err:
                if self._outage(err):
                    raise Unavailable(f"{self.what} at {self.url} failed: {self._describe(err)}") from None
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

    def _migrate(self, migrations: Sequence[Migration]) -> None:
        ordered = sorted(migrations, key=lambda m: m.version)
        versions = [m.version for m in ordered]
        if len(set(versions)) != len(versions) or any(v < 1 for v in versions):
            raise DhowError(f"the migrations of {self.what} must have distinct versions >= 1, not {versions}")
        table = self.migrations_table
        create = (
            f"CREATE TABLE IF NOT EXISTS {table} "
            "(version INTEGER PRIMARY KEY, description TEXT NOT NULL, applied_at TEXT NOT NULL)"
        )
        with self._write(lock_key=PG_MIGRATION_LOCK) as session:
            session.execute(create)
            applied = {int(row[0]) for row in session.all(f"SELECT version FROM {table}")}
        done: builtins.list[int] = []
        for migration in ordered:
            if migration.version in applied:
                continue
            try:
                with self._write(lock_key=PG_MIGRATION_LOCK) as session:
                    # another process may have applied it since the first look
                    if session.one(f"SELECT 1 FROM {table} WHERE version = ?", (migration.version,)):
                        continue
                    for statement in migration.statements(self.dialect):
                        session.execute(statement)
                    session.execute(
                        f"INSERT INTO {table} (version, description, applied_at) VALUES (?, ?, ?)",
                        (migration.version, migration.description, utc_now()),
                    )
            except (sqlite3.Error, psycopg.Error) as err:
                raise DhowError(
                    f"migration {migration.version} ({migration.description}) of {self.what} failed at {self.url}: "
                    f"{self._describe(err)}"
                ) from err
            done.append(migration.version)
        self.migrations_applied = tuple(done)

    def schema_version(self) -> int:
        """The highest migration applied to the database."""
        with self._read() as session:
            row = session.one(f"SELECT MAX(version) FROM {self.migrations_table}")
        return int(row[0]) if row and row[0] is not None else 0
