"""Quality from delayed ground truth: predictions kept by request id until their label comes, then figures.

``PredictionLog`` is bounded (the oldest predictions are dropped, and counted) and lives in the server process
that answered: a label is joined to the prediction this process made, by the request's tenant and id. ``QualityWindow``
keeps the newest labelled predictions of one version and computes accuracy, macro precision and recall
(classification) or MAE and RMSE (regression) from them.
"""

from __future__ import annotations

import math
from collections import Counter, OrderedDict, deque
from typing import Any

import numpy as np

from dhow.core.datatypes import datatype_of

__all__ = ["PredictionLog", "QualityWindow", "figures_of", "label_misfit", "prediction_of"]


def _holds_scores(array: np.ndarray, task: str) -> bool:
    """Whether a classifier's output holds scores (several floats a row), read as their argmax."""
    return array.ndim >= 2 and array.shape[1] > 1 and task == "classification" and array.dtype.kind == "f"


def prediction_of(array: np.ndarray, task: str) -> list[Any]:
    """One prediction per row of an output: a classifier's scores as their argmax, else the value itself."""
    if _holds_scores(array, task):
        return [int(v) for v in np.argmax(array.reshape(array.shape[0], -1), axis=1)]
    flat = array.reshape(array.shape[0], -1)[:, 0] if array.ndim else array.reshape(1)
    if task == "regression":
        return [float(v) for v in flat]
    return [v.decode("utf-8", "replace") if isinstance(v, bytes) else v.item() for v in flat]


def label_misfit(array: np.ndarray, task: str, label: Any) -> str:
    """Why a classifier's label (or list of labels) cannot be compared with its predictions from that output, by
    the output's datatype, saying what to send ("": it can). A label of the wrong type would only count as a wrong
    prediction. Booleans are the classes of a BOOL output only: JSON's ``true`` is no integer class."""
    if task != "classification":
        return ""
    values, kind = label if isinstance(label, list) else [label], array.dtype.kind
    what = datatype_of(array)
    if _holds_scores(array, task):
        classes = array.reshape(array.shape[0], -1).shape[1]
        fits = all(_integer(v) and 0 <= v < classes for v in values)
        what, expected = f"the argmax of {classes} {what} scores a row", f"a class index from 0 to {classes - 1}"
    elif kind in "iu":
        fits, expected = all(_integer(v) for v in values), "an integer class"
    elif kind == "b":
        fits, expected = all(isinstance(v, bool) for v in values), "true or false"
    elif kind == "f":
        fits, expected = all(isinstance(v, int | float) and not isinstance(v, bool) for v in values), "a number"
    else:
        fits, expected = all(isinstance(v, str) for v in values), "a string class"
    return "" if fits else f"the prediction is {what}: send {expected}, not {label!r}"


def _integer(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


#: what a prediction is kept by: the request's tenant and id (one tenant's id never names another's request)
Key = tuple[str, str]


class PredictionLog:
    """Predictions awaiting their label: (tenant, request id) -> (version, prediction); the oldest beyond
    ``capacity`` go."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self._pending: OrderedDict[Key, tuple[str, Any]] = OrderedDict()
        #: the keys of the newest ``capacity`` joined predictions: a label sent again is told from an unknown id's
        self._joined: OrderedDict[Key, None] = OrderedDict()
        self.dropped = 0
        #: predictions replaced by a newer answer to a request of the same key
        self.replaced = 0

    def __len__(self) -> int:
        return len(self._pending)

    def add(self, key: Key, version: str, prediction: Any) -> None:
        """Keep a prediction as the newest. One already kept under its key is replaced, and counted: the newer
        answer (a retry's) is the one the client acted on; left in its place it would be dropped first."""
        pending = self._pending
        if key in pending:
            pending.move_to_end(key)
            self.replaced += 1
        pending[key] = (version, prediction)
        if len(pending) > self.capacity:
            pending.popitem(last=False)
            self.dropped += 1

    def find(self, key: Key) -> tuple[str, Any] | None:
        """The version and prediction of that request, left in the log (a label refused leaves it joinable); None
        when it is unknown."""
        return self._pending.get(key)

    def take(self, key: Key) -> None:
        """Take a joined prediction out of the log: a request is labelled once."""
        del self._pending[key]
        self._joined[key] = None
        if len(self._joined) > self.capacity:
            self._joined.popitem(last=False)

    def joined(self, key: Key) -> bool:
        """Whether that request's prediction was labelled already (as far as the newest ``capacity`` go)."""
        return key in self._joined


class QualityWindow:
    """The newest labelled predictions of one version."""

    def __init__(self, task: str, size: int) -> None:
        self.task = task
        self._pairs: deque[tuple[Any, Any]] = deque(maxlen=size)
        self.labelled = 0

    def add(self, prediction: Any, label: Any) -> None:
        self._pairs.append((prediction, label))
        self.labelled += 1

    def pairs(self) -> list[tuple[Any, Any]]:
        """The window's (prediction, label) pairs now: what ``figures_of`` computes on, off the event loop."""
        return list(self._pairs)

    def figures(self) -> dict[str, float]:
        return figures_of(self.task, self.pairs())

    def __len__(self) -> int:
        return len(self._pairs)


def figures_of(task: str, pairs: list[tuple[Any, Any]]) -> dict[str, float]:
    """accuracy, precision, recall (macro over the classes seen) or mae, rmse of (prediction, label) pairs; {}
    without any."""
    if not pairs:
        return {}
    if task == "regression":
        errors = np.asarray([p for p, _ in pairs], dtype=np.float64) - np.asarray([y for _, y in pairs], np.float64)
        return {"mae": float(np.abs(errors).mean()), "rmse": math.sqrt(float((errors**2).mean()))}
    predicted = Counter(p for p, _ in pairs)
    actual = Counter(y for _, y in pairs)
    right = Counter(p for p, y in pairs if p == y)
    classes = set(predicted) | set(actual)
    precisions = [right[c] / predicted[c] for c in classes if predicted[c]]
    recalls = [right[c] / actual[c] for c in classes if actual[c]]
    return {
        "accuracy": sum(right.values()) / len(pairs),
        "precision": float(np.mean(precisions)) if precisions else 0.0,
        "recall": float(np.mean(recalls)) if recalls else 0.0,
    }
