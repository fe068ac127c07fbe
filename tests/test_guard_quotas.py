"""The admission point takes an in-process quota at once (no coroutine), and a refusal gives back what it took."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry

from dhow.access.actions import ACTIONS
from dhow.access.authenticator import Authenticator
from dhow.access.permissions import ALL_TENANTS, Grant, Principal
from dhow.access.ratelimit import Limits, LocalRateLimiter, Permit
from dhow.core.errors import Overloaded
from dhow.governance.audit import AuditStore
from dhow.governance.audit_trail import AuditTrail
from dhow.governance.masking import Masker, parse_masking
from dhow.serving.guard import AccessGuard, Admission

_KEY = ("key:k1", Limits(concurrency=1), "key 'ci-bot'")
#: a bucket of one token that does not refill within the test
_TENANT = ("tenant:acme", Limits(rate=0.001, burst=1), "tenant 'acme'")


class _Quotas(Authenticator):
    """An authenticator whose principals count against the given quotas (as a key with limits does)."""

    def __init__(self, quotas: tuple[tuple[str, Limits, str], ...]) -> None:
        super().__init__(None, enabled=False)
        self.quotas = quotas

    def admission_of(self, principal: Principal) -> tuple[str, tuple[tuple[str, Limits, str], ...]]:
        return "", self.quotas


@pytest.fixture
def store(tmp_path: Path) -> AuditStore:
    opened = AuditStore.open(f"sqlite:///{tmp_path}/audit.db")
    yield opened  # type: ignore[misc]
    opened.close()


def _guard(
    store: AuditStore, quotas: tuple[tuple[str, Limits, str], ...], registry: CollectorRegistry | None = None
) -> AccessGuard:
    trail = AuditTrail({"default": store}, "default", writer="thread")
    masker = Masker(parse_masking(None, "audit"), b"k" * 32)
    return AccessGuard(_Quotas(quotas), LocalRateLimiter(), trail, masker, lambda name: "default", registry)


_CALLER = Principal("dhow:test", ALL_TENANTS, (Grant("admin"),))


def test_an_in_process_quota_is_taken_without_a_coroutine_and_held_until_the_request_ends(store: AuditStore) -> None:
    guard = _guard(store, (_KEY,))
    admitted = guard.admit(_CALLER, ACTIONS["infer"], "fraud")
    assert isinstance(admitted, Admission)  # at once, not an awaitable
    assert len(admitted.permits) == 1  # the key's concurrency slot
    with pytest.raises(Overloaded, match="1 requests in flight"):
        guard.admit(_CALLER, ACTIONS["infer"], "fraud")
    assert guard._in_flight == 1
    guard.finish(admitted)
    again = guard.admit(_CALLER, ACTIONS["infer"], "fraud")
    assert isinstance(again, Admission) and guard._in_flight == 1


def test_a_rate_quota_holds_no_permit_and_a_later_refusal_gives_back_the_earlier_ones(store: AuditStore) -> None:
    registry = CollectorRegistry()
    guard = _guard(store, (_KEY, _TENANT), registry)
    first = guard.admit(_CALLER, ACTIONS["infer"], "fraud")
    assert isinstance(first, Admission)
    assert len(first.permits) == 1  # the key's slot; the tenant's rate leaves nothing to give back
    guard.finish(first)
    # the tenant's bucket is empty: refused after the key's slot was taken, which is given back
    with pytest.raises(Overloaded, match="tenant 'acme'"):
        guard.admit(_CALLER, ACTIONS["infer"], "fraud")
    assert guard._in_flight == 0
    assert guard.limiter._in_flight == {}  # type: ignore[attr-defined]
    with pytest.raises(Overloaded, match="tenant 'acme'"):
        guard.admit(_CALLER, ACTIONS["infer"], "fraud")
    assert registry.get_sample_value("dhow_access_refusals_total", {"code": "RESOURCE_EXHAUSTED"}) == 2


def test_an_awaited_limiter_still_takes_quotas_in_a_coroutine(store: AuditStore) -> None:
    class Awaited:
        """As a shared limiter (Redis): only ``acquire``, awaited."""

        def __init__(self) -> None:
            self.inner = LocalRateLimiter()

        async def acquire(self, subject: str, limits: Limits, what: str) -> Permit:
            return await self.inner.acquire(subject, limits, what)

        async def close(self) -> None:
            pass

    trail = AuditTrail({"default": store}, "default", writer="thread")
    masker = Masker(parse_masking(None, "audit"), b"k" * 32)
    guard = AccessGuard(_Quotas((_KEY,)), Awaited(), trail, masker, lambda name: "default")
    admitted = guard.admit(_CALLER, ACTIONS["infer"], "fraud")
    assert not isinstance(admitted, Admission)
    admission = asyncio.run(admitted)  # type: ignore[arg-type]
    assert isinstance(admission, Admission) and len(admission.permits) == 1
