"""LightGBM boosters saved as text (``model.txt``).

LightGBM predicts in float64 whatever the input, so ``predict`` is declared FP64.
``parameters: {raw_score: true}`` returns raw scores instead of transformed values.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import lightgbm
import numpy as np

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


class LightGBMRuntime:
    device: str = "cpu"

    def __init__(self) -> None:
        self._booster: Any = None
        self._config: ModelConfig | None = None
        self._signature: Signature = ((), ())
        self._options: dict[str, Any] = {}

    def load(self, version_dir: Path, config: ModelConfig) -> None:
        self.device = require_cpu(config, "lightgbm")
        path = find_artifact(version_dir, config, "model.txt")
        plaintext = decrypted(path)
        raw_score = config.parameters.get("raw_score", False)
        if not isinstance(raw_score, bool):
            raise ModelLoadError(f"{config.name}/model.yaml: parameters.raw_score must be true or false")
        try:
            if plaintext is None:
                booster = lightgbm.Booster(model_file=str(path))
            else:
                booster = lightgbm.Booster(model_str=plaintext.decode("utf-8"))
            features, per_row = booster.num_feature(), booster.num_model_per_iteration()
        except Exception as exc:
            raise load_failure(config, path, exc) from None
        if config.outputs and len(config.outputs) != 1:
            raise ModelLoadError(f"{config.name}/model.yaml: a lightgbm model has exactly one output")
        name = config.outputs[0].name if config.outputs else "predict"
        # multiclass models answer one column per class; the others one value per row
        shape = (-1, per_row) if per_row > 1 else (-1,)
        default = TensorSpec("input", "FP32", (-1, features))
        self._signature = (single_input(config, "lightgbm", default),), (TensorSpec(name, "FP64", shape),)
        self._options = {"raw_score": raw_score, "num_threads": threads_for(config)}
        self._booster, self._config = booster, config

    def signature(self) -> Signature:
        return self._signature

    def infer(self, inputs: Mapping[str, np.ndarray], outputs: Sequence[str]) -> dict[str, np.ndarray]:
        booster, config = self._booster, self._config
        if booster is None or config is None:
            raise ModelFault("the lightgbm model is not loaded")
        (input_spec,), (output_spec,) = self._signature
        if output_spec.name not in outputs:
            return {}
        try:
            value = booster.predict(inputs[input_spec.name], **self._options)
        except Exception as exc:
            raise ModelFault(f"model {config.name}: lightgbm failed: {type(exc).__name__}: {exc}") from None
        results = {output_spec.name: np.asarray(value)}
        check_rows(config, inputs, results)
        return results

    def unload(self) -> None:
        self._booster = None
