"""``dhow serve --cpu-affinity auto`` (a real server): the event loop's thread on a CPU of its own, the writer
processes on the others, the model's threads on every CPU; refused, saying why, where there are not enough CPUs."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import http_request, start_dhow

pytestmark = pytest.mark.skipif(
    not hasattr(os, "sched_getaffinity") or len(os.sched_getaffinity(0)) < 2,
    reason="CPU affinity needs Linux and at least 2 CPUs",
)

BODY = json.dumps({"inputs": [{"name": "input", "shape": [1, 32], "datatype": "FP32", "data": [0.5] * 32}]}).encode()


def _allowed(pid: int, tid: int) -> set[int]:
    """The CPUs a thread may run on (``Cpus_allowed_list``: ``0-3,6``)."""
    for line in Path(f"/proc/{pid}/task/{tid}/status").read_text().splitlines():
        if line.startswith("Cpus_allowed_list:"):
            cpus: set[int] = set()
            for part in line.split(":", 1)[1].strip().split(","):
                first, _, last = part.partition("-")
                cpus.update(range(int(first), int(last or first) + 1))
            return cpus
    raise AssertionError(f"no Cpus_allowed_list for thread {tid} of {pid}")


def _threads(pid: int) -> dict[int, set[int]]:
    """Each thread's CPUs, but libuv's (uvloop's pool for name lookups and file work, started by the loop's thread
    on first use, idle otherwise: the loop waits for what it hands them)."""
    threads = {}
    for tid in os.listdir(f"/proc/{pid}/task"):
        if Path(f"/proc/{pid}/task/{tid}/comm").read_text().strip() != "libuv-worker":
            threads[int(tid)] = _allowed(pid, int(tid))
    return threads


def _children(pid: int) -> list[int]:
    found = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True, check=False).stdout.split()
    return [int(child) for child in found]


def test_the_loop_has_a_cpu_of_its_own_and_the_writers_the_others(demo_repository: Path, tmp_path: Path) -> None:
    allowed = sorted(os.sched_getaffinity(0))
    payloads = tmp_path / "payloads.jsonl"
    server = start_dhow(demo_repository, tmp_path, "--cpu-affinity", "auto", "--payload-log", f"file://{payloads}")
    try:
        status, answer = http_request(server.http_port, "POST", "/v2/models/tabular/infer", BODY)
        assert status == 200, answer
        pid = server.process.pid
        threads = _threads(pid)
        assert threads[pid] == {allowed[0]}, "the event loop's thread is not on a CPU of its own"
        # the model's instance thread (and the loop's helper threads): every CPU
        assert any(cpus == set(allowed) for tid, cpus in threads.items() if tid != pid), threads
        # no other thread of the server shares the loop's CPU alone with it
        assert all(cpus != {allowed[0]} for tid, cpus in threads.items() if tid != pid), threads
        writers = _children(pid)
        assert writers, "no writer process"
        for writer in writers:
            for tid, cpus in _threads(writer).items():
                assert cpus == set(allowed[1:]), f"writer {writer} thread {tid} may run on {cpus}"
        assert "CPU affinity: the event loop pinned to CPU" in server.log()
    finally:
        assert server.stop() == 0, server.log()


def test_more_workers_than_cpus_leave_no_cpu_for_the_writers_and_are_refused(demo_repository: Path) -> None:
    workers = len(os.sched_getaffinity(0))
    done = subprocess.run(
        [sys.executable, "-m", "dhow.cli", "serve", "--repository", str(demo_repository), "--http-port", "0",
         "--grpc-port", "0", "--workers", str(workers), "--cpu-affinity", "auto"],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert done.returncode == 2, done.stderr
    assert "--cpu-affinity auto needs more CPUs than workers" in done.stderr
    assert "Traceback" not in done.stderr
