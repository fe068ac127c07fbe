"""Declared signatures against real servers: a manifest the artifact contradicts is refused at load, naming
both, and an answer outside its declaration is a clear error naming the model (REST and gRPC), never a 200."""

from __future__ import annotations

import json
import shutil
import urllib.request
from collections.abc import Callable
from pathlib import Path

import grpc
import numpy as np
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
import yaml
from tritonclient.utils import InferenceServerException

from tests.conftest import DhowProcess, start_dhow, wait_until

# Python models with input x FP32 [-1, 2] and output y declared FP32 [-1, 2]
WIDE_MODEL = """
import numpy as np

class Wide:
    def load(self):
        pass

    def predict(self, inputs):
        return {"y": np.zeros((inputs["x"].shape[0], 7), dtype=np.float32)}
"""
WORDY_MODEL = """
import numpy as np

class Wordy:
    def load(self):
        pass

    def predict(self, inputs):
        return {"y": np.full(inputs["x"].shape, "many", dtype=object)}
"""
TRUNCATING_MODEL = """
class Truncating:
    def load(self):
        pass

    def predict(self, inputs):
        return {"y": inputs["x"] * 1.5}
"""
RIGHT_MODEL = """
class Right:
    def load(self):
        pass

    def predict(self, inputs):
        return {"y": inputs["x"] * 2}
"""


def _wait_for(condition: Callable[[], bool], timeout: float = 90.0) -> None:
    wait_until(condition, timeout)


def _reasons(server: DhowProcess) -> dict[str, str]:
    request = urllib.request.Request(f"http://{server.http_url}/v2/repository/index", data=b"{}", method="POST")
    with urllib.request.urlopen(request, timeout=10) as answer:
        return {row["name"]: row["reason"] for row in json.loads(answer.read()) if row["state"] != "READY"}


def _rewrite(manifest: Path, **fields: object) -> None:
    data = yaml.safe_load(manifest.read_text())
    data.update(fields)
    manifest.write_text(yaml.safe_dump(data))


def _started(server: DhowProcess) -> bool:
    return server.process.poll() is not None or "dhow is ready" in server.log()


def test_load_refuses_a_manifest_that_the_artifact_contradicts(repository_copy: Path, tmp_path: Path) -> None:
    wide_input = [{"name": "input", "datatype": "FP32", "shape": [-1, 33]}]
    for name in ("tabular", "tabular_sklearn", "tabular_xgboost", "tabular_lightgbm"):
        _rewrite(repository_copy / name / "model.yaml", inputs=wide_input)
    # the ONNX net answers 10 logits; this manifest says 11
    _rewrite(
        repository_copy / "mlp" / "model.yaml", outputs=[{"name": "logits", "datatype": "FP32", "shape": [-1, 11]}]
    )
    # the sklearn classifier answers integer labels; INT8 would do, FP64 probabilities as INT64 would truncate
    _rewrite(
        repository_copy / "tabular_sklearn" / "model.yaml",
        inputs=[{"name": "input", "datatype": "FP32", "shape": [-1, 32]}],
        outputs=[{"name": "predict_proba", "datatype": "INT64", "shape": [-1, 2]}],
    )
    torch_mlp = repository_copy / "torch_mlp" / "model.yaml"
    has_torch = torch_mlp.exists()  # the demo leaves it out where torch is not importable
    if has_torch:  # its forward takes one tensor; two are declared
        extra = {"name": "extra", "datatype": "FP32", "shape": [-1, 16]}
        _rewrite(torch_mlp, inputs=[{"name": "input", "datatype": "FP32", "shape": [-1, 16]}, extra])
    for name in ("text_python", "flags"):
        shutil.rmtree(repository_copy / name, ignore_errors=True)
    server = start_dhow(repository_copy, tmp_path, wait=False)
    try:
        _wait_for(lambda: _started(server))
        reasons = _reasons(server)
        refused = {"tabular", "tabular_sklearn", "tabular_xgboost", "tabular_lightgbm", "mlp"}
        assert set(reasons) == refused | ({"torch_mlp"} if has_torch else set()), reasons
        for name in ("tabular", "tabular_xgboost", "tabular_lightgbm"):
            assert f"{name}/model.yaml: inputs 'input' is declared FP32 [-1, 33]" in reasons[name], reasons[name]
            assert "32" in reasons[name].partition("but")[2], reasons[name]
        assert "model.onnx has FP32 [-1, 32]" in reasons["tabular"]
        assert "n_features_in_" not in reasons["tabular_xgboost"]
        assert "outputs 'logits' is declared FP32 [-1, 11]" in reasons["mlp"] and "[-1, 10]" in reasons["mlp"]
        sklearn = reasons["tabular_sklearn"]
        assert "outputs 'predict_proba' is declared INT64 [-1, 2], but model.joblib has FP64 [-1, 2]" in sklearn
        if has_torch:
            expected = "inputs lists 2 (input, extra), but the forward of model.pt takes 1 (input)"
            assert expected in reasons["torch_mlp"], reasons["torch_mlp"]
    finally:
        assert server.stop() == 0


@pytest.fixture
def python_models(tmp_path: Path) -> Path:
    repository = tmp_path / "models"
    tensors = (
        "runtime: python\nmax_batch_size: 8\n"
        "inputs: [{name: x, datatype: FP32, shape: [-1, 2]}]\noutputs: [{name: y, datatype: FP32, shape: [-1, 2]}]\n"
    )
    for name, source, extra in (
        ("wide", WIDE_MODEL, ""),
        ("wordy", WORDY_MODEL, ""),
        ("right", RIGHT_MODEL, ""),
        ("warmed_wide", WIDE_MODEL, "warmup: {requests: 1}\n"),
    ):
        (repository / name / "1").mkdir(parents=True)
        (repository / name / "1" / "model.py").write_text(source)
        (repository / name / "model.yaml").write_text(tensors + extra)
    (repository / "truncating" / "1").mkdir(parents=True)
    (repository / "truncating" / "1" / "model.py").write_text(TRUNCATING_MODEL)
    (repository / "truncating" / "model.yaml").write_text(
        tensors.replace("name: y, datatype: FP32", "name: y, datatype: INT32")
    )
    return repository


def test_answers_outside_the_declaration_are_clear_errors(python_models: Path, tmp_path: Path) -> None:
    server = start_dhow(python_models, tmp_path, "--strict-readiness", "false")
    http = httpclient.InferenceServerClient(server.http_url)
    channel = grpcclient.InferenceServerClient(server.grpc_url)
    try:
        expectations = {
            "wide": "answered output 'y' with shape [1, 7], but its model.yaml declares [-1, 2]",
            "wordy": "answered output 'y' with datatype BYTES (object), but its model.yaml declares FP32",
            "truncating": "answered output 'y' with datatype FP32 (float32), but its model.yaml declares INT32",
        }
        for name, expected in expectations.items():
            tensor = httpclient.InferInput("x", [1, 2], "FP32")
            tensor.set_data_from_numpy(np.ones((1, 2), np.float32))
            with pytest.raises(InferenceServerException) as caught:
                http.infer(name, [tensor])
            assert caught.value.status() == "500" and f"model '{name}' version 1 {expected}" in caught.value.message()
            over_grpc = grpcclient.InferInput("x", [1, 2], "FP32")
            over_grpc.set_data_from_numpy(np.ones((1, 2), np.float32))
            with pytest.raises(InferenceServerException) as caught:
                channel.infer(name, [over_grpc])
            assert caught.value.status() == str(grpc.StatusCode.INTERNAL) and expected in caught.value.message()
        assert f"model 'wide' version 1 {expectations['wide']}" in server.log()
        right = httpclient.InferInput("x", [1, 2], "FP32")
        right.set_data_from_numpy(np.ones((1, 2), np.float32))
        assert http.infer("right", [right]).as_numpy("y").tolist() == [[2.0, 2.0]]
        # with a warm-up, such a model never reaches a client: its load fails with the same reason
        reason = _reasons(server)["warmed_wide"]
        assert "warm-up request 1 failed" in reason and "shape [1, 7], but its model.yaml declares [-1, 2]" in reason
    finally:
        http.close()
        channel.close()
        assert server.stop() == 0
