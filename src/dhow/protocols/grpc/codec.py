"""Translate between gRPC messages and dhow's transport-neutral requests and responses.

Numeric tensors never go through a per-element Python loop: raw contents become numpy arrays
with ``frombuffer`` (no copy of the message's bytes), typed contents with one ``np.asarray``.
Responses always carry ``raw_output_contents``: perf_analyzer and tritonclient read them, and
some clients hang on typed output contents.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from dhow.core.datatypes import NUMPY_DTYPE, array_from_buffer, array_to_bytes, element_count
from dhow.core.errors import InvalidInput, Unsupported
from dhow.core.types import InferenceRequest, InferenceResponse, Parameters, RequestedOutput, Tensor
from dhow.protocols.grpc.generated import grpc_service_pb2 as pb

#: datatype -> the InferTensorContents field that carries it, and the numpy dtype of that field
_CONTENTS: dict[str, tuple[str, np.dtype]] = {
    "BOOL": ("bool_contents", np.dtype(np.bool_)),
    "INT8": ("int_contents", np.dtype("<i4")),
    "INT16": ("int_contents", np.dtype("<i4")),
    "INT32": ("int_contents", np.dtype("<i4")),
    "INT64": ("int64_contents", np.dtype("<i8")),
    "UINT8": ("uint_contents", np.dtype("<u4")),
    "UINT16": ("uint_contents", np.dtype("<u4")),
    "UINT32": ("uint_contents", np.dtype("<u4")),
    "UINT64": ("uint64_contents", np.dtype("<u8")),
    "FP32": ("fp32_contents", np.dtype("<f4")),
    "FP64": ("fp64_contents", np.dtype("<f8")),
    "BYTES": ("bytes_contents", np.dtype(np.object_)),
}
#: valid protocol datatypes that dhow has no numpy form for
_UNSUPPORTED_DATATYPES = frozenset({"BF16"})
_INT64_MIN, _INT64_MAX, _UINT64_MAX = -(2**63), 2**63 - 1, 2**64 - 1


# -- parameters -----------------------------------------------------------------------------


def parameters_from_proto(parameters: Mapping[str, Any]) -> Parameters:
    """An ``InferParameter`` or ``ModelRepositoryParameter`` map as plain Python values."""
    if not parameters:  # the common case, on every tensor
        return {}
    result: Parameters = {}
    for key, parameter in parameters.items():
        choice = parameter.WhichOneof("parameter_choice")
        result[key] = getattr(parameter, choice) if choice is not None else None
    return result


def parameter_to_proto(value: object) -> pb.InferParameter:
    """A Python value as an ``InferParameter``; containers travel as JSON strings."""
    # bool first: it is an int too
    if isinstance(value, (bool, np.bool_)):
        return pb.InferParameter(bool_param=bool(value))
    if isinstance(value, (int, np.integer)):
        number = int(value)
        if _INT64_MIN <= number <= _INT64_MAX:
            return pb.InferParameter(int64_param=number)
        if 0 <= number <= _UINT64_MAX:
            return pb.InferParameter(uint64_param=number)
        return pb.InferParameter(string_param=str(number))
    if isinstance(value, (float, np.floating)):
        return pb.InferParameter(double_param=float(value))
    if isinstance(value, str):
        return pb.InferParameter(string_param=value)
    if isinstance(value, bytes):
        return pb.InferParameter(string_param=value.decode("utf-8", errors="replace"))
    return pb.InferParameter(string_param=json.dumps(value, default=str))


def _set_parameters(target: Any, parameters: Parameters) -> None:
    for key, value in parameters.items():
        if value is not None:
            target[key].CopyFrom(parameter_to_proto(value))


# -- requests -------------------------------------------------------------------------------


def request_from_proto(message: pb.ModelInferRequest) -> InferenceRequest:
    """Decode a ``ModelInferRequest``; raises ``InvalidInput`` with a message for the client.

    Repeated fields are read as slices (lists): iterating upb's containers ends on an IndexError, about 2.5k
    instructions each time, and a request iterates three of them.
    """
    raw = message.raw_input_contents
    inputs = message.inputs[:]
    if raw:
        buffers = raw[:]
        if len(buffers) != len(inputs):
            raise InvalidInput(
                f"the request has {len(inputs)} input(s) but {len(buffers)} raw_input_contents; "
                "give exactly one raw buffer per input, in the order of the inputs"
            )
        tensors = [_tensor_from_raw(tensor, buffers[index]) for index, tensor in enumerate(inputs)]
    else:
        tensors = [_tensor_from_contents(tensor) for tensor in inputs]
    requested = message.outputs
    outputs = (
        [RequestedOutput(o.name, parameters_from_proto(o.parameters)) for o in requested[:]] if requested else None
    )
    parameters = message.parameters
    return InferenceRequest(
        message.model_name,
        tensors,
        message.model_version,
        message.id,
        parameters_from_proto(parameters) if parameters else {},
        outputs,
    )


def _checked_header(tensor: Any) -> tuple[str, str, list[int], Parameters]:
    name: str = tensor.name
    datatype: str = tensor.datatype
    shape: list[int] = tensor.shape[:]
    parameters = tensor.parameters
    parameters = parameters_from_proto(parameters) if parameters else {}
    if parameters and "shared_memory_region" in parameters:
        raise Unsupported(f"input '{name}' refers to a shared-memory region; dhow does not support shared memory")
    if datatype not in NUMPY_DTYPE:
        if datatype in _UNSUPPORTED_DATATYPES:
            raise Unsupported(f"input '{name}' has datatype {datatype}, which dhow does not support")
        known = ", ".join(NUMPY_DTYPE)
        raise InvalidInput(f"input '{name}' has unknown datatype '{datatype}'; expected one of {known}")
    for dim in shape:
        if dim < 0:
            raise InvalidInput(f"input '{name}' has a negative dimension in its shape {shape}")
    return name, datatype, shape, parameters


def _tensor_from_raw(tensor: Any, buffer: bytes) -> Tensor:
    name, datatype, shape, parameters = _checked_header(tensor)
    if tensor.HasField("contents"):
        raise InvalidInput(
            f"input '{name}' sets contents while the request uses raw_input_contents; "
            "a request carries its tensors either all raw or all as contents"
        )
    try:
        data = array_from_buffer(buffer, datatype, shape)
    except InvalidInput as exc:
        raise InvalidInput(f"input '{name}': {exc.message}") from None
    return Tensor(name, datatype, shape, data, parameters)


def _tensor_from_contents(tensor: Any) -> Tensor:
    name, datatype, shape, parameters = _checked_header(tensor)
    entry = _CONTENTS.get(datatype)
    if entry is None:
        raise InvalidInput(f"input '{name}' of datatype {datatype} can only be sent in raw_input_contents")
    field, wire_dtype = entry
    values = getattr(tensor.contents, field)
    count = element_count(shape)
    if len(values) != count:
        raise _miscounted(tensor, datatype, count, field, len(values))
    if datatype == "BYTES":
        data = np.empty(count, dtype=np.object_)
        data[:] = list(values)
        return Tensor(name, datatype, shape, data.reshape(shape), parameters)
    wide = np.asarray(values, dtype=wire_dtype)
    return Tensor(name, datatype, shape, _narrowed(name, wide, datatype).reshape(shape), parameters)


def _miscounted(tensor: Any, datatype: str, count: int, field: str, got: int) -> InvalidInput:
    """The refusal of contents that do not hold the shape's elements, saying where they should be."""
    message = (
        f"input '{tensor.name}' of shape {list(tensor.shape)} needs {count} element(s) in contents.{field}, got {got}"
    )
    filled = [descriptor.name for descriptor, _ in tensor.contents.ListFields() if descriptor.name != field]
    if filled and not got:
        message += (
            f"; the request filled contents.{filled[0]} instead: a {datatype} input's elements go in contents.{field}"
        )
    elif not got:
        message += "; or send its bytes in raw_input_contents"
    return InvalidInput(message)


def _narrowed(name: str, wide: np.ndarray, datatype: str) -> np.ndarray:
    """INT8/16 and UINT8/16 travel in 32-bit fields: check the range, then cast."""
    dtype = NUMPY_DTYPE[datatype]
    if dtype == wide.dtype:
        return wide
    limits = np.iinfo(dtype)
    if wide.size and (wide.min() < limits.min or wide.max() > limits.max):
        raise InvalidInput(f"input '{name}' has values outside the range of {datatype} [{limits.min}, {limits.max}]")
    return wide.astype(dtype)


# -- responses ------------------------------------------------------------------------------


def response_bytes(response: InferenceResponse) -> bytes:
    """The serialized ``ModelInferResponse`` of ``response``: every output in ``raw_output_contents``, no typed
    contents. The RPCs that answer it are registered without a serializer (``decoding.answers_bytes``).

    Output tensor parameters are not sent: the data plane fills them with the options the client
    asked for (``binary_data``, ``classification``), which mean nothing to a gRPC client.

    Written here (``response_wire``), not built as a message and serialized: the constructor given the outputs'
    messages and bytes costs 43k instructions, parsing these bytes into a message 12k and serializing it again
    9k more. The response's parameters (field 4) follow the other fields: a parser takes fields in any order.
    """
    wire = response_wire(response)
    if not response.parameters:
        return wire
    message = pb.ModelInferResponse()
    _set_parameters(message.parameters, response.parameters)
    parameters: bytes = message.SerializeToString()
    return wire + parameters


def stream_response_bytes(response: bytes) -> bytes:
    """A serialized ``ModelStreamInferResponse`` carrying the serialized ``ModelInferResponse`` ``response``."""
    return b"\x12" + _varint(len(response)) + response  # field 2, infer_response


def response_wire(response: InferenceResponse) -> bytes:
    """The wire form of ``response``'s ``ModelInferResponse`` without its parameters (fields 1, 2, 3, 5, 6).

    The fields before the tensors (model and version) and each output's header (name, datatype, shape) are the
    same from request to request of a version: they are written once and kept, up to ``_WIRE_CACHE`` of each.
    """
    outputs = response.outputs
    prefix = _PREFIXES.get((response.model_name, response.model_version))
    if prefix is None:
        prefix = _string_field(0x0A, response.model_name) + _string_field(0x12, response.model_version)
        _PREFIXES[response.model_name, response.model_version] = _kept(_PREFIXES, prefix)
    parts: list[bytes | memoryview] = [prefix]
    if response.id:
        parts.append(_string_field(0x1A, response.id))
    for tensor in outputs:
        key = (tensor.name, tensor.datatype, *tensor.shape)
        header = _HEADERS.get(key)
        if header is None:
            header = _HEADERS[key] = _kept(_HEADERS, _output_header_wire(tensor))
        parts.append(header)
    for tensor in outputs:
        if tensor.datatype == "BYTES":
            data: bytes | memoryview = array_to_bytes(tensor.data, "BYTES")
            size = len(data)
        else:  # its memory joined as it is: no bytes made of it first
            array = np.ascontiguousarray(tensor.data, NUMPY_DTYPE[tensor.datatype])
            data, size = array.data, array.nbytes
        parts.append(b"\x32" + _varint(size))
        parts.append(data)
    return b"".join(parts)


#: written fields kept per (model, version) and per output header; past this many, each cache starts again
_WIRE_CACHE = 1024
_PREFIXES: dict[tuple[str, str], bytes] = {}
_HEADERS: dict[tuple[object, ...], bytes] = {}
#: one-byte varints, the usual length of a name or a small tensor
_SMALL_VARINTS = [bytes((n,)) for n in range(0x80)]


def _kept(cache: dict[Any, bytes], value: bytes) -> bytes:
    if len(cache) >= _WIRE_CACHE:
        cache.clear()  # a client cycling through shapes cannot grow it without bound
    return value


def _varint(value: int) -> bytes:
    if value < 0x80:
        return _SMALL_VARINTS[value] if value >= 0 else _varint(value & 0xFFFFFFFFFFFFFFFF)  # int64 two's complement
    out = bytearray()
    while value >= 0x80:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def _string_field(tag: int, value: str) -> bytes:
    """A length-delimited field; empty: nothing (proto3 does not write a default value)."""
    if not value:
        return b""
    data = value.encode("utf-8")
    return bytes((tag,)) + _varint(len(data)) + data


def _output_header_wire(tensor: Tensor) -> bytes:
    """Field 5: an ``InferOutputTensor`` with the name, datatype and (packed) shape."""
    dims = b"".join(_varint(dim) for dim in tensor.shape)
    body = _string_field(0x0A, tensor.name) + _string_field(0x12, tensor.datatype)
    if dims:
        body += b"\x1a" + _varint(len(dims)) + dims
    return b"\x2a" + _varint(len(body)) + body


def request_header(message: pb.ModelInferRequest) -> pb.ModelInferResponse:
    """An empty response naming the request's model, version and id (for stream errors)."""
    return pb.ModelInferResponse(model_name=message.model_name, model_version=message.model_version, id=message.id)


def tensor_metadata(specs: Sequence[Mapping[str, Any]]) -> list[pb.ModelMetadataResponse.TensorMetadata]:
    """Model-metadata tensors (``{"name", "datatype", "shape"}`` dicts) as messages."""
    return [
        pb.ModelMetadataResponse.TensorMetadata(name=s["name"], datatype=s["datatype"], shape=s["shape"]) for s in specs
    ]
