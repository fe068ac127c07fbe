"""Every bad input answers 4xx with {"error": ...} saying what was wrong, over REST and gRPC;
no internal exception text reaches a client; a failing model does not take the server down."""

from __future__ import annotations

import gzip
import http.client
import json
import shutil
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
import tritonclient.grpc as grpcclient
from tritonclient.utils import InferenceServerException

from dhow.protocols.grpc.generated import grpc_service_pb2 as pb
from tests.conftest import DhowProcess, start_dhow

TABULAR_INPUT = {"name": "input", "shape": [1, 32], "datatype": "FP32", "data": [0.5] * 32}

FAULTY_MODEL = """
import numpy as np

class Faulty:
    def load(self):
        pass

    def predict(self, inputs):
        x = inputs["x"]
        if float(x.reshape(-1)[0]) < 0:
            raise RuntimeError("secret internal detail: /etc/passwd")
        return {"y": x * 2}
"""


def _post(
    server: DhowProcess, path: str, body: bytes, headers: dict[str, str] | None = None
) -> tuple[int, dict[str, str], bytes]:
    connection = http.client.HTTPConnection(server.http_url.split(":")[0], server.http_port, timeout=30)
    try:
        connection.request("POST", path, body=body, headers=headers or {"Content-Type": "application/json"})
        answer = connection.getresponse()
        return answer.status, {k.lower(): v for k, v in answer.getheaders()}, answer.read()
    finally:
        connection.close()


def _get(server: DhowProcess, path: str) -> tuple[int, dict[str, str], bytes]:
    connection = http.client.HTTPConnection("127.0.0.1", server.http_port, timeout=30)
    try:
        connection.request("GET", path)
        answer = connection.getresponse()
        return answer.status, {k.lower(): v for k, v in answer.getheaders()}, answer.read()
    finally:
        connection.close()


def _infer_json(server: DhowProcess, model: str, payload: object) -> tuple[int, str]:
    status, _, body = _post(server, f"/v2/models/{model}/infer", json.dumps(payload).encode())
    return status, json.loads(body)["error"] if status != 200 else ""


@pytest.mark.parametrize(
    ("model", "payload", "status", "fragment"),
    [
        ("nope", {"inputs": [TABULAR_INPUT]}, 404, "unknown model 'nope'"),
        (
            "tabular",
            {"inputs": [{**TABULAR_INPUT, "shape": [1, 31], "data": [0.5] * 31}]},
            400,
            "must have shape [-1, 32]",
        ),
        ("tabular", {"inputs": [{**TABULAR_INPUT, "datatype": "FP64"}]}, 400, "must be FP32, got FP64"),
        ("tabular", {"inputs": [{**TABULAR_INPUT, "name": "x"}]}, 400, "has no input 'x'"),
        ("tabular", {"inputs": []}, 400, "needs input(s) input"),
        ("tabular", {"inputs": [{**TABULAR_INPUT, "data": [1.0] * 31}]}, 400, "32"),
        ("tabular", {"inputs": [{**TABULAR_INPUT, "datatype": "FLOAT"}]}, 400, "FLOAT"),
        ("tabular", {"inputs": [TABULAR_INPUT], "outputs": [{"name": "nope"}]}, 400, "has no output 'nope'"),
        ("tabular", {"inputs": [{**TABULAR_INPUT, "shape": [65, 32], "data": [0.0] * 65 * 32}]}, 400, "max_batch_size"),
        ("tabular", {"nothing": 1}, 400, "inputs"),
        # numpy would read a JSON boolean among numbers as 1.0; the model would score what nobody sent
        (
            "tabular",
            {"inputs": [{**TABULAR_INPUT, "data": [True] + [0.5] * 31}]},
            400,
            "input 'input': FP32 data must be numbers, got a JSON boolean (true or false) among them",
        ),
        (
            "tabular",
            {"inputs": [{**TABULAR_INPUT, "shape": [2, 32], "data": [[0.5] * 32, [0.5] * 31 + [False]]}]},
            400,
            "FP32 data must be numbers, got a JSON boolean",
        ),
    ],
)
def test_rest_bad_requests(dhow_server: DhowProcess, model: str, payload: object, status: int, fragment: str) -> None:
    got_status, message = _infer_json(dhow_server, model, payload)
    assert got_status == status
    assert fragment in message


def test_rest_unknown_version_malformed_json_framing_and_size(dhow_server: DhowProcess) -> None:
    body = json.dumps({"inputs": [TABULAR_INPUT]}).encode()
    status, _, answer = _post(dhow_server, "/v2/models/tabular/versions/7/infer", body)
    assert status == 404 and "no version 7" in json.loads(answer)["error"]
    status, _, answer = _post(dhow_server, "/v2/models/tabular/infer", b'{"inputs": [')
    assert status == 400 and "JSON" in json.loads(answer)["error"]
    header = json.dumps(
        {"inputs": [{"name": "input", "shape": [1, 32], "datatype": "FP32", "parameters": {"binary_data_size": 128}}]}
    ).encode()
    framed = header + np.zeros(20, np.float32).tobytes()  # 80 bytes where 128 were announced
    headers = {"Inference-Header-Content-Length": str(len(header)), "Content-Type": "application/octet-stream"}
    status, _, answer = _post(dhow_server, "/v2/models/tabular/infer", framed, headers)
    assert status == 400 and "binary_data_size" in json.loads(answer)["error"]
    headers["Inference-Header-Content-Length"] = str(len(framed) + 10)
    status, _, answer = _post(dhow_server, "/v2/models/tabular/infer", framed, headers)
    assert status == 400 and "Inference-Header-Content-Length" in json.loads(answer)["error"]
    status, _, answer = _get(dhow_server, "/v2/nothing/here")
    assert status == 404 and "error" in json.loads(answer)


def test_rest_compressed_bodies(dhow_server: DhowProcess) -> None:
    body = json.dumps({"inputs": [TABULAR_INPUT]}).encode()
    for encoding, data in (("gzip", gzip.compress(body)), ("deflate", zlib.compress(body))):
        status, _, answer = _post(
            dhow_server,
            "/v2/models/tabular/infer",
            data,
            {"Content-Type": "application/json", "Content-Encoding": encoding},
        )
        assert status == 200, answer
        assert {o["name"] for o in json.loads(answer)["outputs"]} == {"label", "probabilities"}
    status, _, answer = _post(dhow_server, "/v2/models/tabular/infer", b"garbage", {"Content-Encoding": "gzip"})
    assert status == 400 and "error" in json.loads(answer)


def test_grpc_bad_requests(dhow_server: DhowProcess) -> None:
    client = grpcclient.InferenceServerClient(dhow_server.grpc_url)
    good = grpcclient.InferInput("input", [1, 32], "FP32")
    good.set_data_from_numpy(np.zeros((1, 32), np.float32))
    wrong_shape = grpcclient.InferInput("input", [1, 31], "FP32")
    wrong_shape.set_data_from_numpy(np.zeros((1, 31), np.float32))
    try:
        cases = [
            ("nope", [good], "StatusCode.NOT_FOUND", "unknown model"),
            ("tabular", [wrong_shape], "StatusCode.INVALID_ARGUMENT", "must have shape"),
        ]
        for model, inputs, code, fragment in cases:
            with pytest.raises(InferenceServerException) as caught:
                client.infer(model, inputs)
            assert caught.value.status() == code
            assert fragment in caught.value.message()
        with pytest.raises(InferenceServerException) as caught:
            client.infer("tabular", [good], model_version="9")
        assert caught.value.status() == "StatusCode.NOT_FOUND"
    finally:
        client.close()


@pytest.fixture
def faulty_server(repository_copy: Path, tmp_path: Path) -> Iterator[DhowProcess]:
    folder = repository_copy / "faulty"
    (folder / "1").mkdir(parents=True)
    (folder / "1" / "model.py").write_text(FAULTY_MODEL)
    (folder / "model.yaml").write_text(
        "runtime: python\nmax_batch_size: 4\n"
        "inputs: [{name: x, datatype: FP32, shape: [-1, 2]}]\noutputs: [{name: y, datatype: FP32, shape: [-1, 2]}]\n"
    )
    broken = repository_copy / "broken"
    (broken / "1").mkdir(parents=True)
    (broken / "1" / "model.onnx").write_bytes(b"this is not an onnx file")
    (broken / "model.yaml").write_text("runtime: onnx\n")
    for name in ("mlp", "tabular_xgboost", "tabular_lightgbm", "torch_mlp", "flags", "text_python"):
        shutil.rmtree(repository_copy / name)  # a smaller server starts faster
    # "broken" fails to load on purpose: ready means "the start-up loads were tried"
    server = start_dhow(repository_copy, tmp_path, "--max-request-bytes", "100000", "--strict-readiness", "false")
    yield server
    server.stop()


def test_failing_and_broken_models_do_not_take_the_server_down(faulty_server: DhowProcess) -> None:
    payload = {"inputs": [{"name": "x", "shape": [1, 2], "datatype": "FP32", "data": [-1.0, 2.0]}]}
    status, message = _infer_json(faulty_server, "faulty", payload)
    assert status == 500
    assert "error id" in message and "secret" not in message and "RuntimeError" not in message
    assert "secret internal detail" in faulty_server.log()  # the operator sees it
    payload["inputs"][0]["data"] = [1.0, 2.0]  # type: ignore[index]
    assert _infer_json(faulty_server, "faulty", payload)[0] == 200
    status, message = _infer_json(faulty_server, "broken", {"inputs": [TABULAR_INPUT]})
    assert status == 503 and "broken" in message
    status, headers, _ = _post(
        faulty_server, "/v2/models/broken/infer", json.dumps({"inputs": [TABULAR_INPUT]}).encode()
    )
    assert int(headers["retry-after"]) >= 1
    status, _, body = _post(faulty_server, "/v2/repository/index", b"{}")
    index = {(row["name"], row.get("version", "")): row for row in json.loads(body)}
    broken = [row for (name, _), row in index.items() if name == "broken"]
    assert broken and broken[0]["state"] == "UNAVAILABLE" and broken[0]["reason"]
    assert _infer_json(faulty_server, "tabular", {"inputs": [TABULAR_INPUT]})[0] == 200


def test_oversized_body_is_refused(faulty_server: DhowProcess) -> None:
    payload: dict[str, Any] = {"inputs": [{**TABULAR_INPUT, "shape": [400, 32], "data": [0.123456789] * 400 * 32}]}
    status, _, body = _post(faulty_server, "/v2/models/tabular/infer", json.dumps(payload).encode())
    assert status == 413 and "100000" in json.loads(body)["error"]
    client = grpcclient.InferenceServerClient(faulty_server.grpc_url)
    try:
        # 50,000 floats = 200 KB of raw contents, over the 100,000-byte limit
        oversized = grpcclient.InferInput("input", [1, 50_000], "FP32")
        oversized.set_data_from_numpy(np.zeros((1, 50_000), dtype=np.float32))
        with pytest.raises(InferenceServerException) as caught:
            client.infer("tabular", [oversized])
        assert caught.value.status() == "StatusCode.RESOURCE_EXHAUSTED"
    finally:
        client.close()


def test_grpc_malformed_messages_are_invalid_argument(dhow_server: DhowProcess) -> None:
    """Bytes that do not decode as the method's request answer INVALID_ARGUMENT, never UNKNOWN or INTERNAL."""
    valid = pb.ModelInferRequest(
        model_name="tabular",
        inputs=[pb.ModelInferRequest.InferInputTensor(name="input", datatype="FP32", shape=[1, 32])],
        raw_input_contents=[np.zeros(32, np.float32).tobytes()],
    ).SerializeToString()
    random = np.random.default_rng(7)
    garbage = [b"\xff\xff\xff", b"\x0a\x05ab", b"\x0a\x02\xc3\x28"]  # truncated field, bad length, bad UTF-8
    for _ in range(200):  # valid messages with bytes flipped or cut short
        mutated = bytearray(valid)
        for position in random.integers(0, len(mutated), size=int(random.integers(1, 4))):
            mutated[position] = int(random.integers(0, 256))
        garbage.append(bytes(mutated[: int(random.integers(1, len(mutated) + 1))]))
    codes: dict[grpc.StatusCode, int] = {}
    with grpc.insecure_channel(dhow_server.grpc_url) as channel:
        infer = channel.unary_unary("/inference.GRPCInferenceService/ModelInfer")
        for payload in garbage:
            try:
                infer(payload, timeout=30)
            except grpc.RpcError as error:
                codes[error.code()] = codes.get(error.code(), 0) + 1
                assert error.code() not in (grpc.StatusCode.UNKNOWN, grpc.StatusCode.INTERNAL), error.details()
        with pytest.raises(grpc.RpcError) as caught:
            channel.unary_unary("/inference.GRPCInferenceService/ModelMetadata")(b"\x0a\x05ab", timeout=30)
        assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert caught.value.details() == (
            "the request (4 bytes) is not a valid inference.ModelMetadataRequest protobuf message; "
            "encode it with the service's .proto file"
        )
        # a stream answers the requests before a malformed one, then ends with INVALID_ARGUMENT
        stream = channel.stream_stream("/inference.GRPCInferenceService/ModelStreamInfer")
        answers = stream(iter([valid, b"\xff\xff\xff", valid]), timeout=30)
        received = []
        with pytest.raises(grpc.RpcError) as caught:
            for answer in answers:
                received.append(pb.ModelStreamInferResponse.FromString(answer))
        assert len(received) == 1 and not received[0].error_message, received
        assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "not a valid inference.ModelInferRequest" in str(caught.value.details())
    assert codes.get(grpc.StatusCode.INVALID_ARGUMENT), codes
    assert "DecodeError" not in dhow_server.log()
