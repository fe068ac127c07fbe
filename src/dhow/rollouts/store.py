"""The registry store: deployments, their history and events, in SQLite or PostgreSQL.

One connection per store, guarded by a lock (callers use worker threads). Edits are optimistic: each names
the revision it was based on, and a stale one is refused with ``Conflict``. Every change writes the
deployment row, a history row and bumps the registry's generation in one transaction.

The schema is versioned: ``MIGRATIONS`` is an ordered list of numbered steps, each applied once, in its own
transaction, when a store opens (see ``dhow.registry.database``). Adding a schema change is adding one
``Migration`` entry at the end.
"""

from __future__ import annotations

import builtins
from dataclasses import dataclass
from typing import Any

import orjson

from dhow.core.errors import Conflict, DhowError, InvalidInput, NotFound
from dhow.registry.database import Database, Migration, Session, utc_now

__all__ = ["MIGRATIONS", "Deployment", "Event", "HistoryRow", "Migration", "RegistryStore", "check_name"]

#: longest deployment name accepted
MAX_NAME_LENGTH = 200
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


def _stale(name: str, current: int, expected: int) -> Conflict:
    return Conflict(f"deployment {name!r} is at revision {current}, not {expected}: read it again and retry")


def _missing(name: str) -> NotFound:
    return NotFound(f"no deployment {name!r}")


class RegistryStore(Database):
    """Deployments, their history and events in one database; safe to call from several threads."""

    @classmethod
    def open(cls, url: str) -> RegistryStore:
        """Connects to ``sqlite:///path`` or ``postgresql://...`` and brings the schema up to date."""
        return cls._open(url, MIGRATIONS, "registry")

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

    def _current(self, session: Session, name: str) -> tuple[int, str] | None:
        """The revision and policy text of a deployment, locked until the transaction ends (PostgreSQL)."""
        lock = " FOR UPDATE" if self.dialect == "postgresql" else ""
        row = session.one(f"SELECT revision, policy FROM dhow_deployments WHERE name = ?{lock}", (name,))
        return None if row is None else (int(row[0]), str(row[1]))

    def _bump_generation(self, session: Session) -> None:
        session.execute("UPDATE dhow_registry_state SET generation = generation + 1 WHERE id = 1")

    def _record(
        self,
        session: Session,
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
