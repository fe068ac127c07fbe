"""A batch's execution on an instance's thread: what a request in the queue holds (``Pending``), its rows
assembled into the batch (``RowParts`` for an instance that copies them itself), the computation, the outputs
checked once and split back into views per request, and the outcome handed to the event loop in one call.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import Executor, Future
from dataclasses import dataclass

import numpy as np

from dhow.core.errors import CallCancelled, ModelFault
from dhow.scheduling.stats import BatchTimings

__all__ = ["Arrays", "Instance", "OutputCheck", "Pending", "RowParts", "in_thread", "takes_row_parts"]

Arrays = dict[str, np.ndarray]
#: one model instance: computes the named outputs of a batch, in a worker thread
Instance = Callable[[Mapping[str, np.ndarray], Sequence[str]], Arrays]
#: checks (and converts) a batch's outputs once for all its requests, on the instance's thread, before they are split
OutputCheck = Callable[[Arrays], Arrays]


@dataclass(slots=True, eq=False)
class Pending:
    inputs: Mapping[str, np.ndarray]
    outputs: tuple[str, ...]
    rows: int
    #: requests batch together only when every non-batch dimension and datatype agrees
    key: tuple[object, ...]
    future: asyncio.Future[Arrays]
    enqueued_ns: int
    #: a request that named its own timeout has a timer of its own
    timer: asyncio.TimerHandle | None = None
    #: when the queue timeout of the others answers them (0: never); one timer, the batcher's, watches these
    deadline_ns: int = 0
    #: whether the client has gone (a closed connection): then it is answered and never computed
    gone: Callable[[], bool] | None = None
    #: the request's tracing when it is traced (opaque here: handed back to the observer)
    trace: object | None = None

    def settled(self) -> bool:
        """Answered already (timed out, cancelled), or answered now because its client has gone."""
        if self.future.done():
            return True
        if self.gone is not None and self.gone():
            self.future.set_exception(CallCancelled())
            return True
        return False


class RowParts(Mapping[str, np.ndarray]):
    """A batch's inputs as the requests' arrays, concatenated along rows only when a tensor is read.

    An instance that writes the batch somewhere itself (a process instance, into shared memory) reads
    ``parts`` and copies each request's rows once, to their place; reading a tensor concatenates it.
    """

    __slots__ = ("_merged", "parts")

    def __init__(self, parts: dict[str, list[np.ndarray]]) -> None:
        self.parts = parts
        self._merged: dict[str, np.ndarray] = {}

    def __getitem__(self, name: str) -> np.ndarray:
        merged = self._merged.get(name)
        if merged is None:
            merged = self._merged[name] = np.concatenate(self.parts[name])
        return merged

    def __iter__(self) -> Iterator[str]:
        return iter(self.parts)

    def __len__(self) -> int:
        return len(self.parts)


def takes_row_parts(instance: Instance) -> bool:
    """Whether an instance (a bound ``infer``, or a callable object) is given ``RowParts``, not concatenated arrays."""
    return bool(getattr(getattr(instance, "__self__", instance), "takes_row_parts", False))


def in_thread(
    loop: asyncio.AbstractEventLoop,
    executor: Executor,
    instance: Instance,
    as_parts: bool,
    batch: list[Pending],
    outputs: tuple[str, ...],
    check: OutputCheck | None = None,
) -> tuple[asyncio.Future[tuple[list[Arrays], BatchTimings]], Future[None]]:
    """``_execute`` on the executor's thread; its outcome comes back by one ``call_soon_threadsafe``, without
    ``run_in_executor``'s chaining of two futures (their locks, callbacks and state copies on the loop's thread,
    once per batch). Also the executor's job, for a stopped worker to cancel while it is still queued."""
    done: asyncio.Future[tuple[list[Arrays], BatchTimings]] = loop.create_future()

    def job() -> None:
        try:
            outcome = _execute(instance, as_parts, batch, outputs, check)
        except BaseException as exc:  # the batch's requests get it (an exception never stays in a thread)
            loop.call_soon_threadsafe(_settle, done, None, exc)
        else:
            loop.call_soon_threadsafe(_settle, done, outcome, None)

    return done, executor.submit(job)


def _settle(
    done: asyncio.Future[tuple[list[Arrays], BatchTimings]],
    outcome: tuple[list[Arrays], BatchTimings] | None,
    exc: BaseException | None,
) -> None:
    if done.cancelled():  # its worker was cancelled (the batcher closed) while the batch ran
        return
    if exc is not None:
        done.set_exception(exc)
    else:
        assert outcome is not None
        done.set_result(outcome)


def _execute(
    instance: Instance,
    as_parts: bool,
    batch: list[Pending],
    outputs: tuple[str, ...],
    check: OutputCheck | None = None,
) -> tuple[list[Arrays], BatchTimings]:
    """Runs in a worker thread: assemble, compute, check the outputs, answer each request with views of its rows."""
    t0 = time.monotonic_ns()
    merged: Mapping[str, np.ndarray]
    if len(batch) == 1:  # the request's own arrays (on the doors, views of the bytes received): no copy at all
        merged = batch[0].inputs
    elif as_parts:  # it copies each request's rows to their place itself: one copy, not two
        merged = RowParts({name: [p.inputs[name] for p in batch] for name in batch[0].inputs})
    else:  # one copy of each request's rows, into the batch (a reused buffer saved no page fault: see RESULTS.md)
        merged = {name: np.concatenate([p.inputs[name] for p in batch]) for name in batch[0].inputs}
    t1 = time.monotonic_ns()
    produced = instance(merged, outputs)
    t2 = time.monotonic_ns()
    total = sum(p.rows for p in batch)
    if len(batch) == 1:
        results = [produced if check is None else check(produced)]
    else:
        for name, array in produced.items():
            if array.ndim == 0 or array.shape[0] != total:
                raise ModelFault(f"output '{name}' has {array.shape[:1]} rows for a batch of {total}")
        if check is not None:
            produced = check(produced)
        results, offset = [], 0
        for pending in batch:
            end = offset + pending.rows
            results.append({name: array[offset:end] for name, array in produced.items()})
            offset = end
    t3 = time.monotonic_ns()
    return results, BatchTimings(total, t1 - t0, t2 - t1, t3 - t2)
