"""A model's configuration in Triton's model-configuration JSON (model_config.proto), for
``GET …/config`` and gRPC ``ModelConfig``, which perf_analyzer and Triton clients read."""

from __future__ import annotations

from typing import Any

from dhow.core.datatypes import triton_type
from dhow.core.model_config import ModelConfig, TensorSpec

#: what Triton calls each runtime's platform (clients show it; perf_analyzer ignores it)
PLATFORMS: dict[str, str] = {
    "onnx": "onnxruntime_onnx",
    "torch": "pytorch_libtorch",
    "sklearn": "sklearn",
    "xgboost": "xgboost",
    "lightgbm": "lightgbm",
    "python": "python",
}


def _tensor(spec: TensorSpec, batched: bool) -> dict[str, Any]:
    dims = list(spec.shape[1:] if batched else spec.shape)
    entry: dict[str, Any] = {"name": spec.name, "data_type": triton_type(spec.datatype), "dims": dims}
    if spec.optional:
        entry["optional"] = True
    return entry


def _version_policy(config: ModelConfig) -> dict[str, Any]:
    policy = config.version_policy
    if policy.all:
        return {"all": {}}
    if policy.specific:
        return {"specific": {"versions": list(policy.specific)}}
    return {"latest": {"num_versions": policy.latest or 1}}


def triton_model_config(config: ModelConfig) -> dict[str, Any]:
    batched = config.max_batch_size > 0
    gpu = config.device.startswith("cuda")
    group: dict[str, Any] = {
        "name": f"{config.name}_0",
        "kind": "KIND_GPU" if gpu else "KIND_CPU",
        "count": config.instances.count,
    }
    if gpu:
        group["gpus"] = [int(config.device.partition(":")[2] or 0)]
    result: dict[str, Any] = {
        "name": config.name,
        "platform": PLATFORMS[config.runtime],
        "backend": config.runtime,
        "max_batch_size": config.max_batch_size,
        "input": [_tensor(s, batched) for s in config.inputs or ()],
        "output": [_tensor(s, batched) for s in config.outputs or ()],
        "version_policy": _version_policy(config),
        "instance_group": [group],
        "model_transaction_policy": {"decoupled": False},
        "response_cache": {"enable": False},
    }
    if config.batching is not None and batched:
        batching = config.batching
        dynamic: dict[str, Any] = {
            "preferred_batch_size": list(batching.preferred_batch_sizes),
            "max_queue_delay_microseconds": int(batching.max_queue_delay_ms * 1000),
        }
        if batching.max_queue_size or batching.timeout_ms:
            dynamic["default_queue_policy"] = {
                "max_queue_size": batching.max_queue_size,
                "default_timeout_microseconds": int(batching.timeout_ms * 1000),
            }
        result["dynamic_batching"] = dynamic
    return result
