"""Prometheus metrics of one server, in a registry of its own (no global state to clean up).

When several worker processes share the ports, the supervisor sets ``PROMETHEUS_MULTIPROC_DIR`` before they
start: prometheus_client then keeps every value in a file per process, and ``/metrics`` renders the sums of
all of them (the dead workers' counts included), whichever worker answers.
"""

from __future__ import annotations

import os

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from prometheus_client.multiprocess import MultiProcessCollector

from dhow.monitoring.model_metrics import ModelMetrics

#: prometheus_client's own switch to multi-process mode, read when it is first imported
MULTIPROCESS_DIR = "PROMETHEUS_MULTIPROC_DIR"

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
            "dhow_models_loaded",
            "Model versions loaded and ready to serve (with several workers: in the worker that has the fewest).",
            registry=self.registry,
            multiprocess_mode="livemin",
        )
        self.workers = Gauge(
            "dhow_workers",
            "Server processes answering on these ports (--workers; fewer while one restarts).",
            registry=self.registry,
            multiprocess_mode="livesum",
        )
        #: drift, quality and latency anomalies of the models
        self.models = ModelMetrics(self.registry, removable=not os.environ.get(MULTIPROCESS_DIR))
        self._exposed = self.registry
        if os.environ.get(MULTIPROCESS_DIR):
            # the metrics above write to this process's files; the exposition reads every process's
            self._exposed = CollectorRegistry()
            MultiProcessCollector(self._exposed)  # type: ignore[no-untyped-call]

    def render(self) -> tuple[bytes, str]:
        """The exposition text and its content type, for ``GET /metrics``."""
        return generate_latest(self._exposed), CONTENT_TYPE_LATEST
