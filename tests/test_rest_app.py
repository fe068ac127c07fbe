"""The REST door in isolation: the real RestApp on each front (dhow's own HTTP/1.1, uvicorn) on a free port, a
fake data plane behind it, driven with tritonclient and raw HTTP. End-to-end tests with the real server live in
test_e2e_*.py."""

from __future__ import annotations

import asyncio
import gc
import gzip
import http.client
import json
import logging
import threading
import time
import zlib
from collections.abc import Iterator
from typing import Any

import numpy as np
import orjson
import pytest
import tritonclient.http as httpclient
import uvicorn
from tritonclient.utils import InferenceServerException

from dhow.core.errors import InvalidInput, NotFound, Unavailable
from dhow.core.types import Caller, InferenceRequest, InferenceResponse, Outcome, Tensor
from dhow.protocols.rest import RestApp
from dhow.protocols.rest.connection import ConnectionTimeouts
from dhow.protocols.rest.front import HttpFront
from dhow.protocols.rest.held_answers import REFUSALS
from dhow.serving.dataplane import DataPlane, Placement
from tests.inprocess import StartingTrail, open_service

MAX_BODY = 50_000
KNOWN = ("echo", "slow", "boom")


class FakeDataPlane(DataPlane):
    """Model "echo" doubles FP32 inputs and echoes the rest; "slow" is busy; "boom" is a bug."""

    def __init__(self) -> None:
        self.server_name = "fake"
        self.is_ready = True
        self.strict_readiness = False  # no model lifecycle behind this fake: ready is is_ready
        self.calls: list[tuple[str, Any]] = []

    def _check(self, name: str, version: str = "") -> None:
        if name not in KNOWN:
            raise NotFound(f"unknown model '{name}'")
        if version not in ("", "1"):
            raise NotFound(f"model '{name}' has no version {version}")

    def model_ready(self, name: str, version: str = "") -> bool:
        self._check(name, version)
        return name != "slow"

    def model_metadata(self, name: str, version: str = "") -> dict[str, Any]:
        self._check(name, version)
        spec = {"name": "x", "datatype": "FP32", "shape": [-1, 2]}
        return {"name": name, "versions": ["1"], "platform": "python", "inputs": [spec], "outputs": [spec]}

    def model_config(self, name: str, version: str = "") -> dict[str, Any]:
        self._check(name, version)
        return {"name": name, "max_batch_size": 8, "input": [{"name": "x", "data_type": "TYPE_FP32", "dims": [2]}]}

    def model_statistics(self, name: str = "", version: str = "", visible: Any = None) -> dict[str, Any]:
        names = [name] if name else list(KNOWN)
        if name:
            self._check(name, version)
        return {"model_stats": [{"name": n, "version": version or "1", "inference_count": 0} for n in names]}

    def repository_index(self, ready_only: bool = False, visible: Any = None) -> list[dict[str, Any]]:
        self.calls.append(("index", ready_only))
        return [{"name": n, "version": "1", "state": "READY", "reason": ""} for n in KNOWN]

    async def load_model(self, name: str, parameters: dict[str, Any] | None = None) -> None:
        self.calls.append(("load", (name, parameters)))
        self._check(name)

    async def unload_model(self, name: str, parameters: dict[str, Any] | None = None) -> None:
        self.calls.append(("unload", (name, parameters)))
        self._check(name)

    def place(self, request: InferenceRequest, caller: Caller) -> Placement:
        return Placement(None, "", None)  # type: ignore[arg-type]  # a fake: no model config, region or model

    async def infer(self, request: InferenceRequest, placement: Placement) -> tuple[InferenceResponse, Outcome]:
        self._check(request.model_name, request.model_version)
        self.calls.append(("infer", request))
        if request.model_name == "slow":
            raise Unavailable("model 'slow' is busy", retry_after=2.5)
        if request.model_name == "boom":
            raise RuntimeError("secret internal detail")
        wanted = {o.name: o.parameters for o in request.outputs} if request.outputs is not None else None
        outputs = []
        for tensor in request.inputs:
            if wanted is not None and tensor.name not in wanted:
                continue
            data = tensor.data * 2 if tensor.datatype == "FP32" else tensor.data
            outputs.append(
                Tensor(tensor.name, tensor.datatype, list(data.shape), data, (wanted or {}).get(tensor.name, {}))
            )
        if wanted is not None and set(wanted) - {t.name for t in outputs}:
            raise InvalidInput(f"no output(s) {sorted(set(wanted) - {t.name for t in outputs})}")
        return InferenceResponse(request.model_name, "1", outputs, id=request.id), Outcome("1")


def _metrics() -> tuple[bytes, str]:
    return b"# HELP up\nup 1\n", "text/plain; version=0.0.4; charset=utf-8"


class Served:
    def __init__(self, dataplane: FakeDataPlane, port: int) -> None:
        self.dataplane = dataplane
        self.port = port
        self.url = f"127.0.0.1:{port}"
        #: tritonclient clients live until the server thread is gone: their gevent hub breaks when the
        #: garbage collector happens to finalize one on uvicorn's thread
        self.clients: list[httpclient.InferenceServerClient] = []

    def request(
        self, method: str, path: str, body: bytes | None = None, headers: dict[str, str] | None = None
    ) -> tuple[int, dict[str, str], bytes]:
        connection = http.client.HTTPConnection("127.0.0.1", self.port, timeout=10)
        try:
            connection.request(method, path, body=body, headers=headers or {})
            answer = connection.getresponse()
            return answer.status, {k.lower(): v for k, v in answer.getheaders()}, answer.read()
        finally:
            connection.close()

    def error(self, method: str, path: str, body: bytes | None = None, **headers: str) -> tuple[int, str]:
        status, answer_headers, answer = self.request(method, path, body, headers)
        assert answer_headers["content-type"] == "application/json"
        return status, json.loads(answer)["error"]


@pytest.fixture(scope="module", params=["native", "uvicorn"])
def served(request: pytest.FixtureRequest) -> Iterator[Served]:
    """The app on each front (``--http-front``): the same tests hold for both."""
    dataplane = FakeDataPlane()
    service, trail = open_service(dataplane)
    app = StartingTrail(RestApp(service, max_body_bytes=MAX_BODY, metrics_handler=_metrics), trail)
    server: Any
    if request.param == "native":
        timeouts = ConnectionTimeouts(header_s=10, body_s=10)
        server = HttpFront(app, host="127.0.0.1", port=0, timeouts=timeouts, keepalive_s=5, drain_s=5)
        thread = threading.Thread(target=asyncio.run, args=(server.serve(),), daemon=True)
    else:
        config = uvicorn.Config(app, host="127.0.0.1", port=0, loop="asyncio", lifespan="off", log_level="warning")
        server = uvicorn.Server(config)
        thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "the server did not start"
        time.sleep(0.01)
    port = server.servers[0].sockets[0].getsockname()[1]
    served = Served(dataplane, port)
    yield served
    server.should_exit = True
    thread.join(10)
    for client in served.clients:
        client.close()
    served.clients.clear()
    gc.collect()


@pytest.fixture
def client(served: Served) -> httpclient.InferenceServerClient:
    triton = httpclient.InferenceServerClient(served.url)
    served.clients.append(triton)
    return triton


# -- with tritonclient ---------------------------------------------------------------------


def test_health_and_metadata(served: Served, client: httpclient.InferenceServerClient) -> None:
    assert client.is_server_live() and client.is_server_ready()
    served.dataplane.is_ready = False
    try:
        assert not client.is_server_ready()
    finally:
        served.dataplane.is_ready = True
    assert client.get_server_metadata()["name"] == "fake"
    assert client.get_model_metadata("echo")["inputs"][0]["shape"] == [-1, 2]
    assert client.get_model_metadata("echo", "1")["name"] == "echo"
    assert client.get_model_config("echo")["max_batch_size"] == 8
    assert client.is_model_ready("echo") and client.is_model_ready("echo", "1")
    assert not client.is_model_ready("slow") and not client.is_model_ready("missing")
    with pytest.raises(InferenceServerException) as caught:
        client.get_model_metadata("missing")
    assert caught.value.status() == "404" and "unknown model 'missing'" in caught.value.message()
    assert [s["name"] for s in client.get_inference_statistics()["model_stats"]] == list(KNOWN)
    assert client.get_inference_statistics("echo", "1")["model_stats"][0]["version"] == "1"


def test_repository(served: Served, client: httpclient.InferenceServerClient) -> None:
    assert {row["name"] for row in client.get_model_repository_index()} == set(KNOWN)
    client.load_model("echo", config='{"max_batch_size": 4}', files={"file:1/model.py": b"print()"})
    name, parameters = served.dataplane.calls[-1][1]
    assert name == "echo" and parameters["config"] == '{"max_batch_size": 4}' and "file:1/model.py" in parameters
    client.unload_model("echo", unload_dependents=True)
    assert served.dataplane.calls[-1] == ("unload", ("echo", {"unload_dependents": True}))
    with pytest.raises(InferenceServerException, match="unknown model 'missing'"):
        client.load_model("missing")
    status, _, body = served.request("POST", "/v2/repository/index", b'{"ready": true}')
    assert status == 200 and served.dataplane.calls[-1] == ("index", True) and len(json.loads(body)) == 3
    assert served.error("POST", "/v2/repository/index", b'{"ready": 1}') == (400, "'ready' must be a boolean, got 1")


@pytest.mark.parametrize("binary_inputs", [False, True])
@pytest.mark.parametrize("binary_outputs", [False, True, None])
def test_infer(client: httpclient.InferenceServerClient, binary_inputs: bool, binary_outputs: bool | None) -> None:
    arrays = {
        "floats": np.arange(6, dtype=np.float32).reshape(3, 2),
        "ints": np.array([[1, -2]], dtype=np.int64),
        "flags": np.array([True, False]),
        "half": np.array([0.5, 1.5], dtype=np.float16),
        "text": np.array([b"hello", "wörld".encode()], dtype=np.object_),
    }
    datatypes = {"floats": "FP32", "ints": "INT64", "flags": "BOOL", "half": "FP16", "text": "BYTES"}
    inputs = []
    for name, array in arrays.items():
        tensor = httpclient.InferInput(name, list(array.shape), datatypes[name])
        tensor.set_data_from_numpy(array, binary_data=binary_inputs)
        inputs.append(tensor)
    # None: no outputs listed, so tritonclient asks for binary_data_output at the request level
    outputs = None
    if binary_outputs is not None:
        outputs = [httpclient.InferRequestedOutput(name, binary_data=binary_outputs) for name in arrays]
    result = client.infer("echo", inputs, outputs=outputs, request_id="r-1")
    response = result.get_response()
    assert response["id"] == "r-1" and response["model_name"] == "echo"
    want_binary = binary_outputs is not False
    for entry in response["outputs"]:
        assert ("parameters" in entry) == want_binary and ("data" in entry) != want_binary
    np.testing.assert_array_equal(result.as_numpy("floats"), arrays["floats"] * 2)
    for name in ("ints", "flags", "half", "text"):
        got = result.as_numpy(name)
        assert got.shape == arrays[name].shape
        if name == "text" and not want_binary:
            got = np.array([s.encode() for s in got], dtype=np.object_)  # JSON carries BYTES as strings
        assert got.tolist() == arrays[name].tolist(), name


def test_infer_requested_outputs_and_compression(served: Served, client: httpclient.InferenceServerClient) -> None:
    big = np.linspace(0, 1, 2000, dtype=np.float32).reshape(1000, 2)
    tensor = httpclient.InferInput("x", [1000, 2], "FP32")
    tensor.set_data_from_numpy(big, binary_data=False)
    other = httpclient.InferInput("y", [1], "INT32")
    other.set_data_from_numpy(np.array([3], dtype=np.int32))
    for algorithm in ("gzip", "deflate"):
        result = client.infer(
            "echo",
            [tensor, other],
            outputs=[httpclient.InferRequestedOutput("x", binary_data=False)],
            request_compression_algorithm=algorithm,
            response_compression_algorithm=algorithm,
        )
        np.testing.assert_allclose(result.as_numpy("x"), big * 2)
        assert result.as_numpy("y") is None
    request = served.dataplane.calls[-1][1]
    assert [o.name for o in request.outputs] == ["x"] and request.outputs[0].parameters == {"binary_data": False}


def test_infer_errors_through_tritonclient(client: httpclient.InferenceServerClient) -> None:
    tensor = httpclient.InferInput("x", [1, 2], "FP32")
    tensor.set_data_from_numpy(np.zeros((1, 2), np.float32))
    with pytest.raises(InferenceServerException) as caught:
        client.infer("missing", [tensor])
    assert caught.value.status() == "404"
    with pytest.raises(InferenceServerException) as caught:
        client.infer("slow", [tensor])
    assert caught.value.status() == "503" and "busy" in caught.value.message()


# -- raw HTTP: the error paths -------------------------------------------------------------


def _infer_body(**extra: Any) -> bytes:
    return json.dumps(
        {"inputs": [{"name": "x", "shape": [1, 2], "datatype": "FP32", "data": [1, 2]}], **extra}
    ).encode()


def test_json_response_framing(served: Served) -> None:
    status, headers, body = served.request("POST", "/v2/models/echo/versions/1/infer", _infer_body(id="a"))
    assert status == 200 and headers["content-type"] == "application/json"
    assert "inference-header-content-length" not in headers
    assert json.loads(body) == {
        "model_name": "echo",
        "model_version": "1",
        "id": "a",
        "outputs": [{"name": "x", "datatype": "FP32", "shape": [1, 2], "data": [2.0, 4.0]}],
    }
    status, headers, body = served.request(
        "POST", "/v2/models/echo/infer", _infer_body(parameters={"binary_data_output": True})
    )
    length = int(headers["inference-header-content-length"])
    assert status == 200 and headers["content-type"] == "application/octet-stream"
    assert json.loads(body[:length])["outputs"][0]["parameters"] == {"binary_data_size": 8}
    assert np.frombuffer(body[length:], np.float32).tolist() == [2.0, 4.0]


def test_unknown_route_and_wrong_method(served: Served) -> None:
    status, message = served.error("GET", "/v2/nothing/here")
    assert status == 404 and "/v2/nothing/here" in message
    assert served.error("GET", "/v2/models/echo/versions/1/explain")[0] == 404
    status, headers, body = served.request("GET", "/v2/models/echo/infer")
    assert status == 405 and headers["allow"] == "POST" and "answers POST, not GET" in json.loads(body)["error"]
    status, headers, _ = served.request("POST", "/v2/health/live")
    assert status == 405 and headers["allow"] == "GET"


def test_bad_bodies(served: Served) -> None:
    status, message = served.error("POST", "/v2/models/echo/infer", b'{"inputs": [')
    assert status == 400 and message.startswith("malformed JSON: ")
    status, message = served.error("POST", "/v2/models/echo/infer", b"{}")
    assert status == 400 and "missing 'inputs'" in message
    header = b'{"inputs": [{"name": "x", "shape": [2], "datatype": "FP32", "parameters": {"binary_data_size": 8}}]}'
    framing = {"Inference-Header-Content-Length": str(len(header))}
    status, message = served.error("POST", "/v2/models/echo/infer", header + b"\0" * 4, **framing)
    assert (status, message) == (400, "input 'x': binary_data_size 8 but the body has only 4 bytes left")
    status, message = served.error("POST", "/v2/models/echo/infer", header, **{"Inference-Header-Content-Length": "x"})
    assert status == 400 and "Inference-Header-Content-Length must be an integer" in message


def test_oversized_bodies_are_refused(served: Served) -> None:
    body = b" " * (MAX_BODY + 1)
    status, message = served.error("POST", "/v2/models/echo/infer", body)
    assert status == 413
    assert (
        message == f"request body of {MAX_BODY + 1} bytes exceeds the limit of {MAX_BODY} bytes (--max-request-bytes)"
    )
    # without Content-Length: refused while streaming
    connection = http.client.HTTPConnection("127.0.0.1", served.port, timeout=10)
    try:
        chunks = iter([b" " * 30_000, b" " * 30_000, b" " * 30_000])
        connection.request("POST", "/v2/models/echo/infer", body=chunks, encode_chunked=True)
        answer = connection.getresponse()
        assert answer.status == 413 and "exceeds the limit of 50000 bytes" in json.loads(answer.read())["error"]
    finally:
        connection.close()
    bomb = gzip.compress(b" " * (MAX_BODY * 20))
    status, message = served.error("POST", "/v2/models/echo/infer", bomb, **{"Content-Encoding": "gzip"})
    assert status == 413 and "once decompressed" in message


def test_compressed_bodies(served: Served) -> None:
    body = _infer_body()
    for encoding, data in (
        ("gzip", gzip.compress(body)),
        ("deflate", zlib.compress(body)),
        ("deflate", zlib.compress(body)[2:-4]),
    ):
        status, _, answer = served.request("POST", "/v2/models/echo/infer", data, {"Content-Encoding": encoding})
        assert status == 200 and json.loads(answer)["outputs"][0]["data"] == [2.0, 4.0]
    status, message = served.error("POST", "/v2/models/echo/infer", b"garbage", **{"Content-Encoding": "gzip"})
    assert status == 400 and "not valid gzip" in message
    status, message = served.error(
        "POST", "/v2/models/echo/infer", gzip.compress(body)[:-9], **{"Content-Encoding": "gzip"}
    )
    assert status == 400 and "truncated" in message
    status, message = served.error("POST", "/v2/models/echo/infer", body, **{"Content-Encoding": "br"})
    assert status == 415 and "'br' is not supported" in message


def test_response_compression(served: Served) -> None:
    data = list(range(1000))
    body = json.dumps({"inputs": [{"name": "x", "shape": [1000], "datatype": "INT32", "data": data}]}).encode()
    status, headers, answer = served.request(
        "POST", "/v2/models/echo/infer", body, {"Accept-Encoding": "br, gzip;q=0.8"}
    )
    assert status == 200 and headers["content-encoding"] == "gzip"
    assert json.loads(gzip.decompress(answer))["outputs"][0]["data"] == data
    _, headers, _ = served.request("POST", "/v2/models/echo/infer", body, {"Accept-Encoding": "gzip;q=0"})
    assert "content-encoding" not in headers
    _, headers, _ = served.request("POST", "/v2/models/echo/infer", _infer_body(), {"Accept-Encoding": "gzip"})
    assert "content-encoding" not in headers  # too small to be worth it


def test_unavailable_sets_retry_after(served: Served) -> None:
    status, headers, body = served.request("POST", "/v2/models/slow/infer", _infer_body())
    assert status == 503 and headers["retry-after"] == "3" and json.loads(body) == {"error": "model 'slow' is busy"}
    status, message = served.error("GET", "/v2/models/slow/ready")
    assert status == 503 and "not ready" in message


def test_internal_errors_are_hidden_and_logged(served: Served, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.ERROR, logger="dhow.service"):
        status, message = served.error("POST", "/v2/models/boom/infer", _infer_body())
    assert status == 500 and "secret" not in message and "RuntimeError" not in message
    error_id = message.split("(id ")[1].split(")")[0]
    assert message == f"internal error (id {error_id}); see the server log"
    record = next(r for r in caplog.records if r.name == "dhow.service")
    assert error_id in record.getMessage() and record.exc_info is not None
    assert "secret internal detail" in caplog.text


def test_metrics(served: Served) -> None:
    status, headers, body = served.request("GET", "/metrics")
    assert status == 200 and body == b"# HELP up\nup 1\n" and headers["content-type"].startswith("text/plain")


def test_metrics_off_and_lifespan() -> None:
    app = RestApp(open_service(FakeDataPlane())[0])
    sent: list[dict[str, Any]] = []

    async def call(scope: dict[str, Any], messages: list[dict[str, Any]]) -> None:
        async def receive() -> dict[str, Any]:
            return messages.pop(0)

        async def send(message: Any) -> None:
            sent.append(message)

        await app(scope, receive, send)

    scope = {"type": "http", "method": "GET", "path": "/metrics", "headers": []}
    asyncio.run(call(scope, []))
    assert sent[0]["status"] == 404 and b"metrics" in sent[1]["body"]
    sent.clear()
    asyncio.run(call({"type": "lifespan"}, [{"type": "lifespan.startup"}, {"type": "lifespan.shutdown"}]))
    assert [m["type"] for m in sent] == ["lifespan.startup.complete", "lifespan.shutdown.complete"]


def test_the_answer_of_a_call_whose_record_could_not_leave_is_the_refusal_of_its_protocol() -> None:
    """What the held answer becomes when its audit record's departure fails: a 503 as the door answers one."""
    status, headers, body = REFUSALS["v2"](Unavailable("the audit records could not be sent", retry_after=0.5))
    assert status == 503 and orjson.loads(body) == {"error": "the audit records could not be sent"}
    assert headers == [
        (b"content-type", b"application/json"), (b"retry-after", b"1"), (b"content-length", b"%d" % len(body))
    ]  # fmt: skip
    status, headers, body = REFUSALS["torchserve"](RuntimeError("out of memory"))
    assert status == 503 and orjson.loads(body)["code"] == 503 and b"RuntimeError" in body
