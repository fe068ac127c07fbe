"""The REST codec on its own: JSON and binary tensors in both directions, and every malformed body."""

from __future__ import annotations

import json
import struct
from typing import Any

import numpy as np
import pytest

from dhow.core.errors import DhowError, InvalidInput, Unsupported
from dhow.core.types import InferenceRequest, InferenceResponse, RequestedOutput, Tensor
from dhow.core.wire.v2 import decode_request, encode_response

NUMERIC = {
    "BOOL": ([True, False, True, True], np.bool_),
    "UINT8": ([0, 1, 254, 255], np.uint8),
    "UINT16": ([0, 1, 2, 65535], np.uint16),
    "UINT32": ([0, 1, 2, 2**32 - 1], np.uint32),
    "UINT64": ([0, 1, 2, 2**64 - 1], np.uint64),
    "INT8": ([-128, -1, 0, 127], np.int8),
    "INT16": ([-32768, -1, 0, 32767], np.int16),
    "INT32": ([-(2**31), -1, 0, 2**31 - 1], np.int32),
    "INT64": ([-(2**63), -1, 0, 2**63 - 1], np.int64),
    "FP16": ([0.5, -1.0, 2, 65504.0], np.float16),
    "FP32": ([0.5, -1.25, 3, 1e30], np.float32),
    "FP64": ([0.1, -1e300, 3, 2.5], np.float64),
}


def _json_body(*inputs: dict[str, Any], **extra: Any) -> bytes:
    return json.dumps({"inputs": list(inputs), **extra}).encode()


def _decode(body: bytes, header_length: int | None = None) -> InferenceRequest:
    return decode_request(body, "m", "", header_length)


def _framed(header: dict[str, Any], *blobs: bytes) -> tuple[bytes, int]:
    encoded = json.dumps(header).encode()
    return encoded + b"".join(blobs), len(encoded)


def _length_prefixed(*items: bytes) -> bytes:
    return b"".join(struct.pack("<I", len(item)) + item for item in items)


def _error(body: bytes, header_length: int | None = None) -> str:
    with pytest.raises(InvalidInput) as caught:
        _decode(body, header_length)
    return caught.value.message


# -- JSON inputs ---------------------------------------------------------------------------


@pytest.mark.parametrize("datatype", sorted(NUMERIC))
def test_json_input_of_every_numeric_datatype(datatype: str) -> None:
    values, dtype = NUMERIC[datatype]
    request = _decode(_json_body({"name": "x", "datatype": datatype, "shape": [2, 2], "data": values}))
    array = request.inputs[0].data
    assert array.dtype == np.dtype(dtype) and array.shape == (2, 2)
    np.testing.assert_array_equal(array.reshape(-1), np.array(values, dtype=dtype))


def test_json_input_flat_and_nested_give_the_same_array() -> None:
    flat = _decode(_json_body({"name": "x", "datatype": "FP32", "shape": [2, 3], "data": [1, 2, 3, 4, 5, 6]}))
    nested = _decode(_json_body({"name": "x", "datatype": "FP32", "shape": [2, 3], "data": [[1, 2, 3], [4, 5, 6]]}))
    np.testing.assert_array_equal(flat.inputs[0].data, nested.inputs[0].data)
    assert flat.inputs[0].data.shape == (2, 3)


def test_json_bytes_input_flat_and_nested() -> None:
    request = _decode(_json_body({"name": "t", "datatype": "BYTES", "shape": [2, 2], "data": [["a", "bé"], ["", "d"]]}))
    array = request.inputs[0].data
    assert array.dtype == np.object_ and array.shape == (2, 2)
    assert array.reshape(-1).tolist() == [b"a", "bé".encode(), b"", b"d"]


def test_request_fields_are_carried() -> None:
    body = _json_body(
        {"name": "x", "datatype": "INT32", "shape": [1], "data": [7], "parameters": {"note": 1}},
        id="req-1",
        parameters={"priority": 2, "binary_data_output": True},
        outputs=[{"name": "y", "parameters": {"classification": 3}}, {"name": "z"}],
    )
    request = decode_request(body, "model", "4")
    assert (request.model_name, request.model_version, request.id) == ("model", "4", "req-1")
    assert request.parameters == {"priority": 2, "binary_data_output": True}
    assert request.outputs == [RequestedOutput("y", {"classification": 3}), RequestedOutput("z", {})]
    assert request.inputs[0].parameters == {"note": 1}
    assert _decode(_json_body()).outputs is None


def test_empty_tensor() -> None:
    request = _decode(_json_body({"name": "x", "datatype": "INT64", "shape": [0, 3], "data": []}))
    assert request.inputs[0].data.shape == (0, 3) and request.inputs[0].data.dtype == np.int64


# -- binary inputs -------------------------------------------------------------------------


@pytest.mark.parametrize("datatype", sorted(NUMERIC))
def test_binary_input_of_every_numeric_datatype_is_zero_copy(datatype: str) -> None:
    values, dtype = NUMERIC[datatype]
    blob = np.array(values, dtype=dtype).tobytes()
    header = {
        "inputs": [{"name": "x", "datatype": datatype, "shape": [4], "parameters": {"binary_data_size": len(blob)}}]
    }
    body, length = _framed(header, blob)
    array = _decode(body, length).inputs[0].data
    np.testing.assert_array_equal(array, np.array(values, dtype=dtype))
    assert array.base is not None  # a view on the body, not a copy


def test_mixed_json_and_binary_inputs_including_length_prefixed_bytes() -> None:
    floats = np.arange(6, dtype=np.float32)
    strings = _length_prefixed(b"hello", b"", b"\xff\x00")
    header = {
        "inputs": [
            {"name": "a", "datatype": "FP32", "shape": [2, 3], "parameters": {"binary_data_size": floats.nbytes}},
            {"name": "b", "datatype": "INT8", "shape": [2], "data": [1, 2]},
            {"name": "c", "datatype": "BYTES", "shape": [3], "parameters": {"binary_data_size": len(strings)}},
        ]
    }
    body, length = _framed(header, floats.tobytes(), strings)
    a, b, c = _decode(body, length).inputs
    np.testing.assert_array_equal(a.data, floats.reshape(2, 3))
    assert b.data.tolist() == [1, 2]
    assert c.data.tolist() == [b"hello", b"", b"\xff\x00"]


# -- malformed requests --------------------------------------------------------------------


def _one(**fields: Any) -> bytes:
    return _json_body({"name": "x", "datatype": "FP32", "shape": [2, 3], "data": [0.0] * 6, **fields})


@pytest.mark.parametrize(
    ("body", "fragment"),
    [
        (b'{"inputs": [', "malformed JSON"),
        (b"", "empty"),
        (b"[1, 2]", "must be a JSON object"),
        (b'{"outputs": []}', "missing 'inputs'"),
        (b'{"inputs": {}}', "'inputs' must be a list"),
        (b'{"inputs": [3]}', "inputs[0] must be a JSON object"),
        (_json_body({"datatype": "FP32", "shape": [1], "data": [1]}), "inputs[0] needs a 'name'"),
        (_one(data=[0.0] * 5), "input 'x': shape [2, 3] needs 6 elements, data has 5"),
        (_one(data=[[0.0] * 3, [0.0] * 2]), "ragged"),
        (_one(data=3.0), "'data' must be a list"),
        (_one(datatype="FLOAT"), "unknown datatype 'FLOAT'; expected one of BOOL, UINT8"),
        (_one(datatype=None), "needs a 'datatype'"),
        (_one(shape=[2, -3]), "negative dimension"),
        (_one(shape="2x3"), "needs a 'shape'"),
        (_one(data=None), "neither 'data' nor parameters.binary_data_size"),
        (_one(data=["a"] * 6), "FP32 data must be numbers, got strings"),
        (_one(data=[None] * 6), "FP32 data must be numbers, got mixed values"),
        (_one(datatype="INT32", data=[1.5] * 6), "INT32 data must be integers, got floating-point numbers"),
        (_one(datatype="BOOL", data=[1] * 6), "BOOL data must be JSON booleans, got integers"),
        (_one(datatype="UINT8", data=[256] * 6), "value 256 is out of the UINT8 range [0, 255]"),
        (_one(datatype="INT8", data=[-129] * 6), "value -129 is out of the INT8 range"),
        (_one(datatype="UINT64", data=[-1] + [2**64 - 1] * 5), "value -1 is out of the UINT64 range"),
        (_one(datatype="UINT64", data=[0.5] + [2**64 - 1] * 5), "UINT64 data must be integers"),
        (_one(datatype="INT64", data=[2**70] * 6), "INT64 data must be integers, got floating-point"),
        (_one(datatype="FP16", data=[1e6] * 6), "out of the FP16 range"),
        (_one(datatype="BYTES", data=[1] * 6), "BYTES data must be JSON strings, got int"),
        (_one(data=[1.5, True, 0, 0, 0, 0]), "input 'x': FP32 data must be numbers, got a JSON boolean (true or"),
        (_one(data=[[1, 2, 3], [4, 5, False]]), "FP32 data must be numbers, got a JSON boolean"),
        (_one(datatype="INT32", data=[True, 2, 3, 4, 5, 6]), "INT32 data must be integers, got a JSON boolean"),
        (_one(parameters=[]), "'parameters' must be a JSON object"),
        (_json_body(id=5), "request 'id' must be a string"),
        (_json_body(outputs=[{"parameters": {}}]), "outputs[0] needs a 'name'"),
        (_json_body(outputs="y"), "'outputs' must be a list"),
    ],
)
def test_malformed_json_requests(body: bytes, fragment: str) -> None:
    assert fragment in _error(body)


def test_fp16_travels_as_json_numbers() -> None:
    request = _decode(_one(datatype="FP16"))
    assert request.inputs[0].data.dtype == np.float16


def _binary_header(size: int, **extra: Any) -> dict[str, Any]:
    entry = {"name": "input", "datatype": "FP32", "shape": [10], "parameters": {"binary_data_size": size}, **extra}
    return {"inputs": [entry]}


def test_malformed_binary_requests() -> None:
    body, length = _framed(_binary_header(100), b"\0" * 40)
    assert _error(body, length) == "input 'input': binary_data_size 100 but the body has only 40 bytes left"
    body, length = _framed(_binary_header(40), b"\0" * 40)
    assert "Inference-Header-Content-Length is 9999" in _error(body, 9999)
    assert "Inference-Header-Content-Length is -1" in _error(body, -1)
    body, length = _framed(_binary_header(36), b"\0" * 36)
    assert _error(body, length).startswith("input 'input': tensor of datatype FP32 and shape [10] needs 40 bytes")
    body, length = _framed(_binary_header(40), b"\0" * 44)
    assert "4 bytes after the binary data" in _error(body, length)
    body, length = _framed(_binary_header(40, data=[0.0] * 10), b"\0" * 40)
    assert "both 'data' and parameters.binary_data_size" in _error(body, length)
    body, length = _framed(_binary_header(-4))
    assert "binary_data_size must be a non-negative integer" in _error(body, length)
    body, length = _framed(_binary_header(40), b"\0" * 40)
    assert "malformed JSON" in _error(body[: length - 1] + body[length:], length - 1)


def test_malformed_binary_bytes() -> None:
    blob = _length_prefixed(b"abc", b"de")[:-1]
    header = {
        "inputs": [{"name": "s", "datatype": "BYTES", "shape": [2], "parameters": {"binary_data_size": len(blob)}}]
    }
    body, length = _framed(header, blob)
    assert _error(body, length).startswith("input 's': BYTES tensor element 1 claims 2 bytes")
    blob = _length_prefixed(b"abc")
    header["inputs"][0]["parameters"]["binary_data_size"] = len(blob)
    body, length = _framed(header, blob)
    assert "needs 2 elements, got 1" in _error(body, length)


def test_shared_memory_is_unsupported() -> None:
    body = _json_body({"name": "x", "datatype": "FP32", "shape": [1], "parameters": {"shared_memory_region": "r"}})
    with pytest.raises(Unsupported):
        _decode(body)


# -- responses -----------------------------------------------------------------------------


def _response(*outputs: Tensor, **extra: Any) -> InferenceResponse:
    return InferenceResponse("m", "1", list(outputs), **extra)


def _request(outputs: list[RequestedOutput] | None = None, **parameters: Any) -> InferenceRequest:
    return InferenceRequest("m", [], parameters=parameters, outputs=outputs)


def _split(body: bytes, length: int | None) -> tuple[dict[str, Any], bytes]:
    if length is None:
        return json.loads(body), b""
    return json.loads(body[:length]), body[length:]


@pytest.mark.parametrize("datatype", sorted(NUMERIC))
def test_json_output_of_every_numeric_datatype(datatype: str) -> None:
    values, dtype = NUMERIC[datatype]
    array = np.array(values, dtype=dtype).reshape(2, 2)
    body, length = encode_response(_response(Tensor("y", datatype, [2, 2], array), id="r"), _request())
    document, rest = _split(body, length)
    assert length is None and rest == b""
    data = document["outputs"][0].pop("data")
    assert document == {
        "model_name": "m",
        "model_version": "1",
        "id": "r",
        "outputs": [{"name": "y", "datatype": datatype, "shape": [2, 2]}],
    }
    # orjson writes the shortest text that reads back as the same value of the array's own type
    np.testing.assert_array_equal(np.array(data, dtype=dtype), array.reshape(-1))


def test_json_output_of_a_non_contiguous_array_is_flat_row_major() -> None:
    array = np.arange(6, dtype=np.float32).reshape(3, 2).T
    body, _ = encode_response(_response(Tensor("y", "FP32", [2, 3], array)), _request())
    assert json.loads(body)["outputs"][0]["data"] == [0, 2, 4, 1, 3, 5]


def test_json_bytes_output_is_strings_and_no_parameters_member() -> None:
    array = np.array([b"a", "é".encode(), b""], dtype=np.object_)
    tensor = Tensor("s", "BYTES", [3], array, {"classification": 2})
    body, length = encode_response(_response(tensor, parameters={"p": 1}), _request())
    document = json.loads(body)
    assert length is None and document["parameters"] == {"p": 1} and "id" not in document
    assert document["outputs"] == [{"name": "s", "datatype": "BYTES", "shape": [3], "data": ["a", "é", ""]}]


def test_json_bytes_output_that_is_not_utf8_asks_for_binary() -> None:
    tensor = Tensor("s", "BYTES", [1], np.array([b"\xff"], dtype=np.object_))
    with pytest.raises(InvalidInput, match="binary_data"):
        encode_response(_response(tensor), _request())


@pytest.mark.parametrize("datatype", sorted(NUMERIC))
def test_binary_output_of_every_numeric_datatype(datatype: str) -> None:
    values, dtype = NUMERIC[datatype]
    array = np.array(values, dtype=dtype).reshape(2, 2)
    body, length = encode_response(_response(Tensor("y", datatype, [2, 2], array)), _request(binary_data_output=True))
    document, blobs = _split(body, length)
    assert document["outputs"] == [
        {"name": "y", "datatype": datatype, "shape": [2, 2], "parameters": {"binary_data_size": array.nbytes}}
    ]
    np.testing.assert_array_equal(np.frombuffer(blobs, dtype=dtype).reshape(2, 2), array)


def test_binary_output_default_and_per_output_override() -> None:
    floats = np.arange(4, dtype=np.float32)
    strings = np.array([b"ab", b"\xff"], dtype=np.object_)
    outputs = (
        Tensor("a", "FP32", [4], floats),
        Tensor("b", "BYTES", [2], strings),
        Tensor("c", "INT8", [1], np.int8([3])),
    )
    asked = [RequestedOutput("a", {"binary_data": False}), RequestedOutput("b"), RequestedOutput("c")]
    body, length = encode_response(_response(*outputs), _request(asked, binary_data_output=True))
    document, blobs = _split(body, length)
    a, b, c = document["outputs"]
    assert a == {"name": "a", "datatype": "FP32", "shape": [4], "data": [0, 1, 2, 3]}
    assert b["parameters"] == {"binary_data_size": 4 + 2 + 4 + 1} and "data" not in b
    assert c["parameters"] == {"binary_data_size": 1}
    assert blobs == struct.pack("<I", 2) + b"ab" + struct.pack("<I", 1) + b"\xff" + b"\x03"
    # per output, without the request-level default
    asked = [RequestedOutput("a", {"binary_data": True}), RequestedOutput("b"), RequestedOutput("c")]
    body, length = encode_response(_response(outputs[0], outputs[2]), _request(asked))
    document, blobs = _split(body, length)
    assert document["outputs"][0]["parameters"] == {"binary_data_size": 16}
    assert document["outputs"][1]["data"] == [3]
    assert np.frombuffer(blobs, np.float32).tolist() == [0, 1, 2, 3]


def test_errors_are_dhow_errors_with_a_400() -> None:
    with pytest.raises(DhowError) as caught:
        _decode(b"{")
    assert caught.value.http_status == 400
