"""A version's declared signature, enforced: the inputs of a request are checked against it before they queue.

Shared by the data plane (every request) and the warm-up (its generated or sample requests), so that a
warm-up request is held to what a client's is.
"""

from __future__ import annotations

import numpy as np

from dhow.core.errors import InvalidInput
from dhow.core.types import InferenceRequest
from dhow.serving.model_version import ModelVersion

__all__ = ["validate_inputs"]


def validate_inputs(model: ModelVersion, request: InferenceRequest) -> tuple[dict[str, np.ndarray], int]:
    """Check every input against the model's signature; return the arrays and the batch rows."""
    label = f"model '{model.name}'"
    arrays: dict[str, np.ndarray] = {}
    rows = 0
    batched = model.config.max_batch_size > 0
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
        if len(shape) != len(spec.shape) or any(d != -1 and d != s for d, s in zip(spec.shape, shape, strict=True)):
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
    missing = [name for name, spec in model.inputs.items() if name not in arrays and not spec.optional]
    if missing:
        raise InvalidInput(f"{label} needs input(s) {', '.join(missing)}, which the request lacks")
    if batched and rows > model.config.max_batch_size:
        raise InvalidInput(f"batch of {rows} rows exceeds {label}'s max_batch_size of {model.config.max_batch_size}")
    return arrays, rows
