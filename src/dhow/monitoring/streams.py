"""Prometheus metrics of stream consumers, in the server's registry (``dhow serve``) or the one of
``dhow stream run``; labelled by stream name (one process may run several)."""

from __future__ import annotations

import numpy as np
import numpy.typing as npt
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

__all__ = ["StreamMetrics"]

_LATENCY = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
_SIZES = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)


class StreamMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.messages = Counter(
            "dhow_stream_messages",
            "Stream messages by what became of them: received, answered, failed (answered or not, by a dead "
            "letter or skipped), dead_lettered.",
            ["stream", "outcome"],
            registry=registry,
        )
        self.failures = Counter(
            "dhow_stream_failures", "Messages that could not be answered, by error code.", ["stream", "code"],
            registry=registry,
        )  # fmt: skip
        self.batch_size = Histogram(
            "dhow_stream_batch_messages",
            "Messages per admitted batch (one poll of the source; the model's batcher cuts its own batches).",
            ["stream"],
            buckets=_SIZES,
            registry=registry,
        )
        self.latency = Histogram(
            "dhow_stream_latency_seconds",
            "From a message's timestamp to the broker's acknowledgement of its reply (end to end).",
            ["stream"],
            buckets=_LATENCY,
            registry=registry,
        )
        self.consumer_lag = Gauge(
            "dhow_stream_consumer_lag",
            "Messages behind the end of each assigned partition (as the Kafka client last measured).",
            ["stream", "partition"],
            registry=registry,
            multiprocess_mode="livesum",
        )
        self._partitions: dict[str, set[str]] = {}

    def received(self, stream: str, count: int) -> None:
        self.messages.labels(stream, "received").inc(count)

    def answered(self, stream: str, seconds: npt.ArrayLike) -> None:
        """A batch's replies: their latencies counted into the histogram's buckets at once, by numpy (``observe``
        per reply costs more than the rest of the reply's bookkeeping, a bisect per reply a third of that)."""
        values = np.asarray(seconds, dtype=np.float64).reshape(-1)
        self.messages.labels(stream, "answered").inc(len(values))
        child = self.latency.labels(stream)
        buckets, total = getattr(child, "_buckets", None), getattr(child, "_sum", None)
        if buckets is None or total is None or len(buckets) != len(_LATENCY) + 1:  # not the client it was written for
            for value in values.tolist():
                child.observe(value)
            return
        total.inc(float(values.sum()))
        # the bucket observe would choose: the first bound not below the value (bisect_left), the last for +Inf
        counts = np.bincount(np.searchsorted(_LATENCY, values, side="left"), minlength=len(_LATENCY) + 1)
        for index in np.flatnonzero(counts).tolist():
            buckets[index].inc(int(counts[index]))

    def failed(self, stream: str, code: str, dead_lettered: bool) -> None:
        self.messages.labels(stream, "failed").inc()
        self.failures.labels(stream, code).inc()
        if dead_lettered:
            self.messages.labels(stream, "dead_lettered").inc()

    def batch(self, stream: str, size: int) -> None:
        self.batch_size.labels(stream).observe(size)

    def lag(self, stream: str, lags: dict[str, int]) -> None:
        """The lag of the partitions assigned now; those no longer assigned leave the exposition."""
        for gone in self._partitions.get(stream, set()) - lags.keys():
            self.consumer_lag.remove(stream, gone)
        for partition, value in lags.items():
            self.consumer_lag.labels(stream, partition).set(value)
        self._partitions[stream] = set(lags)
