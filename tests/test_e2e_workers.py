"""`dhow serve --workers N`: real supervisors and workers sharing the ports, over real sockets.

Each request goes over a connection of its own, so that the kernel spreads them over the workers; the
statistics and metrics must then count every request whichever worker answers the reading, as a load
generator that reads them before and after a window and subtracts expects.
"""

from __future__ import annotations

import http.client
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
from tritonclient.utils import InferenceServerException

from dhow.governance.audit import AuditStore
from dhow.scheduling.stats import BatchTimings, ModelStats, StatsFolder
from tests.conftest import DhowProcess, free_port, make_key, start_dhow

T = TypeVar("T")

#: the first admin key, as the first start prints it
KEY = re.compile(r"^\s+(dhow_[0-9a-f]+_\S+)$", re.MULTILINE)
#: a Python model that leaves a mark when it starts computing, then takes its time
SLOW_MODEL = """
import pathlib
import time


class Slow:
    def load(self):
        pass

    def predict(self, inputs):
        pathlib.Path({mark!r}).touch()
        time.sleep(1.5)
        return {{"y": inputs["x"] * 2}}
"""
SLOW_MODEL_YAML = (
    "runtime: python\nmax_batch_size: 4\n"
    "inputs: [{name: x, datatype: FP32, shape: [-1, 2]}]\noutputs: [{name: y, datatype: FP32, shape: [-1, 2]}]\n"
)
TABULAR_BODY = json.dumps(
    {"inputs": [{"name": "input", "shape": [1, 32], "datatype": "FP32", "data": [0.5] * 32}]}
).encode()


# -- helpers ------------------------------------------------------------------------------------


def _call(server: DhowProcess, method: str, path: str, body: bytes | None = None, key: str = "") -> tuple[int, Any]:
    """One request over a connection of its own (so any worker may answer it)."""
    connection = http.client.HTTPConnection("127.0.0.1", server.http_port, timeout=30)
    try:
        headers = {"Content-Type": "application/json", **({"Authorization": f"Bearer {key}"} if key else {})}
        connection.request(method, path, body=body, headers=headers)
        answer = connection.getresponse()
        raw = answer.read()
        is_json = "json" in answer.getheader("content-type", "")
        return answer.status, json.loads(raw) if is_json else raw.decode()
    finally:
        connection.close()


def _infer(server: DhowProcess, key: str = "", version: int = 2) -> int:
    return _call(server, "POST", f"/v2/models/tabular/versions/{version}/infer", TABULAR_BODY, key)[0]


def _successes(server: DhowProcess, key: str = "") -> int:
    status, answer = _call(server, "GET", "/v2/models/tabular/versions/2/stats", key=key)
    assert status == 200, answer
    (stats,) = answer["model_stats"]
    batches = sum(batch["compute_infer"]["count"] for batch in stats["batch_stats"])
    assert batches == stats["execution_count"], stats
    assert stats["inference_count"] == stats["inference_stats"]["success"]["count"], stats  # one row each
    return int(stats["inference_stats"]["success"]["count"])


def _metric(server: DhowProcess, pattern: str, key: str = "") -> float:
    status, text = _call(server, "GET", "/metrics", key=key)
    assert status == 200, text
    found = re.search(rf"^{pattern} (\S+)$", text, re.MULTILINE)
    return float(found.group(1)) if found else 0.0


def _requests_metric(server: DhowProcess, key: str = "") -> float:
    return _metric(server, r'dhow_inference_requests_total\{model="tabular",outcome="success",version="2"\}', key)


def _wait_for(probe: Callable[[], T], done: Callable[[T], bool], what: str, timeout: float = 60.0) -> T:
    deadline = time.monotonic() + timeout
    while True:
        value = probe()
        if done(value):
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: still {value!r} after {timeout} s")
        time.sleep(0.1)


def _all_ready(server: DhowProcess, times: int = 1) -> None:
    """Wait until the supervisor said ``times`` times that every worker is ready."""
    _wait_for(lambda: server.log().count("workers are ready"), lambda n: n >= times, "workers ready")


def _children(pid: int) -> list[int]:
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
            except OSError:
                continue
            if int(stat.rpartition(")")[2].split()[1]) == pid:
                found.append(int(entry))
    return found


def _descendants(pid: int) -> set[int]:
    found = set(_children(pid))
    for child in list(found):
        found |= _descendants(child)
    return found


def _workers(server: DhowProcess) -> list[int]:
    pids = []
    for pid in _children(server.process.pid):
        try:
            if b"spawn_main" in Path(f"/proc/{pid}/cmdline").read_bytes():
                pids.append(pid)
        except OSError:
            continue
    return pids


def _alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0] != "Z"
    except OSError:
        return False


def test_shared_statistics_sum_every_worker_and_survive_a_successor(tmp_path: Path) -> None:
    first, second = StatsFolder(tmp_path, 1), StatsFolder(tmp_path, 2)
    one = ModelStats(4, shared=(first, "a/b", 3))
    two = ModelStats(4, shared=(second, "a/b", 3))
    one.record_batch(BatchTimings(2, 10, 100, 1000), requests=2)
    one.record_request(True, 50, rows=2)
    two.record_batch(BatchTimings(4, 20, 200, 2000), requests=1)
    two.record_request(True, 70, rows=4)
    two.record_request(False, 5, rows=1)
    two.queue.add(7)
    # worker 1's successor (or a reload) opens the same file, with room for larger batches, and counts on
    successor = ModelStats(8, shared=(first, "a/b", 3))
    successor.record_batch(BatchTimings(8, 1, 2, 3), requests=1)
    for stats in (one, two, successor):
        figures = stats.as_dict("a/b", "3")
        assert (figures["inference_count"], figures["execution_count"]) == (6, 3)
        inference = figures["inference_stats"]
        assert inference["success"] == {"count": 2, "ns": 120} and inference["fail"] == {"count": 1, "ns": 5}
        assert inference["queue"] == {"count": 1, "ns": 7}
        assert inference["compute_infer"] == {"count": 4, "ns": 100 * 2 + 200 + 2}  # per request: times requests
        assert [(b["batch_size"], b["compute_infer"]) for b in figures["batch_stats"]] == [
            (2, {"count": 1, "ns": 100}),
            (4, {"count": 1, "ns": 200}),
            (8, {"count": 1, "ns": 2}),
        ]
    assert successor.last_inference == one.last_inference  # its own slots: the predecessor's figures
    assert sorted(path.name for path in tmp_path.iterdir()) == ["a%2Fb.3"]  # a name never makes a path


# -- one supervisor with two workers, authentication on, shared by the tests that only read --------


@pytest.fixture(scope="module")
def workers(demo_repository: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[DhowProcess, str]]:
    root = tmp_path_factory.mktemp("workers")
    shutil.copytree(demo_repository / "tabular", root / "models" / "tabular")
    server = start_dhow(root / "models", root, "--workers", "2", "--auth", "on", "--registry-poll", "0.5")
    try:
        _all_ready(server)
        keys = KEY.findall(server.log())
        assert len(keys) == 1, server.log()
        yield server, keys[0]
    finally:
        assert server.stop() == 0, server.log()


def test_first_start_prints_one_admin_key(workers: tuple[DhowProcess, str]) -> None:
    server, key = workers
    assert server.log().count("an admin API key was made") == 1
    # the workers found the key the supervisor made, and they take it
    assert _call(server, "GET", "/v2/models/tabular/versions/2/stats")[0] == 401
    assert _call(server, "GET", "/v2/models/tabular/versions/2/stats", key=key)[0] == 200


def test_both_workers_answer_and_statistics_are_server_wide(workers: tuple[DhowProcess, str]) -> None:
    server, key = workers
    before, metric_before = _successes(server, key), _requests_metric(server, key)
    count = 40
    assert [_infer(server, key) for _ in range(count)] == [200] * count
    # read from many connections: whichever worker answers, the figures are the server's
    assert {_successes(server, key) - before for _ in range(8)} == {count}
    assert {_requests_metric(server, key) - metric_before for _ in range(8)} == {count}
    assert _metric(server, "dhow_workers", key) == 2
    # the autoscaling signals, summed over the workers' files: each batch wrote them, nothing waits now
    served = r'\{model="tabular",version="2"\}'
    assert _metric(server, f"dhow_batch_fill_ratio_count{served}", key) >= count
    for gauge in ("dhow_queue_depth", "dhow_inflight_requests"):
        _, text = _call(server, "GET", "/metrics", key=key)
        assert re.search(rf"^{gauge}{served} 0\.0$", text, re.MULTILINE), text
    for _ in range(4):  # a new channel each time, so any worker may answer
        client = grpcclient.InferenceServerClient(server.grpc_url)
        try:
            answer = client.get_inference_statistics("tabular", "2", headers={"authorization": f"Bearer {key}"})
        finally:
            client.close()
        assert answer.model_stats[0].inference_stats.success.count == before + count
    # both workers answered: each request id starts with its process's own random prefix
    store = AuditStore.open(f"sqlite:///{server.log_path.parent / 'data' / 'audit.sqlite3'}")
    try:
        records = _wait_for(
            lambda: store.read(limit=10_000, model="tabular", kind="inference"),
            lambda found: len(found) >= count,
            "inference audit records",
        )
        assert len({record["request_id"][:8] for record in records}) == 2
        assert store.verify().ok  # two workers appending to one hash chain keep it whole
    finally:
        store.close()


def test_repository_load_and_unload_are_refused(workers: tuple[DhowProcess, str]) -> None:
    server, key = workers
    for action in ("load", "unload"):
        status, answer = _call(server, "POST", f"/v2/repository/models/tabular/{action}", b"{}", key)
        assert status == 501, answer
        assert "with --workers 2 each server process loads from the repository itself" in answer["error"]
        assert "--model-control poll" in answer["error"]
    client = grpcclient.InferenceServerClient(server.grpc_url)
    try:
        with pytest.raises(InferenceServerException, match="UNIMPLEMENTED") as raised:
            client.load_model("tabular", headers={"authorization": f"Bearer {key}"})
        assert "--workers 2" in str(raised.value)
    finally:
        client.close()


def test_a_deployment_made_through_one_worker_reaches_every_worker(workers: tuple[DhowProcess, str]) -> None:
    server, key = workers
    policy = json.dumps({"policy": {"kind": "pinned", "version": 1}, "revision": 0}).encode()
    status, answer = _call(server, "PUT", "/v2/admin/deployments/tabular", policy, key)
    assert status == 200, answer

    def versions() -> set[str]:
        answers = [_call(server, "POST", "/v2/models/tabular/infer", TABULAR_BODY, key) for _ in range(16)]
        assert all(status == 200 for status, _ in answers), answers
        return {answer["model_version"] for _, answer in answers}

    _wait_for(versions, lambda seen: seen == {"1"}, "versions answering after pinning version 1")


# -- restarts and stopping --------------------------------------------------------------------------


@pytest.fixture
def slow_repository(demo_repository: Path, tmp_path: Path) -> Path:
    repository = tmp_path / "models"
    shutil.copytree(demo_repository / "tabular", repository / "tabular")
    (repository / "slow" / "1").mkdir(parents=True)
    (repository / "slow" / "1" / "model.py").write_text(SLOW_MODEL.format(mark=str(tmp_path / "computing")))
    (repository / "slow" / "model.yaml").write_text(SLOW_MODEL_YAML)
    return repository


def test_a_killed_worker_is_replaced_without_losing_counts_and_sigterm_stops_all(
    slow_repository: Path, tmp_path: Path
) -> None:
    server = start_dhow(slow_repository, tmp_path, "--workers", "2")
    try:
        _all_ready(server)
        first = 20
        assert [_infer(server) for _ in range(first)] == [200] * first
        assert _successes(server) == first
        workers = _workers(server)
        assert len(workers) == 2, workers
        os.kill(workers[0], signal.SIGKILL)
        _wait_for(server.log, lambda text: f"(pid {workers[0]}) was killed by signal 9" in text, "death noticed")
        # the replacement loads before it listens: no request fails while it does
        statuses = []
        while server.log().count("workers are ready") < 2:
            statuses.append(_infer(server))
        statuses += [_infer(server) for _ in range(10)]
        assert set(statuses) == {200}, statuses
        replaced = _workers(server)
        assert len(replaced) == 2 and workers[0] not in replaced and workers[1] in replaced, (workers, replaced)
        # what the dead worker counted is still in the server's figures
        expected = first + len(statuses)
        assert {_successes(server) for _ in range(6)} == {expected}
        assert {_requests_metric(server) for _ in range(6)} == {expected}
        assert _metric(server, "dhow_workers") == 2

        # SIGTERM: a request in flight is answered, then every process exits
        processes = _descendants(server.process.pid)
        slow: list[tuple[int, Any]] = []
        body = json.dumps({"inputs": [{"name": "x", "shape": [1, 2], "datatype": "FP32", "data": [1, 2]}]}).encode()
        caller = threading.Thread(target=lambda: slow.append(_call(server, "POST", "/v2/models/slow/infer", body)))
        caller.start()
        _wait_for(lambda: (tmp_path / "computing").exists(), bool, "the slow request computing")
        server.process.send_signal(signal.SIGTERM)
        assert server.process.wait(60) == 0, server.log()
        caller.join(30)
        assert slow and slow[0][0] == 200, slow
        assert np.allclose(slow[0][1]["outputs"][0]["data"], [2, 4])
        _wait_for(lambda: sorted(pid for pid in processes if _alive(pid)), lambda left: not left, "processes left")
    finally:
        server.stop()


def test_workers_do_not_outlive_their_supervisor(demo_repository: Path, tmp_path: Path) -> None:
    repository = tmp_path / "models"
    shutil.copytree(demo_repository / "tabular", repository / "tabular")
    server = start_dhow(repository, tmp_path, "--workers", "2")
    try:
        _all_ready(server)
        workers = _workers(server)
        assert len(workers) == 2, workers
        server.process.kill()
        server.process.wait()
        _wait_for(lambda: sorted(pid for pid in workers if _alive(pid)), lambda left: not left, "workers left")
        assert server.log().count("dhow stopped") == 2  # each stopped as on SIGTERM, not killed
    finally:
        server.stop()


# -- refusals before anything serves -----------------------------------------------------------


def test_settings_a_worker_refuses_stop_the_supervisor(demo_repository: Path, tmp_path: Path) -> None:
    missing = str(tmp_path / "missing.pem")
    server = start_dhow(
        demo_repository, tmp_path, "--workers", "2", "--tls-cert", missing, "--tls-key", missing, wait=False
    )
    try:
        assert server.process.wait(60) == 2, server.log()
    finally:
        server.stop()
    assert f"dhow: TLS file {missing} does not exist" in server.log()
    assert "exited with status 2 before it was ready; giving up" in server.log()
    assert "restarting" not in server.log()


@pytest.mark.parametrize("workers", ["1", "2"])
def test_busy_ports_fail_loudly(demo_repository: Path, tmp_path: Path, workers: str) -> None:
    # a plain listener on the REST port; on the gRPC port one that shares with SO_REUSEPORT, as grpc's default
    # does: the workers' own SO_REUSEPORT must not let them in beside it, nor grpc's in a single server
    for door, reuse_port in (("REST", False), ("gRPC", True)):
        port = free_port()
        with socket.socket() as other:
            if reuse_port:
                other.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            other.bind(("127.0.0.1", port))
            other.listen()
            option = "--http-port" if door == "REST" else "--grpc-port"
            (tmp_path / door).mkdir()
            server = start_dhow(demo_repository, tmp_path / door, "--workers", workers, option, str(port), wait=False)
            try:
                assert server.process.wait(60) == 2
            finally:
                server.stop()
        assert f"cannot serve {door} on 127.0.0.1:{port}: Address already in use" in server.log(), server.log()
        assert "worker 1 started" not in server.log()
        assert "Traceback" not in server.log()


@pytest.mark.parametrize(
    ("value", "env", "message"),
    [
        ("0", {}, "option --workers: 'workers' must be an integer of at least 1, got 0"),
        ("abc", {}, "argument --workers: invalid int value: 'abc'"),
        (None, {"DHOW_WORKERS": "-2"}, "environment variable DHOW_WORKERS: 'workers' must be an integer of at least 1"),
    ],
)
def test_the_number_of_workers_is_checked(
    demo_repository: Path, tmp_path: Path, value: str | None, env: dict[str, str], message: str
) -> None:
    args = [sys.executable, "-m", "dhow.cli", "serve", "--repository", str(demo_repository)]
    args += ["--data-dir", str(tmp_path / "data"), "--auth", "none"]
    if value is not None:
        args += ["--workers", value]
    done = subprocess.run(args, capture_output=True, text=True, timeout=60, env={**os.environ, **env})
    assert done.returncode == 2, done.stdout + done.stderr
    assert message in done.stderr


def test_no_answered_request_is_missing_from_the_audit_trail_after_kill_9(
    demo_repository: Path, tmp_path: Path
) -> None:
    """Under load, both workers are killed with SIGKILL: every request that was answered 200 has its record.

    The record of a request leaves the worker (into its audit writer's pipe) before the answer does, and the
    writer writes what is in the pipe after the worker is gone. Before, 14 of 2,998 answered requests were lost.
    """
    repository = tmp_path / "models"
    shutil.copytree(demo_repository / "tabular", repository / "tabular")
    data = tmp_path / "data"
    key = make_key(data, "load", ["invoker"])
    server = start_dhow(repository, tmp_path, "--workers", "2", "--auth", "on")
    answered: list[int] = []
    stop = threading.Event()

    def load() -> None:
        while not stop.is_set():
            try:
                connection = http.client.HTTPConnection("127.0.0.1", server.http_port, timeout=5)
                while not stop.is_set():
                    status = _call_on(connection, key)
                    if status == 200:
                        answered.append(1)
            except (OSError, http.client.HTTPException):
                time.sleep(0.01)  # the worker died under us: connect again (to a restarted one)

    try:
        _all_ready(server)
        callers = [threading.Thread(target=load) for _ in range(4)]
        for caller in callers:
            caller.start()
        _wait_for(lambda: len(answered), lambda n: n >= 1500, "load")
        for worker in _workers(server):
            os.kill(worker, signal.SIGKILL)
        stop.set()
        for caller in callers:
            caller.join(30)
    finally:
        stop.set()
        server.stop()
    audit = AuditStore.open(f"sqlite:///{data / 'audit.sqlite3'}")
    try:

        def recorded() -> int:
            records = []
            since = 0
            while batch := audit.read(since_seq=since, limit=10_000, kind="inference", outcome="success"):
                records += batch
                since = batch[-1]["seq"]
            return len(records)

        # the dead workers' writers finish what their pipes held on their own, after the server stopped
        count = _wait_for(recorded, lambda n: n >= len(answered), "every answered request recorded", timeout=30)
        assert count >= len(answered) >= 1500
        assert audit.verify().ok
    finally:
        audit.close()


def _call_on(connection: http.client.HTTPConnection, key: str) -> int:
    headers = {"content-type": "application/json", "authorization": f"Bearer {key}"}
    connection.request("POST", "/v2/models/tabular/infer", body=TABULAR_BODY, headers=headers)
    answer = connection.getresponse()
    answer.read()
    return answer.status
