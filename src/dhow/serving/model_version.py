"""One loaded version of a model: its runtime instances, batcher and statistics."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from dhow.core import affinity
from dhow.core.model_config import ModelConfig, TensorSpec
from dhow.monitoring.latency import LatencyRecorder
from dhow.monitoring.metrics import ServerMetrics, observe_all
from dhow.monitoring.profile import ReferenceProfile
from dhow.monitoring.tracing import record_batch
from dhow.runtimes.base import Runtime, create_runtime
from dhow.scheduling.batcher import DynamicBatcher
from dhow.scheduling.execution import Arrays
from dhow.scheduling.instances import load_process_instances
from dhow.scheduling.stats import BatchTimings, ModelStats
from dhow.serving.signature import checked_output

log = logging.getLogger("dhow.models")


def load_runtimes(config: ModelConfig, version_dir: Path) -> tuple[list[Runtime], ModelConfig]:
    """Load one runtime per instance (blocking: call from a thread) and complete the config.

    A manifest may leave inputs/outputs out where the artifact declares them (ONNX); the
    runtime's signature fills them in (each runtime checks what is declared against its artifact). With
    ``instances.kind: process`` each instance is a process hosting the runtime, and the
    signature comes from there.
    """
    runtimes: list[Runtime] = []
    try:
        if config.instances.kind == "process":
            runtimes.extend(load_process_instances(config, version_dir))
        else:
            for _ in range(config.instances.count):
                runtime = create_runtime(config.runtime)
                runtime.load(version_dir, config)
                runtimes.append(runtime)
        inputs, outputs = runtimes[0].signature()
        return runtimes, _complete(config, inputs, outputs)
    except BaseException:
        for runtime in runtimes:
            runtime.unload()
        raise


def _complete(config: ModelConfig, inputs: tuple[TensorSpec, ...], outputs: tuple[TensorSpec, ...]) -> ModelConfig:
    return dataclasses.replace(config, inputs=config.inputs or inputs, outputs=config.outputs or outputs)


class ModelVersion:
    def __init__(
        self,
        config: ModelConfig,
        version: int,
        runtimes: list[Runtime],
        metrics: ServerMetrics,
        *,
        queue_timeout_ms: float = 0.0,
    ) -> None:
        self.config = config
        self.name = config.name
        self.version = version
        self.version_label = str(version)
        self.runtimes = runtimes
        self.stats = ModelStats.for_version(config.name, version, config.max_batch_size)
        self.inputs: dict[str, TensorSpec] = {spec.name: spec for spec in config.inputs or ()}
        self.outputs: dict[str, TensorSpec] = {spec.name: spec for spec in config.outputs or ()}
        self.output_names = tuple(self.outputs)
        feedback = config.monitoring.feedback
        #: the output whose prediction is kept for feedback, computed even for a request that asks for others
        #: only ("": the model takes no feedback)
        self.feedback_output = (feedback.output or next(iter(self.outputs), "")) if feedback is not None else ""
        # what every request's checks read, worked out once per version rather than once per request
        #: how errors name the model
        self.label = f"model '{config.name}'"
        #: whether requests carry a batch dimension (``max_batch_size`` > 0)
        self.batched = config.max_batch_size > 0
        #: the inputs a request must give
        self.required_inputs = tuple(name for name, spec in self.inputs.items() if not spec.optional)
        #: the outputs checked against their declaration once per batch, on the instance's thread, rather than once
        #: per request on the loop's: those whose first dimension is any size, so that a batch's output fits
        #: exactly when each request's rows of it do (and a version that does not batch: its batches are of one)
        self.batch_checked = frozenset(
            name for name, spec in self.outputs.items() if not self.batched or spec.shape[:1] == (-1,)
        )
        labels = (config.name, self.version_label)
        #: the requests counter and the request-duration histogram, gathered per batch (``RequestMeter``)
        self._meter = metrics.request_meter(*labels)
        #: the data plane's two per-request updates: ``count_request(outcome)``, ``request_seconds.observe(s)``
        self.count_request: Callable[[str], None] = self._meter.count
        self.request_seconds = self._meter
        self._queue_seconds = metrics.queue_seconds.labels(*labels)
        self._compute_seconds = metrics.compute_seconds.labels(*labels)
        self._batch_size = metrics.batch_size.labels(*labels)
        self._metrics = metrics
        self._batch_fill = metrics.batch_fill.labels(*labels) if config.max_batch_size else None
        #: the reference profile drift is scored against (None: the version has none, or ``profile_error``)
        self.profile: ReferenceProfile | None = None
        self.profile_error = ""
        #: queue and compute times of the current latency window (None: latency anomalies are off)
        self.latency = LatencyRecorder() if config.monitoring.latency.enabled else None
        self._executor = ThreadPoolExecutor(
            len(runtimes), thread_name_prefix=f"dhow-{config.name}-{version}", initializer=affinity.as_any
        )
        self.batcher = DynamicBatcher(
            f"model '{config.name}' version {version}",
            [runtime.infer for runtime in runtimes],
            self._executor,
            self.stats,
            max_batch_size=config.max_batch_size,
            batching=config.batching,
            observer=self._observe_batch,
            default_timeout_ms=queue_timeout_ms,
            check=self._checked_batch if self.batch_checked else None,
            observer_failed=metrics.observer_failures.labels(*labels).inc,
        )
        metrics.watch_load(self.name, self.version_label, self.batcher)

    def _checked_batch(self, produced: Arrays) -> Arrays:
        """A batch's outputs as their declared datatypes (``checked_output``); ``SignatureMismatch`` otherwise."""
        checked = self.batch_checked
        return {
            name: checked_output(self, self.outputs[name], array) if name in checked else array
            for name, array in produced.items()
        }

    def _observe_batch(
        self, timings: BatchTimings, start_ns: int, waits: list[int], traces: Sequence[object | None]
    ) -> None:
        self._meter.flush()  # the requests answered since the last batch: what waits stays bounded
        observe_all(self._queue_seconds, [wait / 1e9 for wait in waits])
        self._compute_seconds.observe((timings.input_ns + timings.infer_ns + timings.output_ns) / 1e9)
        self._batch_size.observe(timings.size)
        if self._batch_fill is not None:
            self._batch_fill.observe(timings.size / self.config.max_batch_size)
        self._metrics.sample_load(self.name, self.version_label, self.batcher)
        if traces:
            attributes = {"dhow.model": self.name, "dhow.version": self.version_label, "dhow.batch.rows": timings.size}
            record_batch(traces, attributes, start_ns, time.monotonic_ns(), waits)
        if self.latency is not None:
            self.latency.add(waits, timings.input_ns + timings.infer_ns + timings.output_ns)

    async def close(self) -> None:
        """Finish what is queued and running, then release the runtimes."""
        await self.batcher.close()
        self._executor.shutdown(wait=True)
        self._metrics.forget_load(self.name, self.version_label, self.batcher)
        self._metrics.forget_meter(self._meter)
        # in a thread: a process instance waits for its process to exit
        await asyncio.to_thread(self._unload)

    def _unload(self) -> None:
        for runtime in self.runtimes:
            try:
                runtime.unload()
            except Exception:
                log.exception("unloading %s version %s failed", self.name, self.version)
