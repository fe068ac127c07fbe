"""The payload log's and tracing's writer processes run at the lowest CPU priority (``SCHED_IDLE``: they never
delay a thread of the serving path that wakes), the server and the audit trail's writer at the normal one; the
payload log, idle-priority, still writes every event of a server that leaves it CPU (a real server)."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest

from tests.conftest import free_port, http_request, start_dhow
from tests.test_cpu_affinity import BODY, _children

pytestmark = pytest.mark.skipif(not hasattr(os, "SCHED_IDLE"), reason="SCHED_IDLE is Linux's")


def _policies(pid: int) -> dict[int, int]:
    """Each thread's scheduling policy."""
    return {int(tid): os.sched_getscheduler(int(tid)) for tid in os.listdir(f"/proc/{pid}/task")}


def _module(pid: int) -> str:
    """What a writer process runs: its ``python -m`` module."""
    arguments = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    return arguments[arguments.index(b"-m") + 1].decode()


def test_the_payload_and_trace_writers_yield_the_cpu_and_the_audit_writer_does_not(
    demo_repository: Path, tmp_path: Path
) -> None:
    payloads = tmp_path / "payloads.jsonl"
    server = start_dhow(demo_repository, tmp_path, "--payload-log", f"file://{payloads}",
                        "--otlp-endpoint", f"http://127.0.0.1:{free_port()}")  # fmt: skip
    try:
        for _ in range(20):
            status, answer = http_request(server.http_port, "POST", "/v2/models/tabular/infer", BODY)
            assert status == 200, answer
        pid = server.process.pid
        writers = {_module(child): child for child in _children(pid)}
        assert set(writers) == {
            "dhow.serving.payload_writer", "dhow.serving.trace_writer", "dhow.governance.audit_writer"
        }, writers  # fmt: skip
        for module in ("dhow.serving.payload_writer", "dhow.serving.trace_writer"):
            policies = _policies(writers[module])
            assert set(policies.values()) == {os.SCHED_IDLE}, f"{module}: {policies}"
        assert set(_policies(writers["dhow.governance.audit_writer"]).values()) == {os.SCHED_OTHER}
        assert set(_policies(pid).values()) == {os.SCHED_OTHER}, "the server's own threads must not yield"
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            lines = payloads.read_text().splitlines() if payloads.exists() else []
            if len(lines) >= 20:
                break
            time.sleep(0.1)
        events = [json.loads(line) for line in lines]
        assert len(events) == 20, f"{len(events)} of 20 events written"
        assert {event["data"]["model"] for event in events} == {"tabular"}
    finally:
        assert server.stop() == 0, server.log()
