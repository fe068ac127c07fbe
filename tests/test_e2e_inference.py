"""Every demo runtime, served by a real `dhow serve`, called with tritonclient over REST
(JSON and binary) and gRPC; answers are compared with the model run directly."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient

from tests.conftest import DhowProcess
from tests.reference import make_inputs, run_directly

MODELS = [
    "tabular",
    "mlp",
    "tabular_sklearn",
    "tabular_xgboost",
    "tabular_lightgbm",
    "torch_mlp",
    "text_python",
    "flags",
]
SERVED_VERSION = {"tabular": 2}  # version_policy {latest: 1} over versions 1 and 2
TRANSPORTS = ["http-json", "http-binary", "grpc"]


def _infer(server: DhowProcess, transport: str, model: str, arrays: dict[str, np.ndarray], **kwargs: Any) -> Any:
    if transport == "grpc":
        client: Any = grpcclient.InferenceServerClient(server.grpc_url)
        module: Any = grpcclient
        extra: dict[str, Any] = {}
    else:
        client = httpclient.InferenceServerClient(server.http_url)
        module = httpclient
        extra = {"binary_data": transport == "http-binary"}
    inputs = []
    for name, array in arrays.items():
        datatype = "BYTES" if array.dtype == np.object_ else _dtype_name(array)
        tensor = module.InferInput(name, list(array.shape), datatype)
        tensor.set_data_from_numpy(array, **extra)
        inputs.append(tensor)
    try:
        return client.infer(model, inputs, **kwargs)
    finally:
        client.close()


def _dtype_name(array: np.ndarray) -> str:
    return {"float32": "FP32", "float16": "FP16", "bool": "BOOL", "int64": "INT64"}[array.dtype.name]


def _metadata(server: DhowProcess, model: str) -> dict[str, Any]:
    client = httpclient.InferenceServerClient(server.http_url)
    try:
        metadata: dict[str, Any] = client.get_model_metadata(model)
        return metadata
    finally:
        client.close()


def _compare(got: np.ndarray, want: np.ndarray) -> None:
    if want.dtype == np.object_:
        assert got.reshape(-1).tolist() == want.reshape(-1).tolist()
    else:
        np.testing.assert_allclose(
            got.astype(np.float64), np.asarray(want, np.float64).reshape(got.shape), rtol=1e-3, atol=1e-3
        )


@pytest.mark.parametrize("transport", TRANSPORTS)
@pytest.mark.parametrize("model", MODELS)
def test_answers_match_the_model_run_directly(
    dhow_server: DhowProcess, model: str, transport: str, demo_repository: Path
) -> None:
    metadata = _metadata(dhow_server, model)
    arrays = make_inputs(metadata["inputs"], rows=3, seed=len(model))
    result = _infer(dhow_server, transport, model, arrays, request_id="req-42")
    response = result.get_response()
    response_id = response.id if transport == "grpc" else response["id"]
    assert response_id == "req-42"
    expected = run_directly(demo_repository, model, SERVED_VERSION.get(model, 1), arrays)
    for output in metadata["outputs"]:
        got = result.as_numpy(output["name"])
        assert got is not None, f"output {output['name']} missing"
        assert got.shape[0] == 3
        _compare(got, expected[output["name"]])


@pytest.mark.parametrize("transport", ["http-binary", "grpc"])
def test_requested_outputs_and_classification(dhow_server: DhowProcess, transport: str) -> None:
    arrays = make_inputs(_metadata(dhow_server, "tabular")["inputs"], rows=2)
    module: Any = grpcclient if transport == "grpc" else httpclient
    wanted = [module.InferRequestedOutput("probabilities", class_count=2)]
    result = _infer(dhow_server, transport, "tabular", arrays, outputs=wanted)
    assert result.as_numpy("label") is None
    top = result.as_numpy("probabilities")
    assert top.shape == (2, 2)
    probabilities = run_directly(dhow_server.repository, "tabular", 2, arrays)["probabilities"]
    for row in range(2):
        value, index = top[row][0].decode().split(":")[:2]
        assert int(index) == int(np.argmax(probabilities[row]))
        assert float(value) == pytest.approx(float(np.max(probabilities[row])), rel=1e-4)


def test_server_and_model_metadata_config_and_stats(dhow_server: DhowProcess) -> None:
    http = httpclient.InferenceServerClient(dhow_server.http_url)
    grpc = grpcclient.InferenceServerClient(dhow_server.grpc_url)
    try:
        assert http.is_server_live() and http.is_server_ready() and grpc.is_server_ready()
        server = http.get_server_metadata()
        assert server["name"] == "dhow"
        assert {"binary_tensor_data", "model_repository", "model_configuration", "statistics"} <= set(
            server["extensions"]
        )
        assert http.is_model_ready("tabular") and grpc.is_model_ready("tabular", "2")
        assert not http.is_model_ready("tabular", "1")
        metadata = http.get_model_metadata("mlp")  # mlp's manifest leaves inputs/outputs to the ONNX file
        assert metadata["inputs"] == [{"name": "input", "datatype": "FP32", "shape": [-1, 512]}]
        assert metadata["outputs"] == [{"name": "logits", "datatype": "FP32", "shape": [-1, 10]}]
        config = http.get_model_config("tabular")
        assert config["max_batch_size"] == 64
        assert config["input"][0] == {"name": "input", "data_type": "TYPE_FP32", "dims": [32]}
        assert "dynamic_batching" in config
        grpc_config = grpc.get_model_config("tabular", as_json=True)["config"]
        assert grpc_config["input"][0]["dims"] == ["32"]  # int64 in proto JSON
        arrays = make_inputs(metadata["inputs"], rows=4)
        _infer(dhow_server, "http-binary", "mlp", arrays)
        stats = http.get_inference_statistics("mlp")["model_stats"][0]
        assert stats["inference_count"] >= 4 and stats["execution_count"] >= 1
        inference = stats["inference_stats"]
        for key in ("success", "queue", "compute_input", "compute_infer", "compute_output"):
            assert inference[key]["count"] >= 1 and inference[key]["ns"] > 0, key
        assert any(b["batch_size"] >= 4 for b in stats["batch_stats"])
        grpc_stats = grpc.get_inference_statistics("mlp", as_json=True)["model_stats"][0]
        assert int(grpc_stats["inference_count"]) >= 4
        everything = http.get_inference_statistics()["model_stats"]
        assert {s["name"] for s in everything} >= set(MODELS)
    finally:
        http.close()
        grpc.close()


def test_metrics_count_requests_by_model_version_and_outcome(dhow_server: DhowProcess) -> None:
    import urllib.request

    arrays = make_inputs(_metadata(dhow_server, "tabular_lightgbm")["inputs"], rows=1)
    _infer(dhow_server, "grpc", "tabular_lightgbm", arrays)
    with urllib.request.urlopen(f"http://{dhow_server.http_url}/metrics") as answer:
        text = answer.read().decode()
    assert 'dhow_inference_requests_total{model="tabular_lightgbm",outcome="success",version="1"}' in text
    for family in (
        "dhow_request_duration_seconds_bucket",
        "dhow_queue_duration_seconds_bucket",
        "dhow_compute_duration_seconds_bucket",
        "dhow_models_loaded",
        # the autoscaling signals: read at the scrape (nothing waits now), and one fill per batch
        'dhow_queue_depth{model="tabular_lightgbm",version="1"} 0.0',
        'dhow_inflight_requests{model="tabular_lightgbm",version="1"} 0.0',
        'dhow_batch_fill_ratio_count{model="tabular_lightgbm",version="1"}',
    ):
        assert family in text, family


def test_grpc_stream_infer(dhow_server: DhowProcess) -> None:
    import queue

    answers: queue.Queue[tuple[Any, Any]] = queue.Queue()
    client = grpcclient.InferenceServerClient(dhow_server.grpc_url)
    arrays = make_inputs(_metadata(dhow_server, "torch_mlp")["inputs"], rows=2)
    tensor = grpcclient.InferInput("input", [2, 16], "FP32")
    tensor.set_data_from_numpy(arrays["input"])
    client.start_stream(callback=lambda result, error: answers.put((result, error)))
    try:
        for i in range(3):
            client.async_stream_infer("torch_mlp", [tensor], request_id=str(i))
        client.async_stream_infer("no_such_model", [tensor], request_id="bad")
        got = [answers.get(timeout=10) for _ in range(4)]
    finally:
        client.stop_stream()
        client.close()
    results = [r for r, e in got if e is None]
    errors = [e for r, e in got if e is not None]
    assert len(results) == 3 and len(errors) == 1
    assert "no_such_model" in str(errors[0])
    expected = run_directly(dhow_server.repository, "torch_mlp", 1, arrays)["scores"]
    np.testing.assert_allclose(results[0].as_numpy("scores"), expected, rtol=1e-4, atol=1e-5)
