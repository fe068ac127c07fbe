"""A core service around a fake data plane, for tests of one door in isolation.

It is built as ``dhow serve --auth none`` builds it: the same admission point (guard, quotas, an audit trail
in a real SQLite store), with authentication off, so that a door test drives the door and not the policies.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

from dhow.access.authenticator import Authenticator
from dhow.access.ratelimit import LocalRateLimiter
from dhow.governance.audit import AuditStore
from dhow.governance.audit_trail import AuditTrail
from dhow.governance.masking import Masker, parse_masking
from dhow.serving.dataplane import DataPlane
from dhow.serving.guard import AccessGuard
from dhow.serving.service import CoreService


def open_service(dataplane: DataPlane, folder: Path | None = None) -> tuple[CoreService, AuditTrail]:
    """The service and its audit trail; start the trail on the loop that serves (``await trail.start()``)."""
    folder = folder or Path(tempfile.mkdtemp(prefix="dhow-door-"))
    store = AuditStore.open(f"sqlite:///{folder / 'audit.sqlite3'}")
    trail = AuditTrail({"default": store}, "default")
    guard = AccessGuard(
        Authenticator(None, enabled=False),
        LocalRateLimiter(),
        trail,
        Masker(parse_masking(None, "audit"), b"k" * 32),
        lambda name: "default",
    )
    return CoreService(dataplane, guard), trail


class StartingTrail:
    """An ASGI wrapper that starts the audit trail on the serving loop before the first request."""

    def __init__(self, app: Any, trail: AuditTrail) -> None:
        self.app = app
        self.trail = trail

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        await self.trail.start()  # once; then nothing
        await self.app(scope, receive, send)
