"""XGBoost boosters saved as ``model.json`` or ``model.ubj``.

``inplace_predict`` reads the numpy batch without building a DMatrix and is safe to call
from several threads at once. ``parameters: {output_margin: true}`` returns raw margins
instead of transformed values (probabilities for ``binary:logistic``).
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import xgboost

from dhow.core.errors import ModelFault, ModelLoadError
from dhow.core.model_config import ModelConfig, TensorSpec
from dhow.runtimes.loading import (
    Signature,
    check_rows,
    decrypted,
    find_artifact,
    load_failure,
    require_cpu,
    single_input,
    threads_for,
)


class XGBoostRuntime:
    device: str = "cpu"

    def __init__(self) -> None:
        self._booster: Any = None
        self._config: ModelConfig | None = None
        self._signature: Signature = ((), ())
        self._predict_type = "value"

    def load(self, version_dir: Path, config: ModelConfig) -> None:
        self.device = require_cpu(config, "xgboost")
        path = find_artifact(version_dir, config, "model.json", "model.ubj")
        plaintext = decrypted(path)
        margin = config.parameters.get("output_margin", False)
        if not isinstance(margin, bool):
            raise ModelLoadError(f"{config.name}/model.yaml: parameters.output_margin must be true or false")
        try:
            booster = _booster(path, plaintext)
            booster.set_param({"nthread": threads_for(config)})
            shape = _output_shape(booster, margin)
        except Exception as exc:
            raise load_failure(config, path, exc) from None
        if config.outputs and len(config.outputs) != 1:
            raise ModelLoadError(f"{config.name}/model.yaml: an xgboost model has exactly one output")
        name = config.outputs[0].name if config.outputs else "predict"
        default = TensorSpec("input", "FP32", (-1, booster.num_features()))
        self._signature = (single_input(config, "xgboost", default),), (TensorSpec(name, "FP32", shape),)
        self._predict_type = "margin" if margin else "value"
        self._booster, self._config = booster, config

    def signature(self) -> Signature:
        return self._signature

    def infer(self, inputs: Mapping[str, np.ndarray], outputs: Sequence[str]) -> dict[str, np.ndarray]:
        booster, config = self._booster, self._config
        if booster is None or config is None:
            raise ModelFault("the xgboost model is not loaded")
        (input_spec,), (output_spec,) = self._signature
        if output_spec.name not in outputs:
            return {}
        try:
            value = booster.inplace_predict(inputs[input_spec.name], predict_type=self._predict_type)
        except Exception as exc:
            raise ModelFault(f"model {config.name}: xgboost failed: {type(exc).__name__}: {exc}") from None
        results = {output_spec.name: np.asarray(value)}
        check_rows(config, inputs, results)
        return results

    def unload(self) -> None:
        self._booster = None


def _booster(path: Path, plaintext: bytes | None) -> Any:
    if plaintext is None:
        return xgboost.Booster(model_file=str(path))
    # from a buffer xgboost tells JSON from UBJSON by the bytes themselves ('{"' vs '{L', '{$', ...),
    # so model.json.enc and model.ubj.enc each load in the format they were saved in
    booster = xgboost.Booster()
    booster.load_model(bytearray(plaintext))
    return booster


def _output_shape(booster: Any, margin: bool) -> tuple[int, ...]:
    learner = json.loads(booster.save_config())["learner"]
    params = learner["learner_model_param"]
    classes, targets = int(params.get("num_class", "0")), int(params.get("num_target", "1"))
    if classes > 1:
        # multi:softmax answers the class index per row; softprob and margins one column per class
        picks_class = learner["objective"]["name"] == "multi:softmax" and not margin
        return (-1,) if picks_class else (-1, classes)
    return (-1, targets) if targets > 1 else (-1,)
