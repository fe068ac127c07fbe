"""The dynamic batcher in-process: rows come back to their own request, deadlines, shedding, faults."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from dhow.core.errors import DeadlineExceeded, ModelFault, Overloaded, Unavailable
from dhow.core.model_config import BatchingConfig
from dhow.scheduling.batcher import DynamicBatcher
from dhow.scheduling.execution import RowParts
from dhow.scheduling.stats import ModelStats

Arrays = dict[str, np.ndarray]


class Recorder:
    """A model instance that doubles its input and remembers every batch it saw."""

    def __init__(self, delay: float = 0.0, gate: threading.Event | None = None) -> None:
        self.batches: list[int] = []
        self.seen: list[float] = []
        self.delay = delay
        self.gate = gate

    def __call__(self, inputs: Mapping[str, np.ndarray], outputs: Sequence[str]) -> Arrays:
        if self.gate is not None:
            self.gate.wait(5)
        if self.delay:
            threading.Event().wait(self.delay)
        x = inputs["x"]
        self.batches.append(x.shape[0])
        self.seen.extend(x[:, 0].tolist())
        return {"y": x * 2, "sum": x.sum(axis=1)}


def _batcher(instance: Recorder, *, max_batch_size: int = 16, count: int = 1, **batching: float) -> DynamicBatcher:
    executor = ThreadPoolExecutor(count)
    return DynamicBatcher(
        "model 'm' version 1",
        [instance] * count,
        executor,
        ModelStats(),
        max_batch_size=max_batch_size,
        batching=BatchingConfig(**batching),  # type: ignore[arg-type]
    )


def _rows(start: int, count: int, width: int = 3) -> np.ndarray:
    return np.arange(start, start + count * width, dtype=np.float32).reshape(count, width)


def test_mixed_batch_sizes_get_exactly_their_own_rows() -> None:
    async def scenario() -> tuple[list[tuple[np.ndarray, Arrays]], Recorder, DynamicBatcher]:
        model = Recorder(delay=0.002)
        batcher = _batcher(model, max_batch_size=16, count=2, max_queue_delay_ms=2)
        sizes = [1, 3, 2, 5, 1, 4, 7, 1, 2, 8] * 6
        inputs, start = [], 0
        for size in sizes:
            inputs.append(_rows(start, size))
            start += size * 3
        results = await asyncio.gather(*(batcher.submit({"x": x}, ["y", "sum"], x.shape[0]) for x in inputs))
        await batcher.close()
        return list(zip(inputs, results, strict=True)), model, batcher

    pairs, model, batcher = asyncio.run(scenario())
    for x, result in pairs:
        np.testing.assert_array_equal(result["y"], x * 2)
        np.testing.assert_array_equal(result["sum"], x.sum(axis=1))
    assert max(model.batches) > 1, "concurrent requests should have been batched"
    assert max(model.batches) <= 16
    assert batcher.stats.execution_count == len(model.batches) < len(pairs)
    assert batcher.stats.queue.count == len(pairs)


def test_queue_delay_gathers_and_preferred_size_cuts() -> None:
    async def scenario() -> list[int]:
        model = Recorder()
        batcher = _batcher(model, max_batch_size=32, max_queue_delay_ms=200, preferred_batch_sizes=(4,))
        tasks = [asyncio.create_task(batcher.submit({"x": _rows(i, 1)}, ["y"], 1)) for i in range(4)]
        await asyncio.gather(*tasks)
        await batcher.close()
        return model.batches

    # four single rows reach the preferred size 4 and go at once, as one batch, without waiting 200 ms
    assert asyncio.run(asyncio.wait_for(scenario(), 0.15)) == [4]


def test_request_past_its_timeout_is_answered_and_never_computed() -> None:
    async def scenario() -> tuple[BaseException | Arrays, Recorder]:
        gate = threading.Event()
        model = Recorder(gate=gate)
        batcher = _batcher(model, max_batch_size=1)
        first = asyncio.create_task(batcher.submit({"x": _rows(0, 1)}, ["y"], 1))
        await asyncio.sleep(0.02)  # the first occupies the only instance
        late = asyncio.create_task(batcher.submit({"x": _rows(1000, 1)}, ["y"], 1, timeout_ns=20_000_000))
        outcome = (await asyncio.gather(late, return_exceptions=True))[0]
        gate.set()
        await first
        await batcher.close()
        return outcome, model

    outcome, model = asyncio.run(scenario())
    assert isinstance(outcome, DeadlineExceeded)
    assert "timed out after 20 ms" in outcome.message and "not run" in outcome.message
    assert 1000.0 not in model.seen


def test_the_queue_timeout_answers_each_request_at_its_own_deadline() -> None:
    """Requests under the model's queue timeout share one timer: each still times out 30 ms after it queued,
    not after the first one did, and a request that named a longer timeout outlives them."""

    async def scenario() -> tuple[list[tuple[BaseException | Arrays, float]], Arrays, Recorder, int]:
        gate = threading.Event()
        model = Recorder(gate=gate)
        batcher = _batcher(model, max_batch_size=1, timeout_ms=30)
        first = asyncio.create_task(batcher.submit({"x": _rows(0, 1)}, ["y"], 1))
        await asyncio.sleep(0.01)  # the first occupies the only instance

        async def timed(start: int) -> tuple[BaseException | Arrays, float]:
            queued = time.monotonic()
            outcome = (await asyncio.gather(batcher.submit({"x": _rows(start, 1)}, ["y"], 1), return_exceptions=True))[
                0
            ]
            return outcome, time.monotonic() - queued

        early = asyncio.create_task(timed(100))
        await asyncio.sleep(0.02)
        later = asyncio.create_task(timed(200))
        patient = asyncio.create_task(batcher.submit({"x": _rows(7, 1)}, ["y"], 1, timeout_ns=5_000_000_000))
        expired = [await early, await later]
        queued = batcher.queued  # the timed-out requests left the queue: only the patient one is in it
        gate.set()
        await first
        answer = await patient
        await batcher.close()
        return expired, answer, model, queued

    expired, answer, model, queued = asyncio.run(scenario())
    for outcome, waited in expired:
        assert isinstance(outcome, DeadlineExceeded) and "timed out after 30 ms" in outcome.message
        assert waited >= 0.03
    assert queued == 1 and answer["y"][0, 0] == 14.0
    assert 100.0 not in model.seen and 200.0 not in model.seen


def test_timed_out_requests_free_their_place_in_a_bounded_queue() -> None:
    async def scenario() -> tuple[list[BaseException | Arrays], Arrays]:
        gate = threading.Event()
        model = Recorder(gate=gate)
        batcher = _batcher(model, max_batch_size=1, max_queue_size=2)
        first = asyncio.create_task(batcher.submit({"x": _rows(0, 1)}, ["y"], 1))
        await asyncio.sleep(0.02)  # the first occupies the only instance
        late = [batcher.submit({"x": _rows(100 + i, 1)}, ["y"], 1, timeout_ns=10_000_000) for i in range(2)]
        expired = await asyncio.gather(*late, return_exceptions=True)
        # the queue is full of answered requests only: a new one must be admitted, not shed
        admitted = asyncio.create_task(batcher.submit({"x": _rows(7, 1)}, ["y"], 1))
        await asyncio.sleep(0.01)
        gate.set()
        await first
        answer = await admitted
        await batcher.close()
        return expired, answer

    expired, answer = asyncio.run(scenario())
    assert all(isinstance(outcome, DeadlineExceeded) for outcome in expired)
    assert answer["y"][0, 0] == 14.0


def test_full_queue_sheds_with_overloaded_and_admitted_requests_complete() -> None:
    async def scenario() -> list[BaseException | Arrays]:
        gate = threading.Event()
        batcher = _batcher(Recorder(gate=gate), max_batch_size=1, max_queue_size=3)
        tasks = [asyncio.create_task(batcher.submit({"x": _rows(i, 1)}, ["y"], 1)) for i in range(8)]
        await asyncio.sleep(0.05)
        gate.set()
        outcomes = await asyncio.gather(*tasks, return_exceptions=True)
        await batcher.close()
        return outcomes

    outcomes = asyncio.run(scenario())
    shed = [o for o in outcomes if isinstance(o, Overloaded)]
    served = [o for o in outcomes if isinstance(o, dict)]
    assert shed and served and len(shed) + len(served) == 8
    assert all(o.retry_after for o in shed) and "max_queue_size" in shed[0].message


def test_model_fault_reaches_the_batch_and_the_batcher_keeps_serving() -> None:
    calls = {"n": 0}

    def flaky(inputs: Mapping[str, np.ndarray], outputs: Sequence[str]) -> Arrays:
        calls["n"] += 1
        if calls["n"] == 1:
            raise ValueError("boom")
        if calls["n"] == 2:
            return {"y": np.zeros((1, 3), np.float32)}  # wrong row count for a batch of two
        return {"y": inputs["x"]}

    async def scenario() -> list[BaseException | Arrays]:
        batcher = DynamicBatcher(
            "m", [flaky], ThreadPoolExecutor(1), ModelStats(), max_batch_size=8, batching=BatchingConfig()
        )
        first = await asyncio.gather(batcher.submit({"x": _rows(0, 1)}, ["y"], 1), return_exceptions=True)
        second = await asyncio.gather(
            *(batcher.submit({"x": _rows(i, 1)}, ["y"], 1) for i in (1, 2)), return_exceptions=True
        )
        third = await asyncio.gather(batcher.submit({"x": _rows(3, 2)}, ["y"], 2), return_exceptions=True)
        await batcher.close()
        return [*first, *second, *third]

    first, second_a, second_b, third = asyncio.run(scenario())
    assert isinstance(first, ModelFault)
    assert isinstance(second_b, ModelFault) and "rows for a batch of 2" in second_b.message
    assert isinstance(second_a, ModelFault)
    assert isinstance(third, dict) and third["y"].shape == (2, 3)


def test_closing_drains_queued_requests_then_refuses_new_ones() -> None:
    async def scenario() -> tuple[list[Arrays], BaseException | None]:
        batcher = _batcher(Recorder(delay=0.01), max_batch_size=1)
        tasks = [asyncio.create_task(batcher.submit({"x": _rows(i, 1)}, ["y"], 1)) for i in range(5)]
        await asyncio.sleep(0)
        closing = asyncio.create_task(batcher.close())
        await asyncio.sleep(0)
        refused = None
        try:
            await batcher.submit({"x": _rows(9, 1)}, ["y"], 1)
        except Unavailable as exc:
            refused = exc
        results = await asyncio.gather(*tasks)
        await closing
        return results, refused

    results, refused = asyncio.run(scenario())
    assert len(results) == 5
    assert isinstance(refused, Unavailable)


@pytest.mark.parametrize("rows", [17, 40])
def test_oversized_request_is_refused(rows: int) -> None:
    async def scenario() -> None:
        batcher = _batcher(Recorder(), max_batch_size=16)
        try:
            await batcher.submit({"x": _rows(0, rows)}, ["y"], rows)
        finally:
            await batcher.close()

    with pytest.raises(Exception, match="takes at most 16 rows a request"):
        asyncio.run(scenario())


class PartsRecorder(Recorder):
    """An instance that writes batches itself (as a process instance does): it is handed the requests' arrays."""

    takes_row_parts = True

    def __init__(self) -> None:
        super().__init__(delay=0.002)
        self.kinds: list[tuple[int, bool]] = []

    def __call__(self, inputs: Mapping[str, np.ndarray], outputs: Sequence[str]) -> Arrays:
        self.kinds.append((inputs["x"].shape[0], isinstance(inputs, RowParts)))
        return super().__call__(inputs, outputs)


def test_an_instance_that_writes_batches_itself_gets_the_requests_unconcatenated() -> None:
    async def scenario() -> tuple[list[tuple[np.ndarray, Arrays]], PartsRecorder]:
        model = PartsRecorder()
        batcher = _batcher(model, max_batch_size=16, max_queue_delay_ms=5)  # type: ignore[arg-type]
        sent = [_rows(100 * i, rows) for i, rows in enumerate([1, 3, 2, 4, 1])]
        answers = await asyncio.gather(*(batcher.submit({"x": x}, ["y"], len(x)) for x in sent))
        await batcher.close()
        return list(zip(sent, answers, strict=True)), model

    pairs, model = asyncio.run(scenario())
    for sent, answer in pairs:
        np.testing.assert_array_equal(answer["y"], sent * 2)
    # a batch of more rows than any one request (4) holds several requests: those came as parts
    several = [as_parts for rows, as_parts in model.kinds if rows > 4]
    assert several and all(several)


def test_a_batch_computes_the_outputs_its_requests_ask_each_once() -> None:
    asked: list[tuple[str, ...]] = []
    gate = threading.Event()

    def model(inputs: Mapping[str, np.ndarray], outputs: Sequence[str]) -> Arrays:
        gate.wait(5)
        asked.append(tuple(outputs))
        return {name: inputs["x"] * (2 if name == "y" else 3) for name in outputs}

    async def scenario() -> list[Arrays]:
        batcher = DynamicBatcher(
            "m", [model], ThreadPoolExecutor(1), ModelStats(), max_batch_size=8, batching=BatchingConfig()
        )
        # the first request holds the instance; the next ones queue and leave as one batch each time it is free
        first = asyncio.create_task(batcher.submit({"x": _rows(0, 1)}, ("y",), 1))
        await asyncio.sleep(0.02)
        mixed = [asyncio.create_task(batcher.submit({"x": _rows(i, 1)}, names, 1)) for i, names in enumerate(
            [("z",), ("y", "z"), ("z", "y")], start=1
        )]  # fmt: skip
        await asyncio.sleep(0.02)
        gate.set()
        answers = await asyncio.gather(first, *mixed)
        twice = await asyncio.gather(*(batcher.submit({"x": _rows(i, 1)}, ("y", "y"), 1) for i in range(2)))
        await batcher.close()
        return [*answers, *twice]

    answers = asyncio.run(scenario())
    assert asked[0] == ("y",)
    assert asked[1] == ("z", "y")  # the union, once each, in the order first asked
    assert asked[-1] == ("y",)  # a name asked twice is computed once
    np.testing.assert_array_equal(answers[2]["z"], _rows(2, 1) * 3)
    np.testing.assert_array_equal(answers[-1]["y"], _rows(1, 1) * 2)


#: the longest a test waits for an answer that must come: a batcher that leaves a request hanging fails by it
SAFETY_S = 30


async def _until(condition: Callable[[], bool]) -> None:
    for _ in range(int(SAFETY_S / 0.005)):
        if condition():
            return
        await asyncio.sleep(0.005)
    raise AssertionError("the batcher never got there")


def test_a_batch_queued_on_the_executor_when_its_worker_stops_is_answered_and_never_run() -> None:
    async def scenario() -> tuple[BaseException | None, BaseException | None, Recorder]:
        model, gate = Recorder(), threading.Event()
        executor = ThreadPoolExecutor(1)
        executor.submit(gate.wait, SAFETY_S)  # the executor's one thread is busy: the batch waits behind it
        batcher = DynamicBatcher(
            "model 'm' version 1", [model], executor, ModelStats(), max_batch_size=1, batching=BatchingConfig()
        )
        request = asyncio.create_task(batcher.submit({"x": _rows(0, 1)}, ["y"], 1))
        await _until(lambda: batcher.queued == 0 and batcher.inflight == 1)  # its batch is on the executor
        batcher._workers[0].cancel()  # its worker stops (the batcher's own task: nothing else reaches it)
        answer = (await asyncio.wait((request,), timeout=SAFETY_S))[0]
        gate.set()
        executor.shutdown(wait=True)  # the batch, had it stayed queued, would have run by now
        refused = None
        try:
            await asyncio.wait_for(batcher.submit({"x": _rows(1, 1)}, ["y"], 1), SAFETY_S)
        except (Unavailable, TimeoutError) as exc:
            refused = exc
        return answer.pop().exception() if answer else None, refused, model

    error, refused, model = asyncio.run(scenario())
    assert isinstance(error, Unavailable) and "stopped before the request's batch ran" in str(error), error
    assert model.batches == []
    assert isinstance(refused, Unavailable)  # no worker is left to take it


def test_a_batch_the_executor_refuses_is_answered_with_the_fault() -> None:
    async def scenario() -> BaseException | None:
        executor = ThreadPoolExecutor(1)
        executor.shutdown()  # submit raises RuntimeError('cannot schedule new futures after shutdown')
        batcher = DynamicBatcher(
            "model 'm' version 1", [Recorder()], executor, ModelStats(), max_batch_size=1, batching=BatchingConfig()
        )
        request = asyncio.create_task(batcher.submit({"x": _rows(0, 1)}, ["y"], 1))
        answer = (await asyncio.wait((request,), timeout=SAFETY_S))[0]
        inflight = batcher.inflight
        await batcher.close()
        assert inflight == 0, inflight
        return answer.pop().exception() if answer else None

    error = asyncio.run(scenario())
    assert isinstance(error, ModelFault) and "cannot schedule new futures" in str(error), error


@pytest.mark.parametrize("how", ["close", "cancel"])
def test_a_batch_being_cut_when_the_batcher_stops_is_answered(how: str) -> None:
    async def scenario() -> tuple[Arrays | BaseException | None, Recorder]:
        model = Recorder()
        # the first request waits a minute for others to join its batch: it is neither queued nor running
        batcher = _batcher(model, max_batch_size=16, max_queue_delay_ms=60_000)
        asked = asyncio.Event()

        async def ask() -> Arrays:
            asked.set()  # submit queues the request before it first waits
            return await batcher.submit({"x": _rows(0, 1)}, ["y"], 1)

        request = asyncio.create_task(ask())
        await _until(lambda: asked.is_set() and batcher.queued == 0)  # taken into a batch being cut
        if how == "close":
            await asyncio.wait_for(batcher.close(), SAFETY_S)
        else:
            batcher._workers[0].cancel()
        done = (await asyncio.wait((request,), timeout=SAFETY_S))[0]
        if not done:
            return None, model
        answered = done.pop()
        return answered.exception() or answered.result(), model

    outcome, model = asyncio.run(scenario())
    assert outcome is not None, "the request was left hanging"
    if how == "close":  # closing lets the batch being cut run
        assert isinstance(outcome, dict), outcome
        np.testing.assert_array_equal(outcome["y"], _rows(0, 1) * 2)
        assert model.batches == [1]
    else:
        assert isinstance(outcome, Unavailable) and "before the request's batch was cut" in str(outcome), outcome
        assert model.batches == []


def test_an_observer_that_fails_never_stops_the_answers_nor_the_model(
    caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Monitoring (metrics, latency windows, tracing) observes each batch; a failure there never stops the batch's
    requests being answered nor the model serving (before, the worker died with the batch unanswered). Every failure
    is counted (the server's metric) and logged at most once a minute, with how many failed since the last log
    (before, only the first was ever logged: a monitoring broken for good went unseen)."""
    from dhow.scheduling import batcher as batcher_module

    calls: list[int] = []
    counted: list[None] = []
    now = [1000.0]
    monkeypatch.setattr(batcher_module, "_clock", lambda: now[0])

    def failing(timings: object, start_ns: int, waits: Sequence[int], traces: Sequence[object | None]) -> None:
        calls.append(len(waits))
        raise RuntimeError("an observer's bug")

    def logged() -> list[str]:
        return [r.getMessage() for r in caplog.records if "observing a batch failed" in r.getMessage()]

    async def scenario() -> list[Arrays]:
        executor = ThreadPoolExecutor(1)
        batcher = DynamicBatcher("model 'm' version 1", [Recorder()], executor, ModelStats(), max_batch_size=16,
                                 batching=BatchingConfig(), observer=failing,
                                 observer_failed=lambda: counted.append(None))  # fmt: skip
        results = []
        # one after the other: the second needs the worker the first batch ran on; the clock moved between some
        for start, moved in [(0, 0.0), (3, 0.0), (6, 0.0), (9, 59.0), (12, 2.0), (15, 0.0), (18, 60.0)]:
            now[0] += moved
            x = _rows(start, 1)
            results.append(await asyncio.wait_for(batcher.submit({"x": x}, ["y"], 1), 5))
        assert batcher.observer_failures == 7
        await batcher.close()
        executor.shutdown()
        return results

    results = asyncio.run(scenario())
    np.testing.assert_array_equal(results[-1]["y"], _rows(18, 1) * 2)
    assert calls == [1] * 7 and len(counted) == 7, "every failure counted"
    # the first at once; the fifth 61 s later (the four since); the seventh a minute after that (the two since)
    assert [message.split(", ")[1].split(" since")[0] for message in logged()] == [
        "1 batch(es)",
        "4 batch(es)",
        "2 batch(es)",
    ]
    assert all(r.exc_info for r in caplog.records if "observing a batch failed" in r.getMessage()), "with the error"


def test_a_failure_counter_that_fails_too_still_lets_the_batch_be_answered() -> None:
    def failing(*args: object) -> None:
        raise RuntimeError("observer bug")

    def counter() -> None:
        raise ValueError("metric backend broken")

    async def scenario() -> Mapping[str, np.ndarray]:
        executor = ThreadPoolExecutor(1)
        batcher = DynamicBatcher("m", [Recorder()], executor, ModelStats(), max_batch_size=4,
                                 batching=BatchingConfig(), observer=failing, observer_failed=counter)  # fmt: skip
        try:
            return await asyncio.wait_for(batcher.submit({"x": _rows(0, 1)}, ["y"], 1), 5)
        finally:
            executor.shutdown(wait=False)

    answered = asyncio.run(scenario())
    assert "y" in answered
