"""scikit-learn estimators and pipelines saved with joblib (``model.joblib``).

Each output is one method of the estimator, named after it: ``predict``, and ``predict_proba``
when the estimator has it (a manifest may also ask for ``decision_function`` or ``transform``).
"""

from __future__ import annotations

import io
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import joblib
import numpy as np

from dhow.core.datatypes import as_bytes
from dhow.core.errors import ModelFault, ModelLoadError
from dhow.core.model_config import ModelConfig, TensorSpec
from dhow.runtimes.tabular import Opened, TabularRuntime

METHODS: tuple[str, ...] = ("predict", "predict_proba", "decision_function", "transform")


class SklearnRuntime(TabularRuntime):
    framework = "sklearn"
    artifacts = ("model.joblib",)
    features_source = "n_features_in_"
    # sklearn computes on 2-D arrays whether or not dhow batches requests together
    input_datatype = "FP64"

    def _open(self, path: Path, plaintext: bytes | None, config: ModelConfig, options: dict[str, Any]) -> Opened:
        estimator = joblib.load(path if plaintext is None else io.BytesIO(plaintext))
        return Opened(estimator, int(getattr(estimator, "n_features_in_", -1)))

    def _outputs(self, opened: Opened, config: ModelConfig, path: Path) -> tuple[TensorSpec, ...]:
        estimator = opened.model
        available = [method for method in METHODS if callable(getattr(estimator, method, None))]
        if "predict" not in available and "transform" not in available:
            kind = type(estimator).__name__
            raise ModelLoadError(f"{config.name}: {kind} in {path} has neither predict nor transform")
        if config.outputs:
            unknown = [spec.name for spec in config.outputs if spec.name not in available]
            if unknown:
                raise ModelLoadError(
                    f"{config.name}/model.yaml: outputs {', '.join(unknown)} are not methods of "
                    f"{type(estimator).__name__}; sklearn outputs are named after one of: {', '.join(available)}"
                )
            names = [spec.name for spec in config.outputs]
        else:
            names = [method for method in ("predict", "predict_proba") if method in available] or ["transform"]
        return tuple(_spec(estimator, name) for name in names)

    def _predict(
        self, model: Any, config: ModelConfig, inputs: Mapping[str, np.ndarray], outputs: Sequence[str]
    ) -> dict[str, np.ndarray]:
        features = inputs[self._signature[0][0].name]
        results: dict[str, np.ndarray] = {}
        for name in outputs:
            try:
                value = getattr(model, name)(features)
            except Exception as exc:
                raise ModelFault(f"model {config.name}: {name} raised {type(exc).__name__}: {exc}") from exc
            results[name] = _as_array(value)
        return results


def _spec(estimator: Any, method: str) -> TensorSpec:
    classes = getattr(estimator, "classes_", None)
    if method == "predict":
        return TensorSpec(method, _label_datatype(classes), (-1,))
    if method == "predict_proba":
        return TensorSpec(method, "FP64", (-1, len(classes) if classes is not None else -1))
    if method == "decision_function" and classes is not None and len(classes) == 2:
        return TensorSpec(method, "FP64", (-1,))
    return TensorSpec(method, "FP64", (-1, -1))


def _label_datatype(classes: Any) -> str:
    if classes is None:  # a regressor
        return "FP64"
    kind = np.asarray(classes).dtype.kind
    if kind in ("i", "u"):
        return "INT64"
    if kind == "b":
        return "BOOL"
    if kind == "f":
        return "FP64"
    return "BYTES"


def _as_array(value: Any) -> np.ndarray:
    array = np.asarray(value)
    if array.dtype.kind in ("U", "S", "O"):
        # string labels travel as BYTES: an object array of utf-8 bytes
        result = np.empty(array.size, dtype=np.object_)
        result[:] = [as_bytes(item) for item in array.reshape(-1)]
        return result.reshape(array.shape)
    if array.dtype.kind in ("i", "u"):
        return array.astype(np.int64, copy=False)
    if array.dtype.kind == "f":
        return array.astype(np.float64, copy=False)
    return array
