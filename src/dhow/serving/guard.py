"""The access guard: one place where every door's request is authenticated, authorized, rate limited and audited.

A door maps its route or RPC to an ``Access`` (a permission and the action's name in the audit trail), hands
the request's credentials to ``admit`` and, when the request ends, calls ``finish`` with the outcome. The data
plane decides the data region (residency) in between; ``finish`` writes the audit record: every change and
every inference, every refusal; never a raw payload (only the model's masked sample, when it asks for one).
"""

from __future__ import annotations

import asyncio
import itertools
import secrets
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from prometheus_client import CollectorRegistry, Counter

from dhow.access.actions import Access
from dhow.access.authenticator import Authenticator, Credentials
from dhow.access.permissions import ALL_TENANTS, Permission, Principal, check_permission
from dhow.access.ratelimit import Permit, RateLimiter
from dhow.access.store import AccessStore, Limits, PrincipalRecord
from dhow.core.errors import DhowError, ErrorCode, Forbidden, InvalidInput, NotFound
from dhow.core.types import Caller
from dhow.governance.audit import AuditRecord
from dhow.governance.audit_trail import AuditTrail
from dhow.governance.masking import Masker

__all__ = ["KEY_FIELDS", "AccessGuard", "Admission"]

#: request ids: random per process, then counted (unique across servers, and cheaper than 8 random bytes each)
_ID_PREFIX = secrets.token_hex(4)
_ID_COUNTER = itertools.count(1)

_DENIALS = frozenset({ErrorCode.UNAUTHENTICATED.value, ErrorCode.PERMISSION_DENIED.value})


@dataclass(slots=True)
class Admission:
    """A request let in: who it is, what it does, the quota permits it holds until it finishes."""

    principal: Principal
    access: Access
    model: str
    caller: Caller
    start_ns: int
    permits: list[Permit] = field(default_factory=list)
    #: set by the handler: a version, a deployment revision, a key id... for the audit record
    details: dict[str, Any] = field(default_factory=dict)
    #: whether the principal may see a model (lists of models show only those: no tenant sees another's)
    visible: Callable[[str], bool] | None = None


class AccessGuard:
    def __init__(
        self,
        authenticator: Authenticator,
        limiter: RateLimiter,
        audit: AuditTrail,
        masker: Masker,
        tenant_of: Callable[[str], str],
        registry: CollectorRegistry | None = None,
    ) -> None:
        self.authenticator = authenticator
        #: refusals by reason; quota refusals are counted here, not audited (a flood must not fill the trail)
        self.refusals = Counter(
            "dhow_access_refusals",
            "Requests refused by access control, by error code (UNAUTHENTICATED, PERMISSION_DENIED, "
            "RESOURCE_EXHAUSTED)",
            ["code"],
            registry=registry,
        )
        self.limiter = limiter
        self.audit = audit
        self.masker = masker
        self.tenant_of = tenant_of

    async def admit(self, credentials: Credentials, access: Access, model: str = "", request_id: str = "") -> Admission:
        """Authenticate and authorize; refusals are audited and raised (401/403/429)."""
        principal = await self.authenticate(credentials, access, model, request_id)
        return await self.authorize(principal, access, model, request_id)

    async def authenticate(
        self, credentials: Credentials, access: Access, model: str = "", request_id: str = ""
    ) -> Principal:
        try:
            return await self.authenticator.authenticate(credentials)
        except DhowError as exc:
            self.refusals.labels(exc.code.value).inc()
            actor = f"cert:{credentials.client_cn}" if credentials.client_cn else "unauthenticated"
            self._deny(actor, "", access, model, request_id, exc)
            raise

    async def authorize(self, principal: Principal, access: Access, model: str = "", request_id: str = "") -> Admission:
        request_id = request_id or f"{_ID_PREFIX}{next(_ID_COUNTER):08x}"
        try:
            check_permission(principal, access.permission, model, self.tenant_of(model) if model else "")
        except DhowError as exc:
            self.refusals.labels(exc.code.value).inc()
            self._deny(principal.name, principal.tenant, access, model, request_id, exc)
            raise
        caller = Caller(principal.name, principal.tenant, request_id, self.authenticator.region_of(principal))
        admission = Admission(principal, access, model, caller, time.perf_counter_ns())
        if not model:
            admission.visible = lambda name: principal.may(Permission.MODEL_READ, name, self.tenant_of(name))
        for subject, limits, what in self.authenticator.limits_of(principal):
            try:
                admission.permits.append(await self.limiter.acquire(subject, limits, what))
            except BaseException as exc:
                self._release(admission)
                if isinstance(exc, DhowError):
                    self.refusals.labels(exc.code.value).inc()
                raise
        return admission

    async def finish(self, admission: Admission, outcome: str = "success", message: str = "") -> None:
        """The request ended: free its quota, and audit it if it changed something, inferred, or was refused."""
        self._release(admission)
        if outcome not in _DENIALS and (
            not admission.access.permission.audited
            # without authentication every caller is "anonymous": inference records would say nothing
            or (admission.access.permission is Permission.INFER and not self.authenticator.enabled)
        ):
            return
        caller = admission.caller
        details = dict(admission.details)
        if message:
            details["reason"] = self.masker.mask_text(message)
        if caller.payload is not None:
            details["payload"] = caller.payload
        # a record belongs to the tenant whose model or key it touched, so that tenant's auditors see it
        tenant = self.tenant_of(admission.model) if admission.model else str(details.get("tenant", caller.tenant))
        if tenant != caller.tenant:
            details["actor_tenant"] = caller.tenant
        record = AuditRecord(
            kind=_kind(admission.access, outcome),
            action=admission.access.action,
            actor=caller.principal,
            tenant=tenant,
            outcome=outcome,
            model=admission.model,
            version=caller.version,
            request_id=caller.request_id,
            region=caller.data_region,
            latency_ms=(time.perf_counter_ns() - admission.start_ns) / 1e6,
            details=details,
        )
        if admission.access.permission is Permission.INFER:
            self.audit.record(record)  # batched off the hot path
        else:
            await self.audit.record_now(record)  # a change is durable before it is answered

    # -- the access admin API (API keys, the audit trail) ------------------------------------------

    def _store(self) -> AccessStore:
        if self.authenticator.store is None:
            raise NotFound("this server keeps no API keys")
        return self.authenticator.store

    async def list_keys(self, admission: Admission | None = None) -> list[dict[str, Any]]:
        """The keys and identities: a tenant's admin sees its tenant's only."""
        records = await asyncio.to_thread(self._store().principals)
        tenant = admission.principal.tenant if admission is not None else ALL_TENANTS
        return [record.as_dict() for record in records if tenant in (ALL_TENANTS, record.tenant)]

    async def create_key(self, body: Mapping[str, Any], actor: str, admission: Admission | None) -> dict[str, Any]:
        """A new API key from the admin API's body; the answer holds its token, shown this once."""
        store = self._store()
        name, roles = body.get("name"), body.get("roles")
        if not isinstance(name, str) or not isinstance(roles, list) or not all(isinstance(r, str) for r in roles):
            raise InvalidInput("the body needs 'name' (a string) and 'roles' (a list like ['invoker:fraud-*'])")
        tenant = _text(body, "tenant", admission.principal.tenant if admission else "default")
        if tenant == ALL_TENANTS and admission is not None and admission.principal.tenant != ALL_TENANTS:
            raise Forbidden("only a principal of every tenant ('*') may make keys for every tenant")
        if admission is not None and admission.principal.tenant not in (ALL_TENANTS, tenant):
            raise Forbidden(
                f"{admission.principal.name} may make keys only for its tenant '{admission.principal.tenant}'"
            )
        limits = Limits(_number(body, "rate"), int(_number(body, "burst")), int(_number(body, "concurrency")))
        expires = body.get("expires_in_s")
        if expires is not None and (not isinstance(expires, (int, float)) or isinstance(expires, bool) or expires <= 0):
            raise InvalidInput(f"'expires_in_s' must be a number of seconds > 0, got {expires!r}")
        made = await asyncio.to_thread(
            lambda: store.create_key(
                name,
                tenant=tenant,
                roles=roles,
                actor=actor,
                region=_text(body, "region", ""),
                limits=limits,
                expires_in_s=expires,
            )
        )
        assert made is not None
        record, token = made
        await asyncio.to_thread(self.authenticator.reload)
        if admission is not None:
            admission.details.update(key=record.id, name=record.name, tenant=record.tenant, roles=list(record.roles))
        return {**record.as_dict(), "key": token}

    async def revoke_key(self, key_id: str, actor: str, admission: Admission | None) -> dict[str, Any]:
        store = self._store()
        self._check_tenant(await asyncio.to_thread(store.get, key_id), admission)
        record = await asyncio.to_thread(lambda: store.revoke(key_id, actor=actor))
        await asyncio.to_thread(self.authenticator.reload)
        if admission is not None:
            admission.details.update(key=record.id, name=record.name, tenant=record.tenant)
        return record.as_dict()

    async def rotate_key(self, key_id: str, grace_s: object, actor: str, admission: Admission | None) -> dict[str, Any]:
        if not isinstance(grace_s, (int, float)) or isinstance(grace_s, bool) or grace_s < 0:
            raise InvalidInput(f"'grace_s' must be a number of seconds >= 0, got {grace_s!r}")
        store = self._store()
        self._check_tenant(await asyncio.to_thread(store.get, key_id), admission)
        record, token = await asyncio.to_thread(lambda: store.rotate(key_id, actor=actor, grace_s=float(grace_s)))
        await asyncio.to_thread(self.authenticator.reload)
        if admission is not None:
            admission.details.update(key=key_id, replaced_by=record.id, grace_s=grace_s, tenant=record.tenant)
        return {**record.as_dict(), "key": token, "replaces": key_id}

    @staticmethod
    def _check_tenant(record: PrincipalRecord, admission: Admission | None) -> None:
        if admission is not None and admission.principal.tenant not in (ALL_TENANTS, record.tenant):
            raise Forbidden(f"{admission.principal.name} may not change keys of tenant '{record.tenant}'")

    async def read_audit(self, query: Mapping[str, str], admission: Admission | None = None) -> list[dict[str, Any]]:
        """Audit records by the query's filters; a tenant's auditor reads its tenant's records only."""
        store = self.audit.store_for(query.get("region", ""))
        try:
            since = int(query.get("since", "0"))
            limit = min(int(query.get("limit", "1000")), 10_000)
        except ValueError:
            raise InvalidInput("'since' and 'limit' must be integers") from None
        filters = {k: query[k] for k in ("actor", "model", "kind", "outcome", "tenant") if k in query}
        if admission is not None and admission.principal.tenant != ALL_TENANTS:
            filters["tenant"] = admission.principal.tenant
        return await asyncio.to_thread(lambda: store.read(since_seq=since, limit=limit, **filters))

    async def verify_audit(self, region: str) -> dict[str, Any]:
        report = await asyncio.to_thread(self.audit.store_for(region).verify)
        return {
            "ok": report.ok,
            "count": report.count,
            "head_seq": report.head_seq,
            "head_hash": report.head_hash,
            "problems": report.problems,
        }

    def _release(self, admission: Admission) -> None:
        for permit in admission.permits:
            permit.release()
        admission.permits.clear()

    def _deny(self, actor: str, tenant: str, access: Access, model: str, request_id: str, exc: DhowError) -> None:
        if exc.code.value not in _DENIALS:
            return
        self.audit.record(
            AuditRecord(
                kind="denial",
                action=access.action,
                actor=actor,
                tenant=self.tenant_of(model) if model else tenant or "unknown",
                outcome=exc.code.value,
                model=model,
                request_id=request_id,
                details={"reason": self.masker.mask_text(exc.message)},
            )
        )


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


def _kind(access: Access, outcome: str) -> str:
    if outcome in _DENIALS:
        return "denial"
    return "inference" if access.permission is Permission.INFER else "admin"
