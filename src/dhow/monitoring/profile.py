"""Reference profiles: what a version's training (or validation) data looked like, feature by feature.

A profile is plain JSON (stored beside the version's artifacts by ``dhow models profile``)::

    {"format": 1, "rows": 100000, "created": "...", "source": "train.parquet",
     "features": {"age": {"tensor": "x", "index": 0, "side": "input", "kind": "numeric", "count": 99990,
                          "null_rate": 0.0001, "min": 18, "max": 90, "mean": 41.2,
                          "quantiles": {"0.01": ..., "0.5": ..., "0.99": ...},
                          "edges": [...9 cut points...], "fractions": [...10 shares...]},
                  "city": {"tensor": "city", "index": 0, "side": "input", "kind": "categorical", ...,
                           "categories": {"paris": 0.4, "lyon": 0.3}, "other": 0.3}}}

A feature is one column of one tensor's rows (``index`` into a row flattened), so a live request's tensor gives
the same feature by the same look-up. Numbers are summarised by a uniform reservoir sample (the quantile sketch:
bounded memory whatever the file's size) cut into ten bins of equal reference share; categories keep their
``MAX_CATEGORIES`` most frequent values, the rest pooled as ``other``.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from typing import Any

import numpy as np

from dhow.core.errors import InvalidInput

__all__ = [
    "BINS",
    "MAX_CATEGORIES",
    "FeatureProfile",
    "FeatureSketch",
    "ReferenceProfile",
    "bin_shares",
    "category_shares",
]

FORMAT = 1
#: bins of equal reference share a numeric feature is cut into
BINS = 10
#: values kept per feature to place the cut points (a uniform sample of the whole input)
SKETCH_SIZE = 50_000
MAX_CATEGORIES = 50
_QUANTILES = (0.01, 0.05, 0.1, 0.25, 0.5, 0.75, 0.9, 0.95, 0.99)


class FeatureSketch:
    """One feature's summary, built a batch at a time."""

    def __init__(self, name: str, tensor: str, index: int, side: str, categorical: bool, seed: int = 0) -> None:
        self.name, self.tensor, self.index, self.side = name, tensor, index, side
        self.categorical = categorical
        self.count = self.nulls = 0
        self._rng = np.random.default_rng(seed)
        self._sample = np.empty(SKETCH_SIZE, dtype=np.float64)
        self._categories: Counter[str] = Counter()
        self._sum = 0.0
        self._min, self._max = np.inf, -np.inf

    def add_nulls(self, count: int) -> None:
        self.nulls += count

    def add(self, values: np.ndarray) -> None:
        """Values of the feature (no nulls), one per row."""
        if self.categorical:
            self._categories.update(_texts(values))
            self.count += len(values)
            return
        numbers = np.asarray(values, dtype=np.float64)
        if not len(numbers):
            return
        self._sum += float(numbers.sum())
        self._min, self._max = min(self._min, float(numbers.min())), max(self._max, float(numbers.max()))
        kept = min(self.count, SKETCH_SIZE)
        room = SKETCH_SIZE - kept
        self._sample[kept : kept + min(room, len(numbers))] = numbers[:room]
        rest = numbers[room:]
        if len(rest):  # Algorithm R, vectorised: the value at position t replaces slot j < SKETCH_SIZE, j ~ U[0, t]
            positions = self.count + room + np.arange(len(rest))
            slots = (self._rng.random(len(rest)) * (positions + 1)).astype(np.int64)
            chosen = slots < SKETCH_SIZE
            self._sample[slots[chosen]] = rest[chosen]
        self.count += len(numbers)

    def finish(self) -> dict[str, Any]:
        total = self.count + self.nulls
        entry: dict[str, Any] = {
            "tensor": self.tensor,
            "index": self.index,
            "side": self.side,
            "kind": "categorical" if self.categorical else "numeric",
            "count": self.count,
            "null_rate": round(self.nulls / total, 6) if total else 0.0,
        }
        if self.categorical:
            top = self._categories.most_common(MAX_CATEGORIES)
            entry["categories"] = {value: round(n / max(self.count, 1), 6) for value, n in top}
            entry["other"] = round(1 - sum(n for _, n in top) / max(self.count, 1), 6)
            return entry
        sample = np.sort(self._sample[: min(self.count, SKETCH_SIZE)])
        if not len(sample):
            return {**entry, "edges": [], "fractions": [1.0]}
        edges = np.unique(np.quantile(sample, np.arange(1, BINS) / BINS))
        entry.update(
            min=self._min,
            max=self._max,
            mean=self._sum / self.count,
            quantiles={str(q): float(v) for q, v in zip(_QUANTILES, np.quantile(sample, _QUANTILES), strict=True)},
            edges=[float(e) for e in edges],
            fractions=[round(float(f), 6) for f in bin_shares(edges, sample)],
        )
        return entry


def _texts(values: np.ndarray) -> list[str]:
    return [v.decode("utf-8", "replace") if isinstance(v, bytes) else str(v) for v in values.tolist()]


def bin_shares(edges: np.ndarray, values: np.ndarray) -> np.ndarray:
    """The share of ``values`` in each bin cut at ``edges`` (a bin holds values up to its upper edge)."""
    positions = np.searchsorted(edges, values, side="left")
    return np.bincount(positions, minlength=len(edges) + 1) / max(len(values), 1)


def category_shares(categories: tuple[str, ...], values: np.ndarray) -> np.ndarray:
    """The share of each reference category in ``values``, then of every other value."""
    counts = Counter(_texts(values))
    known = np.array([counts.get(c, 0) for c in categories] + [0], dtype=np.float64)
    known[-1] = len(values) - known[:-1].sum()
    return known / max(len(values), 1)


@dataclass(frozen=True, slots=True)
class FeatureProfile:
    """One feature of a profile as scoring reads it."""

    name: str
    tensor: str
    index: int
    side: str
    categorical: bool
    #: numeric: the cut points; categorical: unused
    edges: np.ndarray
    #: the reference's share per bin (numeric) or per category then ``other`` (categorical)
    reference: np.ndarray
    categories: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class ReferenceProfile:
    rows: int
    features: tuple[FeatureProfile, ...]

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str) -> ReferenceProfile:
        """Read a stored profile; raises ``InvalidInput`` naming ``source`` and the field when it is malformed."""
        if data.get("format") != FORMAT:
            raise InvalidInput(f"{source}: profile format {data.get('format')!r} is not {FORMAT}; write it again")
        features = []
        for name, entry in data["features"].items():
            try:
                features.append(_feature(name, entry))
            except (KeyError, TypeError, ValueError) as exc:
                why = f"{source}: feature {name!r} is malformed ({exc!r}); write the profile again"
                raise InvalidInput(why) from None
        return cls(int(data.get("rows", 0)), tuple(features))


def _feature(name: str, entry: dict[str, Any]) -> FeatureProfile:
    categorical = entry["kind"] == "categorical"
    side = entry.get("side", "input")
    if side not in ("input", "output"):
        raise ValueError(f"side {side!r}")
    if categorical:
        categories = tuple(str(c) for c in entry["categories"])
        shares = [float(v) for v in entry["categories"].values()] + [float(entry["other"])]
        return FeatureProfile(
            name, entry["tensor"], int(entry["index"]), side, True, np.empty(0), np.asarray(shares), categories
        )
    edges = np.asarray(entry["edges"], dtype=np.float64)
    reference = np.asarray(entry["fractions"], dtype=np.float64)
    if len(reference) != len(edges) + 1:
        raise ValueError("fractions must have one more entry than edges")
    return FeatureProfile(name, entry["tensor"], int(entry["index"]), side, False, edges, reference)
