"""What does scoring drift cost? dhow's PSI on precomputed reference bins against a KS test on the raw data.

    .venv/bin/python benchmarks/drift_scoring.py [--repeats 30]

One run, one process: 100k reference rows and 10k live rows per feature (32 numeric features, half of them
shifted), timed per feature (median of the repeats) for
- dhow: the score of one numeric feature (bin the live values on the profile's cut points, PSI), of one
  categorical feature (shares of the profile's categories, Jensen-Shannon distance), and a whole window of 32
  features as the background task scores it (``dhow.monitoring.drift.score``: stacking included), per feature;
- the peer: scipy's two-sample Kolmogorov-Smirnov test of the live values against the reference rows
  (``scipy.stats.ks_2samp``), what a drift library that keeps reference rows runs per feature;
- PSI computed from the raw reference rows each time (cut points and reference shares recomputed), to show what
  the precomputed profile saves.
Then the request's side, in the same process: ``ModelWatch.observe`` per request (the version look-up, the draw
and, when sampled, the copy of the rows into the window) at sample rates 0, 0.1 and 1, against what every request
already pays for its Prometheus metrics (a counter and a histogram, as the data plane records them).
Writes benchmarks/RESULTS-drift.md with each figure and its ratio to its reference.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import sys
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
from scipy import stats

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from prometheus_client import CollectorRegistry, Counter, Histogram

from dhow.core.model_config import DriftConfig, ModelConfig, MonitoringConfig
from dhow.core.types import Caller, InferenceRequest, InferenceResponse, Tensor
from dhow.monitoring.drift import psi, score, score_feature
from dhow.monitoring.model_metrics import ModelMetrics
from dhow.monitoring.profile import BINS, FeatureSketch, ReferenceProfile, bin_shares
from dhow.serving.watch import ModelWatch

HERE = Path(__file__).resolve().parent
REFERENCE_ROWS, LIVE_ROWS, FEATURES = 100_000, 10_000, 32


def _median_ms(fn: Callable[[], object], repeats: int) -> float:
    fn()  # warm
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1000


def _profile(reference: np.ndarray, cities: np.ndarray) -> ReferenceProfile:
    features = {}
    for index in range(reference.shape[1]):
        sketch = FeatureSketch(f"f{index}", "x", index, "input", categorical=False, seed=index)
        sketch.add(reference[:, index])
        features[f"f{index}"] = sketch.finish()
    city = FeatureSketch("city", "city", 0, "input", categorical=True)
    city.add(cities)
    features["city"] = city.finish()
    return ReferenceProfile.from_dict({"format": 1, "rows": len(reference), "features": features}, "benchmark")


def _raw_psi(reference: np.ndarray, live: np.ndarray) -> float:
    edges = np.unique(np.quantile(reference, np.arange(1, BINS) / BINS))
    return psi(bin_shares(edges, reference), bin_shares(edges, live))


def _observe_us(profile: ReferenceProfile, rate: float, calls: int) -> float:
    """Microseconds per ``ModelWatch.observe`` of a one-row request at this sample rate."""
    config = ModelConfig("m", "onnx", monitoring=MonitoringConfig(drift=DriftConfig(sample_rate=rate)))
    model = SimpleNamespace(name="m", version_label="1", config=config, profile=profile, latency=None)
    models: Any = SimpleNamespace(entries={"m": SimpleNamespace(versions={1: model})})
    watch = ModelWatch(models, ModelMetrics(CollectorRegistry()))
    row = np.random.default_rng(0).normal(size=(1, FEATURES)).astype(np.float32)
    request = InferenceRequest("m", [Tensor("x", "FP32", [1, FEATURES], row),
                                     Tensor("city", "BYTES", [1, 1], np.array([[b"a"]], dtype=object))])  # fmt: skip
    response = InferenceResponse("m", "1", [Tensor("y", "FP32", [1, 2], np.zeros((1, 2), np.float32))])
    who = Caller("key:bench", "default", "r")
    return _median_ms(lambda: [watch.observe(config, request, response, who) for _ in range(calls)], 7) * 1000 / calls


def _metrics_us(calls: int) -> float:
    registry = CollectorRegistry()
    counter = Counter("c", "c", ["model", "version", "outcome"], registry=registry).labels("m", "1", "success")
    histogram = Histogram("h", "h", ["model", "version"], registry=registry).labels("m", "1")

    def record() -> None:
        for _ in range(calls):
            counter.inc()
            histogram.observe(0.001)

    return _median_ms(record, 7) * 1000 / calls


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=30)
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    reference = rng.normal(0, 1, (REFERENCE_ROWS, FEATURES))
    live = rng.normal(0, 1, (LIVE_ROWS, FEATURES))
    live[:, ::2] += 0.5  # half the features shifted
    ref_cities = rng.choice(["a", "b", "c", "d", "e"], REFERENCE_ROWS).astype(object)
    live_cities = rng.choice(["a", "b", "c", "f"], (LIVE_ROWS, 1)).astype(object)
    profile = _profile(reference, ref_cities)
    numeric, categorical = profile.features[0], profile.features[-1]
    column = live[:, 0].copy()
    window = [({"x": live, "city": live_cities}, {})]
    rows = [
        ("dhow: PSI of one numeric feature on the profile's bins", _median_ms(
            lambda: score_feature(numeric, column, 0.2), args.repeats)),
        ("dhow: Jensen-Shannon of one categorical feature on the profile's categories", _median_ms(
            lambda: score_feature(categorical, live_cities[:, 0], 0.2), args.repeats)),
        (f"dhow: a whole window of {FEATURES + 1} features (the background task's call), per feature", _median_ms(
            lambda: score(profile, window, 0.2), args.repeats) / (FEATURES + 1)),
        ("scipy.stats.ks_2samp against the 100k reference rows, one feature", _median_ms(
            lambda: stats.ks_2samp(column, reference[:, 0]), args.repeats)),
        ("PSI recomputed from the 100k raw reference rows, one feature", _median_ms(
            lambda: _raw_psi(reference[:, 0], column), args.repeats)),
    ]  # fmt: skip
    base = rows[0][1]
    scores = {f.name: f for f in score(profile, window, 0.2)}
    flagged = sorted((name for name, f in scores.items() if f.drifted), key=lambda n: (len(n), n))
    ks_flagged = [f"f{i}" for i in range(FEATURES) if stats.ks_2samp(live[:, i], reference[:, i]).pvalue < 0.01]
    lines = [
        "# Drift scoring cost",
        "",
        f"`python benchmarks/drift_scoring.py` on {platform.node()} ({platform.machine()}), "
        f"{datetime.now(UTC):%Y-%m-%d}: {REFERENCE_ROWS:,} reference rows, {LIVE_ROWS:,} live rows per feature, "
        f"median of {args.repeats} repeats in one process (numpy {np.__version__}, scipy {_scipy_version()}).",
        "",
        "| what | ms per feature per 10k live rows | ratio to dhow's numeric PSI |",
        "|---|---|---|",
        *[f"| {name} | {ms:.3f} | {ms / base:.1f} |" for name, ms in rows],
        "",
        f"Both flag the same features: PSI > 0.2 on {', '.join(flagged)}; KS p < 0.01 on {', '.join(ks_flagged)} "
        "(the shifted ones are the even-numbered; city lost a category and gained one).",
        "",
    ]
    calls = 20_000
    metrics_us = _metrics_us(calls)
    observed = [(rate, _observe_us(profile, rate, calls)) for rate in (0.0, 0.1, 1.0)]
    lines += [
        "## On the request's path",
        "",
        f"Microseconds per request ({calls:,} one-row requests of 32 FP32 features and a category, median of 7 runs).",
        "",
        "| what | µs per request | ratio to the request's metrics |",
        "|---|---|---|",
        f"| a request's Prometheus metrics (a counter and a histogram, what every request pays) | {metrics_us:.2f} "
        "| 1.0 |",
        *[f"| ModelWatch.observe, sample_rate {rate:g} | {us:.2f} | {us / metrics_us:.2f} |" for rate, us in observed],
        "",
    ]
    (HERE / "RESULTS-drift.md").write_text("\n".join(lines))
    print("\n".join(lines))


def _scipy_version() -> str:
    import scipy

    return str(scipy.__version__)


if __name__ == "__main__":
    main()
