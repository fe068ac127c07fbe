"""The access admin API: API keys and the audit trail, as the REST door's admin routes serve them.

Every method takes the admitted ``Call``: a tenant's admin sees and changes its tenant's keys only, a
tenant's auditor reads its tenant's records only, and each change names itself in the call's audit record.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from typing import Any

from dhow.access.authenticator import Authenticator
from dhow.access.permissions import ALL_TENANTS, DEFAULT_TENANT
from dhow.access.store import AccessStore, Limits, PrincipalRecord
from dhow.core.errors import Forbidden, InvalidInput, NotFound
from dhow.governance.audit import MAX_READ, AuditStore
from dhow.governance.audit_trail import AuditTrail
from dhow.serving.service import Call

__all__ = ["KEY_FIELDS", "AccessAdmin"]


class AccessAdmin:
    def __init__(self, authenticator: Authenticator, audit: AuditTrail) -> None:
        self.authenticator = authenticator
        self.audit = audit

    def _store(self) -> AccessStore:
        if self.authenticator.store is None:
            raise NotFound("this server keeps no API keys")
        return self.authenticator.store

    async def list_keys(self, call: Call) -> list[dict[str, Any]]:
        """The keys and identities: a tenant's admin sees its tenant's only."""
        records = await asyncio.to_thread(self._store().principals)
        tenant = call.principal.tenant
        return [record.as_dict() for record in records if tenant in (ALL_TENANTS, record.tenant)]

    async def create_key(self, body: Mapping[str, Any], call: Call) -> dict[str, Any]:
        """A new API key from the admin API's body; the answer holds its token, shown this once."""
        store = self._store()
        name, roles = body.get("name"), body.get("roles")
        if not isinstance(name, str) or not isinstance(roles, list) or not all(isinstance(r, str) for r in roles):
            raise InvalidInput("the body needs 'name' (a string) and 'roles' (a list like ['invoker:fraud-*'])")
        # omitted: the caller's own tenant, and for a caller of every tenant the default tenant, as ``dhow keys
        # create`` does: a key for every tenant only when asked (least privilege)
        caller_tenant = call.principal.tenant
        tenant = _text(body, "tenant", DEFAULT_TENANT if caller_tenant == ALL_TENANTS else caller_tenant)
        if tenant == ALL_TENANTS and call.principal.tenant != ALL_TENANTS:
            raise Forbidden("only a principal of every tenant ('*') may make keys for every tenant")
        if call.principal.tenant not in (ALL_TENANTS, tenant):
            raise Forbidden(f"{call.principal.name} may make keys only for its tenant '{call.principal.tenant}'")
        limits = Limits(_number(body, "rate"), int(_number(body, "burst")), int(_number(body, "concurrency")))
        expires = body.get("expires_in_s")
        if expires is not None and (not isinstance(expires, (int, float)) or isinstance(expires, bool) or expires <= 0):
            raise InvalidInput(f"'expires_in_s' must be a number of seconds > 0, got {expires!r}")
        made = await asyncio.to_thread(
            lambda: store.create_key(
                name,
                tenant=tenant,
                roles=roles,
                actor=call.actor,
                region=_text(body, "region", ""),
                limits=limits,
                expires_in_s=expires,
            )
        )
        assert made is not None
        record, token = made
        await asyncio.to_thread(self.authenticator.reload)
        call.note(key=record.id, name=record.name, tenant=record.tenant, roles=list(record.roles))
        return {**record.as_dict(), "key": token}

    async def revoke_key(self, key_id: str, call: Call) -> dict[str, Any]:
        store = self._store()
        self._check_tenant(await asyncio.to_thread(store.get, key_id), call)
        record = await asyncio.to_thread(lambda: store.revoke(key_id, actor=call.actor))
        await asyncio.to_thread(self.authenticator.reload)
        call.note(key=record.id, name=record.name, tenant=record.tenant)
        return record.as_dict()

    async def rotate_key(self, key_id: str, grace_s: object, call: Call) -> dict[str, Any]:
        if not isinstance(grace_s, (int, float)) or isinstance(grace_s, bool) or grace_s < 0:
            raise InvalidInput(f"'grace_s' must be a number of seconds >= 0, got {grace_s!r}")
        store = self._store()
        self._check_tenant(await asyncio.to_thread(store.get, key_id), call)
        record, token = await asyncio.to_thread(lambda: store.rotate(key_id, actor=call.actor, grace_s=float(grace_s)))
        await asyncio.to_thread(self.authenticator.reload)
        call.note(key=key_id, replaced_by=record.id, grace_s=grace_s, tenant=record.tenant)
        return {**record.as_dict(), "key": token, "replaces": key_id}

    @staticmethod
    def _check_tenant(record: PrincipalRecord, call: Call) -> None:
        if call.principal.tenant not in (ALL_TENANTS, record.tenant):
            raise Forbidden(f"{call.principal.name} may not change keys of tenant '{record.tenant}'")

    async def read_audit(self, query: Mapping[str, str], call: Call) -> list[dict[str, Any]]:
        """Audit records by the query's filters; a tenant's auditor reads its tenant's records only."""
        store = self.audit.store_for(query.get("region", ""))
        try:
            since = int(query.get("since", "0"))
            limit = min(int(query.get("limit", "1000")), 10_000)
        except ValueError:
            raise InvalidInput("'since' and 'limit' must be integers") from None
        filters = {k: query[k] for k in ("actor", "model", "kind", "outcome", "tenant") if k in query}
        if call.principal.tenant != ALL_TENANTS:
            filters["tenant"] = call.principal.tenant
        return await asyncio.to_thread(lambda: store.read(since_seq=since, limit=limit, **filters))

    async def verify_audit(self, region: str, call: Call) -> dict[str, Any]:
        """Check the whole hash chain. An auditor of every tenant gets the whole report; a tenant's auditor
        learns whether the chain holds, its head, and its own tenant's record count, nothing of the others'."""
        store = self.audit.store_for(region)
        report = await asyncio.to_thread(store.verify)
        verdict = {"ok": report.ok, "head_seq": report.head_seq, "head_hash": report.head_hash}
        tenant = call.principal.tenant
        if tenant == ALL_TENANTS:
            return {**verdict, "count": report.count, "problems": report.problems}
        problems = [] if report.ok else ["the chain does not verify; an auditor of every tenant ('*') sees where"]
        return {**verdict, "count": await asyncio.to_thread(_count, store, tenant), "problems": problems}


def _count(store: AuditStore, tenant: str) -> int:
    count, since = 0, 0
    while page := store.read(since_seq=since, limit=MAX_READ, tenant=tenant):
        count += len(page)
        since = int(page[-1]["seq"])
    return count


#: the fields of the admin API's body that makes a key
KEY_FIELDS = ("name", "roles", "tenant", "region", "rate", "burst", "concurrency", "expires_in_s")


def _text(body: Mapping[str, Any], name: str, default: str) -> str:
    value = body.get(name, default)
    if not isinstance(value, str):
        raise InvalidInput(f"'{name}' must be a string, got {value!r}")
    return value


def _number(body: Mapping[str, Any], name: str) -> float:
    value = body.get(name, 0)
    if not isinstance(value, (int, float)) or isinstance(value, bool) or value < 0:
        raise InvalidInput(f"'{name}' must be a number >= 0 (0 = unlimited), got {value!r}")
    return float(value)
