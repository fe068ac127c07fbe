"""Parse and validate ``model.yaml`` into a ``ModelConfig``.

Every refusal names the file, the field and what was expected, so that a user can fix a
manifest without reading dhow's source.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from dhow.core.datatypes import DATATYPES
from dhow.core.model_config import (
    DEFAULT_TENANT,
    RUNTIME_NAMES,
    BatchingConfig,
    InstanceConfig,
    ModelConfig,
    TensorSpec,
    VersionPolicy,
    WarmupConfig,
)
from dhow.core.spelling import did_you_mean
from dhow.repository.manifest_fields import Fields as _Fields
from dhow.repository.manifest_fields import ManifestError as ManifestError
from dhow.repository.manifest_fields import is_fraction as _is_fraction
from dhow.repository.manifest_fields import is_int as _is_int
from dhow.repository.manifest_fields import is_name as _is_name
from dhow.repository.manifest_fields import is_number as _is_number
from dhow.repository.monitoring_manifest import parse_monitoring

MANIFEST = "model.yaml"


def _non_negative_int(value: object) -> bool:
    return _is_int(value) and value >= 0  # type: ignore[operator]


def _positive_int(value: object) -> bool:
    return _is_int(value) and value > 0  # type: ignore[operator]


def _is_str(value: object) -> bool:
    return isinstance(value, str)


def _string_map(value: object) -> bool:
    return isinstance(value, dict) and all(map(_is_str, value.values()))


def _int_list(value: object) -> bool:
    return isinstance(value, list) and all(_positive_int(v) for v in value)


def _shape(value: object) -> bool:
    return isinstance(value, list) and all(_is_int(v) and (v == -1 or v > 0) for v in value)


def _tensors(path: Path | str, key: str, raw: object, batched: bool) -> tuple[TensorSpec, ...]:
    if not isinstance(raw, list) or not raw:
        raise ManifestError(path, key, "a non-empty list of {name, datatype, shape}", raw)
    specs: list[TensorSpec] = []
    for index, item in enumerate(raw):
        fields = _Fields(path, f"{key}[{index}]", item)
        name = fields.require("name", lambda v: isinstance(v, str) and bool(v), "a non-empty string")
        datatype = fields.require("datatype", lambda v: v in DATATYPES, f"one of {', '.join(sorted(DATATYPES))}")
        shape = fields.require("shape", _shape, "a list of dimensions, each a positive integer or -1")
        optional = fields.get("optional", lambda v: isinstance(v, bool), "true or false", False)
        fields.finish("name, datatype, shape, optional")
        if batched and (not shape or shape[0] != -1):
            raise ManifestError(
                path, f"{key}[{index}].shape", "the batch dimension first, as -1, because max_batch_size > 0", shape
            )
        if name in {s.name for s in specs}:
            raise ManifestError(path, f"{key}[{index}].name", "a name not used twice", name)
        specs.append(TensorSpec(name, datatype, tuple(shape), optional))
    return tuple(specs)


def _version_policy(path: Path | str, raw: object) -> VersionPolicy:
    if raw is None:
        return VersionPolicy()
    fields = _Fields(path, "version_policy", raw)
    latest = fields.get("latest", _positive_int, "a positive integer")
    every = fields.get("all", lambda v: v is True, "true")
    specific = fields.get("specific", lambda v: _int_list(v) and bool(v), "a non-empty list of version numbers")
    fields.finish("latest, all, specific")
    if sum(x is not None for x in (latest, every, specific)) != 1:
        raise ManifestError(path, "version_policy", "exactly one of {latest: N}, {all: true}, {specific: [..]}", raw)
    if every:
        return VersionPolicy(latest=None, all=True)
    if specific:
        return VersionPolicy(latest=None, specific=tuple(specific))
    return VersionPolicy(latest=latest)


def _batching(path: Path | str, raw: object, max_batch_size: int) -> BatchingConfig | None:
    if raw is False or (raw is None and max_batch_size == 0):
        return None
    if raw is None or raw is True:
        return BatchingConfig()
    fields = _Fields(path, "batching", raw)
    delay = fields.get("max_queue_delay_ms", lambda v: _is_number(v) and v >= 0, "a number >= 0", 0.0)  # type: ignore[operator]
    preferred = fields.get("preferred_batch_sizes", _int_list, "a list of positive integers", [])
    queue = fields.get("max_queue_size", _non_negative_int, "an integer >= 0", 0)
    timeout = fields.get("timeout_ms", lambda v: _is_number(v) and v >= 0, "a number >= 0", 0.0)  # type: ignore[operator]
    fields.finish("max_queue_delay_ms, preferred_batch_sizes, max_queue_size, timeout_ms")
    if max_batch_size == 0:
        raise ManifestError(path, "batching", "no batching block when max_batch_size is 0 (the model does not batch)")
    if any(size > max_batch_size for size in preferred):
        raise ManifestError(
            path, "batching.preferred_batch_sizes", f"sizes <= max_batch_size ({max_batch_size})", preferred
        )
    return BatchingConfig(float(delay), tuple(sorted(preferred)), queue, float(timeout))


def _instances(path: Path | str, raw: object) -> InstanceConfig:
    if raw is None:
        return InstanceConfig()
    fields = _Fields(path, "instances", raw)
    count = fields.get("count", _positive_int, "a positive integer", 1)
    kind = fields.get("kind", lambda v: v in ("thread", "process", "gpu"), "one of thread, process, gpu", "thread")
    fields.finish("count, kind")
    return InstanceConfig(count, kind)


def _warmup(path: Path | str, raw: object, inputs: tuple[TensorSpec, ...] | None) -> WarmupConfig | None:
    """The ``warmup:`` section; sample data is checked against the inputs when the version loads (an ONNX
    manifest may leave its inputs to the artifact), names and generated datatypes here when declared."""
    if raw is None:
        return None
    fields = _Fields(path, "warmup", raw)
    requests = fields.get("requests", _positive_int, "a positive integer (runs of each request per instance)", 1)
    value = fields.get("value", _is_number, "a number (every element of a generated request)", 0)
    samples = fields.get("samples", _samples, "a non-empty list of requests, each a mapping of input name to data")
    fields.finish("requests, value, samples")
    for index, sample in enumerate(samples or ()):
        _check_sample(path, f"warmup.samples[{index}]", sample, inputs)
    if not samples:
        for spec in inputs or ():
            if spec.datatype == "BYTES" and not spec.optional:
                why = f"input '{spec.name}' is BYTES (no value to generate)"
                raise ManifestError(path, "warmup.samples", f"sample requests, because {why}")
    return WarmupConfig(requests, float(value), tuple(samples or ()))


def _samples(value: object) -> bool:
    return (
        isinstance(value, list)
        and bool(value)
        and all(isinstance(item, dict) and item and all(map(_is_str, item)) for item in value)
    )


def _check_sample(path: Path | str, key: str, sample: dict[str, Any], inputs: tuple[TensorSpec, ...] | None) -> None:
    if inputs is None:
        return
    declared = {spec.name for spec in inputs}
    for name in sample:
        if name not in declared:
            raise ManifestError(path, f"{key}.{name}", f"a declared input ({', '.join(sorted(declared))})")
    missing = [spec.name for spec in inputs if not spec.optional and spec.name not in sample]
    if missing:
        raise ManifestError(path, key, f"data for every input; it lacks {', '.join(missing)}")


def _device(value: object) -> bool:
    if not isinstance(value, str):
        return False
    return value in ("cpu", "cuda") or (value.startswith("cuda:") and value[5:].isdigit())


def parse_manifest(data: object, path: Path | str, name: str) -> ModelConfig:
    """Validate manifest data already read from YAML (or JSON) into a ``ModelConfig``."""
    if data is None:
        data = {}
    fields = _Fields(path, "", data)
    runtime = fields.require("runtime", lambda v: v in RUNTIME_NAMES, f"one of {', '.join(RUNTIME_NAMES)}")
    max_batch_size = fields.get("max_batch_size", _non_negative_int, "an integer >= 0 (0 = no batching)", 0)
    batched = max_batch_size > 0
    raw_inputs = fields.get("inputs", lambda v: True, "")
    raw_outputs = fields.get("outputs", lambda v: True, "")
    inputs = None if raw_inputs is None else _tensors(path, "inputs", raw_inputs, batched)
    outputs = None if raw_outputs is None else _tensors(path, "outputs", raw_outputs, batched)
    if runtime != "onnx" and (inputs is None or outputs is None):
        missing = "inputs" if inputs is None else "outputs"
        raise ManifestError(path, missing, f"a list of tensors (only onnx models may leave {missing} out)")
    labels = fields.get(
        "labels", lambda v: isinstance(v, dict) and all(map(_is_str, v.values())), "a mapping of strings", {}
    )
    config = ModelConfig(
        name=name,
        runtime=runtime,
        inputs=inputs,
        outputs=outputs,
        max_batch_size=max_batch_size,
        version_policy=_version_policy(path, fields.get("version_policy", lambda v: True, "")),
        batching=_batching(path, fields.get("batching", lambda v: True, ""), max_batch_size),
        instances=_instances(path, fields.get("instances", lambda v: True, "")),
        device=fields.get("device", _device, "cpu, cuda or cuda:N", "cpu"),
        precision=fields.get("precision", lambda v: v in ("fp32", "fp16", "bf16"), "one of fp32, fp16, bf16", "fp32"),
        threads=fields.get("threads", _non_negative_int, "an integer >= 0 (0 = sized to the cores)", 0),
        owner=fields.get("owner", _is_str, "a string", ""),
        tenant=fields.get("tenant", _is_name, "a tenant name (letters, digits, '.', '_', '-')", DEFAULT_TENANT),
        region=fields.get("region", _is_str, "a string", ""),
        pii=fields.get("pii", lambda v: isinstance(v, dict), "a mapping (detectors, action, fields)", None),
        payload_sample_rate=fields.get("payload_sample_rate", _is_fraction, "a number from 0 to 1", 0.0),
        payload_log=fields.get("payload_log", lambda v: isinstance(v, bool), "true or false", True),
        description=fields.get("description", _is_str, "a string", ""),
        labels={str(k): v for k, v in labels.items()},
        parameters=_parameters(path, runtime, fields.get("parameters", lambda v: isinstance(v, dict), "a mapping", {})),
        warmup=_warmup(path, fields.get("warmup", lambda v: True, ""), inputs),
        monitoring=parse_monitoring(path, fields.get("monitoring", lambda v: True, "")),
    )
    fields.finish(
        "runtime, inputs, outputs, max_batch_size, version_policy, batching, instances, device, precision, "
        "threads, owner, tenant, region, pii, payload_sample_rate, payload_log, description, labels, parameters, "
        "warmup, monitoring"
    )
    return config


#: the ``parameters`` each runtime reads (their values are checked when it loads); any other key is a typo
RUNTIME_PARAMETERS: dict[str, tuple[str, ...]] = {
    "onnx": ("allow_spinning",),
    "torch": (),
    "sklearn": (),
    "xgboost": ("output_margin",),
    "lightgbm": ("raw_score",),
    "python": ("class",),
}


def _parameters(path: Path | str, runtime: str, parameters: dict[str, Any]) -> dict[str, Any]:
    known = RUNTIME_PARAMETERS.get(runtime, ())
    for key in parameters:
        if key not in known:
            expected = f"one of {', '.join(known)}" if known else "none (it takes no parameters)"
            hint = did_you_mean(key, known)
            expected += f"; {hint}" if hint else ""
            raise ManifestError(path, f"parameters.{key}", f"a parameter of the {runtime} runtime: {expected}")
    return parameters


def read_manifest(model_dir: Path) -> ModelConfig:
    """Read ``<model_dir>/model.yaml``; the model's name is its folder's name."""
    return parse_manifest(read_manifest_data(model_dir), Path(model_dir.name) / MANIFEST, model_dir.name)


def read_manifest_data(model_dir: Path) -> dict[str, Any]:
    """``<model_dir>/model.yaml`` as read, a mapping not yet validated (what a load's config is merged over)."""
    path = model_dir / MANIFEST
    # refusals name the file as the repository knows it (<model>/model.yaml): they reach clients
    where = Path(model_dir.name) / MANIFEST
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ManifestError(where, "", "a model.yaml file in every model folder") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ManifestError(where, "", f"valid YAML ({exc})".replace("\n", " ")) from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ManifestError(where, "", "a mapping", data)
    return data
