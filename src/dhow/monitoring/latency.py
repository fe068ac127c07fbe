"""Latency anomalies: each window's p50 and p99 of queue time and of compute time, against a robust baseline
(the p99 only in windows of at least ``P99_REQUESTS`` requests).

``LatencyRecorder.add`` is called by the batcher's observer on the event loop, once per batch: two list
extensions, no lock. Each ``window_s`` the watch takes the lists (``take``) and ``LatencyBaseline.judge``
compares the window's figures with the median and MAD (median absolute deviation) of the previous normal
windows: a window is anomalous when a figure is more than ``threshold`` MADs (scaled to a standard deviation)
above the median, at least ``min_ratio`` times it *and* ``min_slack_ms`` above it. Anomalous windows do not enter
the baseline, so a lasting slow-down stays anomalous instead of becoming the new normal.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

import numpy as np

from dhow.core.model_config import LatencyConfig

__all__ = ["PARTS", "QUANTILES", "Anomaly", "LatencyBaseline", "LatencyRecorder", "duration_text"]

#: what is measured: time queued before the batch ran, time the batch computed
PARTS = ("queue", "compute")
QUANTILES = {"p50": 50.0, "p99": 99.0}
#: MAD to standard deviation, for normally distributed data
_MAD_SCALE = 1.4826
#: the spread below which MAD counts as this share of the median (identical windows would make any change infinite)
_MIN_SPREAD = 0.05
#: a window's p99 is judged only over this many requests: the p99 of fewer is little more than their slowest, which
#: a busy machine's scheduling alone can triple
P99_REQUESTS = 100
#: samples kept per part per window (beyond: the rest of the window is not measured)
_MOST = 100_000


class LatencyRecorder:
    """The queue and compute times (seconds) of one version's requests in the current window."""

    def __init__(self) -> None:
        self.queue: list[float] = []
        self.compute: list[float] = []

    def add(self, waits_ns: list[int], compute_ns: int) -> None:
        if len(self.queue) < _MOST:
            self.queue.extend(w / 1e9 for w in waits_ns)
            self.compute.extend([compute_ns / 1e9] * len(waits_ns))

    def take(self) -> tuple[list[float], list[float]]:
        """The window's times, and a new window begins."""
        taken = self.queue, self.compute
        self.queue, self.compute = [], []
        return taken


@dataclass(frozen=True, slots=True)
class Anomaly:
    part: str
    quantile: str
    #: the window's figure and the baseline's median, in seconds
    seconds: float
    baseline: float
    #: how many baseline MADs above the median, and how many times the median
    score: float
    ratio: float


class LatencyBaseline:
    """The recent normal windows of one version's latency, per part and quantile."""

    def __init__(self, config: LatencyConfig) -> None:
        self.config = config
        self._history: dict[tuple[str, str], deque[float]] = {
            (part, q): deque(maxlen=config.baseline_windows) for part in PARTS for q in QUANTILES
        }

    def judge(self, queue: list[float], compute: list[float]) -> tuple[dict[tuple[str, str], float], list[Anomaly]]:
        """The window's figures and its anomalies; a normal window joins the baseline. Too few requests: nothing."""
        if len(queue) < self.config.min_requests:
            return {}, []
        quantiles = {q: p for q, p in QUANTILES.items() if q != "p99" or len(queue) >= P99_REQUESTS}
        figures: dict[tuple[str, str], float] = {}
        for part, values in (("queue", queue), ("compute", compute)):
            points = np.percentile(np.asarray(values), list(quantiles.values()))
            figures.update({(part, q): float(v) for q, v in zip(quantiles, points, strict=True)})
        anomalies = [a for key, value in figures.items() if (a := self._anomaly(key, value)) is not None]
        if not anomalies:
            for key, value in figures.items():
                self._history[key].append(value)
        return figures, anomalies

    def median(self, part: str, quantile: str) -> float | None:
        history = self._history[(part, quantile)]
        return float(np.median(history)) if history else None

    def _anomaly(self, key: tuple[str, str], value: float) -> Anomaly | None:
        history = self._history[key]
        if len(history) < self.config.min_windows:
            return None
        values = np.asarray(history)
        median = float(np.median(values))
        spread = max(_MAD_SCALE * float(np.median(np.abs(values - median))), _MIN_SPREAD * median, 1e-6)
        score = (value - median) / spread
        ratio = value / median if median > 0 else float("inf")
        slack = (value - median) * 1000 >= self.config.min_slack_ms
        if score > self.config.threshold and ratio >= self.config.min_ratio and slack:
            return Anomaly(key[0], key[1], value, median, round(score, 2), round(ratio, 2))
        return None


def duration_text(seconds: float) -> str:
    """A duration for a log line, in µs below a millisecond (a queue's normal wait is often tens of µs, which
    milliseconds to one decimal would show as 0.0)."""
    if seconds < 0.001:
        return f"{seconds * 1e6:.0f} µs"
    return f"{seconds * 1000:.1f} ms"
