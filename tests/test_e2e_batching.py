"""Dynamic batching against a real server, over REST and gRPC: every request gets exactly its own rows back
from batches larger than any one request; a request whose deadline passes in the queue is answered and never
computed; a full queue sheds with 429/RESOURCE_EXHAUSTED and Retry-After while the admitted requests succeed."""

from __future__ import annotations

import http.client
import json
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import grpc
import numpy as np
import pytest

from dhow.protocols.grpc.generated import grpc_service_pb2 as pb
from dhow.protocols.grpc.generated import grpc_service_pb2_grpc as pb_grpc
from tests.conftest import DhowProcess, start_dhow

ECHO_MODEL = """
import numpy as np


class Echo:
    def load(self):
        pass

    def predict(self, inputs):
        x = inputs["x"]
        # each row carries its request's id: a row handed to the wrong request cannot go unnoticed
        rows = np.full((x.shape[0], 1), x.shape[0], dtype=np.int64)
        return {"y": x * 2 + 1, "batch": rows}
"""

# a slow model that writes the ids of every batch it computes, before computing it (held while CALLS.hold exists)
SLOW_MODEL = """
import os
import time

import numpy as np

CALLS = {calls!r}


class Slow:
    def load(self):
        pass

    def predict(self, inputs):
        ids = inputs["id"].reshape(-1).tolist()
        with open(CALLS, "a") as log:
            log.write(" ".join(map(str, ids)) + "\\n")
        while os.path.exists(CALLS + ".hold"):
            time.sleep(0.01)
        time.sleep(0.3)
        return {{"echo": inputs["id"]}}
"""

ECHO_YAML = """runtime: python
max_batch_size: 16
batching: {max_queue_delay_ms: 5}
inputs: [{name: x, datatype: INT64, shape: [-1, 2]}]
outputs: [{name: y, datatype: INT64, shape: [-1, 2]}, {name: batch, datatype: INT64, shape: [-1, 1]}]
"""

SLOW_YAML = """runtime: python
max_batch_size: {max_batch_size}
batching: {batching}
instances: {{count: 1}}
inputs: [{{name: id, datatype: INT64, shape: [-1, 1]}}]
outputs: [{{name: echo, datatype: INT64, shape: [-1, 1]}}]
"""

#: the largest request of the mixed-size test; a batch above it holds rows of several requests
MAX_REQUEST_ROWS = 7


@dataclass(frozen=True)
class Answer:
    """One inference's outcome, the same shape whichever door answered."""

    status: str  # "200", "429", "504"... for REST; the gRPC status name for gRPC
    outputs: dict[str, np.ndarray]
    message: str = ""
    retry_after: str | None = None


@dataclass(frozen=True)
class BatchingServer:
    server: DhowProcess
    slow_calls: Path
    shed_calls: Path


def _write_model(repository: Path, name: str, manifest: str, source: str) -> None:
    (repository / name / "1").mkdir(parents=True)
    (repository / name / "model.yaml").write_text(manifest, encoding="utf-8")
    (repository / name / "1" / "model.py").write_text(source, encoding="utf-8")


@pytest.fixture(scope="module")
def batching(tmp_path_factory: pytest.TempPathFactory) -> Iterator[BatchingServer]:
    root = tmp_path_factory.mktemp("batching")
    repository = root / "models"
    slow_calls, shed_calls = root / "slow-calls.txt", root / "shed-calls.txt"
    _write_model(repository, "echo", ECHO_YAML, ECHO_MODEL)
    _write_model(
        repository, "slow", SLOW_YAML.format(max_batch_size=8, batching="{}"), SLOW_MODEL.format(calls=str(slow_calls))
    )
    # one row per batch, so that every admitted request waits its own 0.3 s turn
    shed_yaml = SLOW_YAML.format(max_batch_size=1, batching="{max_queue_size: 4}")
    _write_model(repository, "shed", shed_yaml, SLOW_MODEL.format(calls=str(shed_calls)))
    server = start_dhow(repository, root)
    yield BatchingServer(server, slow_calls, shed_calls)
    assert server.stop() == 0, server.log()


# -- the two doors --------------------------------------------------------------------------


def _rest_body(name: str, array: np.ndarray, timeout_us: int | None) -> bytes:
    payload: dict[str, Any] = {
        "inputs": [{"name": name, "shape": list(array.shape), "datatype": "INT64", "data": array.reshape(-1).tolist()}]
    }
    if timeout_us is not None:
        payload["parameters"] = {"timeout": timeout_us}
    return json.dumps(payload).encode()


def _rest_answer(response: http.client.HTTPResponse) -> Answer:
    body = json.loads(response.read())
    if response.status != 200:
        return Answer(str(response.status), {}, body["error"], response.getheader("Retry-After"))
    outputs = {o["name"]: np.array(o["data"], dtype=np.int64).reshape(o["shape"]) for o in body["outputs"]}
    return Answer("200", outputs)


def rest_infer(
    server: DhowProcess, model: str, name: str, array: np.ndarray, timeout_us: int | None = None, *, ready: Any = None
) -> Answer:
    """One JSON inference on its own connection; ``ready`` (a barrier) is passed once it is connected."""
    connection = http.client.HTTPConnection("127.0.0.1", server.http_port, timeout=30)
    try:
        connection.connect()
        if ready is not None:
            ready.wait()
        body = _rest_body(name, array, timeout_us)
        connection.request("POST", f"/v2/models/{model}/infer", body, {"Content-Type": "application/json"})
        return _rest_answer(connection.getresponse())
    finally:
        connection.close()


def _grpc_request(model: str, name: str, array: np.ndarray, timeout_us: int | None) -> pb.ModelInferRequest:
    request = pb.ModelInferRequest(
        model_name=model,
        inputs=[pb.ModelInferRequest.InferInputTensor(name=name, datatype="INT64", shape=list(array.shape))],
        raw_input_contents=[array.astype("<i8").tobytes()],
    )
    if timeout_us is not None:
        request.parameters["timeout"].int64_param = timeout_us
    return request


def grpc_infer(
    stub: pb_grpc.GRPCInferenceServiceStub,
    model: str,
    name: str,
    array: np.ndarray,
    timeout_us: int | None = None,
    *,
    ready: Any = None,
) -> Answer:
    """One ModelInfer on a shared channel; the gRPC deadline is generous, the request's own ``timeout`` is not."""
    request = _grpc_request(model, name, array, timeout_us)
    if ready is not None:
        ready.wait()
    try:
        response = stub.ModelInfer(request, timeout=30)
    except grpc.RpcError as error:
        call = cast(grpc.Call, error)  # a unary call's error is its Call: code, details, trailers
        retry_after = next((str(v) for k, v in call.trailing_metadata() or () if k == "retry-after"), None)
        return Answer(call.code().name, {}, call.details() or "", retry_after)
    outputs = {
        tensor.name: np.frombuffer(raw, dtype="<i8").reshape(list(tensor.shape))
        for tensor, raw in zip(response.outputs, response.raw_output_contents, strict=True)
    }
    return Answer("200", outputs)


@pytest.fixture
def stub(batching: BatchingServer) -> Iterator[pb_grpc.GRPCInferenceServiceStub]:
    with grpc.insecure_channel(batching.server.grpc_url) as channel:
        grpc.channel_ready_future(channel).result(timeout=10)
        yield pb_grpc.GRPCInferenceServiceStub(channel)


def _get_json(server: DhowProcess, path: str) -> tuple[int, Any]:
    connection = http.client.HTTPConnection("127.0.0.1", server.http_port, timeout=30)
    try:
        connection.request("GET", path)
        response = connection.getresponse()
        body = response.read()
        return response.status, json.loads(body) if body else None
    finally:
        connection.close()


def _computed_ids(calls: Path) -> list[int]:
    """Every id the slow model computed, once per time it computed it."""
    if not calls.exists():
        return []
    return [int(token) for token in calls.read_text().split()]


# -- 1. mixed sizes, many clients: own rows back, from real batches ---------------------------------


def test_concurrent_mixed_sizes_get_their_own_rows_from_real_batches(
    batching: BatchingServer, stub: pb_grpc.GRPCInferenceServiceStub
) -> None:
    rng = np.random.default_rng(7)
    sizes = [int(rng.integers(1, MAX_REQUEST_ROWS + 1)) for _ in range(200)]
    # column 0: the request's id; column 1: the row's index in it, so swapped rows are caught as well
    requests = [np.stack([np.full(rows, i), np.arange(rows)], axis=1).astype(np.int64) for i, rows in enumerate(sizes)]

    def send(i: int) -> Answer:
        if i % 2:
            return grpc_infer(stub, "echo", "x", requests[i])
        return rest_infer(batching.server, "echo", "x", requests[i])

    with ThreadPoolExecutor(32) as pool:
        answers = list(pool.map(send, range(len(requests))))

    batch_rows: list[int] = []
    for i, answer in enumerate(answers):
        assert answer.status == "200", (i, answer)
        np.testing.assert_array_equal(answer.outputs["y"], requests[i] * 2 + 1, err_msg=f"request {i}")
        seen = answer.outputs["batch"]
        assert seen.shape == (sizes[i], 1) and np.all(seen == seen[0, 0]) and seen[0, 0] >= sizes[i]
        batch_rows.append(int(seen[0, 0]))
    assert max(batch_rows) > MAX_REQUEST_ROWS, f"no batch held more than one request: {sorted(set(batch_rows))}"

    status, stats = _get_json(batching.server, "/v2/models/echo/stats")
    assert status == 200
    model_stats = stats["model_stats"][0]
    assert model_stats["inference_count"] == sum(sizes)
    assert model_stats["execution_count"] < len(requests)  # fewer model calls than requests
    batch_stats = model_stats["batch_stats"]
    assert max(b["batch_size"] for b in batch_stats) > MAX_REQUEST_ROWS
    assert all(b["batch_size"] <= 16 for b in batch_stats)  # max_batch_size is never exceeded


# -- 2. deadlines in the queue --------------------------------------------------------------


def _wait_until(condition: Callable[[], bool], what: str, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(0.01)
    raise AssertionError(f"not within {timeout:g} s: {what}")


def test_request_timing_out_in_the_queue_is_answered_and_never_computed(
    batching: BatchingServer, stub: pb_grpc.GRPCInferenceServiceStub
) -> None:
    server = batching.server

    def ids(value: int) -> np.ndarray:
        return np.array([[value]], dtype=np.int64)

    hold = Path(f"{batching.slow_calls}.hold")
    hold.touch()
    try:
        with ThreadPoolExecutor(5) as pool:
            first = pool.submit(rest_infer, server, "slow", "id", ids(1))
            # everything below queues behind request 1, held on the only instance until the late ones expired (as
            # long as a slow machine takes to send them)
            _wait_until(lambda: 1 in _computed_ids(batching.slow_calls), "the slow model started request 1")
            late_rest = pool.submit(rest_infer, server, "slow", "id", ids(2), 20_000)  # 20 ms
            late_grpc = pool.submit(grpc_infer, stub, "slow", "id", ids(3), 20_000)
            patient_rest = pool.submit(rest_infer, server, "slow", "id", ids(4))
            patient_grpc = pool.submit(grpc_infer, stub, "slow", "id", ids(5), 30_000_000)  # 30 s: ample
            expired_rest, expired_grpc = late_rest.result(), late_grpc.result()
            hold.unlink()
            answers = {4: patient_rest.result(), 5: patient_grpc.result(), 1: first.result()}
    finally:
        hold.unlink(missing_ok=True)

    for value, answer in answers.items():
        assert answer.status == "200", (value, answer)
        np.testing.assert_array_equal(answer.outputs["echo"], ids(value))
    assert expired_rest.status == "504", expired_rest
    assert "timed out" in expired_rest.message and "not run" in expired_rest.message
    assert expired_grpc.status == "DEADLINE_EXCEEDED", expired_grpc
    assert "timed out" in expired_grpc.message
    # the model computed each patient request exactly once and neither expired one at all
    assert sorted(_computed_ids(batching.slow_calls)) == [1, 4, 5]


# -- 3. shedding under overload -------------------------------------------------------------


def test_full_queue_sheds_with_retry_after_and_the_server_stays_up(
    batching: BatchingServer, stub: pb_grpc.GRPCInferenceServiceStub
) -> None:
    server = batching.server
    count = 60
    # every client is connected before any sends, so that all 60 arrive while the queue is full
    barrier = threading.Barrier(count)

    def send(i: int) -> Answer:
        array = np.array([[100 + i]], dtype=np.int64)
        if i % 2:
            return grpc_infer(stub, "shed", "id", array, ready=barrier)
        return rest_infer(server, "shed", "id", array, ready=barrier)

    with ThreadPoolExecutor(count) as pool:
        answers = list(pool.map(send, range(count)))

    rest = [a for i, a in enumerate(answers) if i % 2 == 0]
    grpc_answers = [a for i, a in enumerate(answers) if i % 2]
    assert {a.status for a in rest} <= {"200", "429", "503"}, [a.status for a in rest]
    assert {a.status for a in grpc_answers} <= {"200", "RESOURCE_EXHAUSTED", "UNAVAILABLE"}
    shed = [a for a in answers if a.status != "200"]
    admitted = [i for i, a in enumerate(answers) if a.status == "200"]
    assert shed and admitted, "expected some requests shed and some admitted"
    for answer in shed:
        assert answer.retry_after is not None and float(answer.retry_after) > 0, answer
        assert "max_queue_size" in answer.message or answer.status in ("503", "UNAVAILABLE"), answer
    for i in admitted:
        np.testing.assert_array_equal(answers[i].outputs["echo"], [[100 + i]])
    # the admitted were computed once each; no shed request reached the model
    assert sorted(_computed_ids(batching.shed_calls)) == sorted(100 + i for i in admitted)

    assert _get_json(server, "/v2/health/ready")[0] == 200
    assert rest_infer(server, "shed", "id", np.array([[999]], dtype=np.int64)).status == "200"
    assert grpc_infer(stub, "shed", "id", np.array([[998]], dtype=np.int64)).status == "200"
    assert server.process.poll() is None
