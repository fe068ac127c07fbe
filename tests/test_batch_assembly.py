"""How the batcher builds a batch: each request's rows copied once, answers that are the request's own rows,
requests that cannot share a batch kept apart, and calls due on the loop joining the next batch."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from dhow.core.errors import SignatureMismatch
from dhow.core.model_config import BatchingConfig
from dhow.scheduling.batcher import DynamicBatcher
from dhow.scheduling.stats import ModelStats

Arrays = dict[str, np.ndarray]


class Recorder:
    """An instance that doubles its input and keeps each batch it was given."""

    def __init__(self) -> None:
        self.inputs: list[np.ndarray] = []

    def __call__(self, inputs: Mapping[str, np.ndarray], outputs: Sequence[str]) -> Arrays:
        self.inputs.append(inputs["x"])
        return {"y": inputs["x"] * 2}


def _batcher(instance: object, **batching: object) -> DynamicBatcher:
    return DynamicBatcher(
        "model 'm' version 1",
        [instance],  # type: ignore[list-item]
        ThreadPoolExecutor(1),
        ModelStats(),
        max_batch_size=16,
        batching=BatchingConfig(**batching),  # type: ignore[arg-type]
    )


def _rows(start: int, count: int, width: int = 3, dtype: type = np.float32) -> np.ndarray:
    rows = np.arange(start, start + count * width, dtype=dtype).reshape(count, width)
    rows.flags.writeable = False  # as the doors' arrays are: views of the bytes received
    return rows


async def _round(batcher: DynamicBatcher, sent: list[np.ndarray]) -> list[Arrays]:
    return list(await asyncio.gather(*(batcher.submit({"x": x}, ["y"], len(x)) for x in sent)))


def test_a_batch_is_each_request_s_rows_copied_once_and_each_answer_is_its_own_rows() -> None:
    async def scenario() -> tuple[list[list[np.ndarray]], list[list[Arrays]], Recorder]:
        model = Recorder()
        # four rows are a preferred batch: each round below leaves as one batch of three requests
        batcher = _batcher(model, max_queue_delay_ms=1000, preferred_batch_sizes=(4,))
        rounds = [[_rows(100 * r + 10 * i, n) for i, n in enumerate((1, 2, 1))] for r in range(2)]
        answers = [await _round(batcher, sent) for sent in rounds]
        lone = _rows(500, 3)
        answers.append(await _round(batcher, [lone]))
        await batcher.close()
        return [*rounds, [lone]], answers, model

    rounds, answers, model = asyncio.run(scenario())
    for sent, answered in zip(rounds, answers, strict=True):
        for x, answer in zip(sent, answered, strict=True):
            np.testing.assert_array_equal(answer["y"], x * 2)
            assert answer["y"].dtype == np.float32
    assert [len(batch) for batch in model.inputs] == [4, 4, 3]
    for sent, batch in zip(rounds[:2], model.inputs[:2], strict=True):
        # one contiguous array of the requests' datatype, their rows in order, sharing memory with none of them
        assert batch.flags.c_contiguous and batch.dtype == np.float32
        np.testing.assert_array_equal(batch, np.concatenate(sent))
        assert not any(np.may_share_memory(batch, x) for x in sent)
    # a request alone is computed on its own arrays: no copy at all
    assert np.shares_memory(model.inputs[2], rounds[2][0])


def test_requests_of_other_row_shapes_or_datatypes_never_share_a_batch() -> None:
    async def scenario() -> tuple[list[np.ndarray], list[Arrays], Recorder]:
        model = Recorder()
        batcher = _batcher(model, max_queue_delay_ms=20)
        sent = [
            _rows(0, 2),
            _rows(10, 1, dtype=np.float64),
            _rows(20, 1, width=5),
            _rows(30, 3),
            _rows(40, 2, dtype=np.float64),
            _rows(50, 1, width=5),
        ]
        answers = await _round(batcher, sent)
        await batcher.close()
        return sent, answers, model

    sent, answers, model = asyncio.run(scenario())
    for x, answer in zip(sent, answers, strict=True):
        np.testing.assert_array_equal(answer["y"], x * 2)
        assert answer["y"].dtype == x.dtype
    widths_and_types = [(inputs.shape[1], inputs.dtype) for inputs in model.inputs]
    assert sorted(widths_and_types, key=str) == sorted(
        [(3, np.dtype(np.float32)), (3, np.dtype(np.float64)), (5, np.dtype(np.float32))], key=str
    )
    assert sorted(len(batch) for batch in model.inputs) == [2, 3, 5]


def test_calls_due_on_the_loop_when_the_instance_frees_join_the_batch_already_queued() -> None:
    """The instance frees with one request queued; two more are on their way through the loop (two callbacks
    deep, as a door's next steps are): they leave with the queued one, not in a batch of their own."""

    async def scenario() -> tuple[list[int], list[Arrays]]:
        loop = asyncio.get_running_loop()
        gate, later = threading.Event(), []
        batches: list[int] = []
        batcher: DynamicBatcher

        def arrive() -> None:  # the door's last step: the requests are submitted
            later.extend(asyncio.ensure_future(batcher.submit({"x": _rows(20 + i, 1)}, ["y"], 1)) for i in range(2))

        def instance(inputs: Mapping[str, np.ndarray], outputs: Sequence[str]) -> Arrays:
            gate.wait(5)
            batches.append(len(inputs["x"]))
            if len(batches) == 1:  # calls read while this batch ran, due on the loop when it ends
                loop.call_soon_threadsafe(loop.call_soon, arrive)
            return {"y": inputs["x"] * 2}

        batcher = _batcher(instance)
        first = asyncio.ensure_future(batcher.submit({"x": _rows(0, 1)}, ["y"], 1))
        await asyncio.sleep(0.02)  # the first occupies the instance
        queued = asyncio.ensure_future(batcher.submit({"x": _rows(10, 1)}, ["y"], 1))
        await asyncio.sleep(0.02)
        gate.set()
        await first
        answers = [await queued]
        while len(later) < 2:
            await asyncio.sleep(0.001)
        answers += [await task for task in later]
        await batcher.close()
        return batches, answers

    batches, answers = asyncio.run(scenario())
    assert batches == [1, 3]
    for start, answer in zip((10, 20, 21), answers, strict=True):
        np.testing.assert_array_equal(answer["y"], _rows(start, 1) * 2)


def test_a_batch_s_outputs_are_checked_once_before_each_request_gets_its_rows() -> None:
    """The version's output check runs once per batch, on the batch's outputs (its conversion reaches every
    request's rows); what it refuses is every request's answer, unchanged."""

    async def scenario(check: Callable[[Arrays], Arrays]) -> list[Arrays | BaseException]:
        batcher = DynamicBatcher(
            "model 'm' version 1",
            [Recorder()],
            ThreadPoolExecutor(1),
            ModelStats(),
            max_batch_size=16,
            batching=BatchingConfig(max_queue_delay_ms=1000, preferred_batch_sizes=(4,)),
            check=check,
        )
        sent = [batcher.submit({"x": _rows(10 * i, n)}, ["y"], n) for i, n in enumerate((1, 2, 1))]
        answers = await asyncio.gather(*sent, return_exceptions=True)
        await batcher.close()
        return list(answers)

    checked: list[int] = []

    def as_float64(produced: Arrays) -> Arrays:
        checked.append(len(produced["y"]))
        return {name: array.astype(np.float64) for name, array in produced.items()}

    answers = asyncio.run(scenario(as_float64))
    assert checked == [4]  # one batch of the three requests' four rows, checked once
    for i, (n, answer) in enumerate(zip((1, 2, 1), answers, strict=True)):
        assert isinstance(answer, dict)
        assert answer["y"].dtype == np.float64
        np.testing.assert_array_equal(answer["y"], _rows(10 * i, n) * 2)

    def refuse(produced: Arrays) -> Arrays:
        raise SignatureMismatch("model 'm' version 1 answered output 'y' with datatype FP32, but declares INT64")

    refused = asyncio.run(scenario(refuse))
    assert [type(answer) for answer in refused] == [SignatureMismatch] * 3
    assert all(str(answer) == str(refused[0]) for answer in refused)
