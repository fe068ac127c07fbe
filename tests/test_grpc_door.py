"""The gRPC door end to end: a real grpc.aio server on a free port, driven by tritonclient.grpc
and by the raw generated stub, over a fake data plane; plus the codec's edge cases."""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
from collections.abc import Iterator
from typing import Any

import grpc
import numpy as np
import pytest
import tritonclient.grpc as grpcclient
from tritonclient.grpc import model_config_pb2 as triton_config
from tritonclient.utils import InferenceServerException

from dhow.core.datatypes import array_to_bytes
from dhow.core.errors import InvalidInput, NotFound, Overloaded, Unsupported
from dhow.core.types import Caller, InferenceRequest, InferenceResponse, Outcome, Tensor
from dhow.protocols.grpc import GrpcServer, create_grpc_server
from dhow.protocols.grpc.codec import (
    parameter_to_proto,
    parameters_from_proto,
    request_from_proto,
    response_bytes,
    stream_response_bytes,
)
from dhow.protocols.grpc.generated import grpc_service_pb2 as pb
from dhow.protocols.grpc.generated import grpc_service_pb2_grpc as pb_grpc
from dhow.serving.dataplane import DataPlane, Placement
from tests.inprocess import open_service

MODELS = ("echo", "busy", "crash")

ECHO_CONFIG: dict[str, Any] = {
    "name": "echo",
    "platform": "python",
    "backend": "python",
    "max_batch_size": 8,
    "input": [
        {"name": "x", "data_type": "TYPE_FP32", "dims": [2]},
        {"name": "s", "data_type": "TYPE_STRING", "dims": [1]},
    ],
    "output": [{"name": "x_out", "data_type": "TYPE_FP32", "dims": [2]}],
    "dynamic_batching": {"preferred_batch_size": [4, 8], "max_queue_delay_microseconds": 500},
    "instance_group": [{"name": "echo_0", "count": 2, "kind": "KIND_CPU"}],
    "version_policy": {"latest": {"num_versions": 1}},
    "model_transaction_policy": {"decoupled": False},
    "sequence_batching": {"not": "in our proto subset"},
}


class FakeDataPlane(DataPlane):
    """Model "echo" doubles FP32/FP16, negates BOOL and echoes the rest; "busy" is overloaded;
    "crash" raises a non-dhow exception; any other name is unknown."""

    def __init__(self) -> None:
        # no model lifecycle behind this fake: ready is is_ready
        super().__init__(None, server_name="fake-dhow", strict_readiness=False)  # type: ignore[arg-type]
        self.is_ready = True
        self.calls: list[tuple[str, str, dict[str, Any] | None]] = []

    @staticmethod
    def _check(name: str) -> None:
        if name not in MODELS:
            raise NotFound(f"unknown model '{name}'")

    def model_ready(self, name: str, version: str = "") -> bool:
        self._check(name)
        return name != "busy"

    def model_metadata(self, name: str, version: str = "") -> dict[str, Any]:
        self._check(name)
        return {
            "name": name,
            "versions": ["1", "2"],
            "platform": "python",
            "inputs": [{"name": "x", "datatype": "FP32", "shape": [-1, 2]}],
            "outputs": [{"name": "x_out", "datatype": "FP32", "shape": [-1, 2]}],
        }

    def model_config(self, name: str, version: str = "") -> dict[str, Any]:
        self._check(name)
        return {**ECHO_CONFIG, "name": name}

    def model_statistics(self, name: str = "", version: str = "", visible: Any = None) -> dict[str, Any]:
        duration = {"count": 3, "ns": 3000}
        stats = [
            {
                "name": model,
                "version": "1",
                "last_inference": 1700000000000,
                "inference_count": 5,
                "execution_count": 2,
                "inference_stats": {"success": duration, "fail": {"count": 0, "ns": 0}, "queue": duration},
                "batch_stats": [{"batch_size": 4, "compute_infer": duration}],
            }
            for model in (MODELS if not name else [name])
            if self._check(model) is None
        ]
        return {"model_stats": stats}

    def repository_index(self, ready_only: bool = False, visible: Any = None) -> list[dict[str, Any]]:
        rows = [{"name": "echo", "version": "1", "state": "READY", "reason": ""}]
        if not ready_only:
            rows.append({"name": "old", "version": "", "state": "UNAVAILABLE", "reason": "unloaded"})
        return rows

    async def load_model(self, name: str, parameters: dict[str, Any] | None = None) -> None:
        self.calls.append(("load", name, parameters))

    async def unload_model(self, name: str, parameters: dict[str, Any] | None = None) -> None:
        self._check(name)
        self.calls.append(("unload", name, parameters))

    def place(self, request: InferenceRequest, caller: Caller) -> Placement:
        return Placement(None, "", None)  # type: ignore[arg-type]  # a fake: no model config, region or model

    async def infer(self, request: InferenceRequest, placement: Placement) -> tuple[InferenceResponse, Outcome]:
        self._check(request.model_name)
        if request.model_name == "busy":
            raise Overloaded("model 'busy' has a full queue; retry later", retry_after=2)
        if request.model_name == "crash":
            raise RuntimeError("secret internal detail")
        await asyncio.sleep(0)
        outputs = [_echo(tensor) for tensor in request.inputs]
        response = InferenceResponse(request.model_name, "1", outputs, id=request.id, parameters={"seen": len(outputs)})
        return response, Outcome("1")


def _echo(tensor: Tensor) -> Tensor:
    if tensor.name == "reject":
        raise InvalidInput("input 'reject' is refused by model 'echo'")
    data = tensor.data
    if tensor.datatype in ("FP32", "FP16"):
        data = data * 2
    elif tensor.datatype == "BOOL":
        data = ~data
    return Tensor(f"{tensor.name}_out", tensor.datatype, list(data.shape), data)


# -- the server, in a thread with its own event loop ------------------------------------------


@pytest.fixture(scope="module", params=["native", "grpcio"])
def door(request: pytest.FixtureRequest) -> Iterator[tuple[str, FakeDataPlane]]:
    """The door on each front (``--grpc-front``): the same tests hold for both."""
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, name="grpc-door", daemon=True)
    thread.start()
    dataplane = FakeDataPlane()
    service, trail = open_service(dataplane)

    async def start() -> GrpcServer:
        await trail.start()
        bound = await create_grpc_server(service, "127.0.0.1", 0, max_message_bytes=1024 * 1024, front=request.param)
        await bound.server.start()
        return bound

    bound = asyncio.run_coroutine_threadsafe(start(), loop).result(10)
    try:
        yield bound.address, dataplane
    finally:
        asyncio.run_coroutine_threadsafe(bound.server.stop(None), loop).result(10)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)
        loop.close()


@pytest.fixture
def client(door: tuple[str, FakeDataPlane]) -> Iterator[grpcclient.InferenceServerClient]:
    triton = grpcclient.InferenceServerClient(door[0])
    yield triton
    triton.close()


@pytest.fixture
def stub(door: tuple[str, FakeDataPlane]) -> Iterator[pb_grpc.GRPCInferenceServiceStub]:
    with grpc.insecure_channel(door[0]) as channel:
        yield pb_grpc.GRPCInferenceServiceStub(channel)


def _input(name: str, array: np.ndarray, datatype: str) -> grpcclient.InferInput:
    tensor = grpcclient.InferInput(name, list(array.shape), datatype)
    tensor.set_data_from_numpy(array)
    return tensor


def _status(caught: pytest.ExceptionInfo[InferenceServerException]) -> str:
    return str(caught.value.status())


# -- health, metadata, configuration, statistics ----------------------------------------------


def test_health_and_metadata(client: grpcclient.InferenceServerClient) -> None:
    assert client.is_server_live() and client.is_server_ready()
    assert client.is_model_ready("echo") and not client.is_model_ready("busy")
    with pytest.raises(InferenceServerException) as caught:
        client.is_model_ready("nope")
    assert _status(caught) == "StatusCode.NOT_FOUND" and "unknown model 'nope'" in caught.value.message()

    server = client.get_server_metadata()
    assert server.name == "fake-dhow" and "statistics" in server.extensions
    model = client.get_model_metadata("echo", as_json=True)
    assert model["versions"] == ["1", "2"] and model["platform"] == "python"
    assert model["inputs"] == [{"name": "x", "datatype": "FP32", "shape": ["-1", "2"]}]


def test_model_config_follows_triton_numbering(client: grpcclient.InferenceServerClient) -> None:
    config = client.get_model_config("echo").config  # decoded with tritonclient's own model_config.proto
    assert (config.name, config.platform, config.backend, config.max_batch_size) == ("echo", "python", "python", 8)
    assert [(i.name, i.data_type, list(i.dims)) for i in config.input] == [
        ("x", triton_config.TYPE_FP32, [2]),
        ("s", triton_config.TYPE_STRING, [1]),
    ]
    assert config.output[0].name == "x_out"
    assert list(config.dynamic_batching.preferred_batch_size) == [4, 8]
    assert config.dynamic_batching.max_queue_delay_microseconds == 500
    group = config.instance_group[0]
    assert (group.name, group.count, group.kind) == ("echo_0", 2, triton_config.ModelInstanceGroup.KIND_CPU)
    assert config.version_policy.latest.num_versions == 1
    assert not config.model_transaction_policy.decoupled
    assert not config.HasField("sequence_batching")


def test_statistics(client: grpcclient.InferenceServerClient) -> None:
    (stats,) = client.get_inference_statistics("echo").model_stats
    assert (stats.name, stats.version, stats.inference_count, stats.execution_count) == ("echo", "1", 5, 2)
    assert stats.last_inference == 1700000000000
    assert (stats.inference_stats.success.count, stats.inference_stats.success.ns) == (3, 3000)
    assert stats.batch_stats[0].batch_size == 4 and stats.batch_stats[0].compute_infer.ns == 3000
    assert len(client.get_inference_statistics().model_stats) == len(MODELS)


# -- the repository ---------------------------------------------------------------------------


def test_repository(client: grpcclient.InferenceServerClient, door: tuple[str, FakeDataPlane]) -> None:
    index = client.get_model_repository_index()
    assert [(m.name, m.version, m.state, m.reason) for m in index.models] == [
        ("echo", "1", "READY", ""),
        ("old", "", "UNAVAILABLE", "unloaded"),
    ]
    dataplane = door[1]
    dataplane.calls.clear()
    client.load_model("new", config='{"runtime": "onnx"}', files={"file:1/model.onnx": b"\x00\x01onnx"})
    client.unload_model("echo", unload_dependents=True)
    assert dataplane.calls == [
        ("load", "new", {"config": '{"runtime": "onnx"}', "file:1/model.onnx": b"\x00\x01onnx"}),
        ("unload", "echo", {"unload_dependents": True}),
    ]
    with pytest.raises(InferenceServerException) as caught:
        client.unload_model("nope")
    assert _status(caught) == "StatusCode.NOT_FOUND"


# -- inference --------------------------------------------------------------------------------


def test_infer_raw_tensors_of_every_kind(client: grpcclient.InferenceServerClient) -> None:
    x = np.arange(6, dtype=np.float32).reshape(3, 2)
    half = np.array([[0.5, -1.5]], dtype=np.float16)
    flags = np.array([True, False, True])
    text = np.array([b"hello", b"", "wörld".encode()], dtype=np.object_)
    inputs = [_input("x", x, "FP32"), _input("h", half, "FP16"), _input("b", flags, "BOOL"), _input("s", text, "BYTES")]
    result = client.infer("echo", inputs, request_id="req-1", outputs=[grpcclient.InferRequestedOutput("x_out")])
    np.testing.assert_array_equal(result.as_numpy("x_out"), x * 2)
    np.testing.assert_array_equal(result.as_numpy("h_out"), half * 2)
    np.testing.assert_array_equal(result.as_numpy("b_out"), ~flags)
    assert list(result.as_numpy("s_out")) == list(text)
    response = result.get_response()
    assert (response.model_name, response.model_version, response.id) == ("echo", "1", "req-1")
    assert response.parameters["seen"].int64_param == 4
    assert len(response.raw_output_contents) == len(response.outputs) == 4
    assert not any(o.HasField("contents") for o in response.outputs)


def test_infer_errors(client: grpcclient.InferenceServerClient, caplog: pytest.LogCaptureFixture) -> None:
    x = _input("x", np.zeros((1, 2), np.float32), "FP32")
    cases = [
        ("nope", [x], "StatusCode.NOT_FOUND", "unknown model 'nope'"),
        ("echo", [_input("reject", np.zeros(1, np.float32), "FP32")], "StatusCode.INVALID_ARGUMENT", "is refused"),
        ("busy", [x], "StatusCode.RESOURCE_EXHAUSTED", "full queue"),
    ]
    for model, inputs, status, fragment in cases:
        with pytest.raises(InferenceServerException) as caught:
            client.infer(model, inputs)
        assert _status(caught) == status and fragment in caught.value.message()

    with caplog.at_level(logging.ERROR, logger="dhow.service"), pytest.raises(InferenceServerException) as caught:
        client.infer("crash", [x])
    message = caught.value.message()
    assert _status(caught) == "StatusCode.INTERNAL" and "secret" not in message
    error_id = message.split("(id ")[1].split(")")[0]
    assert any(error_id in r.getMessage() and r.exc_info for r in caplog.records)


def test_oversized_message_is_resource_exhausted(stub: pb_grpc.GRPCInferenceServiceStub) -> None:
    tensor = pb.ModelInferRequest.InferInputTensor(name="x", datatype="FP32", shape=[512 * 1024])
    request = pb.ModelInferRequest(model_name="echo", inputs=[tensor], raw_input_contents=[b"\0" * (2 * 1024 * 1024)])
    with pytest.raises(grpc.RpcError) as caught:
        stub.ModelInfer(request)  # the door allows 1 MiB
    error: Any = caught.value
    assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED


def test_overload_sets_retry_after(stub: pb_grpc.GRPCInferenceServiceStub) -> None:
    request = pb.ModelInferRequest(model_name="busy")
    with pytest.raises(grpc.RpcError) as caught:
        stub.ModelInfer(request)
    error: Any = caught.value
    assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert ("retry-after", "2") in tuple(error.trailing_metadata())


def test_typed_contents_answered_raw(stub: pb_grpc.GRPCInferenceServiceStub) -> None:
    tensor = pb.ModelInferRequest.InferInputTensor
    request = pb.ModelInferRequest(
        model_name="echo",
        id="typed",
        inputs=[
            tensor(
                name="x", datatype="FP32", shape=[2, 2], contents=pb.InferTensorContents(fp32_contents=[1, 2, 3, 4])
            ),
            tensor(name="i", datatype="INT8", shape=[3], contents=pb.InferTensorContents(int_contents=[-128, 0, 127])),
            tensor(
                name="s", datatype="BYTES", shape=[2], contents=pb.InferTensorContents(bytes_contents=[b"a", b"bc"])
            ),
        ],
    )
    response = stub.ModelInfer(request)
    assert response.id == "typed" and [o.name for o in response.outputs] == ["x_out", "i_out", "s_out"]
    assert not any(o.HasField("contents") for o in response.outputs)
    x_raw, i_raw, s_raw = response.raw_output_contents
    np.testing.assert_array_equal(np.frombuffer(x_raw, "<f4"), [2, 4, 6, 8])
    assert list(response.outputs[0].shape) == [2, 2]
    np.testing.assert_array_equal(np.frombuffer(i_raw, "<i1"), [-128, 0, 127])
    assert s_raw == b"\x01\x00\x00\x00a\x02\x00\x00\x00bc"


def test_malformed_request_is_invalid_argument(stub: pb_grpc.GRPCInferenceServiceStub) -> None:
    tensor = pb.ModelInferRequest.InferInputTensor(name="x", datatype="FP32", shape=[2])
    request = pb.ModelInferRequest(model_name="echo", inputs=[tensor, tensor], raw_input_contents=[b"\0" * 8])
    with pytest.raises(grpc.RpcError) as caught:
        stub.ModelInfer(request)
    error: Any = caught.value
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "2 input(s) but 1 raw_input_contents" in error.details()


def test_unserved_triton_rpcs_are_unimplemented(client: grpcclient.InferenceServerClient) -> None:
    with pytest.raises(InferenceServerException) as caught:
        client.get_cuda_shared_memory_status()
    assert _status(caught) == "StatusCode.UNIMPLEMENTED"


def test_stream_answers_and_errors_without_ending(client: grpcclient.InferenceServerClient) -> None:
    answers: queue.Queue[tuple[Any, Any]] = queue.Queue()
    client.start_stream(callback=lambda result, error: answers.put((result, error)))
    try:
        x = _input("x", np.ones((1, 2), np.float32), "FP32")
        client.async_stream_infer("echo", [x], request_id="a")
        client.async_stream_infer("nope", [x], request_id="b")
        client.async_stream_infer("busy", [x], request_id="c")
        client.async_stream_infer("echo", [x], request_id="d")
        got = [answers.get(timeout=10) for _ in range(4)]
    finally:
        client.stop_stream()
    results = {result.get_response().id: result for result, error in got if error is None}
    errors = sorted(error.message() for result, error in got if error is not None)
    assert sorted(results) == ["a", "d"]
    np.testing.assert_array_equal(results["a"].as_numpy("x_out"), [[2.0, 2.0]])
    assert len(results["d"].get_response().raw_output_contents) == 1
    assert len(errors) == 2 and "full queue" in errors[0] and "unknown model 'nope'" in errors[1]


# -- binding ----------------------------------------------------------------------------------


def test_busy_port_is_refused(door: tuple[str, FakeDataPlane]) -> None:
    host, port = door[0].rsplit(":", 1)

    async def bind_again(front: str) -> None:
        await create_grpc_server(open_service(door[1])[0], host, int(port), max_message_bytes=1024, front=front)

    for front in ("native", "grpcio"):
        with pytest.raises(OSError, match="cannot serve gRPC"):
            asyncio.run(bind_again(front))


# -- the codec on its own -----------------------------------------------------------------------


def _request(*tensors: pb.ModelInferRequest.InferInputTensor, raw: list[bytes] | None = None) -> pb.ModelInferRequest:
    return pb.ModelInferRequest(model_name="m", inputs=list(tensors), raw_input_contents=raw or [])


def _tensor(datatype: str, shape: list[int], **contents: Any) -> pb.ModelInferRequest.InferInputTensor:
    tensor = pb.ModelInferRequest.InferInputTensor(name="t", datatype=datatype, shape=shape)
    if contents:
        tensor.contents.CopyFrom(pb.InferTensorContents(**contents))
    return tensor


@pytest.mark.parametrize(
    ("request_", "error", "fragment"),
    [
        (_request(_tensor("FP32", [2], fp32_contents=[1, 2]), raw=[b"\0" * 8]), InvalidInput, "either all raw"),
        (_request(_tensor("FP32", [3], fp32_contents=[1, 2])), InvalidInput, "needs 3 element(s) in contents.fp32"),
        (_request(_tensor("FP32", [3]), raw=[b"\0" * 8]), InvalidInput, "input 't': tensor of datatype FP32"),
        (_request(_tensor("FLOAT", [1])), InvalidInput, "unknown datatype 'FLOAT'"),
        (_request(_tensor("FP16", [1])), InvalidInput, "only be sent in raw_input_contents"),
        (_request(_tensor("BF16", [1]), raw=[b"\0\0"]), Unsupported, "BF16"),
        (_request(_tensor("INT8", [2], int_contents=[1, 300])), InvalidInput, "outside the range of INT8"),
        (_request(_tensor("UINT16", [1], uint_contents=[70000])), InvalidInput, "outside the range of UINT16"),
        (_request(_tensor("FP32", [-1], fp32_contents=[1])), InvalidInput, "negative dimension"),
    ],
)
def test_codec_rejects(request_: pb.ModelInferRequest, error: type[Exception], fragment: str) -> None:
    with pytest.raises(error) as caught:
        request_from_proto(request_)
    assert fragment in str(caught.value)


def test_codec_decodes_raw_without_copying_and_typed_narrow_ints() -> None:
    raw = np.arange(4, dtype="<i2").tobytes()
    decoded = request_from_proto(_request(_tensor("INT16", [2, 2]), raw=[raw]))
    (tensor,) = decoded.inputs
    assert tensor.data.dtype == np.dtype("<i2") and tensor.data.shape == (2, 2) and not tensor.data.flags.owndata
    typed = request_from_proto(_request(_tensor("UINT8", [3], uint_contents=[0, 7, 255]))).inputs[0]
    assert typed.data.dtype == np.uint8 and list(typed.data) == [0, 7, 255]
    assert decoded.outputs is None


def _built(response: InferenceResponse) -> pb.ModelInferResponse:
    """The message as protobuf's constructor builds it from the response's fields."""
    message = pb.ModelInferResponse(
        model_name=response.model_name,
        model_version=response.model_version,
        id=response.id,
        outputs=[
            pb.ModelInferResponse.InferOutputTensor(name=t.name, datatype=t.datatype, shape=t.shape)
            for t in response.outputs
        ],
        raw_output_contents=[array_to_bytes(t.data, t.datatype) for t in response.outputs],
    )
    for key, value in response.parameters.items():
        message.parameters[key].CopyFrom(parameter_to_proto(value))
    return message


@pytest.mark.parametrize(
    "response",
    [
        InferenceResponse(
            "tabular",
            "1",
            [Tensor("label", "INT64", [1], np.arange(1)), Tensor("p", "FP32", [1, 2], np.ones((1, 2), np.float32))],
        ),
        # names and an id past one-byte lengths, parameters, a non-contiguous output in another dtype than declared
        InferenceResponse(
            "m" * 300,
            "12",
            [Tensor("o" * 200, "FP32", [2, 3], np.arange(6.0).reshape(3, 2).T)],
            id="r" * 130,
            parameters={"dhow_variant": "b", "n": 3},
        ),
        InferenceResponse(
            "ü",
            "",
            [
                Tensor("s", "BYTES", [2], np.array([b"ab", b""], dtype=object)),
                Tensor("e", "FP32", [0, 4], np.zeros((0, 4))),
            ],
        ),
        InferenceResponse("m", "1", [Tensor("x", "INT32", [], np.array(5, np.int32))]),
        InferenceResponse("m", "1", []),
    ],
)
def test_response_bytes_read_as_protobufs_own(response: InferenceResponse) -> None:
    """response_bytes writes the message by hand: protobuf reads it as the message its constructor builds."""
    for _ in range(2):  # the second time from the kept headers
        assert pb.ModelInferResponse.FromString(response_bytes(response)) == _built(response)
    streamed = pb.ModelStreamInferResponse.FromString(stream_response_bytes(response_bytes(response)))
    assert streamed == pb.ModelStreamInferResponse(infer_response=_built(response))


def test_parameters_round_trip() -> None:
    values = {"flag": True, "count": -3, "huge": 2**63, "ratio": 0.25, "name": "x", "nested": {"a": [1]}}
    message = pb.ModelInferRequest()
    for key, value in values.items():
        message.parameters[key].CopyFrom(parameter_to_proto(value))
    decoded = parameters_from_proto(message.parameters)
    assert decoded == {**values, "nested": '{"a": [1]}'}
    assert message.parameters["huge"].WhichOneof("parameter_choice") == "uint64_param"
