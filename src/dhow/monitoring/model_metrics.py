"""The metrics of the models' behaviour (drift, quality from feedback, latency anomalies), beside the server's.

With several worker processes each worker scores its own sample: the exposition shows the highest drift and
anomaly figures of the live workers, and the most recent quality figures.
"""

from __future__ import annotations

from typing import Literal

from prometheus_client import CollectorRegistry, Counter, Gauge

__all__ = ["ModelMetrics"]

_VERSION = ("model", "version")
_LATENCY = (*_VERSION, "part", "quantile")
#: how the workers' values of a gauge are combined (prometheus_client's multi-process modes)
Mode = Literal["livemax", "livesum", "livemostrecent"]


class ModelMetrics:
    def __init__(self, registry: CollectorRegistry, *, removable: bool = True) -> None:
        #: whether a gone version's series can be removed (not in prometheus_client's multi-process mode)
        self.removable = removable

        def gauge(name: str, documentation: str, labels: tuple[str, ...], mode: Mode = "livemax") -> Gauge:
            return Gauge(name, documentation, labels, registry=registry, multiprocess_mode=mode)

        self.profile = gauge(
            "dhow_model_reference_profile",
            "1 when the version has a reference profile (drift is scored), 0 when it has none.",
            _VERSION,
        )
        self.drift = gauge(
            "dhow_drift_score",
            "Drift of a feature's live window from the reference profile (PSI for numbers, Jensen-Shannon "
            "distance for categories); side is input or output (the prediction distribution).",
            (*_VERSION, "feature", "side", "method"),
        )
        self.drifted = gauge(
            "dhow_drift_features_drifted",
            "Features of the version whose drift score is above the threshold in the last scored window.",
            _VERSION,
        )
        self.drift_rows = gauge(
            "dhow_drift_window_rows", "Sampled rows in the version's drift window (what the scores rest on).",
            _VERSION, "livesum",
        )  # fmt: skip
        self.quality = gauge(
            "dhow_model_quality",
            "Quality from feedback over the version's newest labelled predictions: accuracy, precision, recall "
            "(macro) or mae, rmse.",
            (*_VERSION, "metric"),
            "livemostrecent",
        )
        self.feedback = Counter(
            "dhow_feedback_labels",
            "Labels received: joined to a prediction, unmatched (unknown or expired request id), already_joined "
            "(the request was labelled before) or rejected (no fit for its prediction: the prediction stays).",
            ["model", "outcome"],
            registry=registry,
        )
        self.latency = gauge(
            "dhow_latency_window_seconds",
            "The last window's latency quantile of a version, by part (queue or compute).",
            _LATENCY,
        )
        self.latency_baseline = gauge(
            "dhow_latency_baseline_seconds",
            "The median of the version's recent normal windows, by part and quantile.",
            _LATENCY,
        )
        self.anomaly = gauge(
            "dhow_latency_anomaly",
            "How many times its baseline the last window's latency is, when anomalous (0 when normal), by part "
            "(queue or compute) and quantile.",
            _LATENCY,
        )
        self.events = Counter(
            "dhow_monitoring_events",
            "Monitoring episodes begun: drift, latency_anomaly.",
            [*_VERSION, "kind"],
            registry=registry,
        )
