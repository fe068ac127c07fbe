"""The autoscaling signals in-process: queue depth and in-flight requests read at the scrape, batch fill per batch."""

from __future__ import annotations

import asyncio
import threading

import numpy as np
import pytest

from dhow.core.model_config import BatchingConfig, ModelConfig
from dhow.monitoring.metrics import ServerMetrics, observe_all
from dhow.serving.model_version import ModelVersion
from tests.test_batcher import Recorder


def _value(metrics: ServerMetrics, name: str, version: str = "1") -> float | None:
    return metrics.registry.get_sample_value(name, {"model": "m", "version": version})


def _version(metrics: ServerMetrics, recorder: Recorder) -> ModelVersion:
    config = ModelConfig(name="m", runtime="python", max_batch_size=4, batching=BatchingConfig())
    runtime = type("Gated", (), {"infer": staticmethod(recorder), "unload": lambda self: None})()
    return ModelVersion(config, 1, [runtime], metrics)


def test_queue_depth_and_inflight_follow_the_batcher_and_go_with_the_version() -> None:
    async def scenario() -> None:
        metrics, gate = ServerMetrics(), threading.Event()
        recorder = Recorder(gate=gate)
        version = _version(metrics, recorder)
        rows = np.ones((1, 3), dtype=np.float32)
        calls = [asyncio.create_task(version.batcher.submit({"x": rows}, ["y"], 1)) for _ in range(7)]
        while not recorder.batches and version.batcher.inflight < 7:
            await asyncio.sleep(0.01)
        await asyncio.sleep(0.05)  # the first batch is running, held by the gate; the rest wait
        running = 7 - version.batcher.queued
        assert 1 <= running <= 4  # one batch (at most max_batch_size rows) runs, held by the gate
        assert _value(metrics, "dhow_inflight_requests") == 7
        assert _value(metrics, "dhow_queue_depth") == 7 - running
        gate.set()
        await asyncio.gather(*calls)
        assert _value(metrics, "dhow_inflight_requests") == 0
        assert _value(metrics, "dhow_queue_depth") == 0
        # one fill per batch: the batches' rows over max_batch_size 4
        assert _value(metrics, "dhow_batch_fill_ratio_count") == len(recorder.batches)
        assert _value(metrics, "dhow_batch_fill_ratio_sum") == sum(recorder.batches) / 4
        await version.close()
        assert _value(metrics, "dhow_queue_depth") is None  # an unloaded version is not scraped as idle

    asyncio.run(scenario())


def test_a_reload_of_the_same_version_keeps_its_gauges_when_the_old_one_closes() -> None:
    async def scenario() -> None:
        metrics = ServerMetrics()
        old, new = _version(metrics, Recorder()), _version(metrics, Recorder())
        await old.close()  # after the swap the old one finishes and goes: the new one's labels stay
        assert _value(metrics, "dhow_inflight_requests") == 0
        await new.close()
        assert _value(metrics, "dhow_inflight_requests") is None

    asyncio.run(scenario())


def test_a_batch_of_observations_lands_in_the_buckets_one_at_a_time_would() -> None:
    metrics = ServerMetrics()
    # on a bound, between bounds, past the last bound, zero: each bucket as observe would pick it
    values = [0.0, 0.0005, 0.0007, 0.001, 0.003, 0.003, 0.5, 9.9, 10.0, 11.0, 42.0]
    observe_all(metrics.queue_seconds.labels("m", "1"), values)
    for value in values:
        metrics.queue_seconds.labels("m", "2").observe(value)
    samples = {
        version: {
            (sample.name, sample.labels.get("le")): sample.value
            for family in metrics.registry.collect()
            if family.name == "dhow_queue_duration_seconds"
            for sample in family.samples
            if sample.labels.get("version") == version and not sample.name.endswith("_created")
        }
        for version in ("1", "2")
    }
    assert samples["1"] == samples["2"]
    assert samples["1"][("dhow_queue_duration_seconds_count", None)] == len(values)


def test_every_request_of_a_batch_counts_its_queue_wait_once() -> None:
    async def scenario() -> None:
        metrics, recorder = ServerMetrics(), Recorder()
        version = _version(metrics, recorder)
        ones = np.ones((1, 3), dtype=np.float32)
        # submitted in one turn of the loop: they queue together and leave in batches of max_batch_size
        await asyncio.gather(*(version.batcher.submit({"x": ones}, ["y"], 1) for _ in range(9)))
        assert len(recorder.batches) < 9
        assert version.stats.queue.count == 9
        assert _value(metrics, "dhow_queue_duration_seconds_count") == 9
        assert _value(metrics, "dhow_queue_duration_seconds_sum") == pytest.approx(version.stats.queue.ns / 1e9)
        await version.close()

    asyncio.run(scenario())


def test_request_metrics_gathered_per_batch_read_as_written_one_at_a_time() -> None:
    """A version's request counts and durations wait in its meter; any collection of the registry reads the values
    direct updates would have given, a float sum included."""
    gathered, direct = ServerMetrics(), ServerMetrics()
    meter = gathered.request_meter("m", "1")
    durations = [0.0004, 0.0011, 0.3, 1e-9, 0.0011, 7.0, 12.5, 0.1 + 0.2]
    outcomes = ["success", "success", "INVALID_ARGUMENT", "success", "success", "NOT_FOUND", "success", "success"]
    for outcome, seconds in zip(outcomes, durations, strict=True):
        meter.count(outcome)
        meter.observe(seconds)
        direct.requests.labels("m", "1", outcome).inc()
        direct.request_seconds.labels("m", "1").observe(seconds)

    def samples(metrics: ServerMetrics) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
        return {
            (sample.name, tuple(sorted(sample.labels.items()))): sample.value
            for family in metrics.registry.collect()
            if family.name in ("dhow_inference_requests", "dhow_request_duration_seconds")
            for sample in family.samples
            if not sample.name.endswith("_created")
        }

    assert meter._seconds  # nothing written yet: the collection below writes it
    assert samples(gathered) == samples(direct)
    assert gathered.registry.get_sample_value(
        "dhow_inference_requests_total", {"model": "m", "version": "1", "outcome": "success"}
    ) == outcomes.count("success")
    assert gathered.registry.get_sample_value(
        "dhow_request_duration_seconds_sum", {"model": "m", "version": "1"}
    ) == direct.registry.get_sample_value("dhow_request_duration_seconds_sum", {"model": "m", "version": "1"})
    meter.count("success")  # after a collection, more: the next one reads them too
    assert (
        gathered.registry.get_sample_value(
            "dhow_inference_requests_total", {"model": "m", "version": "1", "outcome": "success"}
        )
        == outcomes.count("success") + 1
    )


def test_a_version_answering_requests_exports_them_at_the_scrape() -> None:
    async def scenario() -> None:
        metrics, recorder = ServerMetrics(), Recorder()
        version = _version(metrics, recorder)
        ones = np.ones((1, 3), dtype=np.float32)
        await asyncio.gather(*(version.batcher.submit({"x": ones}, ["y"], 1) for _ in range(5)))
        for _ in range(5):  # the data plane's two updates per answered request
            version.count_request("success")
            version.request_seconds.observe(0.002)
        text = metrics.render()[0].decode()
        assert 'dhow_inference_requests_total{model="m",outcome="success",version="1"} 5.0' in text
        assert 'dhow_request_duration_seconds_count{model="m",version="1"} 5.0' in text
        version.count_request("success")
        await version.close()  # what it held is written when it goes
        assert _value_of(metrics, "dhow_inference_requests_total", outcome="success") == 6

    asyncio.run(scenario())


def _value_of(metrics: ServerMetrics, name: str, **labels: str) -> float | None:
    return metrics.registry.get_sample_value(name, {"model": "m", "version": "1", **labels})


def test_each_batch_whose_monitoring_fails_is_counted_in_the_version_s_metric_and_answered() -> None:
    """The model version's batch observer fails (here its latency window, broken): every such batch is counted in
    ``dhow_batch_observer_failures_total`` (which the alert rules read), its requests answered all the same."""

    class Broken:
        def add(self, waits: object, compute_ns: int) -> None:
            raise RuntimeError("a broken latency window")

    async def scenario() -> None:
        metrics, recorder = ServerMetrics(), Recorder()
        version = _version(metrics, recorder)
        assert _value(metrics, "dhow_batch_observer_failures_total") == 0, "a series from the load: alerts see 0 first"
        version.latency = Broken()  # type: ignore[assignment]
        rows = np.ones((1, 3), dtype=np.float32)
        for _ in range(3):  # one after the other: a batch each
            answer = await version.batcher.submit({"x": rows}, ["y"], 1)
            np.testing.assert_array_equal(answer["y"], rows * 2)
        assert _value(metrics, "dhow_batch_observer_failures_total") == len(recorder.batches) == 3
        assert b'dhow_batch_observer_failures_total{model="m",version="1"} 3.0' in metrics.render()[0]
        await version.close()

    asyncio.run(scenario())
