"""The one small interface every framework runtime implements.

A runtime knows nothing of HTTP, gRPC or batching: it loads one version's artifacts from a
folder and computes a batch of numpy arrays. The scheduler calls ``infer`` from a worker
thread (or a worker process), never from the event loop.
"""

from __future__ import annotations

import importlib
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Protocol

import numpy as np

from dhow.core.errors import ModelLoadError, Unsupported
from dhow.core.model_config import ModelConfig, TensorSpec


class Runtime(Protocol):
    #: where it computes: "cpu" or "cuda:N"
    device: str

    def load(self, version_dir: Path, config: ModelConfig) -> None:
        """Load the artifacts of one version; raise ``ModelLoadError`` with a clear reason."""

    def signature(self) -> tuple[tuple[TensorSpec, ...], tuple[TensorSpec, ...]]:
        """Inputs and outputs as the loaded model declares them (batch dim included as -1)."""

    def infer(self, inputs: Mapping[str, np.ndarray], outputs: Sequence[str]) -> dict[str, np.ndarray]:
        """Compute the named outputs for a batch; arrays keep the batch dimension first."""

    def unload(self) -> None:
        """Release what ``load`` took (sessions, GPU memory)."""


#: runtime name in model.yaml -> "module:Class", imported only when a model uses it
RUNTIMES: dict[str, str] = {
    "onnx": "dhow.runtimes.onnx:OnnxRuntime",
    "torch": "dhow.runtimes.torch:TorchRuntime",
    "sklearn": "dhow.runtimes.sklearn:SklearnRuntime",
    "xgboost": "dhow.runtimes.xgboost:XGBoostRuntime",
    "lightgbm": "dhow.runtimes.lightgbm:LightGBMRuntime",
    "python": "dhow.runtimes.python:PythonRuntime",
}


def create_runtime(name: str) -> Runtime:
    """A new, unloaded runtime for the ``runtime:`` name of a manifest."""
    try:
        target = RUNTIMES[name]
    except KeyError:
        raise Unsupported(f"unknown runtime {name!r}; expected one of {', '.join(sorted(RUNTIMES))}") from None
    module_name, class_name = target.split(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ModelLoadError(
            f"runtime {name!r} needs a package that is not installed ({exc.name}); "
            f"install it with: pip install 'dhow[{name}]'"
        ) from None
    runtime: Runtime = getattr(module, class_name)()
    return runtime
