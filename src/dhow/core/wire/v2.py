"""Inference bodies of the Open Inference Protocol: JSON tensors and the binary tensor data extension.

A binary body is a JSON header of ``Inference-Header-Content-Length`` bytes followed by the raw
blobs of the inputs (or outputs) that carry ``parameters.binary_data_size``, in order. Blobs are
decoded with ``frombuffer`` on a view of the body: no copy between the socket and the model.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import orjson

from dhow.core.datatypes import NUMPY_DTYPE, array_from_buffer, array_to_bytes
from dhow.core.errors import InvalidInput, Unsupported
from dhow.core.types import InferenceRequest, InferenceResponse, Parameters, RequestedOutput, Tensor
from dhow.core.wire.json_refusals import BINARY_TENSORS, json_refusal
from dhow.core.wire.tensors import array_from_json, json_data

__all__ = ["EncodedResponse", "decode_request", "encode_response"]

_VALID_DATATYPES = ", ".join(NUMPY_DTYPE)
_NUMPY_OPTION = orjson.OPT_SERIALIZE_NUMPY
#: JSON writes its booleans only so (no escapes): a body without these holds none

#: a response body and the length of its JSON header when it carries binary outputs (else None)
EncodedResponse = tuple[bytes, int | None]


def decode_request(
    body: bytes | bytearray | memoryview,
    model_name: str,
    model_version: str = "",
    header_length: int | None = None,
    non_finite: str = BINARY_TENSORS,
) -> InferenceRequest:
    """Decode an infer request body; ``header_length`` is the ``Inference-Header-Content-Length`` value,
    ``non_finite`` how the door takes the NaN and Infinity that JSON has not (said when the body holds one)."""
    view = memoryview(body)
    if header_length is None:
        header_length = len(view)
    elif not 0 <= header_length <= len(view):
        raise InvalidInput(
            f"Inference-Header-Content-Length is {header_length} but the request body has {len(view)} bytes"
        )
    document = _load_json(view[:header_length], non_finite)
    if not isinstance(document, dict):
        raise InvalidInput(f"the inference request must be a JSON object, got {_json_type(document)}")
    raw_inputs = document.get("inputs")
    if raw_inputs is None:
        raise InvalidInput("missing 'inputs': an inference request needs a list of input tensors")
    if not isinstance(raw_inputs, list):
        raise InvalidInput(f"'inputs' must be a list of tensors, got {_json_type(raw_inputs)}")
    offset = header_length
    inputs: list[Tensor] = []
    for index, raw in enumerate(raw_inputs):
        tensor, offset = _decode_input(raw, index, body, view, offset, header_length)
        inputs.append(tensor)
    if offset != len(view):
        raise InvalidInput(
            f"the request body has {len(view) - offset} bytes after the binary data of the inputs; "
            "each binary input must announce its size in parameters.binary_data_size"
        )
    parameters = document.get("parameters")
    outputs = document.get("outputs")
    request_id = document.get("id")
    return InferenceRequest(
        model_name,
        inputs,
        model_version,
        "" if request_id is None else _request_id(request_id),
        {} if parameters is None else _parameters(parameters, "request"),
        None if outputs is None else _requested_outputs(outputs),
    )


def _holds_boolean(body: bytes | bytearray | memoryview, view: memoryview, end: int) -> bool:
    """Whether ``true`` or ``false`` appears in the JSON header: bytes.find (a fast scan), not a regular
    expression, which cost 25 µs on a 5 kB body."""
    data = body if isinstance(body, bytes | bytearray) else view[:end].tobytes()
    return data.find(b"true", 0, end) != -1 or data.find(b"false", 0, end) != -1


def _load_json(data: memoryview, non_finite: str) -> Any:
    if not data:
        raise InvalidInput("the request body is empty; expected a JSON inference request")
    try:
        return orjson.loads(data)
    except orjson.JSONDecodeError as exc:
        raise InvalidInput(f"malformed JSON: {json_refusal(exc, non_finite)}") from None


def _decode_input(
    raw: Any, index: int, body: bytes | bytearray | memoryview, view: memoryview, offset: int, header_length: int
) -> tuple[Tensor, int]:
    # the common case's checks inline, the helpers only to word an error: each call costs a request ~0.5k
    # instructions, and the label of the error messages is made only for one
    if not isinstance(raw, dict):
        raise InvalidInput(f"inputs[{index}] must be a JSON object, got {_json_type(raw)}")
    name = raw.get("name")
    if not isinstance(name, str) or not name:
        raise InvalidInput(f"inputs[{index}] needs a 'name' (a non-empty string)")
    datatype: Any = raw.get("datatype")
    if not isinstance(datatype, str) or datatype not in NUMPY_DTYPE:
        _datatype(datatype, f"input '{name}'")
    shape: Any = raw.get("shape")
    if not _plain_shape(shape):
        _shape(shape, f"input '{name}'")
    parameters = raw.get("parameters")
    parameters = {} if parameters is None else _parameters(parameters, f"input '{name}'")
    size = parameters.get("binary_data_size") if parameters else None
    data = raw.get("data")
    if size is not None:
        if data is not None:
            raise InvalidInput(f"input '{name}' has both 'data' and parameters.binary_data_size; send one of them")
        array = _binary_input(view, offset, size, datatype, shape, name)
        return Tensor(name, datatype, shape, array, parameters), offset + size
    label = f"input '{name}'"
    if data is None:
        if "shared_memory_region" in parameters:
            raise Unsupported(f"{label}: shared memory is not supported; send 'data' or binary data")
        raise InvalidInput(f"{label} has neither 'data' nor parameters.binary_data_size")
    # numpy hides a JSON boolean among numbers; looking for one costs a pass over the values, paid only by
    # bodies in which 'true' or 'false' appears at all
    booleans_possible = _holds_boolean(body, view, header_length)
    array = array_from_json(data, datatype, shape, label, booleans_possible=booleans_possible)
    return Tensor(name, datatype, shape, array, parameters), offset


def _plain_shape(value: Any) -> bool:
    """Whether ``value`` is a list of non-negative integers (a loop, not all() over a generator: ~3k less)."""
    if type(value) is not list:
        return False
    for dim in value:  # noqa: SIM110 (a loop: no generator per tensor)
        if type(dim) is not int or dim < 0:
            return False
    return True


def _binary_input(view: memoryview, offset: int, size: Any, datatype: str, shape: list[int], name: str) -> np.ndarray:
    if type(size) is not int or size < 0:
        raise InvalidInput(f"input '{name}': binary_data_size must be a non-negative integer, got {size!r}")
    left = len(view) - offset
    if size > left:
        raise InvalidInput(f"input '{name}': binary_data_size {size} but the body has only {left} bytes left")
    try:
        return array_from_buffer(view[offset : offset + size], datatype, shape)
    except InvalidInput as exc:
        raise InvalidInput(f"input '{name}': {exc.message}") from None


def _datatype(value: Any, label: str) -> str:
    if isinstance(value, str) and value in NUMPY_DTYPE:
        return value
    if value is None:
        raise InvalidInput(f"{label} needs a 'datatype', one of {_VALID_DATATYPES}")
    raise InvalidInput(f"{label}: unknown datatype {value!r}; expected one of {_VALID_DATATYPES}")


def _shape(value: Any, label: str) -> list[int]:
    if not isinstance(value, list) or not all(isinstance(d, int) and not isinstance(d, bool) for d in value):
        raise InvalidInput(f"{label} needs a 'shape' (a list of integers), got {value!r}")
    if any(d < 0 for d in value):
        raise InvalidInput(f"{label}: shape {value} has a negative dimension; a request gives actual sizes")
    return value


def _parameters(value: Any, label: str) -> Parameters:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise InvalidInput(f"{label} 'parameters' must be a JSON object, got {_json_type(value)}")
    return value


def _request_id(value: Any) -> str:
    if value is None:
        return ""
    if not isinstance(value, str):
        raise InvalidInput(f"request 'id' must be a string, got {_json_type(value)}")
    return value


def _requested_outputs(value: Any) -> list[RequestedOutput] | None:
    if value is None:
        return None
    if not isinstance(value, list):
        raise InvalidInput(f"'outputs' must be a list of {{'name': ...}} objects, got {_json_type(value)}")
    outputs: list[RequestedOutput] = []
    for index, raw in enumerate(value):
        name = raw.get("name") if isinstance(raw, dict) else None
        if not isinstance(name, str) or not name:
            raise InvalidInput(f"outputs[{index}] needs a 'name' (a non-empty string)")
        outputs.append(RequestedOutput(name, _parameters(raw.get("parameters"), f"output '{name}'")))
    return outputs


def _json_type(value: Any) -> str:
    if value is None:
        return "null"
    return {dict: "an object", list: "a list", str: "a string", bool: "a boolean"}.get(type(value), "a number")


# -- responses ---------------------------------------------------------------------------


def encode_response(response: InferenceResponse, request: InferenceRequest) -> EncodedResponse:
    """Encode a response: outputs go binary where the request asked for it, JSON otherwise."""
    binary_default = request.parameters.get("binary_data_output") is True if request.parameters else False
    asked = {o.name: o.parameters for o in request.outputs} if request.outputs else None
    entries: list[dict[str, Any]] = []
    blobs: list[bytes | memoryview] = []
    for tensor in response.outputs:
        parameters = tensor.parameters if asked is None else asked.get(tensor.name, tensor.parameters)
        flag = parameters.get("binary_data") if parameters else None
        entry: dict[str, Any] = {"name": tensor.name, "datatype": tensor.datatype, "shape": tensor.shape}
        if flag is True or (flag is None and binary_default):
            blob, size = _blob(tensor)
            blobs.append(blob)
            # the only output parameter ever sent: a Triton client fails on any other
            entry["parameters"] = {"binary_data_size": size}
        else:
            entry["data"] = json_data(tensor)
        entries.append(entry)
    document: dict[str, Any] = {"model_name": response.model_name, "model_version": response.model_version}
    if response.id:
        document["id"] = response.id
    if response.parameters:
        document["parameters"] = response.parameters
    document["outputs"] = entries
    header = orjson.dumps(document, default=_default, option=_NUMPY_OPTION)
    if not blobs:
        return header, None
    return b"".join([header, *blobs]), len(header)


def _blob(tensor: Tensor) -> tuple[bytes | memoryview, int]:
    """An output's raw bytes and their size: a numeric array's memory is joined into the body as it is (no bytes
    of it made first)."""
    if tensor.datatype == "BYTES":
        data = array_to_bytes(tensor.data, "BYTES")
        return data, len(data)
    array = np.ascontiguousarray(tensor.data, NUMPY_DTYPE[tensor.datatype])
    return array.data, array.nbytes


def _default(value: Any) -> Any:
    # orjson falls through here for arrays it cannot write natively (e.g. non-native byte order)
    if isinstance(value, np.ndarray | np.generic):
        return value.tolist()
    raise TypeError(f"cannot serialize {type(value).__name__}")
