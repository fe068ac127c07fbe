"""The peers' clients against a real server: KServe's own SDK (``InferenceRESTClient`` over v1 and v2,
``InferenceGRPCClient``: every call each offers) and TensorFlow Serving's REST formats (row and columnar, named
and positional) compared with the v2 path on the same model; TorchServe's requests, counting, batching and the
README's examples are in ``test_e2e_peer_serving.py``. Every answer is compared with the model run directly
(``tests/reference.py``).

KServe's v1 client has no ``is_server_ready`` and its v2 client no ``explain``: each refuses them itself
(UnsupportedProtocol) before sending anything, so there is nothing of dhow's to test there.
"""

from __future__ import annotations

import base64
import http.client
import importlib.util
import json
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from tests.conftest import IN_CI, DhowProcess
from tests.reference import run_directly

TABULAR_VERSION = 2  # the demo's tabular model has versions 1 and 2; the server serves the newest
ROWS = np.random.default_rng(19).standard_normal((3, 32)).astype(np.float32)


def _kserve() -> None:
    """KServe's SDK must be installed (``make install`` does: the dev extra). It runs in a process of its own: its
    generated protos register the ``inference`` package's messages under another file name than tritonclient's,
    and protobuf refuses the second in one process."""
    if importlib.util.find_spec("kserve") is None:  # not imported here: see above
        if IN_CI:
            pytest.fail("the kserve package is missing; `make install` installs it")
        pytest.skip("the kserve package is missing; `make install` installs it")


def kserve_client(script: str, *argv: str) -> Any:
    """Run ``script`` (its calls of KServe's SDK, ``argv`` as ``sys.argv[1:]``) in a fresh interpreter; what it
    printed, as JSON."""
    _kserve()
    done = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(script), *argv], capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


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


KSERVE_V2 = """
import asyncio, json, sys
import numpy as np
from kserve import InferenceRESTClient, InferInput, InferRequest, RESTConfig
from kserve.protocol.infer_type import RequestedOutput

async def main():
    base, rows = sys.argv[1], np.array(json.loads(sys.argv[2]), dtype=np.float32)
    async with InferenceRESTClient(RESTConfig(protocol="v2")) as client:
        out = {
            "live": await client.is_server_live(base),
            "ready": await client.is_server_ready(base),
            "model_ready": await client.is_model_ready(base, "tabular"),
            "unknown_model_ready": await client.is_model_ready(base, "no_such_model"),
        }
        for binary in (False, True):
            tensor = InferInput("input", list(rows.shape), "FP32")
            tensor.set_data_from_numpy(rows, binary_data=binary)
            wanted = [RequestedOutput("probabilities", {"binary_data": binary})]
            response = await client.infer(base, InferRequest("tabular", [tensor], request_outputs=wanted), "tabular")
            out[f"binary={binary}"] = {o.name: o.as_numpy().tolist() for o in response.outputs}
    print(json.dumps(out))

asyncio.run(main())
"""


def test_kserve_v2_rest_client_every_call(dhow_server: DhowProcess, demo_repository: Path) -> None:
    expected = _direct(demo_repository, "tabular", {"input": ROWS}, TABULAR_VERSION)
    out = kserve_client(KSERVE_V2, f"http://{dhow_server.http_url}", json.dumps(ROWS.tolist()))
    assert (out["live"], out["ready"], out["model_ready"], out["unknown_model_ready"]) == (True, True, True, False)
    for binary in (False, True):
        outputs = out[f"binary={binary}"]
        assert list(outputs) == ["probabilities"]
        np.testing.assert_allclose(outputs["probabilities"], expected["probabilities"], rtol=1e-6)


KSERVE_V1 = """
import asyncio, json, sys
import httpx
import numpy as np
from kserve import InferenceRESTClient, InferInput, InferRequest, RESTConfig

async def main():
    base, rows = sys.argv[1], np.array(json.loads(sys.argv[2]), dtype=np.float32)
    async with InferenceRESTClient(RESTConfig(protocol="v1")) as client:
        out = {"live": await client.is_server_live(base), "model_ready": await client.is_model_ready(base, "tabular")}
        out["instances"] = await client.infer(base, {"instances": rows.tolist()}, model_name="tabular")
        # its InferRequest goes to :predict in v2's shape (binary inputs)
        tensor = InferInput("input", list(rows.shape), "FP32")
        tensor.set_data_from_numpy(rows, binary_data=True)
        out["infer_request"] = await client.infer(base, InferRequest("tabular", [tensor]), model_name="tabular")
        try:
            await client.explain(base, "tabular", {"instances": rows.tolist()})
        except httpx.HTTPStatusError as refused:
            out["explain"] = [refused.response.status_code, str(refused)]
    print(json.dumps(out))

asyncio.run(main())
"""


def test_kserve_v1_rest_client_every_call(dhow_server: DhowProcess, demo_repository: Path) -> None:
    expected = _direct(demo_repository, "tabular", {"input": ROWS}, TABULAR_VERSION)
    out = kserve_client(KSERVE_V1, f"http://{dhow_server.http_url}", json.dumps(ROWS.tolist()))
    assert (out["live"], out["model_ready"]) == (True, True)
    predictions = out["instances"]["predictions"]
    assert [p["label"] for p in predictions] == expected["label"].tolist()
    np.testing.assert_allclose([p["probabilities"] for p in predictions], expected["probabilities"], rtol=1e-6)
    # answered in v2's shape, as KServe answers its InferRequest on :predict
    answer = out["infer_request"]
    outputs = {o["name"]: np.array(o["data"]).reshape(o["shape"]) for o in answer["outputs"]}
    assert answer["model_name"] == "tabular" and outputs["label"].tolist() == expected["label"].tolist()
    np.testing.assert_allclose(outputs["probabilities"], expected["probabilities"], rtol=1e-6)
    status, message = out["explain"]
    assert status == 501 and "no explainers" in message


KSERVE_GRPC = """
import asyncio, json, sys
import numpy as np
from kserve import InferenceGRPCClient, InferInput, InferRequest

async def main():
    rows = np.array(json.loads(sys.argv[2]), dtype=np.float32)
    async with InferenceGRPCClient(sys.argv[1]) as client:
        out = {
            "live": await client.is_server_live(),
            "ready": await client.is_server_ready(),
            "model_ready": await client.is_model_ready("tabular"),
        }
        tensor = InferInput("input", list(rows.shape), "FP32")
        tensor.set_data_from_numpy(rows)
        response = await client.infer(InferRequest("tabular", [tensor]))
        out["outputs"] = {o.name: o.as_numpy().tolist() for o in response.outputs}
    print(json.dumps(out))

asyncio.run(main())
"""


def test_kserve_grpc_client_every_call(dhow_server: DhowProcess, demo_repository: Path) -> None:
    expected = _direct(demo_repository, "tabular", {"input": ROWS}, TABULAR_VERSION)
    out = kserve_client(KSERVE_GRPC, dhow_server.grpc_url, json.dumps(ROWS.tolist()))
    assert (out["live"], out["ready"], out["model_ready"]) == (True, True, True)
    assert out["outputs"]["label"] == expected["label"].tolist()
    np.testing.assert_allclose(out["outputs"]["probabilities"], expected["probabilities"], rtol=1e-6)


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
