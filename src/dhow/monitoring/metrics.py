"""Prometheus metrics of one server, in a registry of its own (no global state to clean up).

When several worker processes share the ports, the supervisor sets ``PROMETHEUS_MULTIPROC_DIR`` before they
start: prometheus_client then keeps every value in a file per process, and ``/metrics`` renders the sums of
all of them (the dead workers' counts included), whichever worker answers.
"""

from __future__ import annotations

import contextlib
import os
from bisect import bisect_left
from collections.abc import Iterable
from typing import Protocol

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from prometheus_client.metrics_core import Metric
from prometheus_client.multiprocess import MultiProcessCollector
from prometheus_client.registry import Collector
from prometheus_client.values import MutexValue

from dhow.monitoring.model_metrics import ModelMetrics

#: prometheus_client's own switch to multi-process mode, read when it is first imported
MULTIPROCESS_DIR = "PROMETHEUS_MULTIPROC_DIR"

#: the share of ``max_batch_size`` an executed batch filled
_FILL_BUCKETS = (0.125, 0.25, 0.375, 0.5, 0.625, 0.75, 0.875, 1.0)
_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


def observe_all(histogram: Histogram, values: Iterable[float], *, in_order: bool = False) -> None:
    """Observe many values at once (a batch's queue waits): the same buckets and sum as ``observe`` on each, one
    update per bucket reached instead of one per value (each update takes a lock, or writes a shared file).
    ``in_order``: the sum takes the values one by one, in order, as ``observe`` on each would (a float sum depends
    on it: request durations, whose scraped sum must be what per-request observes gave)."""
    bounds = getattr(histogram, "_upper_bounds", None)
    if bounds is None:  # not a labelled child of a plain histogram, as this was written for: one at a time
        for value in values:
            histogram.observe(value)
        return
    counts = [0] * len(bounds)
    total = 0.0
    values = values if isinstance(values, list) else list(values)
    for value in values:
        counts[bisect_left(bounds, value)] += 1  # observe's bucket: the first bound >= the value
        total += value
    if in_order:
        _add_in_order(histogram._sum, values)
    else:
        histogram._sum.inc(total)
    for index, count in enumerate(counts):
        if count:
            histogram._buckets[index].inc(count)


def _add_in_order(value: object, values: list[float]) -> None:
    """Add ``values`` to a histogram's sum one by one, in order: under one lock for a single process's value
    (``inc`` on each took the lock and a Python call per value, ~1.5k instructions a request); a shared file's
    value (several worker processes) is added to as ``inc`` does."""
    if type(value) is MutexValue:
        with value._lock:
            total = value._value
            for seconds in values:
                total += seconds
            value._value = total
        return
    add = value.inc  # type: ignore[attr-defined]
    for seconds in values:
        add(seconds)


#: durations a request meter holds at most before it writes them
_PENDING_LIMIT = 1024


class RequestMeter:
    """A model version's per-request metrics (the requests counter by outcome, the request-duration histogram),
    gathered in plain Python and written to prometheus_client in one step per batch and before every collection.

    ``count`` and ``observe`` cost a request ~2k instructions against ~16k for a counter increment and a histogram
    observation (each takes a lock, the observation walks the buckets in Python). What a scrape reads is the same:
    the registry's first collector (``_Flush``) writes what is pending before any metric is collected, the counts
    as sums of ones and the durations added to the sum one by one in their order, as ``observe`` would.
    Both sides run on the event loop's thread (requests are answered there, ``/metrics`` is rendered there).
    """

    __slots__ = ("_children", "_counter", "_histogram", "_labels", "_outcomes", "_seconds")

    def __init__(self, counter: Counter, histogram: Histogram, model: str, version: str) -> None:
        self._counter = counter
        self._labels = (model, version)
        #: the counter's child per outcome: ``labels()`` validates and locks, too dear for every flush
        self._children: dict[str, Counter] = {}
        self._histogram = histogram.labels(model, version)
        self._outcomes: dict[str, int] = {}
        self._seconds: list[float] = []

    def count(self, outcome: str) -> None:
        outcomes = self._outcomes
        pending = outcomes.get(outcome)
        if pending is not None:
            outcomes[outcome] = pending + 1
            return
        if outcome not in self._children:  # the series starts (its _created) with its first request, as before
            self._children[outcome] = self._counter.labels(*self._labels, outcome)
        outcomes[outcome] = 1

    def observe(self, seconds: float) -> None:
        pending = self._seconds
        pending.append(seconds)
        if len(pending) >= _PENDING_LIMIT:  # requests refused before any batch runs: still bounded
            self.flush()

    def flush(self) -> None:
        """Write what is pending to prometheus_client."""
        if self._outcomes:
            outcomes, self._outcomes = self._outcomes, {}
            for outcome, count in outcomes.items():
                self._children[outcome].inc(count)
        if self._seconds:
            seconds, self._seconds = self._seconds, []
            observe_all(self._histogram, seconds, in_order=True)


class _DirectRequestMeter(RequestMeter):
    """With several worker processes a scrape may reach another process, which cannot flush this one's: each
    request writes its metrics (to this process's files) at once."""

    __slots__ = ()

    def count(self, outcome: str) -> None:
        super().count(outcome)
        self.flush()

    def observe(self, seconds: float) -> None:
        self._histogram.observe(seconds)


class _Flush(Collector):
    """Registered first: a collection of the registry (a scrape, ``get_sample_value``) writes the meters' pending
    updates before any metric is read."""

    def __init__(self, meters: set[RequestMeter]) -> None:
        self._meters = meters

    def collect(self) -> Iterable[Metric]:
        for meter in self._meters:
            meter.flush()
        return ()

    def describe(self) -> Iterable[Metric]:
        return ()


class LoadSource(Protocol):
    """What a model version holds now (its batcher): read for the queue-depth and in-flight gauges."""

    @property
    def queued(self) -> int: ...

    @property
    def inflight(self) -> int: ...


class ServerMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.multiprocess = bool(os.environ.get(MULTIPROCESS_DIR))
        #: the model versions' request meters, flushed at every collection
        self._meters: set[RequestMeter] = set()
        self.registry.register(_Flush(self._meters))
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
        # the autoscaling signals (deploy/helm/dhow scales on them): what waits and what runs, per model version
        self.queue_depth, self.inflight = (
            Gauge(name, doc, ["model", "version"], registry=self.registry, multiprocess_mode="livesum")
            for name, doc in (
                ("dhow_queue_depth", "Requests waiting in the model version's queue for a batch."),
                (
                    "dhow_inflight_requests",
                    "Requests the model version was given and has not answered yet (queued or in a running batch).",
                ),
            )
        )
        self.batch_fill = Histogram(
            "dhow_batch_fill_ratio",
            "Rows of an executed batch over the model's max_batch_size (1: full batches, the instances are busy).",
            ["model", "version"],
            buckets=_FILL_BUCKETS,
            registry=self.registry,
        )
        self.connections_refused = Counter(
            "dhow_connections_refused",
            "Connections refused at --max-connections, by port: on the REST port (native front) a request answered "
            "503 and its connection closed, on the gRPC port (native front) a new connection closed before the "
            "server's HTTP/2 SETTINGS, nothing sent.",
            ["port"],
            registry=self.registry,
        )
        self.plaintext_refused = Counter(
            "dhow_plaintext_refused",
            "Connections to a TLS port whose first bytes were not TLS, whatever they were (scanners, HTTP/1 sent to "
            "the gRPC port included), by port: on the REST port a plain HTTP request answered 400 (use https://), on "
            "the gRPC port (native front) a plaintext call failed UNAVAILABLE saying the port needs TLS; other bytes "
            "closed unanswered.",
            ["port"],
            registry=self.registry,
        )
        self.observer_failures = Counter(
            "dhow_batch_observer_failures",
            "Executed batches whose monitoring failed (the requests' counts and durations, the queue and compute "
            "histograms, the load gauges, the latency window, tracing's batch spans): the requests were answered, "
            "what was not recorded of the batch is lost. The server log says why, at most once a minute per model "
            "version.",
            ["model", "version"],
            registry=self.registry,
        )
        #: whose queue each (model, version) gauge reads: a reloaded version's successor takes the labels over
        self._load_sources: dict[tuple[str, str], LoadSource] = {}
        #: drift, quality and latency anomalies of the models
        self.models = ModelMetrics(self.registry, removable=not self.multiprocess)
        self._exposed = self.registry
        if self.multiprocess:
            # the metrics above write to this process's files; the exposition reads every process's
            self._exposed = CollectorRegistry()
            MultiProcessCollector(self._exposed)  # type: ignore[no-untyped-call]

    def request_meter(self, model: str, version: str) -> RequestMeter:
        """The per-request metrics of a model version; ``forget_meter`` when the version goes."""
        if self.multiprocess:
            return _DirectRequestMeter(self.requests, self.request_seconds, model, version)
        meter = RequestMeter(self.requests, self.request_seconds, model, version)
        self._meters.add(meter)
        return meter

    def forget_meter(self, meter: RequestMeter) -> None:
        """Write what ``meter`` holds and stop flushing it (its version was unloaded)."""
        meter.flush()
        self._meters.discard(meter)

    def watch_load(self, model: str, version: str, source: LoadSource) -> None:
        """Export ``source``'s queue depth and in-flight requests as the version's gauges.

        In one process they are read when Prometheus scrapes, so a request costs nothing; with several workers
        the scrape may reach another process, so each batch writes them (``sample_load``)."""
        self._load_sources[model, version] = source
        if self.multiprocess:
            self.sample_load(model, version, source)
            return
        self.queue_depth.labels(model, version).set_function(lambda: source.queued)
        self.inflight.labels(model, version).set_function(lambda: source.inflight)

    def sample_load(self, model: str, version: str, source: LoadSource) -> None:
        """Write the gauges from ``source`` now (several workers: called once per executed batch)."""
        if self.multiprocess and self._load_sources.get((model, version)) is source:
            self.queue_depth.labels(model, version).set(source.queued)
            self.inflight.labels(model, version).set(source.inflight)

    def forget_load(self, model: str, version: str, source: LoadSource) -> None:
        """``source`` was unloaded: its gauges go, unless a reload of the same version took them over."""
        if self._load_sources.get((model, version)) is not source:
            return
        del self._load_sources[model, version]
        for gauge in (self.queue_depth, self.inflight):
            if self.multiprocess:
                gauge.labels(model, version).set(0)
            else:
                with contextlib.suppress(KeyError):
                    gauge.remove(model, version)

    def add_collector(self, collector: Collector) -> None:
        """A collector read at each scrape (GPU, process instances): this process's figures, also when several
        worker processes share the ports (then the worker that answers the scrape reports its own)."""
        self._exposed.register(collector)

    def render(self) -> tuple[bytes, str]:
        """The exposition text and its content type, for ``GET /metrics``."""
        return generate_latest(self._exposed), CONTENT_TYPE_LATEST
