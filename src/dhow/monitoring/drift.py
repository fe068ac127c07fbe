"""Live drift: a bounded window of sampled rows per version, scored against the version's reference profile.

The hot path counts down (``skip``: answers until the next sample, a geometric draw per sample) and only appends:
``DriftWindow.add`` is a ``deque.append`` of a sampled request's arrays (the caller
copies the profiled tensors' rows, at most a window's), on the event loop, with no lock. ``score`` runs in a
worker thread on a snapshot: it stacks the window's rows per tensor and, per feature, compares the live shares with the
reference's (numbers: the Population Stability Index over the reference's ten bins; categories: the
Jensen-Shannon distance over the reference's categories and ``other``). Both need no reference rows, only the
profile's shares: the cost is one ``searchsorted`` (or one count) of the window's values per feature.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from dhow.monitoring.profile import FeatureProfile, ReferenceProfile, bin_shares, category_shares
from dhow.monitoring.sampling import sampling_gap

__all__ = ["DriftWindow", "FeatureDrift", "js_distance", "psi", "score"]

#: a share below this counts as this (an empty bin would make PSI infinite)
_FLOOR = 1e-4

Sample = tuple[Mapping[str, np.ndarray], Mapping[str, np.ndarray]]


class DriftWindow:
    """The newest ``rows`` sampled rows of one version, as the requests' own arrays (inputs, outputs)."""

    def __init__(self, rows: int, rate: float = 1.0) -> None:
        self.rows = rows
        self.rate = rate
        #: answers to let by before the next sample (the request's path only counts down)
        self.skip = sampling_gap(rate)
        self.held = 0
        self._samples: deque[tuple[int, Sample]] = deque()
        #: rows sampled since the version loaded (a gauge of how much the scores rest on)
        self.sampled = 0

    def add(self, rows: int, inputs: Mapping[str, np.ndarray], outputs: Mapping[str, np.ndarray]) -> None:
        if rows > self.rows:
            inputs = {name: array[: self.rows] for name, array in inputs.items()}
            outputs = {name: array[: self.rows] for name, array in outputs.items()}
            rows = self.rows
        self._samples.append((rows, (inputs, outputs)))
        self.held += rows
        self.sampled += rows
        while self.held - self._samples[0][0] >= self.rows:
            self.held -= self._samples.popleft()[0]
        if self.held > self.rows:  # the oldest sample keeps its newest rows only (views: nothing is copied)
            extra = self.held - self.rows
            count, (old_inputs, old_outputs) = self._samples[0]
            trimmed = ({n: a[extra:] for n, a in old_inputs.items()}, {n: a[extra:] for n, a in old_outputs.items()})
            self._samples[0] = (count - extra, trimmed)
            self.held = self.rows

    def snapshot(self) -> list[Sample]:
        """The window's samples now (the list, not the arrays, is copied: arrays are never written to)."""
        return [sample for _, sample in self._samples]


@dataclass(frozen=True, slots=True)
class FeatureDrift:
    name: str
    side: str
    #: psi (numbers) or js (categories)
    method: str
    score: float
    drifted: bool
    rows: int


def psi(reference: np.ndarray, live: np.ndarray) -> float:
    """Population Stability Index of two share vectors over the same bins."""
    expected, actual = np.maximum(reference, _FLOOR), np.maximum(live, _FLOOR)
    return float(np.sum((actual - expected) * np.log(actual / expected)))


def js_distance(reference: np.ndarray, live: np.ndarray) -> float:
    """Jensen-Shannon distance (base 2: from 0, the same, to 1, disjoint) of two share vectors."""
    p, q = reference / max(reference.sum(), 1e-12), live / max(live.sum(), 1e-12)
    m = (p + q) / 2
    with np.errstate(divide="ignore", invalid="ignore"):
        kl_p = np.where(p > 0, p * np.log2(p / m), 0.0).sum()
        kl_q = np.where(q > 0, q * np.log2(q / m), 0.0).sum()
    return float(np.sqrt(max((kl_p + kl_q) / 2, 0.0)))


def score(profile: ReferenceProfile, samples: Sequence[Sample], threshold: float) -> list[FeatureDrift]:
    """Every feature's drift on the window's rows, the worst first (blocking: call from a thread)."""
    stacked: dict[tuple[str, str], np.ndarray] = {}
    results = []
    for feature in profile.features:
        key = (feature.side, feature.tensor)
        if key not in stacked:
            stacked[key] = _stack(samples, feature.side, feature.tensor)
        rows = stacked[key]
        if rows.shape[0] == 0 or feature.index >= rows.shape[1]:
            continue
        results.append(score_feature(feature, rows[:, feature.index], threshold))
    return sorted(results, key=lambda drift: drift.score, reverse=True)


def score_feature(feature: FeatureProfile, values: np.ndarray, threshold: float) -> FeatureDrift:
    if feature.categorical:
        value = js_distance(feature.reference, category_shares(feature.categories, values))
        method = "js"
    else:
        numbers = np.asarray(values, dtype=np.float64)
        value = psi(feature.reference, bin_shares(feature.edges, numbers[np.isfinite(numbers)]))
        method = "psi"
    return FeatureDrift(feature.name, feature.side, method, round(value, 6), value > threshold, len(values))


def _stack(samples: Sequence[Sample], side: str, tensor: str) -> np.ndarray:
    """One tensor's sampled rows as (rows, values per row)."""
    parts = []
    for inputs, outputs in samples:
        array = (inputs if side == "input" else outputs).get(tensor)
        if array is not None and array.ndim > 0 and array.shape[0]:
            parts.append(array.reshape(array.shape[0], -1))
    if not parts:
        return np.empty((0, 0))
    width = parts[0].shape[1]
    return np.concatenate([p for p in parts if p.shape[1] == width])
