"""The access guard: authentication, authorization, quotas and the audit record of one request.

Only the core service's admission point (``CoreService.call``) uses it: ``admit`` lets a request in or refuses
it (refusals are audited), ``finish`` frees its quota and writes its audit record: every change and every
inference, every refusal; never a raw payload (only the model's masked sample, when it asks for one).
An in-process caller (a shadow copy, a batch job) is admitted as a named ``Principal`` instead of credentials:
it skips authentication, nothing else.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, NoReturn

from prometheus_client import CollectorRegistry, Counter

from dhow.access.actions import Access
from dhow.access.authenticator import Authenticator, Credentials
from dhow.access.permissions import ALL_TENANTS, Permission, Principal, check_permission
from dhow.access.ratelimit import LocalRateLimiter, Permit, RateLimiter
from dhow.access.store import Limits
from dhow.core.errors import DhowError, ErrorCode, unknown_model
from dhow.core.ids import new_request_id
from dhow.core.model_config import DEFAULT_TENANT
from dhow.core.types import Caller, Outcome
from dhow.governance.audit import AuditRecord, AuditRow
from dhow.governance.audit_trail import AuditTrail
from dhow.governance.masking import Masker
from dhow.serving.refusals import Refusal, UnknownCallers

__all__ = ["AccessGuard", "Admission"]

_NOTHING = Outcome()
#: read once: a member read through its Enum class costs a request more than a call
_INFER = Permission.INFER

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
    #: the model's tenant, as authorization saw it ("" without a model): its audit record's
    tenant: str = ""


class _HeldRefusal(Exception):
    """A refusal whose audit record waits in this process (the writer is behind, or restarting): answered once the
    record has left it, as an allowed call's answer is."""

    def __init__(self, answer: DhowError, departure: Awaitable[None]) -> None:
        super().__init__(answer)
        self.answer = answer
        self.departure = departure

    async def refuse(self) -> NoReturn:
        await self.departure
        raise self.answer from None


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
        #: a limiter that decides at once (its counts in this process: ``LocalRateLimiter.take``): quotas are taken
        #: without a coroutine
        self._take: Callable[[str, Limits, str], Permit | None] | None = (
            limiter.take if isinstance(limiter, LocalRateLimiter) else None
        )
        self.audit = audit
        #: refusals of callers without valid credentials: aggregated per source, and limited per source
        self.unknown = UnknownCallers(self._tallied, rate=failures[0], burst=failures[1])
        self.masker = masker
        self.tenant_of = tenant_of
        #: requests admitted and not finished: while others are, an inference's record waits for theirs (a batch's
        #: requests end in one pass of the event loop) to leave with them in one write; alone, it leaves at once
        self._in_flight = 0
        #: the record of the refusal of an unknown caller just written, when it waits in this process (see
        #: ``_unauthenticated``); None the rest of the time
        self._held: AuditRecord | None = None

    def admit(
        self, who: Credentials | Principal, access: Access, model: str = "", request_id: str = ""
    ) -> Admission | Awaitable[Admission]:
        """Authenticate (unless ``who`` is an in-process principal), authorize, take quota; refusals are audited
        and raised (401/403/429). The admission at once when nothing must be waited for (the usual request: no
        token to verify, quotas of this process or none), else what to await for it (a token, a shared limiter's
        quota): no coroutine for the usual request."""
        try:
            principal = self.known(who, access, model)
        except _HeldRefusal as held:
            return held.refuse()
        if principal is None:
            return self._admit_verified(who, access, model, request_id)
        try:
            admission, quotas = self.permit(principal, access, model, request_id)
        except _HeldRefusal as held:
            return held.refuse()
        if not quotas:
            return admission
        take = self._take
        return self._take_quota_now(admission, quotas, take) if take else self._take_quota(admission, quotas)

    async def _admit_verified(
        self, who: Credentials | Principal, access: Access, model: str, request_id: str
    ) -> Admission:
        assert isinstance(who, Credentials)  # a principal is known already
        principal = await self.authenticate(who, access, model, request_id)
        try:
            admission, quotas = self.permit(principal, access, model, request_id)
        except _HeldRefusal as held:
            await held.refuse()
        if not quotas:
            return admission
        take = self._take
        return self._take_quota_now(admission, quotas, take) if take else await self._take_quota(admission, quotas)

    def may_see(self, principal: Principal, name: str) -> bool:
        """Whether the principal may see a model (lists of models show only those: no tenant sees another's)."""
        return principal.may(Permission.MODEL_READ, name, self.tenant_of(name))

    def known(self, who: Credentials | Principal, access: Access, model: str = "") -> Principal | None:
        """Who calls, when that needs no waiting (an in-process principal, no authentication, an API key, a
        certificate); None: a token to verify (``authenticate``). The first step of ``admit`` (which ``Call`` takes
        without a coroutine for the usual request); refusals as in ``authenticate`` (one whose
        record waits in this process raises ``_HeldRefusal``, which ``admit`` answers once the record has left)."""
        try:
            if isinstance(who, Principal):  # authenticated once for many calls: as the keys read last have it
                return self.authenticator.current(who)
            return self.authenticator.known(who)
        except DhowError as exc:
            raise self._unauthenticated(who, access, model, exc) from None

    async def authenticate(
        self, credentials: Credentials, access: Access, model: str = "", request_id: str = ""
    ) -> Principal:
        try:
            return await self.authenticator.authenticate(credentials)
        except DhowError as exc:
            refusal = self._unauthenticated(credentials, access, model, exc)
        if isinstance(refusal, _HeldRefusal):
            await refusal.refuse()
        raise refusal from None

    def _unauthenticated(
        self, who: Credentials | Principal, access: Access, model: str, exc: DhowError
    ) -> DhowError | _HeldRefusal:
        """The refusal to raise; a ``_HeldRefusal`` when its record (the first of its window) waits in this
        process. ``who``: a principal whose credentials were revoked since it was authenticated (a stream's)."""
        if isinstance(who, Principal):
            source = actor = who.name
        else:
            source, actor = who.source, f"cert:{who.client_cn}" if who.client_cn else "unauthenticated"
        answer = self.unknown.refused(source, actor, access.action, model, exc)
        self.refusals.labels(answer.code.value).inc()
        held, self._held = self._held, None
        return answer if held is None else _HeldRefusal(answer, self.audit.handed_over(held))

    def permit(
        self, principal: Principal, access: Access, model: str = "", request_id: str = ""
    ) -> tuple[Admission, tuple[tuple[str, Limits, str], ...]]:
        """Check the principal's permission (a refusal is audited and raised) and let it in; the quotas it must
        still take (most principals have none). A refusal whose record waits in this process raises
        ``_HeldRefusal``: ``admit`` answers it once the record has left."""
        request_id = request_id or new_request_id()  # (``Call`` hands one in: its door logs the same)
        tenant = self.tenant_of(model) if model else ""
        try:
            check_permission(principal, access.permission, model, tenant)
        except DhowError as exc:
            self.refusals.labels(exc.code.value).inc()
            departure = self._deny(principal.name, principal.tenant, access, model, request_id, exc)
            answer: DhowError = exc
            if model and principal.tenant not in (ALL_TENANTS, tenant or DEFAULT_TENANT):
                # another tenant's model answers as a missing one: no tenant learns another's model names
                answer = unknown_model(model)
            if departure is not None:
                raise _HeldRefusal(answer, departure) from None
            raise answer from None
        region, quotas = self.authenticator.admission_of(principal)
        caller = Caller(principal.name, principal.tenant, request_id, region)
        self._in_flight += 1
        admission = Admission(principal, access, model, caller, time.perf_counter_ns(), [], tenant)
        return admission, quotas

    async def _take_quota(self, admission: Admission, quotas: tuple[tuple[str, Limits, str], ...]) -> Admission:
        """Take a permit of each quota for the admitted request; a refusal (429) gives back those taken."""
        for subject, limits, what in quotas:
            try:
                admission.permits.append(await self.limiter.acquire(subject, limits, what))
            except BaseException as exc:
                self._quota_refused(admission, exc)
                raise
        return admission

    def _take_quota_now(
        self,
        admission: Admission,
        quotas: tuple[tuple[str, Limits, str], ...],
        take: Callable[[str, Limits, str], Permit | None],
    ) -> Admission:
        """``_take_quota`` from a limiter that decides at once (``take``): no coroutine, and no permit kept for a
        quota without a concurrency limit (nothing to give back)."""
        for subject, limits, what in quotas:
            try:
                permit = take(subject, limits, what)
            except BaseException as exc:
                self._quota_refused(admission, exc)
                raise
            if permit is not None:
                admission.permits.append(permit)
        return admission

    def _quota_refused(self, admission: Admission, exc: BaseException) -> None:
        """A quota refused the admitted request: it is no longer in flight, and gives back the permits it took."""
        self._in_flight -= 1
        self._release(admission)
        if isinstance(exc, DhowError):
            self.refusals.labels(exc.code.value).inc()

    def finish(
        self,
        admission: Admission,
        outcome: str = "success",
        message: str = "",
        served: Outcome | None = None,
        details: Mapping[str, Any] | None = None,
    ) -> Awaitable[None] | None:
        """The request ended: free its quota, and audit it if it changed something, inferred, or was refused.

        ``served`` is what inference decided (version, data region, payload sample); ``details`` what an admin
        change says about itself (a key's id, a revision). None when nothing must be waited for (nothing to record,
        or its record is queued for a writer thread), else what to await before the answer leaves (a record on its
        way out of this process, or to durability)."""
        self._in_flight -= 1
        if admission.permits:
            self._release(admission)
        access = admission.access
        permission = access.permission
        if outcome not in _DENIALS and (
            # (an inference's permission is audited: asked first, it spares the usual request the property's call)
            (permission is not _INFER and not permission.audited)
            # without authentication every caller is "anonymous": inference records would say nothing (a batch
            # run's record still says what ran, on which files)
            or (access.action == "infer" and not self.authenticator.enabled)
        ):
            return None
        row = self._row(admission, outcome, message, served or _NOTHING, details)
        if permission is _INFER:
            # batched off the hot path: it leaves this process before the answer does (with the records of the other
            # requests that end in this pass of the event loop, in one write, when others are in flight)
            return self.audit.record_before_answer(row, together=self._in_flight > 0)
        return self.audit.record_now(AuditRecord(*row))  # a change is durable before it is answered

    def _row(
        self, admission: Admission, outcome: str, message: str, served: Outcome, given: Mapping[str, Any] | None
    ) -> AuditRow:
        """The request's audit record as a row (``AuditRecord.as_tuple``'s): an inference's crosses to the writer
        process as it is, with no ``AuditRecord`` made and taken apart again."""
        caller = admission.caller
        details = dict(given) if given else {}
        if message:
            details["reason"] = self.masker.mask_text(message)
        if served.payload is not None:
            details["payload"] = served.payload
        # a record belongs to the tenant whose model or key it touched, so that tenant's auditors see it
        tenant = admission.tenant if admission.model else str(details.get("tenant", caller.tenant))
        if tenant != caller.tenant:
            details["actor_tenant"] = caller.tenant
        access = admission.access
        kind = "denial" if outcome in _DENIALS else "inference" if access.permission is _INFER else "admin"
        return (
            kind, access.action, caller.principal, tenant, outcome, admission.model, served.version,
            caller.request_id, served.data_region, (time.perf_counter_ns() - admission.start_ns) / 1e6, details, "",
            time.time(),
        )  # fmt: skip

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
        held = self._denial(
            refusal.actor, "", refusal.action, refusal.model, refusal.outcome, refusal.reason, "", extra
        )
        if not window_s:  # the first refusal of its window, written as it is answered: the answer waits for it
            self._held = held

    def _deny(
        self, actor: str, tenant: str, access: Access, model: str, request_id: str, exc: DhowError
    ) -> Awaitable[None] | None:
        """Record a refusal by role; what to await before it is answered (its record waits in this process)."""
        if exc.code.value not in _DENIALS:
            return None
        record = self._denial(actor, tenant, access.action, model, exc.code.value, exc.message, request_id, {})
        return self.audit.handed_over(record) if record is not None else None

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
    ) -> AuditRecord | None:
        """Queue a refusal's record: it belongs to the model's tenant, else the caller's, else "unknown". The record
        when it waits in this process for its writer (see ``AuditTrail.record``)."""
        record = AuditRecord(
            kind="denial",
            action=action,
            actor=actor,
            tenant=self.tenant_of(model) if model else tenant or "unknown",
            outcome=outcome,
            model=model,
            request_id=request_id,
            details={"reason": self.masker.mask_text(reason), **extra},
        )
        return record if self.audit.record(record) else None
