"""What a message holds and what its reply holds (``--format``).

- ``v2-json``: an Open Inference Protocol request as JSON; the reply is the v2 response.
- ``v2-binary``: the same with the binary tensor extension: the JSON header's length is in the message header
  ``inference-header-content-length`` (as in the REST door's HTTP header); the reply's outputs are binary,
  its header length in the same message header.
- ``json``: one record ``{"<input name>": <one row>, …}``; the reply is ``{"<output name>": <one row>, …}``.

The v2 bodies are read and written by the same codec as the REST door's (``core.wire.v2``).

A poll's messages are decoded together (``decode_batch``): their rows stacked into few requests (``rows``), the
ones that cannot be answered set aside with the reason; the answers are encoded together (``encode_answered``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np
import orjson

from dhow.core.datatypes import NUMPY_DTYPE
from dhow.core.errors import DhowError, InvalidInput
from dhow.core.model_config import TensorSpec
from dhow.core.types import InferenceRequest, InferenceResponse, Tensor
from dhow.core.wire.json_refusals import json_refusal
from dhow.core.wire.tensors import array_from_json
from dhow.core.wire.v2 import decode_request, encode_response
from dhow.streaming.records import Header, Record
from dhow.streaming.rows import Answered, Stack, split_rows, stack_requests

__all__ = ["FORMATS", "HEADER_LENGTH", "Decoded", "Encoded", "MessageFormat", "message_format"]

#: the message header that carries the JSON header's length of a binary body
HEADER_LENGTH = "inference-header-content-length"

#: how a v2 message's sender gives the NaN and Infinity that JSON has not (a null is no number to a model either):
#: in its own message, whichever v2 format the consumer reads (both take binary tensors)
_V2_NON_FINITE = f"send non-finite values in binary tensors (the binary data extension, with an {HEADER_LENGTH} header)"
#: and a json message's: it cannot carry them; a consumer of a v2 format, the consumer's option, takes them
_JSON_NON_FINITE = (
    "a json message cannot carry non-finite values: a consumer run with --format v2-binary (or v2-json, in binary "
    "tensors) takes them"
)


@dataclass(slots=True)
class Decoded:
    """A poll's messages decoded: the stacks to send, the messages refused (by index) and, where a format keeps
    them, each message's own request (its id and options shape its reply)."""

    stacks: list[Stack] = field(default_factory=list)
    errors: dict[int, DhowError] = field(default_factory=dict)
    requests: dict[int, InferenceRequest] = field(default_factory=dict)


#: a reply: the message's index in the poll, its body, the headers it needs, its request's id
Encoded = tuple[int, bytes, list[Header], str]


class MessageFormat(Protocol):
    def decode(self, record: Record, model: str, version: str, inputs: Sequence[TensorSpec]) -> InferenceRequest:
        """The request a message holds (``InvalidInput`` saying what is wrong)."""
        ...

    def encode(self, request: InferenceRequest, response: InferenceResponse) -> tuple[bytes, list[Header]]:
        """The reply's body and the headers it needs (beside the ones every reply gets)."""
        ...

    def decode_batch(
        self, records: Sequence[Record], model: str, version: str, inputs: Sequence[TensorSpec], data_region: str
    ) -> Decoded:
        """A poll's messages, their rows stacked where they can be."""
        ...

    def encode_answered(self, decoded: Decoded, answered: Answered) -> list[Encoded]:
        """The replies to the messages of an answered stack."""
        ...


def _decode_each(
    fmt: MessageFormat,
    records: Sequence[Record],
    indices: Sequence[int],
    model: str,
    version: str,
    inputs: Sequence[TensorSpec],
    data_region: str,
    decoded: Decoded,
) -> None:
    """Messages decoded one by one (each refusal with its own reason), their one-row requests stacked."""
    requests = {}
    for index in indices:
        try:
            request = fmt.decode(records[index], model, version, inputs)
        except DhowError as exc:
            decoded.errors[index] = exc
            continue
        if data_region:
            request.parameters.setdefault("data_region", data_region)
        requests[index] = request
    decoded.requests.update(requests)
    decoded.stacks.extend(stack_requests(requests))


class V2Json:
    binary = False

    def decode(self, record: Record, model: str, version: str, inputs: Sequence[TensorSpec]) -> InferenceRequest:
        return decode_request(record.value, model, version, self._header_length(record), _V2_NON_FINITE)

    def encode(self, request: InferenceRequest, response: InferenceResponse) -> tuple[bytes, list[Header]]:
        body, header_length = encode_response(response, request)
        return body, [] if header_length is None else [(HEADER_LENGTH, str(header_length).encode())]

    def decode_batch(
        self, records: Sequence[Record], model: str, version: str, inputs: Sequence[TensorSpec], data_region: str
    ) -> Decoded:
        """Plain one-row JSON requests (named inputs with datatype, shape and data, nothing else) grouped by
        signature and each group's data decoded in one pass; any other message by the REST codec, alone."""
        decoded = Decoded()
        groups: dict[Any, list[tuple[int, dict[str, Any]]]] = {}
        others: list[int] = []
        for index, record in enumerate(records):
            found = None if self.binary or record.header(HEADER_LENGTH) is not None else _plain_request(record.value)
            if found is None:
                others.append(index)
            else:
                groups.setdefault(found[0], []).append((index, found[1]))
        for signature, members in groups.items():
            if not _stack_plain(signature, members, model, version, data_region, decoded):
                others.extend(index for index, _ in members)
        if others:
            _decode_each(self, records, sorted(others), model, version, inputs, data_region, decoded)
        return decoded

    def encode_answered(self, decoded: Decoded, answered: Answered) -> list[Encoded]:
        requests = [decoded.requests[index] for index in answered.indices]
        bodies = None if answered.whole else _v2_json_rows(answered.response, requests)
        if bodies is not None:
            return [(i, body, [], r.id) for i, body, r in zip(answered.indices, bodies, requests, strict=True)]
        replies = []
        for index, request, response in zip(
            answered.indices, requests, split_rows(answered, [r.id for r in requests]), strict=True
        ):
            body, headers = self.encode(request, response)
            replies.append((index, body, headers, request.id))
        return replies

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
            raise InvalidInput(f"malformed JSON: {json_refusal(exc, _JSON_NON_FINITE)}") from None
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

    def decode_batch(
        self, records: Sequence[Record], model: str, version: str, inputs: Sequence[TensorSpec], data_region: str
    ) -> Decoded:
        """The rows of every message that holds exactly the model's inputs, stacked in one pass; any other
        message (and all of them when the stacked rows do not fit the model) decoded alone, for its own reason."""
        decoded = Decoded()
        names = {spec.name for spec in inputs}
        batched = bool(inputs) and all(
            spec.shape and spec.shape[0] == -1 and spec.datatype != "BYTES" for spec in inputs
        )
        rows: list[dict[str, Any]] = []
        indices: list[int] = []
        values: list[bytes] = []
        others: list[int] = []
        loads = orjson.loads
        for index, record in enumerate(records):
            try:
                document = loads(record.value) if batched else None
            except orjson.JSONDecodeError:
                document = None
            if type(document) is dict and document.keys() == names:
                rows.append(document)
                indices.append(index)
                values.append(record.value)
            else:
                others.append(index)
        stacked = _stacked_rows(rows, inputs, _booleans_possible(values, names)) if rows else None
        if stacked is None:
            others = sorted(others + indices)
        else:
            parameters = {"data_region": data_region} if data_region else {}
            decoded.stacks.append(Stack(InferenceRequest(model, stacked, version, parameters=parameters), indices))
        if others:
            _decode_each(self, records, others, model, version, inputs, data_region, decoded)
        return decoded

    def encode_answered(self, decoded: Decoded, answered: Answered) -> list[Encoded]:
        if answered.whole:  # the request is not needed: a reply is the response's outputs
            row = {tensor.name: _one_row(tensor.data) for tensor in answered.response.outputs}
            return [
                (answered.indices[0], orjson.dumps(row, option=orjson.OPT_SERIALIZE_NUMPY, default=_default), [], "")
            ]
        rows = len(answered.indices)
        columns = [_json_rows(t.name, t.data, rows) for t in answered.response.outputs]
        if all(column is not None for column in columns):  # each output's rows as JSON in one call: joined
            bodies = [b"{" + b",".join(parts) + b"}" for parts in zip(*columns, strict=True)]
            return [(index, body, [], "") for index, body in zip(answered.indices, bodies, strict=True)]
        outputs = [(t.name, _rows_of(t.data)) for t in answered.response.outputs]
        dumps, option = orjson.dumps, orjson.OPT_SERIALIZE_NUMPY
        return [
            (index, dumps({name: rows[j] for name, rows in outputs}, option=option, default=_default), [], "")
            for j, index in enumerate(answered.indices)
        ]


def _stacked_rows(rows: list[dict[str, Any]], inputs: Sequence[TensorSpec], booleans: bool) -> list[Tensor] | None:
    """Each input's rows as one tensor; None when a row does not fit (ragged, another shape, a wrong type)."""
    tensors = []
    for spec in inputs:
        values = [row[spec.name] for row in rows]
        shape = [len(values), *_bytes_shape(values[0])]
        if len(shape) != len(spec.shape) or any(
            d not in (-1, s) for d, s in zip(spec.shape[1:], shape[1:], strict=True)
        ):
            return None
        try:
            data = array_from_json(values, spec.datatype, shape, spec.name, booleans_possible=booleans)
        except InvalidInput:
            return None
        tensors.append(Tensor(spec.name, spec.datatype, shape, data))
    return tensors


def _booleans_possible(values: list[bytes], names: set[str]) -> bool:
    """Whether a JSON ``true`` or ``false`` may be among the values of messages that are objects with exactly the
    keys ``names`` (numpy would read it as 1 or 0 without a word), from two byte counts over all of them instead
    of two searches in each.

    Every such message holds each name's ``u`` and ``l`` at least once; a ``\\u`` escape in a key writes one more
    ``u`` (and may hide an ``l``), a key written twice more of both, and numbers and JSON's punctuation none. So
    when the counts are exactly the names', there is no ``true``, ``false`` or ``null`` in the values; otherwise
    the values' types are looked at (``array_from_json``)."""
    # counted by numpy: a compare and a count per letter over the bytes, 4x fewer instructions than bytes.count's
    codes = np.frombuffer(b"".join(values), np.uint8)
    keys = "".join(names).encode()
    count = len(values)
    return any(int(np.count_nonzero(codes == ord(letter))) != keys.count(letter) * count for letter in (b"u", b"l"))


def _json_rows(name: str, array: np.ndarray, rows: int) -> list[bytes] | None:
    """``"<name>":<row>`` of each row of a numeric output, from one serialization of the whole output (its rows
    cut at the top level's separators); None where that cannot be done (text, an empty dimension, no rows)."""
    if array.dtype.kind not in "biuf" or array.ndim == 0 or array.shape[0] != rows or 0 in array.shape:
        return None
    text = orjson.dumps(array, option=orjson.OPT_SERIALIZE_NUMPY)
    depth = array.ndim - 1
    cut = b"]" * depth + b"," + b"[" * depth
    parts = text[1 + depth : len(text) - 1 - depth].split(cut)
    if len(parts) != rows:
        return None
    key = orjson.dumps(name) + b":" + b"[" * depth
    end = b"]" * depth
    return [key + part + end for part in parts]


_PLAIN_INPUT = frozenset({"name", "datatype", "shape", "data"})


def _plain_request(value: bytes) -> tuple[Any, dict[str, Any]] | None:
    """(signature, document) of a one-row v2 JSON request with nothing but inputs (name, datatype, shape [1, …],
    data), an id and plain parameters; None for any other message (the REST codec decodes it, for its reason)."""
    try:
        document = orjson.loads(value)
    except orjson.JSONDecodeError:
        return None
    if type(document) is not dict or not document.keys() <= {"inputs", "id", "parameters"}:
        return None
    raw, request_id, parameters = document.get("inputs"), document.get("id", ""), document.get("parameters") or {}
    if type(raw) is not list or not raw or type(request_id) is not str or type(parameters) is not dict:
        return None
    signature = []
    for tensor in raw:
        if type(tensor) is not dict or tensor.keys() != _PLAIN_INPUT or type(tensor["data"]) is not list:
            return None
        name, datatype, shape = tensor["name"], tensor["datatype"], tensor["shape"]
        if type(name) is not str or datatype not in NUMPY_DTYPE or datatype == "BYTES" or type(shape) is not list:
            return None
        if not shape or shape[0] != 1 or not all(type(d) is int and d > 0 for d in shape):
            return None
        signature.append((name, datatype, tuple(shape)))
    try:
        key = (tuple(signature), tuple(sorted(parameters.items())), b"true" in value or b"false" in value)
        hash(key)
    except TypeError:
        return None
    return key, document


def _stack_plain(
    signature: Any, members: list[tuple[int, dict[str, Any]]], model: str, version: str, data_region: str,
    decoded: Decoded,
) -> bool:  # fmt: skip
    """The group's rows as one stack (and each member's own request, for its reply); False when the data does
    not fit (the members are then decoded alone, each for its own reason)."""
    tensors_of, parameters, booleans = signature
    rows = len(members)
    stacked = []
    for k, (name, datatype, shape) in enumerate(tensors_of):
        values = [document["inputs"][k]["data"] for _, document in members]
        try:
            data = array_from_json(values, datatype, [rows, *shape[1:]], f"input '{name}'", booleans_possible=booleans)
        except InvalidInput:
            return False
        stacked.append(Tensor(name, datatype, [rows, *shape[1:]], data))
    request_parameters = dict(parameters)
    if data_region:
        request_parameters.setdefault("data_region", data_region)
    for index, document in members:
        decoded.requests[index] = InferenceRequest(model, [], version, id=document.get("id", ""),
                                                   parameters=dict(request_parameters))  # fmt: skip
    decoded.stacks.append(Stack(InferenceRequest(model, stacked, version, parameters=request_parameters),
                                [index for index, _ in members]))  # fmt: skip
    return True


def _v2_json_rows(response: InferenceResponse, requests: list[InferenceRequest]) -> list[bytes] | None:
    """Each row's v2 response as ``encode_response`` writes it, from one serialization of each output (cut into
    rows); None where that cannot be done (binary outputs asked for, text, an empty dimension)."""
    rows = len(requests)
    first = requests[0]
    if first.parameters.get("binary_data_output") is True or first.outputs is not None:
        return None
    columns = []
    for tensor in response.outputs:
        if "binary_data" in tensor.parameters:
            return None
        parts = _json_rows(
            "", np.ascontiguousarray(tensor.data).reshape(rows, -1) if tensor.data.size else tensor.data, rows
        )
        if parts is None:
            return None
        head = b'{"name":%b,"datatype":%b,"shape":%b,"data":' % (
            orjson.dumps(tensor.name),
            orjson.dumps(tensor.datatype),
            orjson.dumps([1, *tensor.shape[1:]]),
        )
        columns.append([head + part[3:] + b"}" for part in parts])  # part: '"":[…]'
    head = b'{"model_name":%b,"model_version":%b' % (
        orjson.dumps(response.model_name),
        orjson.dumps(response.model_version),
    )
    tail = b""
    if response.parameters:
        tail = b',"parameters":' + orjson.dumps(
            response.parameters, default=_default, option=orjson.OPT_SERIALIZE_NUMPY
        )
    tail += b',"outputs":['
    return [
        head + (b',"id":' + orjson.dumps(request.id) if request.id else b"") + tail + b",".join(entries) + b"]}"
        for request, entries in zip(requests, zip(*columns, strict=True), strict=True)
    ]


def _rows_of(array: np.ndarray) -> list[Any]:
    """An output's rows as the json reply holds them."""
    if array.dtype == np.object_:
        if array.ndim == 1:  # its rows are the items themselves
            return [_text(item) for item in array.tolist()]
        return [[_text(item) for item in row.reshape(-1)] for row in array]
    if array.ndim == 1 and array.dtype.kind in "biu":  # exact as Python numbers, and in one call
        return list(array.tolist())
    return list(array)


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
    if not isinstance(row, np.ndarray | np.generic):  # the item of a one-dimensional BYTES output
        return _text(row)
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
