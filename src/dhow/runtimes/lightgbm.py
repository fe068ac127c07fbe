"""LightGBM boosters saved as text (``model.txt``).

LightGBM predicts in float64 whatever the input, so ``predict`` is declared FP64.
``parameters: {raw_score: true}`` returns raw scores instead of transformed values.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lightgbm
import numpy as np

from dhow.core.model_config import ModelConfig
from dhow.runtimes.loading import threads_for
from dhow.runtimes.tabular import BoosterRuntime, Opened, switch


class LightGBMRuntime(BoosterRuntime):
    framework = "lightgbm"
    artifacts = ("model.txt",)
    features_source = "num_feature()"
    model_noun = "a lightgbm model"
    output_datatype = "FP64"

    def _read_options(self, config: ModelConfig) -> dict[str, Any]:
        return {"raw_score": switch(config, "raw_score"), "num_threads": threads_for(config)}

    def _open(self, path: Path, plaintext: bytes | None, config: ModelConfig, options: dict[str, Any]) -> Opened:
        if plaintext is None:
            booster = lightgbm.Booster(model_file=str(path))
        else:
            booster = lightgbm.Booster(model_str=plaintext.decode("utf-8"))
        per_row = booster.num_model_per_iteration()
        # multiclass models answer one column per class; the others one value per row
        return Opened(booster, booster.num_feature(), (-1, per_row) if per_row > 1 else (-1,))

    def _call(self, model: Any, features: np.ndarray) -> Any:
        return model.predict(features, **self._options)
