"""Prometheus metrics of one server, in a registry of its own (no global state to clean up)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


class ServerMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.requests = Counter(
            "dhow_inference_requests",
            "Inference requests by model, version and outcome (success, or the error code).",
            ["model", "version", "outcome"],
            registry=self.registry,
        )
        self.request_seconds = Histogram(
            "dhow_request_duration_seconds",
            "Time from a request reaching the data plane to its answer.",
            ["model", "version"],
            buckets=_BUCKETS,
            registry=self.registry,
        )
        self.queue_seconds = Histogram(
            "dhow_queue_duration_seconds",
            "Time a request waited in its model's queue before its batch ran.",
            ["model", "version"],
            buckets=_BUCKETS,
            registry=self.registry,
        )
        self.compute_seconds = Histogram(
            "dhow_compute_duration_seconds",
            "Time a batch spent computing (input assembly, model, output split).",
            ["model", "version"],
            buckets=_BUCKETS,
            registry=self.registry,
        )
        self.batch_size = Histogram(
            "dhow_batch_size",
            "Rows per executed batch.",
            ["model", "version"],
            buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256),
            registry=self.registry,
        )
        self.models_loaded = Gauge(
            "dhow_models_loaded", "Model versions loaded and ready to serve.", registry=self.registry
        )

    def render(self) -> tuple[bytes, str]:
        """The exposition text and its content type, for ``GET /metrics``."""
        return generate_latest(self.registry), CONTENT_TYPE_LATEST
