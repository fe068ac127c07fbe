"""A version's declared signature, enforced both ways: a request's inputs are checked before they queue, and
the model's outputs after it computed, before they reach a client.

Shared by the data plane (every request) and the warm-up (its generated or sample requests), so that a
warm-up request is held to what a client's is, and a model that answers outside its declaration fails its
warm-up with the reason a client would have been given.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING

import numpy as np

from dhow.core.datatypes import NUMPY_DTYPE, as_bytes, datatype_of
from dhow.core.errors import DhowError, InvalidInput, ModelFault, SignatureMismatch, too_many_rows
from dhow.core.model_config import TensorSpec
from dhow.core.types import InferenceRequest, RequestedOutput, Tensor

if TYPE_CHECKING:  # a version checks its batches' outputs with ``checked_output``: it imports this module
    from dhow.serving.model_version import ModelVersion

__all__ = ["checked_output", "response_outputs", "validate_inputs"]

log = logging.getLogger("dhow.dataplane")


def validate_inputs(model: ModelVersion, request: InferenceRequest) -> tuple[dict[str, np.ndarray], int]:
    """Check every input against the model's signature; return the arrays and the batch rows."""
    label = model.label
    arrays: dict[str, np.ndarray] = {}
    rows = 0
    batched = model.batched
    for tensor in request.inputs:
        spec = model.inputs.get(tensor.name)
        if spec is None:
            known = ", ".join(model.inputs)
            raise InvalidInput(f"{label} has no input '{tensor.name}'; its inputs are: {known}")
        if tensor.name in arrays:
            raise InvalidInput(f"input '{tensor.name}' is given twice")
        if tensor.datatype != spec.datatype:
            raise InvalidInput(f"input '{tensor.name}' of {label} must be {spec.datatype}, got {tensor.datatype}")
        shape = tuple(tensor.shape)
        if not fits(spec.shape, shape):
            raise InvalidInput(
                f"input '{tensor.name}' of {label} must have shape {list(spec.shape)} (-1: any size), got {list(shape)}"
            )
        if tensor.data.shape != shape:
            raise InvalidInput(
                f"input '{tensor.name}': data of shape {list(tensor.data.shape)} for shape {list(shape)}"
            )
        if batched:
            if rows and shape[0] != rows:
                raise InvalidInput(
                    f"all inputs must have the same batch size; '{tensor.name}' has {shape[0]}, not {rows}"
                )
            rows = shape[0]
            if rows < 1:
                raise InvalidInput(f"input '{tensor.name}' has an empty batch")
        arrays[tensor.name] = tensor.data
    # every input given (the usual request): none can be missing, nothing to look for
    missing = [name for name in model.required_inputs if name not in arrays] if len(arrays) < len(model.inputs) else ()
    if missing:
        raise InvalidInput(f"{label} needs input(s) {', '.join(missing)}, which the request lacks")
    if batched and rows > model.config.max_batch_size:
        raise too_many_rows(label, rows, model.config.max_batch_size)
    return arrays, rows


def fits(declared: tuple[int, ...], shape: tuple[int, ...]) -> bool:
    """Whether a shape is one the declared shape allows (-1: any size)."""
    if len(shape) != len(declared):
        return False
    # indexed, not zip(strict=True): 1.8k instructions a call against 4.9k, and every request makes three
    index = 0
    for want in declared:
        if want != shape[index] and want != -1:
            return False
        index += 1  # noqa: SIM113 (enumerate makes a tuple per dimension)
    return True


def response_outputs(
    model: ModelVersion,
    results: Mapping[str, np.ndarray],
    names: Sequence[str],
    wanted: list[RequestedOutput] | None,
) -> list[Tensor]:
    """The request's output tensors from its rows of the batch's outputs; those its version checks per batch
    (``ModelVersion.batch_checked``) were checked there, once for every request of the batch."""
    params = {o.name: o.parameters for o in wanted} if wanted is not None else {}
    outputs: list[Tensor] = []
    checked = model.batch_checked
    for name in names:
        array = results.get(name)
        if array is None:
            raise ModelFault(f"the model produced no output '{name}'")
        spec = model.outputs[name]
        if name not in checked:
            array = checked_output(model, spec, array)
        parameters = params.get(name, {})
        classes = parameters.get("classification")
        if classes:
            array = _classify(array, int(classes), model.config.max_batch_size > 0)
            outputs.append(Tensor(name, "BYTES", list(array.shape), array, parameters))
        else:
            outputs.append(Tensor(name, spec.datatype, list(array.shape), array, parameters))
    return outputs


def checked_output(model: ModelVersion, spec: TensorSpec, value: np.ndarray) -> np.ndarray:
    """The output as its declared datatype; ``SignatureMismatch`` when the model answered another shape, or a
    datatype that does not become the declared one without changing values (float to integer, text to numbers)."""
    array = np.asarray(value)
    shape = array.shape
    if not fits(spec.shape, shape):
        raise _mismatch(model, spec, f"shape {list(shape)}", str(list(spec.shape)))
    if spec.datatype == "BYTES":
        return _as_bytes(array)
    dtype = NUMPY_DTYPE[spec.datatype]
    if array.dtype == dtype:
        return array
    if array.dtype.kind in "biuf" and np.can_cast(array.dtype, dtype, casting="same_kind"):
        return array.astype(dtype)
    if array.dtype.kind == "O":  # Python numbers in an object array convert; anything else is not a number
        try:
            converted = array.astype(dtype)
        except (TypeError, ValueError):
            pass
        else:
            if np.array_equal(converted, array):
                return converted
    raise _mismatch(model, spec, f"datatype {_datatype_name(array)} ({array.dtype})", spec.datatype)


def _datatype_name(array: np.ndarray) -> str:
    try:
        return datatype_of(array)
    except DhowError:
        return str(array.dtype)


def _mismatch(model: ModelVersion, spec: TensorSpec, answered: str, declared: str) -> SignatureMismatch:
    message = (
        f"model '{model.name}' version {model.version} answered output '{spec.name}' with {answered}, but its "
        f"model.yaml declares {declared}; the model and its declaration disagree (fix the one that is wrong)"
    )
    log.error("%s", message)
    return SignatureMismatch(message)


def _as_bytes(array: np.ndarray) -> np.ndarray:
    if array.dtype.kind in ("U", "S") or (
        array.dtype.kind == "O" and array.size and not isinstance(array.flat[0], bytes)
    ):
        converted = np.empty(array.shape, dtype=np.object_)
        converted.reshape(-1)[:] = [as_bytes(x) for x in array.reshape(-1)]
        return converted
    return array


def _classify(array: np.ndarray, classes: int, batched: bool) -> np.ndarray:
    """Triton's classification extension: the top N as "value:index" strings."""
    scores = array.reshape(array.shape[0], -1) if batched else array.reshape(1, -1)
    top = np.argsort(-scores, axis=1, kind="stable")[:, :classes]
    result = np.empty(top.shape, dtype=np.object_)
    for row in range(top.shape[0]):
        for col, index in enumerate(top[row]):
            result[row, col] = f"{scores[row, index]:g}:{index}".encode()
    return result if batched else result.reshape(-1)
