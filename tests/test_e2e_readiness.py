"""Readiness and warm-up against real servers: ready means every model the server should serve is loaded and
warmed (REST and gRPC agree), and model.yaml's ``warmup`` runs before a version is served, on load, reload and
the versions a deployment needs."""

from __future__ import annotations

import json
import shutil
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient

from tests.conftest import DhowProcess, start_dhow, wait_until

# a Python model that writes down every request it computes (input x FP32 [-1, 4], output y FP32 [-1, 4])
RECORDING_MODEL = """
import json
from pathlib import Path

class Recording:
    def load(self, version_dir):
        self.log = Path(version_dir).parent / "calls.jsonl"
        self.version = Path(version_dir).name

    def predict(self, inputs):
        x = inputs["x"]
        if FAIL_ON_ZEROS and not x.any():
            raise ValueError("zeros are not a customer")
        with self.log.open("a") as out:
            out.write(json.dumps({"version": self.version, "x": x.tolist()}) + "\\n")
        return {"y": x * 2}
"""
UNLOADABLE_MODEL = """
class Unloadable:
    def load(self):
        raise RuntimeError("this model cannot load")

    def predict(self, inputs):
        return inputs
"""
TENSORS = (
    "max_batch_size: 8\n"
    "inputs: [{name: x, datatype: FP32, shape: [-1, 4]}]\noutputs: [{name: y, datatype: FP32, shape: [-1, 4]}]\n"
)


def _python_model(repository: Path, name: str, source: str, extra: str = "", versions: tuple[int, ...] = (1,)) -> Path:
    folder = repository / name
    for version in versions:
        (folder / str(version)).mkdir(parents=True, exist_ok=True)
        (folder / str(version) / "model.py").write_text(source, encoding="utf-8")
    (folder / "model.yaml").write_text(f"runtime: python\n{TENSORS}{extra}", encoding="utf-8")
    return folder


def _recording(fail_on_zeros: bool = False) -> str:
    return RECORDING_MODEL.replace("FAIL_ON_ZEROS", str(fail_on_zeros))


def _calls(folder: Path) -> list[dict[str, Any]]:
    path = folder / "calls.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines()]


def _wait_for(condition: Callable[[], bool], timeout: float = 60.0) -> None:
    wait_until(condition, timeout)


def _index(server: DhowProcess) -> dict[str, dict[str, str]]:
    request = urllib.request.Request(f"http://{server.http_url}/v2/repository/index", data=b"{}", method="POST")
    with urllib.request.urlopen(request, timeout=10) as answer:
        return {f"{row['name']}/{row['version']}": row for row in json.loads(answer.read())}


def _ready_status(server: DhowProcess) -> int:
    try:
        with urllib.request.urlopen(f"http://{server.http_url}/v2/health/ready", timeout=10) as answer:
            return int(answer.status)
    except urllib.error.HTTPError as exc:
        return exc.code


def _get(server: DhowProcess, path: str) -> tuple[int, Any]:
    try:
        with urllib.request.urlopen(f"http://{server.http_url}{path}", timeout=10) as answer:
            return int(answer.status), json.loads(answer.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def _not_ready_bodies(server: DhowProcess) -> None:
    """Every door's probe says 503 with the body its clients read (KServe's ``ready``, TorchServe's ``status``,
    TensorFlow Serving's version states), and the reason in ``error``."""
    status, body = _get(server, "/v2/health/ready")
    assert status == 503 and body["ready"] is False and "not ready" in body["error"], body
    status, body = _get(server, "/v2/models/broken/ready")
    assert status == 503 and (body["name"], body["ready"]) == ("broken", False), body
    status, body = _get(server, "/ping")
    assert status == 503 and body["status"] == "Unhealthy" and "has no version loaded" in body["error"], body
    status, body = _get(server, "/v1/models/broken")
    assert status == 503 and body["ready"] is False and "not ready" in body["error"], body
    (version,) = body["model_version_status"]
    assert version["state"] == "END" and version["status"]["error_code"] == "UNAVAILABLE", version
    assert _get(server, "/v1/models/tabular")[0] == 200  # a model that answers is ready, whatever the server


def _started(server: DhowProcess) -> bool:
    """The server finished loading what it loads at start (it says so in its log)."""
    return "dhow is ready" in server.log()


def test_not_ready_while_a_model_is_not_loaded(repository_copy: Path, tmp_path: Path) -> None:
    for folder in repository_copy.iterdir():
        if folder.name != "tabular":
            shutil.rmtree(folder)
    broken = _python_model(repository_copy, "broken", UNLOADABLE_MODEL)
    for name in ("strict", "lenient"):
        (tmp_path / name).mkdir()
    server = start_dhow(
        repository_copy,
        tmp_path / "strict",
        "--model-control",
        "poll",
        "--poll-interval",
        "0.2",
        wait=False,
        started=_started,
    )
    grpc = grpcclient.InferenceServerClient(server.grpc_url)
    http = httpclient.InferenceServerClient(server.http_url)
    try:
        _wait_for(lambda: server.process.poll() is not None or _started(server))
        assert _index(server)["broken/1"]["state"] == "UNAVAILABLE"
        assert _ready_status(server) == 503
        assert grpc.is_server_ready() is False  # gRPC ServerReady agrees with REST
        assert http.is_model_ready("tabular") and not http.is_model_ready("broken")  # per model: as before
        _not_ready_bodies(server)

        # repaired on disk: loaded by the poller, and the server is ready
        (broken / "1" / "model.py").write_text(_recording(), encoding="utf-8")
        _wait_for(lambda: _ready_status(server) == 200)
        assert grpc.is_server_ready() is True
    finally:
        grpc.close()
        http.close()
        assert server.stop() == 0

    # the escape hatch: ready once the start-up loads were tried, whatever their outcome
    (broken / "1" / "model.py").write_text(UNLOADABLE_MODEL, encoding="utf-8")
    lenient = start_dhow(repository_copy, tmp_path / "lenient", "--strict-readiness", "false")
    try:
        assert _index(lenient)["broken/1"]["state"] == "UNAVAILABLE"
        assert _ready_status(lenient) == 200
    finally:
        assert lenient.stop() == 0


def test_warmup_runs_before_a_version_is_served(tmp_path: Path) -> None:
    repository = tmp_path / "models"
    generated = _python_model(repository, "generated", _recording(), "warmup: {requests: 2, value: 1}\n")
    sampled = _python_model(repository, "sampled", _recording(), "warmup: {samples: [{x: [[1, 2, 3, 4]]}]}\n")
    _python_model(repository, "refused", _recording(fail_on_zeros=True), "warmup: {requests: 1}\n")
    _python_model(repository, "misspelt", _recording(), "warmup: {requests: 0}\n")
    _python_model(repository, "unwarmed", _recording(fail_on_zeros=True))
    server = start_dhow(
        repository, tmp_path, "--model-control", "poll", "--poll-interval", "0.2", wait=False, started=_started
    )
    http = httpclient.InferenceServerClient(server.http_url)
    try:
        _wait_for(lambda: server.process.poll() is not None or _started(server))
        # every instance computed the warm-up before the version was served, and clients' statistics do not show it
        assert [call["x"] for call in _calls(generated)] == [[[1.0, 1.0, 1.0, 1.0]]] * 2
        assert [call["x"] for call in _calls(sampled)] == [[[1.0, 2.0, 3.0, 4.0]]]
        assert http.get_inference_statistics("generated")["model_stats"][0]["inference_count"] == 0
        index = _index(server)
        assert index["generated/1"]["state"] == "READY" and index["unwarmed/1"]["state"] == "READY"
        # a warm-up that fails is a load that fails, with the model's reason
        assert index["refused/1"]["state"] == "UNAVAILABLE"
        reason = index["refused/1"]["reason"]
        assert "warm-up request 1 failed" in reason and "zeros are not a customer" in reason
        # a bad warmup section is refused naming file, field and expectation
        misspelt = index["misspelt/"]["reason"]
        assert "model.yaml: field 'warmup.requests': expected a positive integer" in misspelt
        assert _ready_status(server) == 503

        # a reload warms the new copy before it replaces the old one
        (generated / "model.yaml").write_text(
            f"runtime: python\n{TENSORS}warmup: {{samples: [{{x: [[5, 6, 7, 8], [0, 0, 0, 1]]}}]}}\n"
        )
        _wait_for(lambda: len(_calls(generated)) == 3)
        assert _calls(generated)[-1]["x"] == [[5.0, 6.0, 7.0, 8.0], [0.0, 0.0, 0.0, 1.0]]
        _wait_for(lambda: http.is_model_ready("generated"))
    finally:
        http.close()
        assert server.stop() == 0


def test_a_deployment_routes_to_a_version_only_once_it_is_warmed(tmp_path: Path) -> None:
    repository = tmp_path / "models"
    extra = "version_policy: {specific: [1]}\nwarmup: {requests: 1, value: 3}\n"
    folder = _python_model(repository, "pinned", _recording(), extra, versions=(1, 2))
    server = start_dhow(repository, tmp_path)
    try:
        assert [call["version"] for call in _calls(folder)] == ["1"]
        body = json.dumps({"policy": {"kind": "pinned", "version": 2}, "revision": 0}).encode()
        request = urllib.request.Request(
            f"http://{server.http_url}/v2/admin/deployments/pinned", data=body, method="PUT"
        )
        with urllib.request.urlopen(request, timeout=30) as answer:
            assert answer.status == 200
        # version 2 was loaded for the deployment and warmed before the policy was applied
        assert _calls(folder)[-1] == {"version": "2", "x": [[3.0, 3.0, 3.0, 3.0]]}
    finally:
        assert server.stop() == 0
