"""Bodies of TensorFlow Serving's REST API, which KServe's v1 protocol shares: predict in row format
(``instances``) and columnar format (``inputs``), classify and regress (``examples``), model status and metadata.

A model's inputs are matched by name: an instance (or an example) is an object keyed by input name, and a model
with one input also takes the value itself. A value's nesting gives its shape (the first element of each level,
as TensorFlow Serving reads it); its datatype is the model's. BYTES values are strings, or ``{"b64": "..."}`` for
binary data, which is how BYTES outputs that are not UTF-8, or whose name ends in ``_bytes``, come back.
"""

from __future__ import annotations

import base64
import binascii
import math
from typing import Any, Literal

import numpy as np

from dhow.core.errors import InvalidInput
from dhow.core.model_config import TensorSpec
from dhow.core.types import InferenceResponse, RequestedOutput, Tensor
from dhow.core.wire.tensors import array_from_json

__all__ = [
    "Format",
    "Specs",
    "check_signature",
    "classify_results",
    "columnar_outputs",
    "columnar_tensors",
    "example_instances",
    "instance_ranks",
    "model_signature",
    "model_status",
    "predictions",
    "regress_results",
    "row_tensors",
    "rows",
    "scores_output",
    "unsqueezed",
    "value_output",
]

#: the model's inputs (or outputs) as it declares them: name, datatype, shape (-1: any size)
Specs = list[TensorSpec]
#: how the request sent its inputs, which is how the answer sends the outputs
Format = Literal["row", "columnar"]

_FLOATS = ("FP16", "FP32", "FP64")
#: TensorFlow's names of the datatypes, for the model metadata
_TF_DTYPES = {
    "BOOL": "DT_BOOL", "UINT8": "DT_UINT8", "UINT16": "DT_UINT16", "UINT32": "DT_UINT32", "UINT64": "DT_UINT64",
    "INT8": "DT_INT8", "INT16": "DT_INT16", "INT32": "DT_INT32", "INT64": "DT_INT64", "FP16": "DT_HALF",
    "FP32": "DT_FLOAT", "FP64": "DT_DOUBLE", "BYTES": "DT_STRING",
}  # fmt: skip
#: the repository index's states, as TensorFlow Serving's ModelVersionStatus names them
_STATES = {"READY": "AVAILABLE", "LOADING": "LOADING", "UNAVAILABLE": "END"}


def check_signature(value: Any, accepted: tuple[str, ...]) -> None:
    """A dhow model has one signature, TensorFlow Serving's default; a request may name it (or not)."""
    if value is None or value in accepted:
        return
    raise InvalidInput(
        f"signature_name {value!r} is unknown: a dhow model has one signature, {' or '.join(map(repr, accepted))}; "
        "leave signature_name out or send that"
    )


# -- inputs -------------------------------------------------------------------------------------


def row_tensors(instances: Any, specs: Specs, booleans_possible: bool = True) -> list[Tensor]:
    """The inputs of ``{"instances": [...]}``: each instance is one row (of every input)."""
    if not isinstance(instances, list) or not instances:
        raise InvalidInput(f"'instances' must be a non-empty list (one item per row), got {_kind(instances)}")
    if not _is_named(instances[0]):
        if len(specs) != 1:
            raise InvalidInput(
                f"'instances' is a list of values, but the model takes {len(specs)} inputs ({_names(specs)}): "
                "send each instance as an object keyed by input name"
            )
        return [_tensor(instances, specs[0], "instances", booleans_possible)]
    columns: dict[str, list[Any]] = {}
    by_name = {spec.name: spec for spec in specs}
    for index, instance in enumerate(instances):
        if not _is_named(instance) or not set(instance) <= set(by_name):
            raise InvalidInput(
                f"instances[{index}] must be an object keyed by the model's input names ({_names(specs)}), "
                f"like instances[0]; got {_kind(instance)}"
            )
        if index and set(instance) != set(columns):
            raise InvalidInput(f"instances[{index}] has the inputs {sorted(instance)}, instances[0] {sorted(columns)}")
        for name, value in instance.items():
            columns.setdefault(name, []).append(value)
    return [_tensor(values, by_name[name], f"input '{name}'", booleans_possible) for name, values in columns.items()]


def columnar_tensors(inputs: Any, specs: Specs, booleans_possible: bool = True) -> list[Tensor]:
    """The inputs of ``{"inputs": ...}``: the whole tensor of each input (an object by name, or one value)."""
    if not _is_named(inputs):
        if len(specs) != 1:
            raise InvalidInput(
                f"'inputs' is a single value, but the model takes {len(specs)} inputs ({_names(specs)}): "
                "send an object keyed by input name"
            )
        return [_tensor(inputs, specs[0], "inputs", booleans_possible)]
    by_name = {spec.name: spec for spec in specs}
    unknown = sorted(set(inputs) - set(by_name))
    if unknown:
        raise InvalidInput(f"'inputs' names {unknown[0]!r}, which is not an input of the model ({_names(specs)})")
    return [_tensor(value, by_name[name], f"input '{name}'", booleans_possible) for name, value in inputs.items()]


def example_instances(document: dict[str, Any]) -> list[dict[str, Any]]:
    """The instances of a classify or regress request: its ``examples``, each with the ``context`` added."""
    examples = document.get("examples")
    if not isinstance(examples, list) or not examples:
        raise InvalidInput(f"'examples' must be a non-empty list of objects keyed by input name, got {_kind(examples)}")
    context = document.get("context") or {}
    if not isinstance(context, dict):
        raise InvalidInput(f"'context' must be an object keyed by input name, got {_kind(context)}")
    instances = []
    for index, example in enumerate(examples):
        if not isinstance(example, dict):
            raise InvalidInput(f"examples[{index}] must be an object keyed by input name, got {_kind(example)}")
        shared = set(example) & set(context)
        if shared:
            raise InvalidInput(f"examples[{index}] repeats {sorted(shared)[0]!r}, which 'context' already gives")
        instances.append({**context, **example})
    return instances


def _tensor(value: Any, spec: TensorSpec, label: str, booleans_possible: bool) -> Tensor:
    datatype, name = spec.datatype, spec.name
    shape = _nested_shape(value)
    data = value if isinstance(value, list) else [value]
    if datatype != "BYTES":
        array = array_from_json(data, datatype, shape, label, booleans_possible=booleans_possible)
    else:
        flat = _flat_bytes(data, label)
        if len(flat) != math.prod(shape):
            raise InvalidInput(f"{label}: the nested lists are ragged; every row must have the same length")
        array = np.empty(len(flat), dtype=np.object_)
        array[:] = flat
    shape = unsqueezed(shape, spec.shape)
    return Tensor(name, datatype, shape, array.reshape(shape))


def unsqueezed(shape: list[int], declared: tuple[int, ...]) -> list[int]:
    """The shape with the declared trailing dimensions of size 1 that the value left out (``["a", "b"]`` for an
    input of shape ``[-1, 1]``, as KServe v1 clients send text): a value does not have to nest them."""
    missing = declared[len(shape) :]
    if shape and missing and all(d == 1 for d in missing):
        return shape + [1] * len(missing)
    return shape


def instance_ranks(declared: tuple[int, ...]) -> tuple[int, int]:
    """The ranks one instance of an input may have: without its trailing dimensions of size 1, and with them."""
    full = max(len(declared) - 1, 0)
    squeezed = full
    while squeezed and declared[squeezed] == 1:
        squeezed -= 1
    return squeezed, full


def _nested_shape(value: Any) -> list[int]:
    shape: list[int] = []
    while isinstance(value, list):
        shape.append(len(value))
        if not value:
            break
        value = value[0]
    return shape


def _flat_bytes(data: list[Any], label: str) -> list[bytes]:
    flat: list[bytes] = []
    stack = [iter(data)]
    while stack:
        for item in stack[-1]:
            if isinstance(item, list):
                stack.append(iter(item))
                break
            flat.append(_bytes(item, label))
        else:
            stack.pop()
    return flat


def _bytes(item: Any, label: str) -> bytes:
    if isinstance(item, str):
        return item.encode("utf-8")
    if isinstance(item, dict) and set(item) == {"b64"} and isinstance(item["b64"], str):
        try:
            return base64.b64decode(item["b64"], validate=True)
        except (binascii.Error, ValueError):
            raise InvalidInput(f"{label}: {item['b64'][:40]!r} is not valid base64") from None
    raise InvalidInput(f'{label}: BYTES values must be strings or {{"b64": "<base64>"}}, got {_kind(item)}')


def _is_named(value: Any) -> bool:
    """An object of inputs, not a value (a ``{"b64": ...}`` object is a value)."""
    return isinstance(value, dict) and set(value) != {"b64"}


def _names(specs: Specs) -> str:
    return ", ".join(f"{s.name} ({s.datatype} {list(s.shape)})" for s in specs)


def _kind(value: Any) -> str:
    if value is None:
        return "nothing"
    if isinstance(value, list) and not value:
        return "an empty list"
    return {dict: "an object", list: "a list", str: "a string", bool: "a boolean"}.get(type(value), "a number")


# -- outputs ------------------------------------------------------------------------------------


def predictions(response: InferenceResponse) -> list[Any]:
    """Row format: one item per row, the value of the one output or an object of every output."""
    outputs = response.outputs
    if len(outputs) == 1:
        return _json_value(outputs[0])  # type: ignore[no-any-return]
    batch = {len(tensor.data) if tensor.data.ndim else 1 for tensor in outputs}
    if len(batch) != 1 or any(tensor.data.ndim == 0 for tensor in outputs):
        raise InvalidInput(
            f"model '{response.model_name}' answers outputs of different first dimensions, which the row format "
            'cannot hold; send the columnar format ({"inputs": ...}) to get them'
        )
    values = {tensor.name: _json_value(tensor) for tensor in outputs}
    return [{name: value[row] for name, value in values.items()} for row in range(batch.pop())]


def rows(response: InferenceResponse) -> list[Any]:
    """The answer's rows as :func:`predictions` gives them, each of its own (TorchServe answers one unwrapped)."""
    return list(predictions(response))


def columnar_outputs(response: InferenceResponse) -> Any:
    """Columnar format: the one output's value, or an object of every output."""
    if len(response.outputs) == 1:
        return _json_value(response.outputs[0])
    return {tensor.name: _json_value(tensor) for tensor in response.outputs}


def _json_value(tensor: Tensor) -> Any:
    """The output as orjson writes it: a numpy array (written natively), or nested strings for BYTES."""
    if tensor.datatype != "BYTES":
        return np.ascontiguousarray(tensor.data)
    binary = tensor.name.endswith("_bytes")
    flat = [_text(item, binary) for item in tensor.data.reshape(-1).tolist()]
    nested = np.empty(len(flat), dtype=np.object_)
    nested[:] = flat
    return nested.reshape(tensor.data.shape).tolist()


def _text(item: Any, binary: bool) -> Any:
    data = item if isinstance(item, bytes) else str(item).encode("utf-8")
    if not binary:
        try:
            return data.decode("utf-8")
        except UnicodeDecodeError:
            pass
    return {"b64": base64.b64encode(data).decode("ascii")}


def scores_output(model: str, outputs: Specs) -> RequestedOutput:
    """The output :classify reads: the one floating-point output of shape [-1, K], the scores of K classes."""
    found = [s for s in outputs if s.datatype in _FLOATS and len(s.shape) == 2]
    return _one(found, model, outputs, "classify", "floating-point output of shape [-1, K] (the scores of K classes)")


def value_output(model: str, outputs: Specs) -> RequestedOutput:
    """The output :regress reads: the one floating-point output of one value per example."""
    found = [s for s in outputs if s.datatype in _FLOATS and s.shape[1:] in ((), (1,))]
    return _one(found, model, outputs, "regress", "floating-point output of one value per example")


def _one(found: Specs, model: str, outputs: Specs, verb: str, wanted: str) -> RequestedOutput:
    if len(found) == 1:
        return RequestedOutput(found[0].name)
    which = "none" if not found else f"{len(found)} ({', '.join(s.name for s in found)})"
    raise InvalidInput(
        f"model '{model}' cannot answer :{verb}: it needs one {wanted}, and has {which} among its outputs "
        f"{_names(outputs)}; use :predict"
    )


def classify_results(response: InferenceResponse) -> list[list[list[Any]]]:
    """Each example's ``[label, score]`` pairs; the label is the class's index (dhow models carry no class names)."""
    scores = response.outputs[0].data.astype(np.float64)
    return [[[str(k), float(score)] for k, score in enumerate(row)] for row in scores.reshape(len(scores), -1)]


def regress_results(response: InferenceResponse) -> list[float]:
    return [float(value) for value in response.outputs[0].data.reshape(-1)]


# -- model status and metadata --------------------------------------------------------------------


def model_status(name: str, index: list[dict[str, Any]], ready: bool) -> dict[str, Any]:
    """TensorFlow Serving's GetModelStatus answer, with KServe v1's ``name`` and ``ready`` beside it."""
    versions = [
        {
            "version": row["version"] or "0",
            "state": _STATES.get(row["state"], "UNKNOWN"),
            "status": {
                "error_code": "OK" if row["state"] != "UNAVAILABLE" else "UNAVAILABLE",
                "error_message": row["reason"] if row["state"] == "UNAVAILABLE" else "",
            },
        }
        for row in index
    ]
    return {"name": name, "ready": ready, "model_version_status": versions}


def model_signature(metadata: dict[str, Any], version: str) -> dict[str, Any]:
    """TensorFlow Serving's GetModelMetadata answer: the model's one signature, ``serving_default``."""
    signature = {
        "inputs": {spec["name"]: _tensor_info(spec) for spec in metadata["inputs"]},
        "outputs": {spec["name"]: _tensor_info(spec) for spec in metadata["outputs"]},
        "method_name": "tensorflow/serving/predict",
    }
    return {
        "model_spec": {"name": metadata["name"], "signature_name": "", "version": version},
        "metadata": {"signature_def": {"signature_def": {"serving_default": signature}}},
    }


def _tensor_info(spec: dict[str, Any]) -> dict[str, Any]:
    return {
        "dtype": _TF_DTYPES.get(spec["datatype"], "DT_INVALID"),
        "tensor_shape": {"dim": [{"size": str(d), "name": ""} for d in spec["shape"]], "unknown_rank": False},
        "name": spec["name"],
    }
