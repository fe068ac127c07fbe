"""The access guard: authentication, authorization, quotas and the audit record of one request.

Only the core service's admission point (``CoreService.call``) uses it: ``admit`` lets a request in or refuses
it (refusals are audited), ``finish`` frees its quota and writes its audit record: every change and every
inference, every refusal; never a raw payload (only the model's masked sample, when it asks for one).
An in-process caller (a shadow copy, a batch job) is admitted as a named ``Principal`` instead of credentials:
it skips authentication, nothing else.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from prometheus_client import CollectorRegistry, Counter

from dhow.access.actions import Access
from dhow.access.authenticator import Authenticator, Credentials
from dhow.access.permissions import ALL_TENANTS, Permission, Principal, check_permission
from dhow.access.ratelimit import Permit, RateLimiter
from dhow.core.errors import DhowError, ErrorCode, unknown_model
from dhow.core.ids import new_request_id
from dhow.core.types import Caller, Outcome
from dhow.governance.audit import AuditRecord
from dhow.governance.audit_trail import AuditTrail
from dhow.governance.masking import Masker
from dhow.serving.refusals import Refusal, UnknownCallers

__all__ = ["AccessGuard", "Admission"]

_NOTHING = Outcome()

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


class AccessGuard:
    def __init__(
        self,
        authenticator: Authenticator,
        limiter: RateLimiter,
        audit: AuditTrail,
        masker: Masker,
        tenant_of: Callable[[str], str],
        registry: CollectorRegistry | None = None,
        *,
        failures: tuple[float, float] = (10.0, 200.0),
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
        #: refusals of callers without valid credentials: aggregated per source, and limited per source
        self.unknown = UnknownCallers(self._tallied, rate=failures[0], burst=failures[1])
        self.masker = masker
        self.tenant_of = tenant_of

    async def admit(
        self, who: Credentials | Principal, access: Access, model: str = "", request_id: str = ""
    ) -> Admission:
        """Authenticate (unless ``who`` is an in-process principal), authorize, take quota; refusals are
        audited and raised (401/403/429)."""
        principal = who if isinstance(who, Principal) else await self.authenticate(who, access, model, request_id)
        return await self.authorize(principal, access, model, request_id)

    def may_see(self, principal: Principal, name: str) -> bool:
        """Whether the principal may see a model (lists of models show only those: no tenant sees another's)."""
        return principal.may(Permission.MODEL_READ, name, self.tenant_of(name))

    async def authenticate(
        self, credentials: Credentials, access: Access, model: str = "", request_id: str = ""
    ) -> Principal:
        try:
            return await self.authenticator.authenticate(credentials)
        except DhowError as exc:
            actor = f"cert:{credentials.client_cn}" if credentials.client_cn else "unauthenticated"
            answer = self.unknown.refused(credentials.source, actor, access.action, model, exc)
            self.refusals.labels(answer.code.value).inc()
            raise answer from None

    async def authorize(self, principal: Principal, access: Access, model: str = "", request_id: str = "") -> Admission:
        request_id = request_id or new_request_id()
        tenant = self.tenant_of(model) if model else ""
        try:
            check_permission(principal, access.permission, model, tenant)
        except DhowError as exc:
            self.refusals.labels(exc.code.value).inc()
            self._deny(principal.name, principal.tenant, access, model, request_id, exc)
            if model and principal.tenant not in (ALL_TENANTS, tenant or "default"):
                # another tenant's model answers as a missing one: no tenant learns another's model names
                raise unknown_model(model) from None
            raise
        caller = Caller(principal.name, principal.tenant, request_id, self.authenticator.region_of(principal))
        admission = Admission(principal, access, model, caller, time.perf_counter_ns())
        for subject, limits, what in self.authenticator.limits_of(principal):
            try:
                admission.permits.append(await self.limiter.acquire(subject, limits, what))
            except BaseException as exc:
                self._release(admission)
                if isinstance(exc, DhowError):
                    self.refusals.labels(exc.code.value).inc()
                raise
        return admission

    async def finish(
        self,
        admission: Admission,
        outcome: str = "success",
        message: str = "",
        served: Outcome | None = None,
        details: Mapping[str, Any] | None = None,
    ) -> None:
        """The request ended: free its quota, and audit it if it changed something, inferred, or was refused.

        ``served`` is what inference decided (version, data region, payload sample); ``details`` what an admin
        change says about itself (a key's id, a revision)."""
        self._release(admission)
        if outcome not in _DENIALS and (
            not admission.access.permission.audited
            # without authentication every caller is "anonymous": inference records would say nothing (a batch
            # run's record still says what ran, on which files)
            or (admission.access.action == "infer" and not self.authenticator.enabled)
        ):
            return
        record = self._record(admission, outcome, message, served or _NOTHING, details or {})
        if admission.access.permission is Permission.INFER:
            if self.audit.record(record):  # batched off the hot path, unless its writer is behind:
                await self.audit.handed_over(record)  # then it leaves this process before the answer does
        else:
            await self.audit.record_now(record)  # a change is durable before it is answered

    def _record(
        self, admission: Admission, outcome: str, message: str, served: Outcome, given: Mapping[str, Any]
    ) -> AuditRecord:
        caller = admission.caller
        details = dict(given)
        if message:
            details["reason"] = self.masker.mask_text(message)
        if served.payload is not None:
            details["payload"] = served.payload
        # a record belongs to the tenant whose model or key it touched, so that tenant's auditors see it
        tenant = self.tenant_of(admission.model) if admission.model else str(details.get("tenant", caller.tenant))
        if tenant != caller.tenant:
            details["actor_tenant"] = caller.tenant
        return AuditRecord(
            kind=_kind(admission.access, outcome),
            action=admission.access.action,
            actor=caller.principal,
            tenant=tenant,
            outcome=outcome,
            model=admission.model,
            version=served.version,
            request_id=caller.request_id,
            region=served.data_region,
            latency_ms=(time.perf_counter_ns() - admission.start_ns) / 1e6,
            details=details,
        )

    def _release(self, admission: Admission) -> None:
        for permit in admission.permits:
            permit.release()
        admission.permits.clear()

    def close(self) -> None:
        """Write the refusals counted in the current window (before the audit trail closes)."""
        self.unknown.flush()

    def _tallied(self, refusal: Refusal, count: int, window_s: float) -> None:
        """An audit record of refusals of unknown callers: the first of a window, or the window's count."""
        extra: dict[str, Any] = {"source": refusal.source}
        if window_s:
            extra.update(count=count, window_s=window_s)
        self._denial(refusal.actor, "", refusal.action, refusal.model, refusal.outcome, refusal.reason, "", extra)

    def _deny(self, actor: str, tenant: str, access: Access, model: str, request_id: str, exc: DhowError) -> None:
        if exc.code.value in _DENIALS:
            self._denial(actor, tenant, access.action, model, exc.code.value, exc.message, request_id, {})

    def _denial(
        self,
        actor: str,
        tenant: str,
        action: str,
        model: str,
        outcome: str,
        reason: str,
        request_id: str,
        extra: dict[str, Any],
    ) -> None:
        """Queue a refusal's record: it belongs to the model's tenant, else the caller's, else "unknown"."""
        self.audit.record(
            AuditRecord(
                kind="denial",
                action=action,
                actor=actor,
                tenant=self.tenant_of(model) if model else tenant or "unknown",
                outcome=outcome,
                model=model,
                request_id=request_id,
                details={"reason": self.masker.mask_text(reason), **extra},
            )
        )


def _kind(access: Access, outcome: str) -> str:
    if outcome in _DENIALS:
        return "denial"
    return "inference" if access.permission is Permission.INFER else "admin"
