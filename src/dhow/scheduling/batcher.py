"""Dynamic batching: requests queue per model version and run as batches on the instances.

A batch is cut when it reaches ``max_batch_size``, a preferred size, or when its first
request has waited ``max_queue_delay_ms``, whichever comes first; with no delay it takes
whatever queued while the instances were busy, so batches grow with load by themselves.
Each request's rows are copied once, into the batch's input (a lone request's arrays go as they are), and
each request is answered with views of the batch's outputs. When an instance has just become free with
requests queued, the loop first finishes the pass it is in, so that calls that reached the server together
leave together. Deadlines
are monotonic; a request that times out in the queue is answered and never computed, and so is
one whose client has gone (its ``gone`` says so) by the time a batch is cut.

The queue is bounded even when the model sets no ``max_queue_size``: by the number of requests the
instances can serve within the queue timeout (the model's ``timeout_ms``, else the server's default),
from the measured time of recent batches; past it a request is refused at once (429) rather than
left to wait longer than anyone would.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import Executor, Future

import numpy as np

from dhow.core.errors import (
    DeadlineExceeded,
    InvalidInput,
    ModelFault,
    Overloaded,
    SignatureMismatch,
    Unavailable,
    too_many_rows,
)
from dhow.core.model_config import BatchingConfig
from dhow.scheduling.execution import Arrays, Instance, OutputCheck, Pending, in_thread, takes_row_parts
from dhow.scheduling.stats import BatchTimings, ModelStats

log = logging.getLogger("dhow.scheduling")

#: the derived queue bound before a batch has been measured, and its floor
UNMEASURED_QUEUE_LIMIT, MIN_QUEUE_LIMIT = 1024, 8
#: told of every executed batch: its timings, when it started (monotonic ns), the queue wait of each of its
#: requests and their traces (each request's ``trace`` in order; empty when none is traced), for metrics and spans
BatchObserver = Callable[[BatchTimings, int, list[int], Sequence[object | None]], None]
#: seconds at least between two logs of a failing observer: each says how many batches it failed since the last
OBSERVER_LOG_INTERVAL_S = 60.0
#: the clock of those logs (a test moves it)
_clock = time.monotonic


def _batch_key(inputs: Mapping[str, np.ndarray]) -> tuple[object, ...]:
    # dtypes compare as their ``str`` does (byte order, size), without making that string for every request
    if len(inputs) == 1:  # the usual request: no generator
        for name, array in inputs.items():
            return ((name, array.dtype, array.shape[1:]),)
    return tuple((name, array.dtype, array.shape[1:]) for name, array in inputs.items())


class DynamicBatcher:
    def __init__(
        self,
        label: str,
        instances: Sequence[Instance],
        executor: Executor,
        stats: ModelStats,
        *,
        max_batch_size: int,
        batching: BatchingConfig | None,
        observer: BatchObserver | None = None,
        default_timeout_ms: float = 0.0,
        check: OutputCheck | None = None,
        observer_failed: Callable[[], None] | None = None,
    ) -> None:
        self.label = label
        self.stats = stats
        self._observer = observer
        #: told of each batch the observer failed (the server counts them in a metric)
        self._observer_failed = observer_failed
        #: batches the observer failed, in all and when it was last logged, and when that was (``_clock``)
        self.observer_failures = 0
        self._failures_logged = 0
        self._failure_logged_at = float("-inf")
        self._check = check
        self._executor = executor
        self._max_rows = max_batch_size if batching is not None else 0
        self._batching = batching or BatchingConfig()
        self._delay_ns = int(self._batching.max_queue_delay_ms * 1e6)
        self._preferred = set(self._batching.preferred_batch_sizes)
        self._timeout_ns = int((self._batching.timeout_ms or default_timeout_ms) * 1e6)
        #: below this many queued requests the queue bound cannot be reached: not worth working it out
        self._room_below = self._batching.max_queue_size or (MIN_QUEUE_LIMIT if self._timeout_ns else 1 << 62)
        #: recent batches: moving averages of their time and of the requests they carried
        self._batch_ns = 0.0
        self._batch_requests = 1.0
        self._queue: collections.deque[Pending] = collections.deque()
        self._wakeup = asyncio.Event()
        self._closing = False
        #: batches taken from the queue and not answered yet (being cut, or running): closing waits for them
        self._busy = 0
        #: requests in the batches running now
        self._running = 0
        #: the one timer of the requests queued under the default timeout (set for the oldest one's deadline)
        self._sweep: asyncio.TimerHandle | None = None
        self._workers = [asyncio.create_task(self._work(instance)) for instance in instances]
        for worker in self._workers:
            worker.add_done_callback(self._worker_gone)

    @property
    def queued(self) -> int:
        return len(self._queue)

    @property
    def inflight(self) -> int:
        """Requests given and not answered yet: queued, or in a running batch."""
        return len(self._queue) + self._running

    @property
    def queue_limit(self) -> int:
        """``max_queue_size``, else what the instances serve within the queue timeout (0: unbounded)."""
        if self._batching.max_queue_size or not self._timeout_ns:
            return self._batching.max_queue_size
        if not self._batch_ns:
            return UNMEASURED_QUEUE_LIMIT
        batches = self._timeout_ns / self._batch_ns * len(self._workers)
        return max(MIN_QUEUE_LIMIT, int(batches * self._batch_requests))

    def _check_room(self) -> None:
        limit = self.queue_limit
        if not limit or len(self._queue) < limit:
            return
        if self._batching.max_queue_size:
            raise Overloaded(f"{self.label} has {limit} requests queued (its max_queue_size); retry later")
        seconds = self._timeout_ns / 1e9
        raise Overloaded(
            f"{self.label} has {len(self._queue)} requests queued, as many as it serves in {seconds:g} s (its queue "
            "timeout); retry later",
            retry_after=max(1.0, self._batch_ns * len(self._queue) / max(1, len(self._workers)) / 1e9 / 2),
        )

    async def submit(
        self,
        inputs: Mapping[str, np.ndarray],
        outputs: Sequence[str],
        rows: int,
        timeout_ns: int = 0,
        gone: Callable[[], bool] | None = None,
        trace: object | None = None,
    ) -> Arrays:
        """Queue one request and wait for its outputs; ``rows`` is its batch dimension; ``gone`` tells whether
        its client has left (then it is dropped before it is computed); ``trace`` goes to the observer."""
        if self._closing:
            raise Unavailable(f"{self.label} is being unloaded; retry", retry_after=1)
        if len(self._queue) >= self._room_below:
            self._check_room()
        if self._max_rows and rows > self._max_rows:
            raise too_many_rows(self.label, rows, self._max_rows)
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Arrays] = loop.create_future()
        pending = Pending(
            inputs, tuple(outputs), rows, _batch_key(inputs), future, time.monotonic_ns(), gone=gone, trace=trace
        )
        if timeout_ns:
            pending.timer = loop.call_later(timeout_ns / 1e9, self._expire, pending, timeout_ns)
        elif self._timeout_ns:
            # the queue keeps arrival order, so the oldest such request's deadline is the next: no timer each
            pending.deadline_ns = pending.enqueued_ns + self._timeout_ns
            if self._sweep is None:
                self._sweep = loop.call_later(self._timeout_ns / 1e9, self._expire_queued)
        self._queue.append(pending)
        self._wakeup.set()
        try:
            return await future
        except asyncio.CancelledError:  # the client went away: its place in the queue is free again
            if pending.timer is not None:
                pending.timer.cancel()
            self._forget(pending)
            raise

    def _expire(self, pending: Pending, timeout_ns: int) -> None:
        if not pending.future.done():
            pending.future.set_exception(DeadlineExceeded(self._late(timeout_ns)))
            # an answered request must not hold a place that max_queue_size counts
            self._forget(pending)

    def _expire_queued(self) -> None:
        """Answer the requests queued under the default timeout whose deadline passed; wait for the next one."""
        self._sweep = None
        now = time.monotonic_ns()
        expired = False
        for pending in self._queue:
            if not pending.deadline_ns or pending.future.done():
                continue
            if pending.deadline_ns > now:  # the first one still in time: every later one is too
                self._sweep = asyncio.get_running_loop().call_later(
                    (pending.deadline_ns - now) / 1e9, self._expire_queued
                )
                break
            pending.future.set_exception(DeadlineExceeded(self._late(self._timeout_ns)))
            expired = True
        if expired:  # an answered request must not hold a place that the queue bound counts
            kept = [pending for pending in self._queue if not pending.future.done()]
            self._queue.clear()
            self._queue.extend(kept)

    def _late(self, timeout_ns: int) -> str:
        return f"request to {self.label} timed out after {timeout_ns / 1e6:g} ms in the queue; it was not run"

    def _forget(self, pending: Pending) -> None:
        with contextlib.suppress(ValueError):  # already taken into a batch
            self._queue.remove(pending)

    async def close(self) -> None:
        """Stop taking requests, let queued and running ones finish, then stop the workers."""
        self._closing = True
        while self._queue or self._busy:
            self._wakeup.set()
            await asyncio.sleep(0.005)
        if self._sweep is not None:
            self._sweep.cancel()
        for worker in self._workers:
            worker.cancel()
        await asyncio.gather(*self._workers, return_exceptions=True)

    def _worker_gone(self, worker: asyncio.Task[None]) -> None:
        """A worker stopped (cancelled, even before it ran): once none is left, what is queued is answered and
        nothing more is taken."""
        if all(other.done() for other in self._workers):
            self._closing = True
            queued = list(self._queue)
            self._queue.clear()
            self._stopped(queued, "before the request's batch was cut")

    async def _work(self, instance: Instance) -> None:
        loop = asyncio.get_running_loop()
        as_parts = takes_row_parts(instance)
        while True:
            batch = await self._next_batch()  # counted in _busy from when its first request is taken
            try:
                if batch:
                    await self._run(loop, instance, as_parts, batch)
            finally:
                self._busy -= 1
            if self._max_rows and self._queue and not self._delay_ns:
                # free again with requests queued: the callbacks already due on the loop (calls read in the same
                # pass, a door's next step) run first, so that what arrived together leaves in one batch
                await asyncio.sleep(0)

    async def _next_batch(self) -> list[Pending]:
        while not self._live_head():
            self._wakeup.clear()
            await self._wakeup.wait()
        head = self._queue.popleft()
        batch, rows = [head], head.rows
        # from here until answered, the batch is neither queued nor running: closing must still wait for it
        self._busy += 1
        if self._max_rows:
            try:
                rows = await self._fill(batch, rows, head.enqueued_ns + self._delay_ns)
            except asyncio.CancelledError:  # its worker stopped while it waited for more requests
                self._busy -= 1
                self._stopped(batch, "before the request's batch was cut")
                raise
        # whether a client has gone is asked once per request, here, when its batch is cut
        return [p for p in batch if not p.settled()]

    async def _fill(self, batch: list[Pending], rows: int, deadline: int) -> int:
        """Take compatible requests into the batch until it is full, preferred, or its first request's delay ends."""
        while rows < self._max_rows and rows not in self._preferred:
            rows = self._take_compatible(batch, rows)
            if rows >= self._max_rows or rows in self._preferred or self._closing:
                break
            remaining = deadline - time.monotonic_ns()
            if remaining <= 0:
                break
            self._wakeup.clear()
            try:
                async with asyncio.timeout(remaining / 1e9):
                    await self._wakeup.wait()
            except TimeoutError:
                return self._take_compatible(batch, rows)
        return rows

    def _live_head(self) -> bool:
        """Drop answered (timed-out, cancelled) requests from the front; is one left?"""
        while self._queue and self._queue[0].future.done():
            self._queue.popleft()
        return bool(self._queue)

    def _take_compatible(self, batch: list[Pending], rows: int) -> int:
        """Move queued requests that fit the batch into it, in arrival order; return its rows."""
        key = batch[0].key
        kept: list[Pending] = []
        while self._queue:
            pending = self._queue.popleft()
            if pending.future.done():  # whether its client has gone is asked once, when the batch is cut
                continue
            if pending.key == key and rows + pending.rows <= self._max_rows:
                batch.append(pending)
                rows += pending.rows
                if rows >= self._max_rows or rows in self._preferred:
                    break
            else:
                kept.append(pending)
        self._queue.extendleft(reversed(kept))
        return rows

    async def _run(
        self, loop: asyncio.AbstractEventLoop, instance: Instance, as_parts: bool, batch: list[Pending]
    ) -> None:
        start = time.monotonic_ns()
        waits = [start - pending.enqueued_ns for pending in batch]
        for pending in batch:
            if pending.timer is not None:
                pending.timer.cancel()
        self.stats.queue.add(sum(waits), len(waits))  # the same sums as one request at a time, in one step
        outputs = _outputs_of(batch)
        self._running += len(batch)
        job: Future[None] | None = None
        try:
            # inside the try: an executor that refuses the job (shut down) fails the batch, never strands it
            computing, job = in_thread(loop, self._executor, instance, as_parts, batch, outputs, self._check)
            results, timings = await computing
        except BaseException as exc:
            self._running -= len(batch)
            if not isinstance(exc, Exception):
                # its worker stopped (or the instance raised SystemExit): a batch still queued on the executor
                # never runs; one running already is not waited for. Either way its requests are answered now.
                queued = job is not None and job.cancel()
                when = "before the request's batch ran" if queued else "while the request's batch ran"
                self._stopped(batch, when)
                raise
            # what an instance says of itself stays as it is (a restarting process instance is a 503, not a 500)
            passed = (ModelFault, InvalidInput, Unavailable, DeadlineExceeded, SignatureMismatch)
            fault = exc if isinstance(exc, passed) else ModelFault(f"{self.label} failed: {exc!r}")
            if fault is not exc:
                fault.__cause__ = exc  # its traceback goes to the server log
            for pending in batch:
                if not pending.future.done():
                    pending.future.set_exception(fault)
            return
        self._running -= len(batch)  # answered below: what the observer reads no longer counts them
        self._measure(time.monotonic_ns() - start, len(batch))
        self.stats.record_batch(timings, len(batch))
        if self._observer is not None:
            traces = [p.trace for p in batch]
            try:
                self._observer(timings, start, waits, traces if any(traces) else ())
            except Exception:  # monitoring never stops a model from answering (the worker would die, unanswered)
                self._observer_failure()
        for pending, result in zip(batch, results, strict=True):
            if not pending.future.done():
                pending.future.set_result(result)

    def _observer_failure(self) -> None:
        """Count a batch the observer failed, and log it unless a failure was logged less than
        ``OBSERVER_LOG_INTERVAL_S`` ago: a broken monitoring stays visible without a line a batch."""
        self.observer_failures += 1
        if self._observer_failed is not None:
            with contextlib.suppress(Exception):  # (counting it must not stop the batch's answers either)
                self._observer_failed()
        now = _clock()
        if now - self._failure_logged_at < OBSERVER_LOG_INTERVAL_S:
            return
        failed, self._failures_logged = self.observer_failures - self._failures_logged, self.observer_failures
        self._failure_logged_at = now
        log.exception(
            "%s: observing a batch failed, %d batch(es) since the last such log (logged at most every %.0f s; the "
            "requests are answered; what monitoring would have kept of those batches is lost)",
            self.label, failed, OBSERVER_LOG_INTERVAL_S,
        )  # fmt: skip

    def _stopped(self, requests: list[Pending], when: str) -> None:
        """Answer requests that their worker will not compute (it was stopped): 503, retry."""
        for pending in requests:
            if not pending.future.done():
                pending.future.set_exception(Unavailable(f"{self.label} stopped {when}; retry", retry_after=1))
            if pending.timer is not None:
                pending.timer.cancel()

    def _measure(self, batch_ns: int, requests: int) -> None:
        """Moving averages of a batch's time and size: what the derived queue bound is made of."""
        if not self._batch_ns:
            self._batch_ns, self._batch_requests = float(batch_ns), float(requests)
            return
        self._batch_ns += (batch_ns - self._batch_ns) / 8
        self._batch_requests += (requests - self._batch_requests) / 8


def _outputs_of(batch: list[Pending]) -> tuple[str, ...]:
    """The outputs a batch computes: every request's, once each, in the order first asked."""
    first = batch[0].outputs
    for pending in batch:
        if pending.outputs is not first and pending.outputs != first:
            return tuple(dict.fromkeys(name for p in batch for name in p.outputs))
    # the usual batch: every request asks the same (its version's every output)
    return first if len(first) < 2 or len(set(first)) == len(first) else tuple(dict.fromkeys(first))
