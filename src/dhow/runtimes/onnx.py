"""ONNX models with onnxruntime: the artifact declares its own inputs and outputs."""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime

from dhow.core.datatypes import NUMPY_DTYPE
from dhow.core.errors import ModelFault, ModelLoadError
from dhow.core.model_config import ModelConfig, TensorSpec
from dhow.runtimes.loading import (
    Signature,
    check_declared,
    check_rows,
    decrypted,
    default_threads,
    find_artifact,
    load_failure,
    threads_for,
)

__all__ = ["OnnxRuntime", "default_threads"]

log = logging.getLogger("dhow.runtimes.onnx")

#: ONNX tensor element types -> v2 datatypes
_DATATYPES: dict[str, str] = {
    "tensor(bool)": "BOOL",
    "tensor(uint8)": "UINT8",
    "tensor(uint16)": "UINT16",
    "tensor(uint32)": "UINT32",
    "tensor(uint64)": "UINT64",
    "tensor(int8)": "INT8",
    "tensor(int16)": "INT16",
    "tensor(int32)": "INT32",
    "tensor(int64)": "INT64",
    "tensor(float16)": "FP16",
    "tensor(float)": "FP32",
    "tensor(double)": "FP64",
    "tensor(string)": "BYTES",
}


class OnnxRuntime:
    device: str = "cpu"

    def __init__(self) -> None:
        self._session: Any = None
        self._config: ModelConfig | None = None
        self._signature: Signature = ((), ())
        #: outputs that are ONNX sequences or maps (an unconverted ZipMap), which no v2 tensor can carry
        self._not_tensors: dict[str, str] = {}

    def load(self, version_dir: Path, config: ModelConfig) -> None:
        path = find_artifact(version_dir, config, "model.onnx")
        plaintext = decrypted(path)
        providers = self._providers(config)
        options = onnxruntime.SessionOptions()
        options.intra_op_num_threads = threads_for(config)
        # requests run concurrently on the instances; one graph branch at a time is enough per run
        options.inter_op_num_threads = 1
        options.log_severity_level = 3
        spinning = config.parameters.get("allow_spinning", False)
        if not isinstance(spinning, bool):
            raise ModelLoadError(
                f"{config.name}/model.yaml: parameters.allow_spinning must be true or false, got {spinning!r}"
            )
        # idle intra-op threads spin by default, burning a core between batches that the event loop and the
        # other instances need; off unless a model on a machine with cores to spare asks for it
        options.add_session_config_entry("session.intra_op.allow_spinning", "1" if spinning else "0")
        try:
            model = str(path) if plaintext is None else plaintext
            session = onnxruntime.InferenceSession(model, sess_options=options, providers=providers)
        except Exception as exc:
            raise load_failure(config, path, exc) from None
        if self.device != "cpu" and "CUDAExecutionProvider" not in session.get_providers():
            # onnxruntime falls back to the CPU quietly when CUDA or cuDNN libraries fail to load
            raise ModelLoadError(f"{config.name}: onnxruntime could not start CUDA on {self.device}; see its log")
        self._session, self._config = session, config
        self._signature = self._read_signature(session, config.name)
        _check_manifest(config, self._signature, path.name)
        for name, kind in self._not_tensors.items():
            log.warning("%s: output %r is an ONNX %s, not a tensor; it cannot be served", config.name, name, kind)

    def _providers(self, config: ModelConfig) -> list[Any]:
        if not config.device.startswith("cuda"):
            self.device = "cpu"
            return ["CPUExecutionProvider"]
        available = onnxruntime.get_available_providers()
        if "CUDAExecutionProvider" not in available:
            raise ModelLoadError(
                f"{config.name}/model.yaml asks for device {config.device}, but this onnxruntime has no "
                f"CUDAExecutionProvider (it has: {', '.join(available)}); install onnxruntime-gpu or set device: cpu"
            )
        index = int(config.device.partition(":")[2] or 0)
        self.device = f"cuda:{index}"
        return [("CUDAExecutionProvider", {"device_id": index}), "CPUExecutionProvider"]

    def _read_signature(self, session: Any, model: str) -> Signature:
        for node in session.get_inputs():
            if node.type not in _DATATYPES:
                raise ModelLoadError(f"{model}: ONNX input '{node.name}' has type {node.type}, which is not a tensor")
        self._not_tensors = {node.name: node.type for node in session.get_outputs() if node.type not in _DATATYPES}
        inputs = tuple(_spec(node) for node in session.get_inputs())
        outputs = tuple(_spec(node) for node in session.get_outputs() if node.name not in self._not_tensors)
        return inputs, outputs

    def signature(self) -> Signature:
        return self._signature

    def infer(self, inputs: Mapping[str, np.ndarray], outputs: Sequence[str]) -> dict[str, np.ndarray]:
        session, config = self._session, self._config
        if session is None or config is None:
            raise ModelFault("the ONNX model is not loaded")
        for name in outputs:
            if name in self._not_tensors:
                raise ModelFault(
                    f"model {config.name}: output '{name}' is an ONNX {self._not_tensors[name]}, not a tensor; "
                    "re-export the model with tensor outputs (skl2onnx: options={'zipmap': False})"
                )
        if not outputs:
            return {}
        feeds = {spec.name: _as_feed(inputs[spec.name], spec) for spec in self._signature[0] if spec.name in inputs}
        try:
            values = session.run(list(outputs), feeds)
        except Exception as exc:
            raise ModelFault(f"model {config.name}: onnxruntime failed: {type(exc).__name__}: {exc}") from exc
        results: dict[str, np.ndarray] = {}
        for name, value in zip(outputs, values, strict=True):
            if not isinstance(value, np.ndarray):
                raise ModelFault(
                    f"model {config.name}: output '{name}' came back as {type(value).__name__}, not a tensor"
                )
            results[name] = value
        check_rows(config, inputs, results)
        return results

    def unload(self) -> None:
        self._session = None


def _check_manifest(config: ModelConfig, signature: Signature, artifact: str) -> None:
    """What model.yaml declares must be what the ONNX graph has: names, datatypes, shapes."""
    for kind, declared, actual in (("inputs", config.inputs, signature[0]), ("outputs", config.outputs, signature[1])):
        found = {spec.name: spec for spec in actual}
        for spec in declared or ():
            if spec.name not in found:
                raise ModelLoadError(
                    f"{config.name}/model.yaml: {kind} names '{spec.name}', which the ONNX model does not have "
                    f"(it has: {', '.join(sorted(found))})"
                )
            check_declared(config, kind, spec, found[spec.name], artifact)


def _spec(node: Any) -> TensorSpec:
    # symbolic ("batch") and unknown (None) dimensions are both "any size"
    shape = tuple(dim if isinstance(dim, int) and dim > 0 else -1 for dim in node.shape or ())
    return TensorSpec(node.name, _DATATYPES[node.type], shape)


def _as_feed(array: np.ndarray, spec: TensorSpec) -> np.ndarray:
    if spec.datatype == "BYTES":
        # onnxruntime wants str elements for string tensors; the wire gives bytes
        texts = [item.decode("utf-8") if isinstance(item, bytes) else str(item) for item in array.reshape(-1)]
        return np.array(texts, dtype=np.object_).reshape(array.shape)
    dtype = NUMPY_DTYPE[spec.datatype]
    return array if array.dtype == dtype else array.astype(dtype)
