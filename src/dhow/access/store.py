"""The access store: principals (API keys and client-certificate identities), tenants and trusted digests.

It lives in the registry's database (its own tables and migrations table) so that every server sharing the
registry sees the same keys; a generation counter, raised by every change, lets servers reload only when
something changed. Secrets are never stored: a key keeps its salt and salted hash (see ``keys.py``).
"""

from __future__ import annotations

import builtins
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import orjson

from dhow.access.keys import new_key
from dhow.access.permissions import ALL_TENANTS, parse_grant
from dhow.access.ratelimit import Limits
from dhow.core.errors import InvalidInput, NotFound
from dhow.registry.database import Database, Migration, Session, utc_now

__all__ = ["AccessStore", "Limits", "PrincipalRecord", "TenantRecord"]

UNLIMITED = Limits()
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._@-]{0,127}$")

_TABLES = (
    """CREATE TABLE dhow_principals (
        id TEXT PRIMARY KEY,
        kind TEXT NOT NULL,
        name TEXT NOT NULL,
        tenant TEXT NOT NULL,
        roles TEXT NOT NULL,
        region TEXT NOT NULL,
        salt TEXT,
        secret_hash TEXT,
        rate DOUBLE PRECISION NOT NULL,
        burst INTEGER NOT NULL,
        concurrency INTEGER NOT NULL,
        created_at TEXT NOT NULL,
        created_by TEXT NOT NULL,
        expires_at TEXT,
        revoked_at TEXT,
        replaced_by TEXT
    )""",
    """CREATE TABLE dhow_tenants (
        name TEXT PRIMARY KEY,
        rate DOUBLE PRECISION NOT NULL,
        burst INTEGER NOT NULL,
        concurrency INTEGER NOT NULL,
        region TEXT NOT NULL,
        updated_at TEXT NOT NULL,
        updated_by TEXT NOT NULL
    )""",
    """CREATE TABLE dhow_artifact_digests (
        model TEXT NOT NULL,
        version TEXT NOT NULL,
        path TEXT NOT NULL,
        sha256 TEXT NOT NULL,
        recorded_at TEXT NOT NULL,
        recorded_by TEXT NOT NULL,
        PRIMARY KEY (model, version, path)
    )""",
    "CREATE TABLE dhow_access_state (id INTEGER PRIMARY KEY CHECK (id = 1), generation BIGINT NOT NULL)",
    "INSERT INTO dhow_access_state (id, generation) VALUES (1, 0)",
)

MIGRATIONS = [Migration(1, "principals, tenants, trusted artifact digests", sqlite=_TABLES, postgresql=_TABLES)]


@dataclass(frozen=True, slots=True)
class PrincipalRecord:
    id: str
    kind: str  # "key" or "cert"
    name: str
    tenant: str
    roles: tuple[str, ...]
    region: str
    limits: Limits
    created_at: str
    created_by: str
    expires_at: str | None = None
    revoked_at: str | None = None
    replaced_by: str | None = None
    salt: str | None = None
    secret_hash: str | None = None

    def active(self, now: datetime | None = None) -> bool:
        if self.revoked_at is not None:
            return False
        if self.expires_at is None:
            return True
        return datetime.fromisoformat(self.expires_at) > (now or datetime.now(UTC))

    def as_dict(self) -> dict[str, Any]:
        """What may be shown: everything but the salt and hash."""
        return {
            "id": self.id,
            "kind": self.kind,
            "name": self.name,
            "tenant": self.tenant,
            "roles": list(self.roles),
            "region": self.region,
            "rate": self.limits.rate,
            "burst": self.limits.burst,
            "concurrency": self.limits.concurrency,
            "created_at": self.created_at,
            "created_by": self.created_by,
            "expires_at": self.expires_at,
            "revoked_at": self.revoked_at,
            "replaced_by": self.replaced_by,
            "active": self.active(),
        }


@dataclass(frozen=True, slots=True)
class TenantRecord:
    name: str
    limits: Limits
    region: str

    def as_dict(self) -> dict[str, Any]:
        limits = self.limits
        return {"name": self.name, "rate": limits.rate, "burst": limits.burst, "concurrency": limits.concurrency}


_COLUMNS = (
    "id, kind, name, tenant, roles, region, rate, burst, concurrency, created_at, created_by, expires_at,"
    " revoked_at, replaced_by, salt, secret_hash"
)


def _principal(row: Sequence[Any]) -> PrincipalRecord:
    return PrincipalRecord(
        id=row[0],
        kind=row[1],
        name=row[2],
        tenant=row[3],
        roles=tuple(orjson.loads(row[4])),
        region=row[5],
        limits=Limits(float(row[6]), int(row[7]), int(row[8])),
        created_at=row[9],
        created_by=row[10],
        expires_at=row[11],
        revoked_at=row[12],
        replaced_by=row[13],
        salt=row[14],
        secret_hash=row[15],
    )


def check_limits(limits: Limits) -> Limits:
    if limits.rate < 0 or limits.burst < 0 or limits.concurrency < 0:
        raise InvalidInput(f"rate, burst and concurrency must be >= 0 (0 = unlimited), got {limits}")
    return limits


def _check_name(value: str, what: str) -> str:
    if not isinstance(value, str) or not _NAME.match(value):
        raise InvalidInput(f"{what} must be 1-128 letters, digits, '.', '_', '@' or '-', got {value!r}")
    return value


def _check_tenant(tenant: str) -> str:
    return tenant if tenant == ALL_TENANTS else _check_name(tenant, "a tenant")


def _check_roles(roles: Sequence[str]) -> tuple[str, ...]:
    if not roles:
        raise InvalidInput(
            "give at least one role (admin, deployer, invoker, auditor; optionally 'role:model-pattern')"
        )
    return tuple(str(parse_grant(role)) for role in roles)


class AccessStore(Database):
    """Principals, tenants and digests; safe to call from several threads."""

    migrations_table = "dhow_access_migrations"

    @classmethod
    def open(cls, url: str) -> AccessStore:
        """Connects to ``sqlite:///path`` or ``postgresql://...`` and brings the schema up to date."""
        return cls._open(url, MIGRATIONS, "access store")

    def _bump(self, session: Session) -> None:
        session.execute("UPDATE dhow_access_state SET generation = generation + 1 WHERE id = 1")

    def generation(self) -> int:
        with self._read() as session:
            row = session.one("SELECT generation FROM dhow_access_state WHERE id = 1")
        return int(row[0]) if row else 0

    # -- principals ---------------------------------------------------------------------------------

    def principals(self) -> builtins.list[PrincipalRecord]:
        with self._read() as session:
            rows = session.all(f"SELECT {_COLUMNS} FROM dhow_principals ORDER BY created_at, id")
        return [_principal(row) for row in rows]

    def get(self, principal_id: str) -> PrincipalRecord:
        with self._read() as session:
            row = session.one(f"SELECT {_COLUMNS} FROM dhow_principals WHERE id = ?", (principal_id,))
        if row is None:
            raise NotFound(f"no API key or identity with id {principal_id!r} (see 'dhow keys list')")
        return _principal(row)

    def _insert(self, session: Session, record: PrincipalRecord) -> None:
        limits = record.limits
        session.execute(
            f"INSERT INTO dhow_principals ({_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (
                record.id,
                record.kind,
                record.name,
                record.tenant,
                orjson.dumps(list(record.roles)).decode(),
                record.region,
                limits.rate,
                limits.burst,
                limits.concurrency,
                record.created_at,
                record.created_by,
                record.expires_at,
                record.revoked_at,
                record.replaced_by,
                record.salt,
                record.secret_hash,
            ),
        )
        self._bump(session)

    def create_key(
        self,
        name: str,
        *,
        tenant: str,
        roles: Sequence[str],
        actor: str,
        region: str = "",
        limits: Limits = UNLIMITED,
        expires_in_s: float | None = None,
        only_if_empty: bool = False,
    ) -> tuple[PrincipalRecord, str] | None:
        """A new API key and its token (shown once); None when ``only_if_empty`` and keys exist already."""
        key = new_key()
        expires = None
        if expires_in_s is not None:
            expires = (datetime.now(UTC) + timedelta(seconds=expires_in_s)).isoformat(timespec="microseconds")
        record = PrincipalRecord(
            id=key.key_id,
            kind="key",
            name=_check_name(name, "a key name"),
            tenant=_check_tenant(tenant),
            roles=_check_roles(roles),
            region=region,
            limits=check_limits(limits),
            created_at=utc_now(),
            created_by=actor,
            expires_at=expires,
            salt=key.salt,
            secret_hash=key.secret_hash,
        )
        with self._write() as session:
            if only_if_empty and session.one("SELECT 1 FROM dhow_principals LIMIT 1"):
                return None
            self._insert(session, record)
        return record, key.token

    def create_identity(
        self,
        common_name: str,
        *,
        tenant: str,
        roles: Sequence[str],
        actor: str,
        region: str = "",
        limits: Limits = UNLIMITED,
    ) -> PrincipalRecord:
        """A client-certificate identity: requests over mutual TLS whose certificate's CN is ``common_name``."""
        record = PrincipalRecord(
            id=f"cert:{_check_name(common_name, 'a certificate common name')}",
            kind="cert",
            name=common_name,
            tenant=_check_tenant(tenant),
            roles=_check_roles(roles),
            region=region,
            limits=check_limits(limits),
            created_at=utc_now(),
            created_by=actor,
        )
        with self._write() as session:
            if session.one("SELECT 1 FROM dhow_principals WHERE id = ? AND revoked_at IS NULL", (record.id,)):
                raise InvalidInput(f"the certificate identity {common_name!r} exists already")
            session.execute("DELETE FROM dhow_principals WHERE id = ?", (record.id,))
            self._insert(session, record)
        return record

    def revoke(self, principal_id: str, *, actor: str) -> PrincipalRecord:
        with self._write() as session:
            changed = session.execute(
                "UPDATE dhow_principals SET revoked_at = ? WHERE id = ? AND revoked_at IS NULL",
                (utc_now(), principal_id),
            )
            if changed:
                self._bump(session)
        record = self.get(principal_id)
        if not changed and record.revoked_at is None:  # pragma: no cover - raced with another writer
            raise InvalidInput(f"could not revoke {principal_id!r}; try again")
        return record

    def rotate(self, principal_id: str, *, actor: str, grace_s: float = 0.0) -> tuple[PrincipalRecord, str]:
        """A new key with the old one's name, tenant, roles and limits; the old one ends after ``grace_s``."""
        old = self.get(principal_id)
        if old.kind != "key":
            raise InvalidInput(f"{principal_id!r} is a certificate identity; rotate the certificate instead")
        if not old.active():
            raise InvalidInput(f"the key {principal_id!r} is revoked or expired; create a new one instead")
        made = self.create_key(
            old.name, tenant=old.tenant, roles=old.roles, actor=actor, region=old.region, limits=old.limits
        )
        assert made is not None
        new, token = made
        ends = datetime.now(UTC) + timedelta(seconds=max(0.0, grace_s))
        with self._write() as session:
            if grace_s > 0:
                session.execute(
                    "UPDATE dhow_principals SET expires_at = ?, replaced_by = ? WHERE id = ?",
                    (ends.isoformat(timespec="microseconds"), new.id, old.id),
                )
            else:
                session.execute(
                    "UPDATE dhow_principals SET revoked_at = ?, replaced_by = ? WHERE id = ?",
                    (utc_now(), new.id, old.id),
                )
            self._bump(session)
        return new, token

    def set_limits(self, principal_id: str, limits: Limits) -> PrincipalRecord:
        check_limits(limits)
        with self._write() as session:
            changed = session.execute(
                "UPDATE dhow_principals SET rate = ?, burst = ?, concurrency = ? WHERE id = ?",
                (limits.rate, limits.burst, limits.concurrency, principal_id),
            )
            if changed:
                self._bump(session)
        return self.get(principal_id)

    # -- tenants ------------------------------------------------------------------------------------

    def tenants(self) -> dict[str, TenantRecord]:
        with self._read() as session:
            rows = session.all("SELECT name, rate, burst, concurrency, region FROM dhow_tenants")
        return {r[0]: TenantRecord(r[0], Limits(float(r[1]), int(r[2]), int(r[3])), r[4]) for r in rows}

    def set_tenant(self, name: str, *, limits: Limits, region: str, actor: str) -> TenantRecord:
        _check_name(name, "a tenant")
        check_limits(limits)
        with self._write() as session:
            session.execute("DELETE FROM dhow_tenants WHERE name = ?", (name,))
            session.execute(
                "INSERT INTO dhow_tenants (name, rate, burst, concurrency, region, updated_at, updated_by)"
                " VALUES (?, ?, ?, ?, ?, ?, ?)",
                (name, limits.rate, limits.burst, limits.concurrency, region, utc_now(), actor),
            )
            self._bump(session)
        return TenantRecord(name, limits, region)

    # -- trusted artifact digests -------------------------------------------------------------------

    def record_digests(self, model: str, version: str, digests: Mapping[str, str], *, actor: str) -> None:
        """Trust exactly these files for the model version (replacing what was trusted before)."""
        at = utc_now()
        with self._write() as session:
            session.execute("DELETE FROM dhow_artifact_digests WHERE model = ? AND version = ?", (model, version))
            for path, digest in sorted(digests.items()):
                session.execute(
                    "INSERT INTO dhow_artifact_digests (model, version, path, sha256, recorded_at, recorded_by)"
                    " VALUES (?, ?, ?, ?, ?, ?)",
                    (model, version, path, digest, at, actor),
                )
            self._bump(session)

    def digests(self, model: str, version: str) -> dict[str, str]:
        with self._read() as session:
            rows = session.all(
                "SELECT path, sha256 FROM dhow_artifact_digests WHERE model = ? AND version = ?", (model, version)
            )
        return {row[0]: row[1] for row in rows}
