"""The peers' clients against a real server: KServe's own SDK (``InferenceRESTClient`` over v1 and v2,
``InferenceGRPCClient``: every call each offers), TensorFlow Serving's REST formats (row and columnar, named and
positional) compared with the v2 path on the same model, and TorchServe-style requests with raw bodies. Every
answer is compared with the model run directly (``tests/reference.py``).

KServe's v1 client has no ``is_server_ready`` and its v2 client no ``explain``: each refuses them itself
(UnsupportedProtocol) before sending anything, so there is nothing of dhow's to test there.
"""

from __future__ import annotations

import asyncio
import base64
import http.client
import json
import os
import subprocess
import sys
from collections.abc import Coroutine, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import pytest

from tests.conftest import IN_CI, DhowProcess, start_dhow
from tests.reference import run_directly

T = TypeVar("T")
TABULAR_VERSION = 2  # the demo's tabular model has versions 1 and 2; the server serves the newest
ROWS = np.random.default_rng(19).standard_normal((3, 32)).astype(np.float32)


def _kserve() -> Any:
    try:
        import kserve
    except ImportError as exc:  # `make install` installs it (the dev extra)
        if IN_CI:
            pytest.fail(f"the kserve package is missing: {exc}")
        pytest.skip(f"the kserve package is missing: {exc}")
    return kserve


def _run(coroutine: Coroutine[Any, Any, T]) -> T:
    return asyncio.run(coroutine)


def http_call(
    server: DhowProcess, method: str, path: str, body: Any = None, headers: dict[str, str] | None = None
) -> tuple[int, Any]:
    """One request; a body that is not bytes is sent as JSON; the answer's JSON (or None when empty)."""
    connection = http.client.HTTPConnection("127.0.0.1", server.http_port, timeout=30)
    try:
        data = body if isinstance(body, bytes) or body is None else json.dumps(body).encode()
        connection.request(method, path, body=data, headers=headers or {})
        answer = connection.getresponse()
        raw = answer.read()
        return answer.status, json.loads(raw) if raw.strip() else None
    finally:
        connection.close()


def _direct(repository: Path, model: str, inputs: dict[str, np.ndarray], version: int = 1) -> dict[str, np.ndarray]:
    return run_directly(repository, model, version, inputs)


def _v2(server: DhowProcess, model: str, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The same inputs through the Open Inference Protocol, for comparison."""
    body = {
        "inputs": [
            {"name": name, "datatype": _datatype(array), "shape": list(array.shape), "data": _data(array)}
            for name, array in inputs.items()
        ]
    }
    status, answer = http_call(server, "POST", f"/v2/models/{model}/infer", body)
    assert status == 200, answer
    return {o["name"]: np.array(o["data"]).reshape(o["shape"]) for o in answer["outputs"]}


def _datatype(array: np.ndarray) -> str:
    return {"f": "FP32", "b": "BOOL", "O": "BYTES", "i": "INT64"}[array.dtype.kind]


def _data(array: np.ndarray) -> list[Any]:
    flat = array.reshape(-1).tolist()
    return [item.decode() if isinstance(item, bytes) else item for item in flat]


# -- KServe's SDK ----------------------------------------------------------------------------------


def test_kserve_v2_rest_client_every_call(dhow_server: DhowProcess, demo_repository: Path) -> None:
    kserve = _kserve()
    from kserve.protocol.infer_type import RequestedOutput

    base = f"http://{dhow_server.http_url}"
    expected = _direct(demo_repository, "tabular", {"input": ROWS}, TABULAR_VERSION)

    async def calls() -> None:
        async with kserve.InferenceRESTClient(kserve.RESTConfig(protocol="v2")) as client:
            assert await client.is_server_live(base) is True
            assert await client.is_server_ready(base) is True
            assert await client.is_model_ready(base, "tabular") is True
            assert await client.is_model_ready(base, "no_such_model") is False
            for binary in (False, True):
                tensor = kserve.InferInput("input", list(ROWS.shape), "FP32")
                tensor.set_data_from_numpy(ROWS, binary_data=binary)
                wanted = [RequestedOutput("probabilities", {"binary_data": binary})]
                request = kserve.InferRequest("tabular", [tensor], request_outputs=wanted)
                response = await client.infer(base, request, model_name="tabular")
                (output,) = response.outputs
                assert output.name == "probabilities"
                np.testing.assert_allclose(output.as_numpy(), expected["probabilities"], rtol=1e-6)

    _run(calls())


def test_kserve_v1_rest_client_every_call(dhow_server: DhowProcess, demo_repository: Path) -> None:
    kserve = _kserve()
    import httpx

    base = f"http://{dhow_server.http_url}"
    expected = _direct(demo_repository, "tabular", {"input": ROWS}, TABULAR_VERSION)

    async def calls() -> None:
        async with kserve.InferenceRESTClient(kserve.RESTConfig(protocol="v1")) as client:
            assert await client.is_server_live(base) is True
            assert await client.is_model_ready(base, "tabular") is True
            answer = await client.infer(base, {"instances": ROWS.tolist()}, model_name="tabular")
            assert [p["label"] for p in answer["predictions"]] == expected["label"].tolist()
            probabilities = [p["probabilities"] for p in answer["predictions"]]
            np.testing.assert_allclose(probabilities, expected["probabilities"], rtol=1e-6)
            # its InferRequest goes to :predict in v2's shape, and is answered in v2's shape, as KServe does
            tensor = kserve.InferInput("input", list(ROWS.shape), "FP32")
            tensor.set_data_from_numpy(ROWS, binary_data=True)
            answer = await client.infer(base, kserve.InferRequest("tabular", [tensor]), model_name="tabular")
            outputs = {o["name"]: np.array(o["data"]).reshape(o["shape"]) for o in answer["outputs"]}
            assert answer["model_name"] == "tabular" and outputs["label"].tolist() == expected["label"].tolist()
            with pytest.raises(httpx.HTTPStatusError, match="no explainers") as refused:
                await client.explain(base, "tabular", {"instances": ROWS.tolist()})
            assert refused.value.response.status_code == 501

    _run(calls())


def test_kserve_grpc_client_every_call(dhow_server: DhowProcess, demo_repository: Path) -> None:
    kserve = _kserve()
    expected = _direct(demo_repository, "tabular", {"input": ROWS}, TABULAR_VERSION)

    async def calls() -> None:
        client = kserve.InferenceGRPCClient(dhow_server.grpc_url)
        try:
            assert await client.is_server_live() is True
            assert await client.is_server_ready() is True
            assert await client.is_model_ready("tabular") is True
            tensor = kserve.InferInput("input", list(ROWS.shape), "FP32")
            tensor.set_data_from_numpy(ROWS)
            response = await client.infer(kserve.InferRequest("tabular", [tensor]))
            outputs = {o.name: o.as_numpy() for o in response.outputs}
            assert outputs["label"].tolist() == expected["label"].tolist()
            np.testing.assert_allclose(outputs["probabilities"], expected["probabilities"], rtol=1e-6)
        finally:
            await client.close()

    _run(calls())


def test_health_bodies_keep_their_status_codes(dhow_server: DhowProcess) -> None:
    """KServe's clients read the bodies, Triton's the status codes: both get what they read."""
    assert http_call(dhow_server, "GET", "/v2/health/live") == (200, {"live": True})
    assert http_call(dhow_server, "GET", "/v2/health/ready") == (200, {"ready": True})
    assert http_call(dhow_server, "GET", "/v2/models/tabular/ready") == (200, {"name": "tabular", "ready": True})
    assert http_call(dhow_server, "GET", "/v2/models/tabular/versions/2/ready")[0] == 200
    status, answer = http_call(dhow_server, "GET", "/v2/models/no_such_model/ready")
    assert status == 404 and "unknown model" in answer["error"]
    import tritonclient.http as httpclient

    triton = httpclient.InferenceServerClient(dhow_server.http_url)
    assert triton.is_server_live() and triton.is_server_ready() and triton.is_model_ready("tabular")
    assert http_call(dhow_server, "GET", "/") == (200, {"status": "alive"})
    assert http_call(dhow_server, "GET", "/ping") == (200, {"status": "Healthy"})


# -- TensorFlow Serving's formats ------------------------------------------------------------------


def test_tf_serving_row_and_columnar_equal_the_v2_path_and_the_model(
    dhow_server: DhowProcess, demo_repository: Path
) -> None:
    expected = _direct(demo_repository, "tabular", {"input": ROWS}, TABULAR_VERSION)
    v2 = _v2(dhow_server, "tabular", {"input": ROWS})
    assert v2["label"].tolist() == expected["label"].tolist()
    rows = ROWS.tolist()
    requests = {
        "row, positional": {"instances": rows},
        "row, named": {"instances": [{"input": row} for row in rows], "signature_name": "serving_default"},
        "columnar, positional": {"inputs": rows},
        "columnar, named": {"inputs": {"input": rows}},
    }
    for path in ("/v1/models/tabular:predict", "/v1/models/tabular/versions/2:predict"):
        for what, body in requests.items():
            status, answer = http_call(dhow_server, "POST", path, body)
            assert status == 200, (what, answer)
            if what.startswith("row"):
                assert set(answer) == {"predictions"}, what
                labels = [p["label"] for p in answer["predictions"]]
                probabilities = np.array([p["probabilities"] for p in answer["predictions"]])
            else:
                assert set(answer) == {"outputs"}, what
                labels, probabilities = answer["outputs"]["label"], np.array(answer["outputs"]["probabilities"])
            assert labels == v2["label"].tolist(), what
            np.testing.assert_allclose(probabilities, expected["probabilities"], rtol=1e-6, err_msg=what)
            np.testing.assert_allclose(probabilities, v2["probabilities"], rtol=1e-6, err_msg=what)


def test_tf_serving_several_inputs_by_name(dhow_server: DhowProcess, demo_repository: Path) -> None:
    rng = np.random.default_rng(3)
    mask, x = rng.integers(0, 2, (2, 4)).astype(bool), rng.integers(-8, 8, (2, 4)).astype(np.float32)
    expected = _direct(demo_repository, "flags", {"mask": mask, "x": x.astype(np.float16)})
    row = {"instances": [{"mask": m, "x": v} for m, v in zip(mask.tolist(), x.tolist(), strict=True)]}
    status, answer = http_call(dhow_server, "POST", "/v1/models/flags:predict", row)
    assert status == 200, answer
    assert [p["count"] for p in answer["predictions"]] == expected["count"].tolist()
    assert [p["masked"] for p in answer["predictions"]] == expected["masked"].astype(float).tolist()
    status, answer = http_call(
        dhow_server, "POST", "/v1/models/flags:predict", {"inputs": {"mask": mask.tolist(), "x": x.tolist()}}
    )
    assert status == 200 and answer["outputs"]["count"] == expected["count"].tolist(), answer
    # positional values cannot say which input they are
    status, answer = http_call(dhow_server, "POST", "/v1/models/flags:predict", {"instances": x.tolist()})
    assert status == 400 and "object keyed by input name" in answer["error"], answer


def test_tf_serving_strings_and_base64(dhow_server: DhowProcess, demo_repository: Path) -> None:
    texts = np.array([["héllo"], ["dhow"]], dtype=np.object_)
    expected = _direct(demo_repository, "text_python", {"text": np.vectorize(str.encode, otypes=[object])(texts)})
    encoded = base64.b64encode(b"dhow").decode()
    for instances in (["héllo", "dhow"], [["héllo"], ["dhow"]], ["héllo", {"b64": encoded}]):
        status, answer = http_call(dhow_server, "POST", "/v1/models/text_python:predict", {"instances": instances})
        assert status == 200, (instances, answer)
        assert [p["length"] for p in answer["predictions"]] == expected["length"].tolist()
        assert [p["upper"] for p in answer["predictions"]] == [["HÉLLO"], ["DHOW"]]


def test_tf_serving_classify_and_regress(dhow_server: DhowProcess, demo_repository: Path) -> None:
    examples = {"examples": [{"input": row} for row in ROWS.tolist()]}
    scores = _direct(demo_repository, "tabular", {"input": ROWS}, TABULAR_VERSION)["probabilities"]
    status, answer = http_call(dhow_server, "POST", "/v1/models/tabular:classify", examples)
    assert status == 200, answer
    assert [[label for label, _ in pairs] for pairs in answer["results"]] == [["0", "1"]] * len(ROWS)
    np.testing.assert_allclose([[s for _, s in pairs] for pairs in answer["results"]], scores, rtol=1e-6)
    values = _direct(demo_repository, "tabular_xgboost", {"input": ROWS})["predict"]
    body = {"signature_name": "tensorflow/serving/regress", "context": {}, **examples}
    status, answer = http_call(dhow_server, "POST", "/v1/models/tabular_xgboost:regress", body)
    assert status == 200, answer
    np.testing.assert_allclose(answer["results"], values, rtol=1e-6)
    # tabular has no output of one floating-point value per example
    status, answer = http_call(dhow_server, "POST", "/v1/models/tabular:regress", examples)
    assert status == 400 and "cannot answer :regress" in answer["error"] and ":predict" in answer["error"]


def test_tf_serving_status_metadata_and_list(dhow_server: DhowProcess) -> None:
    status, answer = http_call(dhow_server, "GET", "/v1/models/tabular")
    assert status == 200 and answer["ready"] is True and answer["name"] == "tabular"
    assert {"version": "2", "state": "AVAILABLE", "status": {"error_code": "OK", "error_message": ""}} in answer[
        "model_version_status"
    ]
    status, answer = http_call(dhow_server, "GET", "/v1/models/tabular/versions/2/metadata")
    assert status == 200 and answer["model_spec"] == {"name": "tabular", "signature_name": "", "version": "2"}
    signature = answer["metadata"]["signature_def"]["signature_def"]["serving_default"]
    assert signature["inputs"]["input"]["dtype"] == "DT_FLOAT"
    assert [d["size"] for d in signature["inputs"]["input"]["tensor_shape"]["dim"]] == ["-1", "32"]
    assert set(signature["outputs"]) == {"label", "probabilities"}
    status, answer = http_call(dhow_server, "GET", "/v1/models")
    assert status == 200 and {"tabular", "flags", "text_python"} <= set(answer["models"])
    assert http_call(dhow_server, "GET", "/v1/models/no_such_model")[0] == 404


@pytest.mark.parametrize(
    ("body", "says"),
    [
        (b"{not json", "malformed JSON"),
        (b"[1, 2]", "must be a JSON object"),
        ({"instances": [[0.0] * 32], "inputs": [[0.0] * 32]}, "not both"),
        ({"rows": [[0.0] * 32]}, "needs 'instances'"),
        ({"instances": []}, "non-empty list"),
        ({"instances": [[0.0] * 32, [0.0] * 31]}, "ragged"),
        ({"instances": [[0.0] * 31]}, "must have shape [-1, 32]"),
        ({"instances": [["a"] * 32]}, "FP32 data must be numbers"),
        ({"instances": [{"nope": [0.0] * 32}]}, "keyed by the model's input names"),
        ({"inputs": {"nope": [[0.0] * 32]}}, "not an input of the model"),
        ({"instances": [[0.0] * 32], "signature_name": "predict_images"}, "signature_name 'predict_images'"),
    ],
)
def test_tf_serving_bad_bodies_say_what_is_wrong(dhow_server: DhowProcess, body: Any, says: str) -> None:
    status, answer = http_call(dhow_server, "POST", "/v1/models/tabular:predict", body)
    assert status == 400 and set(answer) == {"error"} and says in answer["error"], answer


# -- TorchServe --------------------------------------------------------------------------------------


def test_torchserve_raw_bodies_and_json(dhow_server: DhowProcess, demo_repository: Path) -> None:
    text = "héllo wörld".encode()
    expected = _direct(demo_repository, "text_python", {"text": np.array([[text]], dtype=np.object_)})
    for method in ("POST", "PUT"):  # TorchServe's own example, curl -T file, sends a PUT
        for headers in ({}, {"Content-Type": "application/octet-stream"}):
            status, answer = http_call(dhow_server, method, "/predictions/text_python", text, headers)
            assert status == 200, answer
            assert answer == {"length": expected["length"][0].tolist(), "upper": ["HÉLLO WÖRLD"]}
    # JSON: one instance answered unwrapped, a list of instances as a list
    table = _direct(demo_repository, "tabular", {"input": ROWS}, TABULAR_VERSION)
    status, answer = http_call(dhow_server, "POST", "/predictions/tabular", ROWS[0].tolist())
    assert status == 200 and answer["label"] == table["label"][0], answer
    np.testing.assert_allclose(answer["probabilities"], table["probabilities"][0], rtol=1e-6)
    status, answer = http_call(dhow_server, "POST", "/predictions/tabular/2", ROWS.tolist())
    assert status == 200 and [a["label"] for a in answer] == table["label"].tolist(), answer
    status, answer = http_call(dhow_server, "POST", "/predictions/tabular", {"input": ROWS[0].tolist()})
    assert status == 200 and answer["label"] == table["label"][0], answer
    headers = {"Content-Type": "application/json"}
    status, answer = http_call(dhow_server, "POST", "/predictions/text_python", b'["a", "bb"]', headers)
    assert status == 200 and answer == [{"length": [1], "upper": ["A"]}, {"length": [2], "upper": ["BB"]}]


def test_torchserve_errors_answer_its_shape(dhow_server: DhowProcess) -> None:
    status, answer = http_call(dhow_server, "POST", "/predictions/tabular", b"not json")
    assert status == 400 and answer["code"] == 400 and answer["type"] == "BadRequestException"
    assert "not JSON" in answer["message"] and answer["error"] == answer["message"]
    status, answer = http_call(dhow_server, "POST", "/predictions/no_such_model", [1.0])
    assert status == 404 and answer["type"] == "ModelNotFoundException" and "unknown model" in answer["message"]
    status, answer = http_call(dhow_server, "POST", "/predictions/tabular", {"x": [1.0]})
    assert status == 400 and "keys are input names" in answer["message"]
    status, answer = http_call(dhow_server, "POST", "/predictions/tabular", [[[0.0] * 32]])
    assert status == 400 and "nests 3 lists deep" in answer["message"]


# -- counted like any inference ------------------------------------------------------------------------


def _inference_count(server: DhowProcess, model: str) -> int:
    status, answer = http_call(server, "GET", f"/v2/models/{model}/stats")
    assert status == 200, answer
    return sum(stat["inference_count"] for stat in answer["model_stats"])


def _requests_metric(server: DhowProcess, model: str) -> float:
    connection = http.client.HTTPConnection("127.0.0.1", server.http_port, timeout=30)
    try:
        connection.request("GET", "/metrics")
        text = connection.getresponse().read().decode()
    finally:
        connection.close()
    prefix = f'dhow_inference_requests_total{{model="{model}",'
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(prefix))


def test_every_door_is_counted_in_statistics_and_metrics(dhow_server: DhowProcess) -> None:
    model = "tabular_lightgbm"
    rows_before, requests_before = _inference_count(dhow_server, model), _requests_metric(dhow_server, model)
    calls = [
        ("POST", f"/v1/models/{model}:predict", {"instances": ROWS.tolist()}),  # 3 rows
        ("POST", f"/v1/models/{model}:predict", {"inputs": ROWS[:2].tolist()}),  # 2 rows
        ("POST", f"/predictions/{model}", ROWS[0].tolist()),  # 1 row
    ]
    for method, path, body in calls:
        status, answer = http_call(dhow_server, method, path, body)
        assert status == 200, answer
    assert _inference_count(dhow_server, model) - rows_before == 6
    assert _requests_metric(dhow_server, model) - requests_before == len(calls)


# -- batched like any inference ------------------------------------------------------------------------

ECHO_MODEL = """
import numpy as np


class Echo:
    def load(self):
        pass

    def predict(self, inputs):
        x = inputs["x"]
        # every row says how many rows its batch had
        return {"y": x * 2 + 1, "batch": np.full((x.shape[0], 1), x.shape[0], dtype=np.int64)}
"""
ECHO_YAML = """runtime: python
max_batch_size: 16
batching: {max_queue_delay_ms: 20}
inputs: [{name: x, datatype: INT64, shape: [-1, 2]}]
outputs: [{name: y, datatype: INT64, shape: [-1, 2]}, {name: batch, datatype: INT64, shape: [-1, 1]}]
"""


@pytest.fixture(scope="module")
def echo_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DhowProcess]:
    root = tmp_path_factory.mktemp("peer-batching")
    (root / "models" / "echo" / "1").mkdir(parents=True)
    (root / "models" / "echo" / "model.yaml").write_text(ECHO_YAML, encoding="utf-8")
    (root / "models" / "echo" / "1" / "model.py").write_text(ECHO_MODEL, encoding="utf-8")
    server = start_dhow(root / "models", root)
    yield server
    assert server.stop() == 0, server.log()


def test_the_peers_requests_share_batches_with_v2_requests(echo_server: DhowProcess) -> None:
    """Each door's requests queue for the same batcher: every request gets its own row back, from batches that
    held several requests."""

    def send(i: int) -> tuple[list[int], int]:
        row = [i, -i]
        door = i % 3
        if door == 0:
            status, answer = http_call(echo_server, "POST", "/v1/models/echo:predict", {"instances": [row]})
            assert status == 200, answer
            (prediction,) = answer["predictions"]
        elif door == 1:
            status, prediction = http_call(echo_server, "POST", "/predictions/echo", row)
            assert status == 200, prediction
        else:
            body = {"inputs": [{"name": "x", "datatype": "INT64", "shape": [1, 2], "data": row}]}
            status, answer = http_call(echo_server, "POST", "/v2/models/echo/infer", body)
            assert status == 200, answer
            outputs = {o["name"]: o["data"] for o in answer["outputs"]}
            prediction = {"y": outputs["y"], "batch": outputs["batch"]}
        return prediction["y"], prediction["batch"][0]

    with ThreadPoolExecutor(24) as pool:
        answers = list(pool.map(send, range(120)))
    for i, (y, _) in enumerate(answers):
        assert y == [2 * i + 1, -2 * i + 1], i
    for door in range(3):
        assert max(batch for i, (_, batch) in enumerate(answers) if i % 3 == door) > 1, f"door {door} never batched"


# -- the README's examples, run as written ----------------------------------------------------------------

README = Path(__file__).resolve().parent.parent / "README.md"


def _readme_block(heading: str, fence: str) -> str:
    """The first ``fence`` code block after ``heading`` in the README."""
    _, found, section = README.read_text(encoding="utf-8").partition(f"\n{heading}\n")
    assert found, f"README.md has no {heading!r}"
    _, opened, rest = section.partition(f"```{fence}\n")
    block, closed, _ = rest.partition("\n```")
    assert opened and closed, f"no ```{fence} block after {heading!r}"
    return block


def test_the_readme_sends_the_same_request_to_every_door(dhow_server: DhowProcess) -> None:
    script = _readme_block("### The same request at every door", "sh").replace("127.0.0.1:8080", dhow_server.http_url)
    done = subprocess.run(
        ["bash", "-euo", "pipefail", "-c", script],
        env={**os.environ, "DHOW_KEY": "unused-without-auth"},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    v2, row, columnar, torchserve = (json.loads(line) for line in done.stdout.splitlines() if line.strip())
    probabilities = next(o["data"] for o in v2["outputs"] if o["name"] == "probabilities")
    assert row["predictions"][0]["probabilities"] == probabilities
    assert columnar["outputs"]["probabilities"] == [probabilities]
    assert torchserve["probabilities"] == probabilities


def test_the_readme_kserve_sdk_example_runs(dhow_server: DhowProcess) -> None:
    _kserve()
    script = _readme_block(
        "With KServe's SDK (`pip install kserve`), the same over its v1, v2 and gRPC clients:", "python"
    )
    script = script.replace("127.0.0.1:8080", dhow_server.http_url).replace("127.0.0.1:8081", dhow_server.grpc_url)
    done = subprocess.run(
        [sys.executable, "-c", script],
        env={**os.environ, "DHOW_KEY": "unused-without-auth"},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("True\n") and "predictions" in done.stdout, done.stdout
