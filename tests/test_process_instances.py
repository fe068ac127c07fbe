"""Process instances (``instances: {kind: process}``) against a real server: the same answers as thread instances
over REST and gRPC, one process per instance that loads only its own model, a killed instance restarted, a
model's exception and a failed load reported with the model's message, nothing left behind by an unload, and
an encrypted artifact loaded with a key that reached the process over its socket only."""

from __future__ import annotations

import http.client
import json
import os
import shutil
import signal
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import joblib
import numpy as np
import pytest

from dhow.protocols.grpc.generated import grpc_service_pb2 as pb
from dhow.protocols.grpc.generated import grpc_service_pb2_grpc as pb_grpc
from dhow.repository.encryption import Keyring, encrypt_repository, generate_key
from tests.conftest import DhowProcess, start_dhow

pytestmark = pytest.mark.skipif(not hasattr(os, "memfd_create"), reason="process instances need Linux")

PROCESS = "instances: {count: 2, kind: process}\n"
ONE_PROCESS = "instances: {count: 1, kind: process}\n"

# reports the process it runs in and the models that process imported; fails or hangs when asked to
PROBE_MODEL = """
import json
import os
import subprocess
import sys
import time

import numpy as np

PIDS = {pids!r}


class Probe:
    def load(self):
        pass

    def predict(self, inputs):
        x = inputs["x"]
        if (x < 0).any():
            raise ValueError(f"negative input {{int(x.min())}}")
        if (x >= 1000).any():  # hold the batch until the test kills this process
            held = [os.getpid()]
            if (x == 1001).any():  # and hand its socket to a process it starts, as a library might
                socket_fd = int(sys.argv[1])
                held.append(subprocess.Popen(["sleep", "120"], pass_fds=(socket_fd,), stdout=subprocess.DEVNULL).pid)
            with open(PIDS, "a") as out:
                out.write(" ".join(map(str, held)) + "\\n")
            time.sleep(60)
        loaded = [module for name, module in list(sys.modules.items()) if name.startswith("dhow_model_")]
        files = sorted(str(getattr(module, "__file__", "")) for module in loaded)
        inheritable = os.get_inheritable(int(sys.argv[1]))
        seen = json.dumps({{"models": files, "sklearn": "sklearn" in sys.modules, "inheritable": inheritable}}).encode()
        return {{"pid": np.full(x.shape, os.getpid(), dtype=np.int64), "seen": np.full(x.shape, seen, dtype=object)}}
"""

PROBE_YAML = f"""runtime: python
max_batch_size: 8
inputs: [{{name: x, datatype: INT64, shape: [-1, 1]}}]
outputs: [{{name: pid, datatype: INT64, shape: [-1, 1]}}, {{name: seen, datatype: BYTES, shape: [-1, 1]}}]
{PROCESS}"""

OTHER_MODEL = """
class Other:
    def load(self):
        pass

    def predict(self, inputs):
        return {"y": inputs["x"] + 1}
"""

OTHER_YAML = """runtime: python
max_batch_size: 8
inputs: [{name: x, datatype: INT64, shape: [-1, 1]}]
outputs: [{name: y, datatype: INT64, shape: [-1, 1]}]
"""

# loads at once, except while the marker file exists: then its load outlasts any test
SLOW_MODEL = """
import os
import time


class Slow:
    def load(self):
        if os.path.exists({marker!r}):
            time.sleep(600)

    def predict(self, inputs):
        return {{"y": inputs["x"] + 1}}
"""

# an sklearn model whose signature comes from its estimator (the number of classes), not only from model.yaml
# its classes are left open (-1), so that a refit with a third class still loads: the restart's own signature
# check is what refuses it
DRIFTING_YAML = """runtime: sklearn
max_batch_size: 8
inputs: [{name: input, datatype: FP64, shape: [-1, 4]}]
outputs: [{name: predict_proba, datatype: FP64, shape: [-1, -1]}]
instances: {count: 1, kind: process}
"""

BROKEN_MODEL = """
class Broken:
    def load(self):
        raise RuntimeError("the weights are missing")

    def predict(self, inputs):
        return inputs
"""


@dataclass(frozen=True)
class Served:
    server: DhowProcess
    repository: Path
    pids_file: Path
    slow_marker: Path


def _python_model(repository: Path, name: str, manifest: str, source: str) -> None:
    (repository / name / "1").mkdir(parents=True)
    (repository / name / "model.yaml").write_text(manifest, encoding="utf-8")
    (repository / name / "1" / "model.py").write_text(source, encoding="utf-8")


def _fit_estimator(path: Path, classes: int) -> None:
    from sklearn.linear_model import LogisticRegression

    x = np.arange(4 * 6, dtype=np.float64).reshape(6, 4)
    joblib.dump(LogisticRegression().fit(x, [i % classes for i in range(6)]), path)


def _copy(demo_repository: Path, model: str, repository: Path, name: str, extra: str = "") -> None:
    shutil.copytree(demo_repository / model, repository / name)
    with (repository / name / "model.yaml").open("a", encoding="utf-8") as manifest:
        manifest.write(extra)


@pytest.fixture(scope="module")
def served(demo_repository: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    root = tmp_path_factory.mktemp("process-instances")
    repository, pids_file, slow_marker = root / "models", root / "held-pids.txt", root / "slow-load"
    _copy(demo_repository, "tabular_sklearn", repository, "sk_thread")
    _copy(demo_repository, "tabular_sklearn", repository, "sk_process", PROCESS)
    _copy(demo_repository, "text_python", repository, "text_process", "instances: {count: 1, kind: process}\n")
    _python_model(repository, "probe", PROBE_YAML, PROBE_MODEL.format(pids=str(pids_file)))
    _python_model(repository, "other", OTHER_YAML, OTHER_MODEL)
    _python_model(repository, "broken", OTHER_YAML + PROCESS, BROKEN_MODEL)
    _python_model(repository, "slow", OTHER_YAML + ONE_PROCESS, SLOW_MODEL.format(marker=str(slow_marker)))
    (repository / "drifting" / "1").mkdir(parents=True)
    (repository / "drifting" / "model.yaml").write_text(DRIFTING_YAML, encoding="utf-8")
    _fit_estimator(repository / "drifting" / "1" / "model.joblib", classes=2)
    # "broken" fails to load on purpose: ready means "the start-up loads were tried"
    server = start_dhow(
        repository, root, "--model-control", "explicit", "--load-model", "*", "--strict-readiness", "false"
    )
    yield Served(server, repository, pids_file, slow_marker)
    children = _instance_processes(server)
    assert server.stop() == 0, server.log()
    assert children and not [pid for pid in children if _proc(pid, "stat")], "instances outlived their server"


# -- processes, as /proc shows them ---------------------------------------------------------------


def _proc(pid: int, name: str) -> bytes:
    try:
        return Path(f"/proc/{pid}/{name}").read_bytes()
    except OSError:  # it ended while we looked
        return b""


def _descendants(root: int) -> list[int]:
    parents: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        stat = _proc(int(entry), "stat") if entry.isdigit() else b""
        if stat:
            fields = stat.rpartition(b")")[2].split()
            parents.setdefault(int(fields[1]), []).append(int(entry))
    found, todo = [], [root]
    while todo:
        children = parents.get(todo.pop(), [])
        found += children
        todo += children
    return found


def _instance_processes(server: DhowProcess) -> dict[int, str]:
    """Live instance processes under the server (pid -> label, e.g. dhow-probe-1-0); zombies excluded."""
    found: dict[int, str] = {}
    for pid in _descendants(server.process.pid):
        argv = _proc(pid, "cmdline").rstrip(b"\0").split(b"\0")
        state = _proc(pid, "stat").rpartition(b")")[2].split()[:1]
        if b"dhow.scheduling.instances.worker" in argv and state != [b"Z"]:
            found[pid] = argv[-1].decode()
    return found


def _of(server: DhowProcess, model: str) -> set[int]:
    return {pid for pid, label in _instance_processes(server).items() if label.startswith(f"dhow-{model}-1-")}


def _wait_until(condition: Callable[[], bool], what: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(0.05)
    raise AssertionError(f"not within {timeout:g} s: {what}")


# -- the two doors ----------------------------------------------------------------------------------


def _rest(server: DhowProcess, method: str, path: str, body: Any = None) -> tuple[int, Any]:
    connection = http.client.HTTPConnection("127.0.0.1", server.http_port, timeout=90)
    try:
        payload = json.dumps(body).encode() if body is not None else None
        connection.request(method, path, payload, {"Content-Type": "application/json"})
        response = connection.getresponse()
        data = response.read()
        return response.status, json.loads(data) if data else None
    finally:
        connection.close()


def _rest_infer(server: DhowProcess, model: str, inputs: dict[str, np.ndarray]) -> tuple[int, Any]:
    tensors = [
        {"name": name, "shape": list(array.shape), "datatype": _datatype(array), "data": array.reshape(-1).tolist()}
        for name, array in inputs.items()
    ]
    return _rest(server, "POST", f"/v2/models/{model}/infer", {"inputs": tensors})


def _datatype(array: np.ndarray) -> str:
    return {"float32": "FP32", "int64": "INT64"}.get(array.dtype.name, "BYTES")


def _rest_outputs(body: Any) -> dict[str, np.ndarray]:
    return {o["name"]: np.array(o["data"]).reshape(o["shape"]) for o in body["outputs"]}


def _grpc_outputs(stub: pb_grpc.GRPCInferenceServiceStub, model: str, x: np.ndarray) -> dict[str, np.ndarray]:
    request = pb.ModelInferRequest(
        model_name=model,
        inputs=[pb.ModelInferRequest.InferInputTensor(name="input", datatype="FP32", shape=list(x.shape))],
        raw_input_contents=[x.astype("<f4").tobytes()],
    )
    response = stub.ModelInfer(request, timeout=60)
    dtypes = {"INT64": "<i8", "FP64": "<f8"}
    return {
        tensor.name: np.frombuffer(raw, dtype=dtypes[tensor.datatype]).reshape(list(tensor.shape))
        for tensor, raw in zip(response.outputs, response.raw_output_contents, strict=True)
    }


def _probe(server: DhowProcess, value: int, rows: int = 1) -> tuple[int, Any]:
    return _rest_infer(server, "probe", {"x": np.full((rows, 1), value, dtype=np.int64)})


def _probe_pids(server: DhowProcess, requests: int) -> set[int]:
    with ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(lambda i: _probe(server, i + 1), range(requests)))
    assert all(status == 200 for status, _ in answers), answers
    return {int(_rest_outputs(body)["pid"][0, 0]) for _, body in answers}


# -- answers --------------------------------------------------------------------------------------


def test_answers_equal_the_thread_instances_row_by_row(served: Served) -> None:
    server = served.server
    rng = np.random.default_rng(3)
    requests = [rng.normal(size=(int(rng.integers(1, 8)), 32)).astype(np.float32) for _ in range(48)]
    with grpc.insecure_channel(server.grpc_url) as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)

        def ask(model: str, i: int) -> dict[str, np.ndarray]:
            if i % 2:
                return _grpc_outputs(stub, model, requests[i])
            status, body = _rest_infer(server, model, {"input": requests[i]})
            assert status == 200, body
            return _rest_outputs(body)

        with ThreadPoolExecutor(16) as pool:
            threads = list(pool.map(lambda i: ask("sk_thread", i), range(len(requests))))
            processes = list(pool.map(lambda i: ask("sk_process", i), range(len(requests))))
    for i, (expected, got) in enumerate(zip(threads, processes, strict=True)):
        assert got["predict"].shape == (len(requests[i]),) and got["predict_proba"].shape == (len(requests[i]), 2)
        np.testing.assert_array_equal(got["predict"], expected["predict"], err_msg=f"request {i}")
        np.testing.assert_array_equal(got["predict_proba"], expected["predict_proba"], err_msg=f"request {i}")
    _, stats = _rest(server, "GET", "/v2/models/sk_process/stats")
    assert stats["model_stats"][0]["inference_count"] == sum(len(r) for r in requests)


def test_each_instance_is_a_process_that_loads_only_its_model(served: Served) -> None:
    server = served.server
    assert len(_of(server, "sk_process")) == 2 and len(_of(server, "probe")) == 2
    assert not _of(server, "sk_thread") and not _of(server, "other")  # thread instances stay in the server
    pids = _probe_pids(server, 24)
    assert pids <= _of(server, "probe") and server.process.pid not in pids
    status, body = _probe(server, 5)
    assert status == 200, body
    seen = json.loads(_rest_outputs(body)["seen"][0, 0])
    # the probe's process imported its own model.py, not the other python model's, and no scikit-learn
    assert seen == {
        "models": [str(served.repository / "probe" / "1" / "model.py")],
        "sklearn": False,
        "inheritable": False,
    }


# -- failures -------------------------------------------------------------------------------------


def test_an_exception_in_predict_is_a_500_with_the_models_message_in_the_log(served: Served) -> None:
    status, body = _probe(served.server, -5)
    assert status == 500, body
    error_id = body["error"].split("error id ")[1].split(";")[0]
    line = next(line for line in served.server.log().splitlines() if error_id in line)
    assert "model probe raised ValueError: negative input -5" in line
    assert _probe(served.server, 5)[0] == 200


def test_a_model_failing_to_load_in_its_process_reports_why(served: Served) -> None:
    status, index = _rest(served.server, "POST", "/v2/repository/index", {})
    assert status == 200
    row = next(row for row in index if row["name"] == "broken")
    assert row["state"] == "UNAVAILABLE"
    assert "model.py raised RuntimeError: the weights are missing" in row["reason"], row
    assert not _of(served.server, "broken")  # the process that failed is gone
    status, body = _rest(served.server, "POST", "/v2/repository/models/broken/load", {})
    assert status != 200 and "the weights are missing" in body["error"], body


def test_a_killed_instance_fails_its_batch_and_is_restarted(served: Served) -> None:
    server = served.server
    before = _of(server, "probe")
    held: list[tuple[int, Any]] = []
    request = threading.Thread(target=lambda: held.append(_probe(server, 1000)))
    request.start()
    _wait_until(lambda: served.pids_file.exists() and served.pids_file.read_text().strip() != "", "the batch is held")
    victim = int(served.pids_file.read_text().split()[0])
    os.kill(victim, signal.SIGKILL)
    request.join(60)
    status, body = held[0]
    # a retryable 503 that says what happened: the batch was lost with the process, not refused
    assert status == 503, body
    assert "instance process" in body["error"]
    assert "of model probe version 1 exited with signal 9 (SIGKILL); restarting; retry" in body["error"]
    # the next requests are answered (after the restart, if they come first) by live instances only
    pids = _probe_pids(server, 16)
    assert victim not in pids
    _wait_until(lambda: len(_of(server, "probe")) == 2, "two probe instances again")

    # an idle instance killed: the request that comes next is computed on its replacement
    idle = next(iter(_of(server, "probe")))
    os.kill(idle, signal.SIGKILL)
    _wait_until(lambda: idle not in _of(server, "probe"), "the idle instance is dead")
    pids = _probe_pids(server, 16)
    assert idle not in pids and victim not in pids
    _wait_until(lambda: len(_of(server, "probe")) == 2, "two probe instances again")
    assert _of(server, "probe").isdisjoint({victim, idle}) and victim in before
    assert _rest(server, "GET", "/v2/models/probe/ready")[0] == 200
    assert server.process.poll() is None


def test_an_instance_is_seen_dead_while_a_process_it_started_holds_its_socket(served: Served) -> None:
    server = served.server
    served.pids_file.write_text("")
    held: list[tuple[int, Any]] = []
    request = threading.Thread(target=lambda: held.append(_probe(server, 1001)))
    request.start()
    _wait_until(lambda: len(served.pids_file.read_text().split()) == 2, "the batch is held")
    victim, holder = map(int, served.pids_file.read_text().split())
    try:
        os.kill(victim, signal.SIGKILL)
        request.join(60)
        # the socket never reaches its end (the holder has it): the process's own end is what tells
        status, body = held[0]
        assert status == 503 and "exited with signal 9 (SIGKILL); restarting; retry" in body["error"], body
    finally:
        os.kill(holder, signal.SIGKILL)
    assert victim not in _probe_pids(server, 4)


def test_a_restart_that_loads_another_signature_leaves_no_process_behind(served: Served) -> None:
    server = served.server
    (first,) = _of(server, "drifting")
    _fit_estimator(served.repository / "drifting" / "1" / "model.joblib", classes=3)
    os.kill(first, signal.SIGKILL)
    _wait_until(lambda: "now has another signature" in server.log(), "the relay's restart is refused")
    assert not _of(server, "drifting")
    # each batch tries the restart again, and each refused child is stopped
    row = {"name": "input", "shape": [1, 4], "datatype": "FP64", "data": [0.0, 1.0, 2.0, 3.0]}
    for _ in range(2):
        status, body = _rest(server, "POST", "/v2/models/drifting/infer", {"inputs": [row]})
        assert status == 500, body
        assert not _of(server, "drifting")


def test_unload_ends_a_restart_instead_of_waiting_for_its_load(served: Served) -> None:
    server = served.server
    (first,) = _of(server, "slow")
    served.slow_marker.write_text("")
    os.kill(first, signal.SIGKILL)
    _wait_until(lambda: bool(_of(server, "slow") - {first}), "the restart is loading")
    status, body = _rest(server, "POST", "/v2/repository/models/slow/unload", {})
    assert status == 200, body
    assert not _of(server, "slow")
    # an unload's halt is no failure to report
    assert not [line for line in server.log().splitlines() if "model slow" in line and "restarting it failed" in line]


# -- unloading --------------------------------------------------------------------------------------


def _memory_of(server: DhowProcess, model: str) -> list[str]:
    """What of ``model``'s shared memory the server's processes still map or hold open."""
    found = []
    for pid in [server.process.pid, *_descendants(server.process.pid)]:
        maps = _proc(pid, "maps").decode(errors="replace").splitlines()
        found += [line for line in maps if f"memfd:dhow-{model}-" in line or "/dev/shm/" in line]
        try:
            links = [os.readlink(f"/proc/{pid}/fd/{fd}") for fd in os.listdir(f"/proc/{pid}/fd")]
        except OSError:
            continue
        found += [link for link in links if f"memfd:dhow-{model}-" in link or link.startswith("/dev/shm/")]
    return found


def test_unload_stops_the_instances_and_frees_their_shared_memory(served: Served) -> None:
    server = served.server
    tensors = [{"name": "text", "shape": [2, 1], "datatype": "BYTES", "data": ["hello", "gr\u00fc\u00df"]}]
    status, body = _rest(server, "POST", "/v2/models/text_process/infer", {"inputs": tensors})
    assert status == 200, body
    # BYTES in and out of the process: UTF-8 lengths, upper-cased text
    assert {o["name"]: o["data"] for o in body["outputs"]} == {"length": [5, 6], "upper": ["HELLO", "GR\u00dcSS"]}
    children = _of(server, "text_process")
    assert len(children) == 1 and _memory_of(server, "text_process"), "a batch maps the regions"

    assert _rest(server, "POST", "/v2/repository/models/text_process/unload", {})[0] == 200
    for pid in children:
        assert not _proc(pid, "stat"), f"instance process {pid} outlived the unload (or is an unreaped zombie)"
    assert _memory_of(server, "text_process") == []
    assert not [name for name in os.listdir("/dev/shm") if "dhow" in name]
    assert _rest_infer(server, "other", {"x": np.array([[1]], dtype=np.int64)})[0] == 200


# -- encrypted artifacts ------------------------------------------------------------------------------


def test_an_encrypted_artifact_loads_in_a_process_instance(
    demo_repository: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    repository = tmp_path / "models"
    _copy(demo_repository, "tabular_sklearn", repository, "sealed", "instances: {count: 1, kind: process}\n")
    key = f"k1:{generate_key()}"
    monkeypatch.setenv("DHOW_KEK", key)
    assert len(encrypt_repository(repository, Keyring.parse(key, "test"))) == 1
    assert (repository / "sealed" / "1" / "model.joblib.enc").is_file()
    server = start_dhow(repository, tmp_path)
    try:
        x = np.linspace(-2, 2, 3 * 32, dtype=np.float32).reshape(3, 32)
        status, body = _rest_infer(server, "sealed", {"input": x})
        assert status == 200, body
        estimator = joblib.load(demo_repository / "tabular_sklearn" / "1" / "model.joblib")
        np.testing.assert_array_equal(_rest_outputs(body)["predict_proba"], estimator.predict_proba(x))
        # the key reached the process over its socket: not in its environment nor its arguments
        (child,) = _of(server, "sealed")
        secret = key.split(":")[1].encode()
        assert b"DHOW_KEK" not in _proc(child, "environ") and secret not in _proc(child, "cmdline")
    finally:
        assert server.stop() == 0, server.log()
