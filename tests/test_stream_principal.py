"""A gRPC stream authenticates once and runs each of its requests with the principal it got then: each request
must still be let in as the keys read last have that identity, so that revoking a key or a certificate identity
stops the streams already open, not only new connections, and a changed identity's region and tenant apply."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any, cast

import pytest
import uvloop

from dhow.access.actions import ACTIONS
from dhow.access.authenticator import Authenticator, Credentials
from dhow.access.permissions import ALL_TENANTS, Grant, Principal
from dhow.access.ratelimit import LocalRateLimiter
from dhow.access.store import AccessStore
from dhow.core.errors import Unauthenticated
from dhow.governance.audit import AuditStore
from dhow.governance.audit_trail import AuditTrail
from dhow.governance.masking import Masker, parse_masking
from dhow.serving.guard import AccessGuard
from dhow.serving.service import CoreService


def test_a_streams_principal_is_refused_once_revoked_and_takes_a_re_created_identitys_region(tmp_path: Path) -> None:
    keys = AccessStore.open(f"sqlite:///{tmp_path}/keys.db")
    audit = AuditStore.open(f"sqlite:///{tmp_path}/audit.db")
    keys.create_identity("svc", tenant="default", roles=["invoker"], actor="test", region="us")
    authenticator = Authenticator(keys)
    authenticator.reload()
    trail = AuditTrail({"default": audit}, "default", writer="thread")
    guard = AccessGuard(
        authenticator, LocalRateLimiter(), trail, Masker(parse_masking(None, "audit"), b"k" * 32), lambda m: "default"
    )
    service = CoreService(cast(Any, None), guard)
    streamed = authenticator.known(Credentials(client_cn="svc"))  # what ModelStreamInfer keeps for the stream
    assert streamed is not None
    infer = ACTIONS["infer"]

    async def scenario() -> None:
        await trail.start()
        keys.revoke("cert:svc", actor="test")
        authenticator.reload()
        with pytest.raises(Unauthenticated, match="revoked since this stream was opened"):
            async with service.call(streamed, infer, "fraud"):
                pass
        for _ in range(200):  # the refusal's record, by the trail's writer on this loop
            await asyncio.sleep(0.01)
            if audit.read(limit=10):
                break
        await trail.close()

    try:
        uvloop.run(scenario())
        [refusal] = audit.read(limit=10)
        assert (refusal["kind"], refusal["actor"], refusal["outcome"]) == ("denial", "cert:svc", "UNAUTHENTICATED")
        keys.create_identity("svc", tenant="default", roles=["invoker"], actor="test", region="eu")
        authenticator.reload()
        current = guard.known(streamed, infer, "fraud")
        assert current is not None and current is not streamed and current.region == "eu"
        admission, _ = guard.permit(current, infer, "fraud")
        assert admission.caller.default_region == "eu"
    finally:
        audit.close()
        keys.close()


def test_a_principal_that_is_not_stored_is_itself(tmp_path: Path) -> None:
    """An in-process service identity (a shadow copy's) and a JWT's principal have no record to look up."""
    keys = AccessStore.open(f"sqlite:///{tmp_path}/keys.db")
    authenticator = Authenticator(keys)
    authenticator.reload()
    service_identity = Principal("dhow:shadow", ALL_TENANTS, (Grant("invoker"),))
    assert authenticator.current(service_identity) is service_identity
    keys.close()
