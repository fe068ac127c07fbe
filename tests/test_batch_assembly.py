"""How the batcher builds a batch: each request's rows copied once, into buffers a borrowing instance keeps
getting, answers that are the request's own rows, and calls due on the loop joining the next batch."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from dhow.core.model_config import BatchingConfig
from dhow.scheduling.batcher import DynamicBatcher
from dhow.scheduling.stats import ModelStats

Arrays = dict[str, np.ndarray]


class Borrower:
    """An instance that reads its inputs during the call only (as ONNX Runtime does), and records each batch."""

    borrows_inputs = True

    def __init__(self, answer_views: bool = False) -> None:
        self.answer_views = answer_views
        #: per batch: its rows, the address of its input, whether that input is C-contiguous, its datatype
        self.batches: list[tuple[int, int, bool, np.dtype[np.generic]]] = []
        self.inputs: list[np.ndarray] = []

    def __call__(self, inputs: Mapping[str, np.ndarray], outputs: Sequence[str]) -> Arrays:
        x = inputs["x"]
        self.inputs.append(x)
        self.batches.append((len(x), x.__array_interface__["data"][0], x.flags.c_contiguous, x.dtype))
        return {"y": x if self.answer_views else x * 2}


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


def test_a_borrowing_instance_gets_every_batch_in_the_same_buffer_each_request_copied_once() -> None:
    async def scenario() -> tuple[list[list[np.ndarray]], list[list[Arrays]], Borrower]:
        model = Borrower()
        # four rows are a preferred batch: each round below leaves as one batch of three requests
        batcher = _batcher(model, max_queue_delay_ms=1000, preferred_batch_sizes=(4,))
        rounds = [[_rows(100 * r + 10 * i, n) for i, n in enumerate((1, 2, 1))] for r in range(3)]
        answers = [await _round(batcher, sent) for sent in rounds]
        await batcher.close()
        return rounds, answers, model

    rounds, answers, model = asyncio.run(scenario())
    for sent, answered in zip(rounds, answers, strict=True):
        for x, answer in zip(sent, answered, strict=True):
            np.testing.assert_array_equal(answer["y"], x * 2)
            assert answer["y"].dtype == np.float32
    assert [rows for rows, *_ in model.batches] == [4, 4, 4]
    assert len({address for _, address, *_ in model.batches}) == 1, "each batch should reuse the one buffer"
    assert all(contiguous and dtype == np.float32 for _, _, contiguous, dtype in model.batches)
    # the batch is a copy of the requests' rows, not a view of any request
    for sent, batch in zip(rounds, model.inputs, strict=True):
        assert not any(np.may_share_memory(batch, x) for x in sent)


def test_an_answer_that_views_the_batch_keeps_its_rows_when_the_next_batch_comes() -> None:
    async def scenario() -> tuple[list[list[np.ndarray]], list[list[Arrays]], Borrower]:
        model = Borrower(answer_views=True)
        batcher = _batcher(model, max_queue_delay_ms=1000, preferred_batch_sizes=(4,))
        rounds = [[_rows(100 * r + 10 * i, n) for i, n in enumerate((2, 1, 1))] for r in range(2)]
        answers = [await _round(batcher, sent) for sent in rounds]
        await batcher.close()
        return rounds, answers, model

    rounds, answers, model = asyncio.run(scenario())
    # the first round's answers still hold their own rows after the second batch was assembled
    for sent, answered in zip(rounds, answers, strict=True):
        for x, answer in zip(sent, answered, strict=True):
            np.testing.assert_array_equal(answer["y"], x)
    assert model.batches[0][1] != model.batches[1][1], "a buffer an answer still reads must not be reused"


def test_requests_of_other_row_shapes_or_datatypes_never_share_a_batch() -> None:
    async def scenario() -> tuple[list[np.ndarray], list[Arrays], Borrower]:
        model = Borrower()
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
    assert sorted(rows for rows, *_ in model.batches) == [2, 3, 5]


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
