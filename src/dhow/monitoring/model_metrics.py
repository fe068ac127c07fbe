"""The metrics of the models' behaviour (drift, quality from feedback, latency anomalies), beside the server's.

With several worker processes each worker scores its own sample: the exposition shows the highest drift and
anomaly figures of the live workers, and the most recent quality figures.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge

__all__ = ["ModelMetrics"]


class ModelMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.profile = Gauge(
            "dhow_model_reference_profile",
            "1 when the version has a reference profile (drift is scored), 0 when it has none.",
            ["model", "version"],
            registry=registry,
            multiprocess_mode="livemax",
        )
        self.drift = Gauge(
            "dhow_drift_score",
            "Drift of a feature's live window from the reference profile (PSI for numbers, Jensen-Shannon "
            "distance for categories); side is input or output (the prediction distribution).",
            ["model", "version", "feature", "side", "method"],
            registry=registry,
            multiprocess_mode="livemax",
        )
        self.drifted = Gauge(
            "dhow_drift_features_drifted",
            "Features of the version whose drift score is above the threshold in the last scored window.",
            ["model", "version"],
            registry=registry,
            multiprocess_mode="livemax",
        )
        self.drift_rows = Gauge(
            "dhow_drift_window_rows",
            "Sampled rows in the version's drift window (what the scores rest on).",
            ["model", "version"],
            registry=registry,
            multiprocess_mode="livesum",
        )
        self.quality = Gauge(
            "dhow_model_quality",
            "Quality from feedback over the version's newest labelled predictions: accuracy, precision, recall "
            "(macro) or mae, rmse.",
            ["model", "version", "metric"],
            registry=registry,
            multiprocess_mode="livemostrecent",
        )
        self.feedback = Counter(
            "dhow_feedback_labels",
            "Labels received: joined to a prediction, or unmatched (unknown or expired request id).",
            ["model", "outcome"],
            registry=registry,
        )
        self.latency = Gauge(
            "dhow_latency_window_seconds",
            "The last window's latency quantile of a version, by part (queue or compute).",
            ["model", "version", "part", "quantile"],
            registry=registry,
            multiprocess_mode="livemax",
        )
        self.latency_baseline = Gauge(
            "dhow_latency_baseline_seconds",
            "The median of the version's recent normal windows, by part and quantile.",
            ["model", "version", "part", "quantile"],
            registry=registry,
            multiprocess_mode="livemax",
        )
        self.anomaly = Gauge(
            "dhow_latency_anomaly",
            "How many times its baseline the last window's latency is, when anomalous (0 when normal), by part "
            "(queue or compute) and quantile.",
            ["model", "version", "part", "quantile"],
            registry=registry,
            multiprocess_mode="livemax",
        )
        self.events = Counter(
            "dhow_monitoring_events",
            "Monitoring episodes begun: drift, latency_anomaly.",
            ["model", "version", "kind"],
            registry=registry,
        )
