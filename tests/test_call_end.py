"""A call ended by a ``BaseException`` other than cancellation (its coroutine closed: GeneratorExit; SystemExit;
KeyboardInterrupt) still ends at the admission point: its in-flight count and quota are freed and its audit
record is written, though nothing may be awaited while such an exception unwinds."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any, cast

import pytest
import uvloop

from dhow.access.actions import ACTIONS
from dhow.access.authenticator import Authenticator
from dhow.access.permissions import ALL_TENANTS, Grant, Principal
from dhow.access.ratelimit import LocalRateLimiter
from dhow.governance.audit import AuditStore
from dhow.governance.audit_trail import AuditTrail
from dhow.governance.masking import Masker, parse_masking
from dhow.serving.guard import AccessGuard
from dhow.serving.service import CoreService


def _service(tmp_path: Path, writer: str) -> tuple[CoreService, AccessGuard, AuditTrail, AuditStore]:
    store = AuditStore.open(f"sqlite:///{tmp_path}/audit.db")
    trail = AuditTrail({"default": store}, "default", writer=writer)
    guard = AccessGuard(
        Authenticator(None, enabled=True),  # authenticated: inference is audited
        LocalRateLimiter(),
        trail,
        Masker(parse_masking(None, "audit"), b"k" * 32),
        lambda name: "default",
    )
    return CoreService(cast(Any, None), guard), guard, trail, store


def _closed_inside(service: CoreService, action: str, model: str) -> None:
    """Enters a call, suspends inside it, then closes the coroutine: ``__aexit__`` runs with GeneratorExit."""
    caller = Principal("dhow:test", ALL_TENANTS, (Grant("admin"),))

    async def handler() -> None:
        async with service.call(caller, ACTIONS[action], model):
            await asyncio.get_running_loop().create_future()  # never done

    coroutine = handler()
    coroutine.send(None)  # admitted, now waiting inside the call
    coroutine.close()


def test_a_closed_inference_frees_its_place_and_is_audited(tmp_path: Path) -> None:
    service, guard, trail, store = _service(tmp_path, "process")

    async def scenario() -> None:
        await trail.start()
        _closed_inside(service, "infer", "fraud")
        assert guard._in_flight == 0
        await trail.close()

    try:
        uvloop.run(scenario())
        rows = store.read(limit=10)
        assert [(r["action"], r["outcome"]) for r in rows] == [("infer", "CANCELLED")]
    finally:
        store.close()


def test_a_closed_change_still_writes_its_durable_record(tmp_path: Path) -> None:
    """A change's record is awaited to durability on the usual path; closed, it is queued all the same and written."""
    service, guard, trail, store = _service(tmp_path, "thread")

    async def scenario() -> None:
        await trail.start()
        _closed_inside(service, "model.unload", "fraud")
        assert guard._in_flight == 0
        for _ in range(100):  # the trail's writer runs on this loop
            await asyncio.sleep(0.01)
            if store.read(limit=10):
                break
        await trail.close()

    try:
        uvloop.run(scenario())
        rows = store.read(limit=10)
        assert [(r["action"], r["outcome"]) for r in rows] == [("model.unload", "CANCELLED")]
    finally:
        store.close()


def test_a_keyboard_interrupt_in_a_change_propagates_with_its_record_queued(tmp_path: Path) -> None:
    """The loop stops with the KeyboardInterrupt: nothing after it runs, so the record must be queued by the end of
    the call itself (the trail's close on shutdown writes what is queued)."""
    service, guard, trail, store = _service(tmp_path, "thread")
    caller = Principal("dhow:test", ALL_TENANTS, (Grant("admin"),))

    async def scenario() -> None:
        await trail.start()
        async with service.call(caller, ACTIONS["model.unload"], "fraud"):
            raise KeyboardInterrupt

    try:
        with pytest.raises(KeyboardInterrupt):
            asyncio.run(scenario())
        assert guard._in_flight == 0 and trail.pending == 1
    finally:
        store.close()


def test_a_system_exit_stays_a_system_exit_when_the_audit_trail_refuses_the_record(tmp_path: Path) -> None:
    service, guard, trail, store = _service(tmp_path, "process")
    caller = Principal("dhow:test", ALL_TENANTS, (Grant("admin"),))

    async def scenario() -> None:
        await trail.start()
        try:
            with pytest.raises(SystemExit):
                async with service.call(caller, ACTIONS["infer"], "fraud"):
                    await trail.close()  # shut down meanwhile: the trail refuses the record (Unavailable)
                    raise SystemExit(3)
            assert guard._in_flight == 0
        finally:
            await trail.close()

    try:
        uvloop.run(scenario())
    finally:
        store.close()
