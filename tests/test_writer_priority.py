"""The payload log's and tracing's writer processes run at the lowest CPU priority (``SCHED_IDLE``: they never delay a
thread of the serving path that wakes), but the threads each keeps for its close and its counts; the server and the
audit trail's writer keep the normal one; ``--writer-priority normal`` keeps the writers there too. An idle-priority
payload log still writes every event of a server that leaves it CPU (a real server)."""

from __future__ import annotations

import contextlib
import json
import os
import time
from pathlib import Path

import pytest

from tests.conftest import free_port, http_request, start_dhow
from tests.test_cpu_affinity import BODY, _children

pytestmark = pytest.mark.skipif(not hasattr(os, "SCHED_IDLE"), reason="SCHED_IDLE is Linux's")

PAYLOAD, TRACE, AUDIT = "dhow.serving.payload_writer", "dhow.serving.trace_writer", "dhow.governance.audit_writer"
#: what this test runs at (a runner started under chrt -b is not at SCHED_OTHER): what "normal" means here
NORMAL = os.sched_getscheduler(0)


def _policies(pid: int) -> dict[str, int]:
    """Each thread's scheduling policy, by its name and id."""
    policies = {}
    for tid in os.listdir(f"/proc/{pid}/task"):
        with contextlib.suppress(OSError):  # (a thread that ended meanwhile)
            name = Path(f"/proc/{pid}/task/{tid}/comm").read_text().strip()
            policies[f"{name}:{tid}"] = os.sched_getscheduler(int(tid))
    return policies


def _writers(pid: int) -> dict[str, int]:
    """The server's writer processes by their ``python -m`` module."""
    found = {}
    for child in _children(pid):
        arguments = Path(f"/proc/{child}/cmdline").read_bytes().split(b"\0")
        if b"-m" in arguments:
            found[arguments[arguments.index(b"-m") + 1].decode()] = child
    return found


def _serve(demo_repository: Path, tmp_path: Path, *extra: str) -> tuple[object, Path]:
    payloads = tmp_path / "payloads.jsonl"
    server = start_dhow(demo_repository, tmp_path, "--payload-log", f"file://{payloads}",
                        "--otlp-endpoint", f"http://127.0.0.1:{free_port()}", *extra)  # fmt: skip
    return server, payloads


def _events(payloads: Path, count: int) -> list[dict[str, object]]:
    """The payload log's events once ``count`` whole lines are written (20 s at most)."""
    deadline = time.monotonic() + 20
    lines: list[str] = []
    while time.monotonic() < deadline:
        lines = payloads.read_text().split("\n")[:-1] if payloads.exists() else []  # (whole lines only)
        if len(lines) >= count:
            break
        time.sleep(0.1)
    return [json.loads(line) for line in lines]


def test_the_payload_and_trace_writers_yield_the_cpu_but_their_close_and_the_audit_writer_do_not(
    demo_repository: Path, tmp_path: Path
) -> None:
    server, payloads = _serve(demo_repository, tmp_path)
    try:
        for _ in range(20):
            status, answer = http_request(server.http_port, "POST", "/v2/models/tabular/infer", BODY)
            assert status == 200, answer
        pid = server.process.pid
        writers = _writers(pid)
        assert set(writers) == {PAYLOAD, TRACE, AUDIT}, writers
        for module in (PAYLOAD, TRACE):
            policies = _policies(writers[module])
            # (Python 3.11 names no thread for the system: the close's and the reporter's are the two left at the
            # normal priority)
            expected = [NORMAL] * 2 + [os.SCHED_IDLE] * (len(policies) - 2)
            assert sorted(policies.values()) == expected, f"{module}: {policies}"
        assert set(_policies(writers[AUDIT]).values()) == {NORMAL}
        assert set(_policies(pid).values()) == {NORMAL}, "the server's own threads must not yield"
        events = _events(payloads, 20)
        assert len(events) == 20, f"{len(events)} of 20 events written"
        assert {event["data"]["model"] for event in events} == {"tabular"}  # type: ignore[index]
    finally:
        assert server.stop() == 0, server.log()


def test_writer_priority_normal_keeps_the_writers_at_the_normal_priority(demo_repository: Path, tmp_path: Path) -> None:
    server, payloads = _serve(demo_repository, tmp_path, "--writer-priority", "normal")
    try:
        status, answer = http_request(server.http_port, "POST", "/v2/models/tabular/infer", BODY)
        assert status == 200, answer
        writers = _writers(server.process.pid)
        for module in (PAYLOAD, TRACE):
            assert set(_policies(writers[module]).values()) == {NORMAL}, f"{module}: {_policies(writers[module])}"
        assert len(_events(payloads, 1)) == 1
    finally:
        assert server.stop() == 0, server.log()
