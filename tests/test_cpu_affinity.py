"""``dhow serve --cpu-affinity auto`` (a real server): the event loop's thread on a CPU of its own, the writer
processes on the others, the model's threads and a Kafka stream's client threads on every CPU; refused, saying
why, where there are not enough CPUs or with the grpcio front; off, a plan inherited from the environment is not
followed."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from tests.conftest import http_request, start_dhow
from tests.kafka_broker import Broker, start_broker

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


def _names(pid: int) -> dict[int, str]:
    return {
        int(tid): Path(f"/proc/{pid}/task/{tid}/comm").read_text().strip() for tid in os.listdir(f"/proc/{pid}/task")
    }


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


def test_the_grpcio_front_whose_threads_would_share_the_loops_cpu_is_refused(demo_repository: Path) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "dhow.cli", "serve", "--repository", str(demo_repository), "--http-port", "0",
         "--grpc-port", "0", "--cpu-affinity", "auto", "--grpc-front", "grpcio"],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert done.returncode == 2, done.stderr
    assert "--cpu-affinity auto cannot place grpcio's threads" in done.stderr
    assert "use --grpc-front native" in done.stderr


@pytest.fixture(scope="module")
def broker() -> Iterator[Broker]:
    yield from start_broker()


def test_a_kafka_streams_client_threads_are_not_left_on_the_loops_cpu(
    broker: Broker, demo_repository: Path, tmp_path: Path
) -> None:
    """librdkafka starts its threads (``rdk:main``, one per broker) when its client is built, on the loop's thread:
    they inherit its mask unless built elsewhere."""
    allowed = sorted(os.sched_getaffinity(0))
    broker.create_topics("affinity.requests", "affinity.replies", partitions=1)
    settings = tmp_path / "dhow.yaml"
    settings.write_text(yaml.safe_dump({"streams": [{
        "name": "scoring", "model": "tabular:2", "format": "v2-json",
        "source": broker.url("affinity.requests", group_options=True), "sink": broker.url("affinity.replies"),
        "on_error": "skip",
    }]}))  # fmt: skip
    broker.produce("affinity.requests", [(b"0", BODY, [])])
    server = start_dhow(demo_repository, tmp_path, "--cpu-affinity", "auto", "--config", str(settings))
    replies = broker.tail("affinity.replies")
    try:
        replies.until_keys({b"0"})  # the stream polled, answered and had its reply acknowledged
        pid = server.process.pid
        names, threads = _names(pid), _threads(pid)
        assert threads[pid] == {allowed[0]}, "the event loop's thread is not on a CPU of its own"
        assert any(name.startswith("rdk:") for name in names.values()), names
        on_the_loops = {names[tid] for tid, cpus in threads.items() if tid != pid and cpus == {allowed[0]}}
        assert not on_the_loops, f"threads left on the event loop's CPU: {sorted(on_the_loops)}"
    finally:
        replies.close()
        assert server.stop() == 0, server.log()


def test_off_a_plan_inherited_from_the_environment_is_not_followed(
    demo_repository: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A server started from a pinned one's environment (by one of its models) places nothing unless asked to."""
    allowed = sorted(os.sched_getaffinity(0))
    monkeypatch.setenv("DHOW_CPU_PLAN", f"{','.join(map(str, allowed))}|{allowed[-1]}")
    payloads = tmp_path / "payloads.jsonl"
    server = start_dhow(demo_repository, tmp_path, "--payload-log", f"file://{payloads}")
    try:
        status, answer = http_request(server.http_port, "POST", "/v2/models/tabular/infer", BODY)
        assert status == 200, answer
        writers = _children(server.process.pid)
        assert writers, "no writer process"
        for writer in writers:
            for tid, cpus in _threads(writer).items():
                assert cpus == set(allowed), f"writer {writer} thread {tid} may run on {cpus}"
    finally:
        assert server.stop() == 0, server.log()
