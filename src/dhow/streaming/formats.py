"""What a message holds and what its reply holds (``--format``).

- ``v2-json``: an Open Inference Protocol request as JSON; the reply is the v2 response.
- ``v2-binary``: the same with the binary tensor extension: the JSON header's length is in the message header
  ``inference-header-content-length`` (as in the REST door's HTTP header); the reply's outputs are binary,
  its header length in the same message header.
- ``json``: one record ``{"<input name>": <one row>, …}``; the reply is ``{"<output name>": <one row>, …}``.

The v2 bodies are read and written by the same codec as the REST door's (``core.wire.v2``).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Protocol

import numpy as np
import orjson

from dhow.core.errors import InvalidInput
from dhow.core.model_config import TensorSpec
from dhow.core.types import InferenceRequest, InferenceResponse, Tensor
from dhow.core.wire.tensors import array_from_json
from dhow.core.wire.v2 import decode_request, encode_response
from dhow.streaming.records import Header, Record

__all__ = ["FORMATS", "HEADER_LENGTH", "MessageFormat", "message_format"]

#: the message header that carries the JSON header's length of a binary body
HEADER_LENGTH = "inference-header-content-length"


class MessageFormat(Protocol):
    def decode(self, record: Record, model: str, version: str, inputs: Sequence[TensorSpec]) -> InferenceRequest:
        """The request a message holds (``InvalidInput`` saying what is wrong)."""
        ...

    def encode(self, request: InferenceRequest, response: InferenceResponse) -> tuple[bytes, list[Header]]:
        """The reply's body and the headers it needs (beside the ones every reply gets)."""
        ...


class V2Json:
    binary = False

    def decode(self, record: Record, model: str, version: str, inputs: Sequence[TensorSpec]) -> InferenceRequest:
        return decode_request(record.value, model, version, self._header_length(record))

    def encode(self, request: InferenceRequest, response: InferenceResponse) -> tuple[bytes, list[Header]]:
        body, header_length = encode_response(response, request)
        return body, [] if header_length is None else [(HEADER_LENGTH, str(header_length).encode())]

    def _header_length(self, record: Record) -> int | None:
        raw = record.header(HEADER_LENGTH)
        if raw is None:
            return None
        try:
            return int(raw)
        except ValueError:
            raise InvalidInput(f"message header {HEADER_LENGTH} must be a number of bytes, got {raw!r}") from None


class V2Binary(V2Json):
    """v2 with binary tensors: the replies' outputs are binary unless the request asks otherwise."""

    binary = True

    def decode(self, record: Record, model: str, version: str, inputs: Sequence[TensorSpec]) -> InferenceRequest:
        request = super().decode(record, model, version, inputs)
        request.parameters.setdefault("binary_data_output", True)
        return request


class JsonRecord:
    """``{"<input>": <one row>}`` in, ``{"<output>": <one row>}`` out: each message is one row of the model."""

    def decode(self, record: Record, model: str, version: str, inputs: Sequence[TensorSpec]) -> InferenceRequest:
        try:
            document = orjson.loads(record.value)
        except orjson.JSONDecodeError as exc:
            raise InvalidInput(f"malformed JSON: {exc}") from None
        if not isinstance(document, dict):
            raise InvalidInput('a json message must be an object {"<input name>": <one row>, ...}')
        names = [spec.name for spec in inputs]
        unknown = sorted(set(document) - set(names))
        if unknown:
            raise InvalidInput(f"model '{model}' has no input {unknown[0]!r}; its inputs are: {', '.join(names)}")
        tensors = []
        for spec in inputs:
            if spec.name not in document:
                if spec.optional:
                    continue
                raise InvalidInput(f"the record has no {spec.name!r}; model '{model}' needs: {', '.join(names)}")
            tensors.append(_row_tensor(spec, document[spec.name]))
        request_id = record.header("x-request-id")
        return InferenceRequest(model, tensors, version, id=request_id.decode(errors="replace") if request_id else "")

    def encode(self, request: InferenceRequest, response: InferenceResponse) -> tuple[bytes, list[Header]]:
        row = {tensor.name: _one_row(tensor.data) for tensor in response.outputs}
        return orjson.dumps(row, option=orjson.OPT_SERIALIZE_NUMPY, default=_default), []


def _row_tensor(spec: TensorSpec, value: Any) -> Tensor:
    """One row as a tensor of a batch of one (a model that batches), or as the whole tensor (one that does not)."""
    label = f"input '{spec.name}'"
    batched = bool(spec.shape) and spec.shape[0] == -1
    data = [value] if batched else value
    try:
        shape = list(np.shape(data)) if spec.datatype != "BYTES" else _bytes_shape(data)
    except ValueError:
        raise InvalidInput(f"{label}: a ragged nested list; rows must have equal lengths") from None
    if len(shape) != len(spec.shape):
        row = list(spec.shape[1:] if batched else spec.shape)
        raise InvalidInput(
            f"{label}: expected a row of shape {row}, got one of shape {shape[1:] if batched else shape}"
        )
    return Tensor(spec.name, spec.datatype, shape, array_from_json(data, spec.datatype, shape, label))


def _bytes_shape(data: Any) -> list[int]:
    shape: list[int] = []
    while isinstance(data, list):
        shape.append(len(data))
        data = data[0] if data else None
    return shape


def _one_row(array: np.ndarray) -> Any:
    row = array[0] if array.ndim and array.shape[0] == 1 else array
    if row.dtype == np.object_:
        return [_text(item) for item in row.reshape(-1)] if row.ndim else _text(row.item())
    return row


def _text(item: Any) -> Any:
    return item.decode(errors="replace") if isinstance(item, bytes) else item


def _default(value: Any) -> Any:
    if isinstance(value, np.ndarray | np.generic):
        return value.tolist()
    raise TypeError(f"cannot serialize {type(value).__name__}")


FORMATS: dict[str, MessageFormat] = {"v2-json": V2Json(), "v2-binary": V2Binary(), "json": JsonRecord()}


def message_format(name: str) -> MessageFormat:
    try:
        return FORMATS[name]
    except KeyError:
        raise InvalidInput(f"unknown --format {name!r}; expected one of {', '.join(FORMATS)}") from None
