"""XGBoost boosters saved as ``model.json`` or ``model.ubj``.

``inplace_predict`` reads the numpy batch without building a DMatrix and is safe to call
from several threads at once. ``parameters: {output_margin: true}`` returns raw margins
instead of transformed values (probabilities for ``binary:logistic``).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import xgboost

from dhow.core.model_config import ModelConfig
from dhow.runtimes.loading import threads_for
from dhow.runtimes.tabular import BoosterRuntime, Opened, switch


class XGBoostRuntime(BoosterRuntime):
    framework = "xgboost"
    artifacts = ("model.json", "model.ubj")
    features_source = "num_features()"
    model_noun = "an xgboost model"
    output_datatype = "FP32"

    def _read_options(self, config: ModelConfig) -> dict[str, Any]:
        return {"predict_type": "margin" if switch(config, "output_margin") else "value"}

    def _open(self, path: Path, plaintext: bytes | None, config: ModelConfig, options: dict[str, Any]) -> Opened:
        booster = _booster(path, plaintext)
        booster.set_param({"nthread": threads_for(config)})
        shape = _output_shape(booster, margin=options["predict_type"] == "margin")
        return Opened(booster, booster.num_features(), shape)

    def _call(self, model: Any, features: np.ndarray) -> Any:
        return model.inplace_predict(features, **self._options)


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
