"""Warm-up: the requests of ``model.yaml``'s ``warmup:`` run on every instance of a version before it is served.

It runs while the version loads (start, reload, a load through the API, the versions a deployment needs), so a
version is resolvable, and the server ready, only once it has answered them; a failure fails the load with
the reason. The requests go to the instances directly, not through the admission point: the version is not
served yet, the data is the server's own (nothing to authorize, audit or mask), and the model's statistics
stay those of its clients.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Mapping
from typing import Any

import numpy as np

from dhow.core.datatypes import NUMPY_DTYPE, as_bytes
from dhow.core.errors import DhowError, InvalidInput, ModelFault, ModelLoadError
from dhow.core.model_config import TensorSpec, WarmupConfig
from dhow.core.types import InferenceRequest, Tensor
from dhow.runtimes.base import Runtime
from dhow.serving.model_version import ModelVersion
from dhow.serving.signature import checked_output, validate_inputs

__all__ = ["warm"]

log = logging.getLogger("dhow.models")

Arrays = dict[str, np.ndarray]


async def warm(version: ModelVersion) -> None:
    """Run the version's warm-up requests on each of its instances; raises ``ModelLoadError`` saying why not."""
    warmup = version.config.warmup
    if warmup is None:
        return
    requests = warmup_requests(version, warmup)
    outputs = list(version.output_names)
    await asyncio.gather(*(_run(version, runtime, requests, outputs, warmup.requests) for runtime in version.runtimes))
    log.info(
        "model %s version %d warmed: %d request(s) x %d on %d instance(s)",
        version.name,
        version.version,
        len(requests),
        warmup.requests,
        len(version.runtimes),
    )


def warmup_requests(version: ModelVersion, warmup: WarmupConfig) -> list[Arrays]:
    """The warm-up's inputs, checked as a client's request would be: its samples, or one generated request."""
    if not warmup.samples:
        return [_checked(version, "warmup", _generated(version, warmup.value))]
    return [
        _checked(version, f"warmup.samples[{index}]", _sample(version, f"warmup.samples[{index}]", sample))
        for index, sample in enumerate(warmup.samples)
    ]


def _generated(version: ModelVersion, value: float) -> list[Tensor]:
    tensors = []
    for spec in version.inputs.values():
        if spec.optional:
            continue
        if spec.datatype == "BYTES":
            why = f"input '{spec.name}' is BYTES (no value to generate)"
            raise _manifest_error(version, "warmup.samples", f"sample requests, because {why}")
        shape = [1 if dim == -1 else dim for dim in spec.shape]
        tensors.append(Tensor(spec.name, spec.datatype, shape, np.full(shape, value, dtype=NUMPY_DTYPE[spec.datatype])))
    return tensors


def _sample(version: ModelVersion, field: str, sample: Mapping[str, Any]) -> list[Tensor]:
    tensors = []
    for name, data in sample.items():
        spec = version.inputs.get(name)
        if spec is None:
            known = ", ".join(version.inputs)
            raise _manifest_error(version, f"{field}.{name}", f"a name of the model's inputs ({known})")
        array = _array(version, f"{field}.{name}", spec, data)
        tensors.append(Tensor(name, spec.datatype, list(array.shape), array))
    return tensors


def _array(version: ModelVersion, field: str, spec: TensorSpec, data: object) -> np.ndarray:
    try:
        if spec.datatype != "BYTES":
            return np.asarray(data, dtype=NUMPY_DTYPE[spec.datatype])
        items = np.asarray(data, dtype=np.object_)
        array = np.empty(items.shape, dtype=np.object_)
        array.reshape(-1)[:] = [as_bytes(item) for item in items.reshape(-1)]
        return array
    except (TypeError, ValueError) as exc:
        raise _manifest_error(version, field, f"data of datatype {spec.datatype} ({exc})") from None


def _checked(version: ModelVersion, field: str, tensors: list[Tensor]) -> Arrays:
    try:
        arrays, _ = validate_inputs(version, InferenceRequest(version.name, tensors))
    except InvalidInput as exc:
        raise _manifest_error(version, field, f"a request the model accepts: {exc.message}") from None
    return arrays


async def _run(version: ModelVersion, runtime: Runtime, requests: list[Arrays], outputs: list[str], times: int) -> None:
    for index, inputs in enumerate(requests):
        for _ in range(times):
            try:
                results = await asyncio.to_thread(runtime.infer, inputs, outputs)
                for name in outputs:  # held to the declaration as a client's answer would be
                    if name not in results:
                        raise ModelFault(f"the model produced no output '{name}'")
                    checked_output(version, version.outputs[name], results[name])
            except DhowError as exc:
                raise _failed(version, index, exc.message) from None
            except Exception as exc:
                raise _failed(version, index, f"{type(exc).__name__}: {exc}") from None


def _failed(version: ModelVersion, index: int, reason: str) -> ModelLoadError:
    label = f"model '{version.name}' version {version.version}"
    return ModelLoadError(f"{label}: warm-up request {index + 1} failed: {reason}")


def _manifest_error(version: ModelVersion, field: str, expected: str) -> ModelLoadError:
    return ModelLoadError(f"{version.name}/model.yaml: field '{field}': expected {expected}")
