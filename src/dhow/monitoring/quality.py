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
    ``capacity`` go. A prediction may also be found by an alias (the x-request-id of a request that named itself
    in its body too): it counts once against ``capacity``, and is joined once, by either."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self._pending: OrderedDict[Key, tuple[str, Any, Key | None]] = OrderedDict()
        #: alias -> the key of the prediction it names (the newest it came with); the newest ``2 * capacity``
        self._aliases: OrderedDict[Key, Key] = OrderedDict()
        #: the keys (and aliases) of the newest joined predictions: a label sent again is told from an unknown id's
        self._joined: OrderedDict[Key, None] = OrderedDict()
        self.dropped = 0
        #: predictions replaced by a newer answer to a request of the same key
        self.replaced = 0

    def __len__(self) -> int:
        return len(self._pending)

    def add(self, key: Key, version: str, prediction: Any, alias: Key | None = None) -> None:
        """Keep a prediction as the newest, found by its key and its alias. One already kept under its key is
        replaced, and counted: the newer answer (a retry's) is the one the client acted on; left in its place it
        would be dropped first. An alias names the newest prediction it came with (an x-request-id passed on with
        several requests, a trace's, names the last; each stays found by its own key)."""
        pending = self._pending
        if key in pending:
            pending.move_to_end(key)
            self.replaced += 1
        pending[key] = (version, prediction, alias)
        aliases = self._aliases
        if alias is not None:
            aliases[alias] = key
            aliases.move_to_end(alias)
            if len(aliases) > 2 * self.capacity:
                aliases.popitem(last=False)
        if len(pending) > self.capacity:
            oldest, (_, _, its_alias) = pending.popitem(last=False)
            if its_alias is not None and aliases.get(its_alias) == oldest:
                del aliases[its_alias]
            self.dropped += 1

    def _key_of(self, key: Key) -> Key | None:
        return key if key in self._pending else self._aliases.get(key)

    def find(self, key: Key) -> tuple[str, Any] | None:
        """The version and prediction of that request (by its key or its alias), left in the log (a label refused
        leaves it joinable); None when it is unknown."""
        own = self._key_of(key)
        found = self._pending.get(own) if own is not None else None
        return None if found is None else (found[0], found[1])

    def take(self, key: Key) -> bool:
        """Take a joined prediction out of the log, by its key or its alias: a request is labelled once. False
        when it was taken already (its label sent by both its ids at once)."""
        own = self._key_of(key)
        if own is None or own not in self._pending:
            return False
        _, _, alias = self._pending.pop(own)
        joined = self._joined
        for each in {key, own, alias}:
            if each is None:
                continue
            if self._aliases.get(each) == own:
                del self._aliases[each]
            joined[each] = None
            joined.move_to_end(each)
        while len(joined) > 2 * self.capacity:
            joined.popitem(last=False)
        return True

    def joined(self, key: Key) -> bool:
        """Whether that request's prediction was labelled already (as far as the newest ``capacity`` go)."""
        if key in self._joined:
            return True
        own = self._aliases.get(key)
        return own is not None and own in self._joined


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
