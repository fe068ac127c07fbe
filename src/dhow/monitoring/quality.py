"""Quality from delayed ground truth: predictions kept by request id until their label comes, then figures.

``PredictionLog`` is bounded (the oldest predictions are dropped, and counted) and lives in the server process
that answered: a label is joined to the prediction this process made, by the request's id. ``QualityWindow``
keeps the newest labelled predictions of one version and computes accuracy, macro precision and recall
(classification) or MAE and RMSE (regression) from them.
"""

from __future__ import annotations

import math
from collections import OrderedDict, deque
from dataclasses import dataclass
from typing import Any

import numpy as np

__all__ = ["Labelled", "PredictionLog", "QualityWindow", "prediction_of"]


def prediction_of(array: np.ndarray, task: str) -> list[Any]:
    """One prediction per row of an output: a classifier's scores as their argmax, else the value itself."""
    if array.ndim >= 2 and array.shape[1] > 1 and task == "classification" and array.dtype.kind == "f":
        return [int(v) for v in np.argmax(array.reshape(array.shape[0], -1), axis=1)]
    flat = array.reshape(array.shape[0], -1)[:, 0] if array.ndim else array.reshape(1)
    if task == "regression":
        return [float(v) for v in flat]
    return [v.decode("utf-8", "replace") if isinstance(v, bytes) else v.item() for v in flat]


@dataclass(frozen=True, slots=True)
class Labelled:
    version: str
    prediction: Any
    label: Any


class PredictionLog:
    """Predictions awaiting their label: request id -> (version, prediction); the oldest beyond ``capacity`` go."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self._pending: OrderedDict[str, tuple[str, Any]] = OrderedDict()
        self.dropped = 0

    def __len__(self) -> int:
        return len(self._pending)

    def add(self, request_id: str, version: str, prediction: Any) -> None:
        self._pending[request_id] = (version, prediction)
        if len(self._pending) > self.capacity:
            self._pending.popitem(last=False)
            self.dropped += 1

    def join(self, request_id: str, label: Any) -> Labelled | None:
        """The prediction of that request with its label (taken out of the log), or None when it is unknown."""
        found = self._pending.pop(request_id, None)
        return None if found is None else Labelled(found[0], found[1], label)


class QualityWindow:
    """The newest labelled predictions of one version."""

    def __init__(self, task: str, size: int) -> None:
        self.task = task
        self._pairs: deque[tuple[Any, Any]] = deque(maxlen=size)
        self.labelled = 0

    def add(self, prediction: Any, label: Any) -> None:
        self._pairs.append((prediction, label))
        self.labelled += 1

    def figures(self) -> dict[str, float]:
        """accuracy, precision, recall (macro over the labels seen) or mae, rmse; {} before any label."""
        if not self._pairs:
            return {}
        predictions = [p for p, _ in self._pairs]
        labels = [y for _, y in self._pairs]
        if self.task == "regression":
            errors = np.asarray(predictions, dtype=np.float64) - np.asarray(labels, dtype=np.float64)
            return {"mae": float(np.abs(errors).mean()), "rmse": math.sqrt(float((errors**2).mean()))}
        right = sum(p == y for p, y in zip(predictions, labels, strict=True))
        classes = sorted(set(labels) | set(predictions), key=str)
        precisions, recalls = [], []
        for cls in classes:
            true_pos = sum(p == cls and y == cls for p, y in zip(predictions, labels, strict=True))
            predicted, actual = predictions.count(cls), labels.count(cls)
            if predicted:
                precisions.append(true_pos / predicted)
            if actual:
                recalls.append(true_pos / actual)
        return {
            "accuracy": right / len(labels),
            "precision": float(np.mean(precisions)) if precisions else 0.0,
            "recall": float(np.mean(recalls)) if recalls else 0.0,
        }

    def __len__(self) -> int:
        return len(self._pairs)
