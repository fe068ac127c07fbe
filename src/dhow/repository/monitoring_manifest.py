"""The ``monitoring:`` section of model.yaml: drift sampling, feedback and latency anomalies.

Every refusal names the file, the field and what was expected, as the rest of the manifest's do.
"""

from __future__ import annotations

from pathlib import Path

from dhow.core.model_config import DriftConfig, FeedbackConfig, LatencyConfig, MonitoringConfig
from dhow.repository.manifest_fields import Fields, is_fraction, is_number, positive_int

__all__ = ["parse_monitoring"]


def _positive(value: object) -> bool:
    return is_number(value) and value > 0  # type: ignore[operator]


def parse_monitoring(path: Path | str, raw: object) -> MonitoringConfig:
    if raw is None:
        return MonitoringConfig()
    fields = Fields(path, "monitoring", raw)
    drift = _drift(path, fields.get("drift", lambda v: True, ""))
    feedback = _feedback(path, fields.get("feedback", lambda v: True, ""))
    latency = _latency(path, fields.get("latency", lambda v: True, ""))
    fields.finish("drift, feedback, latency")
    return MonitoringConfig(drift, feedback, latency)


def _drift(path: Path | str, raw: object) -> DriftConfig:
    if raw is None:
        return DriftConfig()
    fields = Fields(path, "monitoring.drift", raw)
    default = DriftConfig()
    config = DriftConfig(
        sample_rate=float(fields.get("sample_rate", is_fraction, "a number from 0 to 1", default.sample_rate)),
        window=fields.get("window", positive_int, "a positive number of rows", default.window),
        interval_s=float(fields.get("interval_s", _positive, "a number of seconds above 0", default.interval_s)),
        min_rows=fields.get("min_rows", positive_int, "a positive number of rows", default.min_rows),
        threshold=float(fields.get("threshold", _positive, "a number above 0 (PSI, e.g. 0.2)", default.threshold)),
    )
    fields.finish("sample_rate, window, interval_s, min_rows, threshold")
    if config.min_rows > config.window:
        raise fields.error("min_rows", f"at most the window ({config.window} rows)")
    return config


def _feedback(path: Path | str, raw: object) -> FeedbackConfig | None:
    if raw is None:
        return None
    fields = Fields(path, "monitoring.feedback", raw)
    default = FeedbackConfig()
    task = fields.require("task", lambda v: v in ("classification", "regression"), "classification or regression")
    config = FeedbackConfig(
        task=task,
        output=fields.get("output", lambda v: isinstance(v, str), "the name of an output", ""),
        pending=fields.get("pending", positive_int, "a positive number of predictions", default.pending),
        window=fields.get("window", positive_int, "a positive number of labelled predictions", default.window),
    )
    fields.finish("task, output, pending, window")
    return config


def _latency(path: Path | str, raw: object) -> LatencyConfig:
    if raw is None:
        return LatencyConfig()
    if raw is False:
        return LatencyConfig(enabled=False)
    fields = Fields(path, "monitoring.latency", raw)
    default = LatencyConfig()
    config = LatencyConfig(
        enabled=fields.get("enabled", lambda v: isinstance(v, bool), "true or false", True),
        window_s=float(fields.get("window_s", _positive, "a number of seconds above 0", default.window_s)),
        baseline_windows=fields.get("baseline_windows", positive_int, "a positive integer", default.baseline_windows),
        min_windows=fields.get("min_windows", positive_int, "a positive integer", default.min_windows),
        threshold=float(fields.get("threshold", _positive, "a number of MADs above 0", default.threshold)),
        min_ratio=float(fields.get("min_ratio", lambda v: is_number(v) and v >= 1, "a number >= 1", default.min_ratio)),  # type: ignore[operator]
        min_slack_ms=float(
            fields.get("min_slack_ms", lambda v: is_number(v) and v >= 0, "milliseconds >= 0", default.min_slack_ms)  # type: ignore[operator]
        ),
        min_requests=fields.get("min_requests", positive_int, "a positive integer", default.min_requests),
    )
    fields.finish("enabled, window_s, baseline_windows, min_windows, threshold, min_ratio, min_slack_ms, min_requests")
    if config.min_windows > config.baseline_windows:
        raise fields.error("min_windows", f"at most baseline_windows ({config.baseline_windows})")
    return config
