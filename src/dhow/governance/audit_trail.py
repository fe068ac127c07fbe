"""The audit trail as the server uses it: records queued on the event loop, written in batches off it.

``record`` costs the hot path an append to a queue; a writer per store chains and writes what came within
``commit_s`` (``--audit-commit-ms``) of a first record in one transaction (or at once when a batch is full, or
someone waits for a record to be durable). The writing runs in a thread, or (``writer="process"``,
what the server uses) in a writer process per store, spoken to over pipes from the event loop, so that
hashing and the database's work take nothing from the interpreter lock the loop needs. A write that fails is
retried with backoff, never dropped. The inference path's records (``record_before_answer``) leave for a
writer process together: those made in one pass of the event loop (a batch's requests end together) as one
frame in one write, early in the next pass, before any of their answers is sent.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import deque
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Literal

from dhow.core.errors import DhowError, InvalidInput, Unavailable
from dhow.governance.audit import AuditRecord, AuditRow, AuditStore
from dhow.governance.audit_refusals import Appending, RefusingAll
from dhow.governance.audit_writer import COMMIT_S
from dhow.governance.writer_process import Departure, WriterProcess, _depart

__all__ = ["AuditTrail"]

log = logging.getLogger("dhow.audit")

#: seconds between retries of a failing store: doubling from the first to the most
FIRST_BACKOFF_S, MAX_BACKOFF_S = 0.1, 5.0


@dataclass(eq=False)
class _Lane:
    """The queue of one store, written in order by one task."""

    store: AuditStore
    #: the writer process (``writer="process"``), else None: writes go to a thread
    process: WriterProcess | None = None
    #: records as rows (``AuditRecord.as_tuple``), as they cross to a writer process
    queue: deque[AuditRow] = field(default_factory=deque)
    #: the batch being written (a writer thread's), kept until it is all written
    batch: Appending | None = None
    wake: asyncio.Event = field(default_factory=asyncio.Event)
    enqueued: int = 0
    written: int = 0
    #: (records enqueued when it was added, future) of each ``record_now`` waiting for durability
    waiters: deque[tuple[int, asyncio.Future[None]]] = field(default_factory=deque)
    failing: bool = False
    #: the store refused a record and every stand-in for it (``RefusingAll``): said once, and kept until a write
    #: works (an outage in between does not say that it stopped refusing)
    refusing_all: bool = False
    #: the data regions whose records go to this store (regions sharing a store share its lane)
    regions: list[str] = field(default_factory=list)
    backoff_s: float = 0.0
    #: a writer process's records of this pass of the event loop (``record_before_answer``), sent as one frame
    #: early in the next pass, and what their requests await until then (None: none waits)
    outbox: list[AuditRow] = field(default_factory=list)
    departure: Departure | None = None

    @property
    def idle(self) -> bool:
        return self.batch is None and not self.queue


async def _nap(wake: asyncio.Event, seconds: float) -> None:
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(wake.wait(), seconds)
    wake.clear()


class AuditTrail:
    """Queues records on the event loop and writes them in batches, per store, off the loop.

    Call ``record`` and ``record_now`` from the event loop's thread. The stores stay open on ``close``: whoever
    opened them closes them. A write that fails is retried with backoff and never dropped; a batch whose commit
    was lost with the connection may be written twice (at least once, never zero times).
    """

    def __init__(
        self,
        stores: Mapping[str, AuditStore],
        default_region: str,
        *,
        flush_interval_s: float | None = None,
        max_batch: int = 2000,
        max_pending: int = 100_000,
        writer: Literal["thread", "process"] = "thread",
        commit_s: float = COMMIT_S,
    ) -> None:
        if default_region not in stores:
            known = ", ".join(sorted(stores)) or "none"
            raise InvalidInput(f"no audit store for the default region {default_region!r} (stores given: {known})")
        if (flush_interval_s is not None and not flush_interval_s > 0) or max_batch < 1 or max_pending < 1:
            raise InvalidInput("flush_interval_s must be > 0, and max_batch and max_pending at least 1")
        lanes: dict[int, _Lane] = {}
        # regions sharing one store share its lane, so that its records stay in order
        self._lanes = {
            region: lanes.setdefault(
                id(store), _Lane(store, WriterProcess(store.open_url, commit_s) if writer == "process" else None)
            )
            for region, store in stores.items()
        }
        for region, lane in self._lanes.items():
            lane.regions.append(region)
        self._default = self._lanes[default_region]
        #: how long a writer thread gathers records after the first before a transaction: ``flush_interval_s``
        #: when given, else ``commit_s``, as a writer process does (``audit_writer.COMMIT_S``)
        self._window_s = commit_s if flush_interval_s is None else flush_interval_s
        #: how often a writer process's lane looks for answers while it expects none (``_send`` wakes it)
        self._poll_s = flush_interval_s or 0.2
        self._max_batch = max_batch
        self._max_pending = max_pending
        self._tasks: list[asyncio.Task[None]] = []
        self._closing = False
        self._pending = 0
        self.written = 0
        self.failures = 0
        #: records the store refused, each replaced by an ``audit.unwritable`` record (``audit_refusals.py``); one
        #: it refused with every stand-in for it is not (``refusing_all``)
        self.unwritable = 0
        #: told how many more records the store refused (the server counts them in a metric)
        self.on_unwritable: Callable[[int], None] | None = None
        #: told, for each data region of a store, when whether it refuses all changes (``refusing_regions``; the
        #: server's gauge is set, not read at the scrape: with several workers the scrape reads every worker's
        #: metric files, which a gauge read at the scrape never writes)
        self.on_refusing_all: Callable[[str, bool], None] | None = None
        #: whether ``on_refusing_all`` raised yet (logged the first time only)
        self._refusing_all_failed = False

    @property
    def refusing_all(self) -> bool:
        """Whether a store refused a record and even its smallest stand-in, and no write has worked since: the trail
        is stuck until someone mends the store (the server's gauge ``dhow_audit_refusing_all``)."""
        return any(lane.refusing_all for lane in self._lanes.values())

    @property
    def refusing_regions(self) -> set[str]:
        """The data regions whose store ``refusing_all`` is about (the label of the server's gauge)."""
        return {region for region, lane in self._lanes.items() if lane.refusing_all}

    @property
    def pending(self) -> int:
        """Records recorded but not yet durable."""
        return self._pending

    def store_for(self, region: str) -> AuditStore:
        """The store that a record of that data region goes to."""
        return self._lanes.get(region, self._default).store

    def record(self, record: AuditRecord) -> bool:
        """Queues a record (no waiting; to a writer process it is written at once, after the outbox of this pass);
        ``Unavailable`` when the backlog is full, since work must not go unaudited. True when the record waits in
        this process for its writer's pipe: then ``handed_over`` before answering."""
        lane = self._enqueue(record.as_tuple())
        return lane.process is not None and lane.process.held

    def record_before_answer(self, row: AuditRow, *, together: bool = True) -> Awaitable[None] | None:
        """Queues the record of a request about to be answered (an inference), given as a row (the hot path builds
        no ``AuditRecord``); what to await before its answer is sent, or None when nothing must be (a writer
        thread: ``close`` writes what is queued).

        To a writer process, the records made in one pass of the event loop (a batch's requests end together)
        leave as one frame, in one write, early in the next pass; what this returns is done once that frame is in
        the writer's pipe (also when the pipe had to make room), where a SIGKILL of this process no longer loses
        it. Unless ``together`` is False (no other request is in flight to end in this pass): then the record is
        written at once, and nothing is awaited unless the pipe is full. ``Unavailable`` as for ``record``."""
        if not together and not self._lanes.get(row[8], self._default).outbox:
            lane = self._enqueue(row)
            return lane.process.handed_over() if lane.process is not None and lane.process.held else None
        lane = self._admit(row)
        if lane.process is None:
            self._queue(lane, row)
            return None
        lane.outbox.append(row)
        departure = lane.departure
        if departure is None:
            departure = lane.departure = Departure()
            departure.get_loop().call_soon(self._send_outbox, lane)
        return departure

    def _send_outbox(self, lane: _Lane) -> None:
        """Write the lane's outbox as one frame; its requests may be answered once the pipe has taken it."""
        records, departure = lane.outbox, lane.departure
        lane.outbox, lane.departure = [], None
        try:
            if records:
                self._send(lane, records)
        except BaseException as exc:  # (out of memory): the requests fail rather than wait forever, or go unaudited
            if departure is not None:
                departure.set_exception(Unavailable(f"the audit records could not be sent ({type(exc).__name__})"))
            raise
        if departure is None:
            return
        process = lane.process
        if process is not None and process.held:
            asyncio.get_running_loop().create_task(_depart(process, departure))
        else:
            departure.set_result(None)

    async def handed_over(self, record: AuditRecord) -> None:
        """Wait until the record left this process (into its writer process's pipe), where a SIGKILL of this
        process no longer loses it; at once with a writer thread (``close`` writes what is queued)."""
        lane = self._lanes.get(record.region, self._default)
        if lane.process is not None:
            await lane.process.handed_over()

    def _admit(self, row: AuditRow) -> _Lane:
        """The record's lane, its record counted; ``Unavailable`` when closed or too far behind."""
        if self._closing:
            raise Unavailable("the audit trail is closed: the server is shutting down", retry_after=1.0)
        if self._pending >= self._max_pending:
            raise Unavailable(
                f"the audit trail is {self._pending} records behind; refusing work until it catches up",
                retry_after=1.0,
            )
        lane = self._lanes.get(row[8], self._default)  # its data region's
        lane.enqueued += 1
        self._pending += 1
        return lane

    def _enqueue(self, row: AuditRow, *, urgent: bool = False) -> _Lane:
        lane = self._admit(row)
        if lane.process is None:
            self._queue(lane, row)
        else:
            if lane.outbox:  # the records made before it go first: a store's records keep their order
                self._send_outbox(lane)
            self._send(lane, [row], urgent=urgent)  # it leaves this process now
        return lane

    def _queue(self, lane: _Lane, row: AuditRow) -> None:
        """For a writer thread."""
        lane.queue.append(row)
        if (len(lane.queue) == 1 or len(lane.queue) >= self._max_batch) and not lane.failing:
            lane.wake.set()  # the first record (the window starts), or a full batch (written at once)

    def _send(self, lane: _Lane, records: list[AuditRow], *, urgent: bool = False) -> None:
        process = lane.process
        assert process is not None
        process.send(records, urgent=urgent)
        if process.unacknowledged == 1:
            lane.wake.set()

    def record_now(self, record: AuditRecord) -> asyncio.Future[None]:
        """Queues the record at once and returns what is done once it (and every record queued before it for its
        store) is durable: queued by the call itself, not by a first await, so that a caller that cannot await
        (its coroutine unwinding a KeyboardInterrupt) still has it written."""
        if not self._tasks or self._closing:
            raise Unavailable("the audit trail is not running: start it first", retry_after=1.0)
        lane = self._enqueue(record.as_tuple(), urgent=True)
        done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        lane.waiters.append((lane.enqueued, done))
        lane.wake.set()
        return done

    async def start(self) -> None:
        """Starts one writer task per store (again: nothing)."""
        if not self._tasks:
            lanes = {id(lane): lane for lane in self._lanes.values()}.values()
            for lane in lanes:
                if lane.process is not None:
                    await lane.process.start()
            self._tasks = [
                asyncio.create_task(
                    self._drain(lane) if lane.process is None else self._acknowledge(lane), name="dhow-audit-writer"
                )
                for lane in lanes
            ]

    async def close(self, *, timeout_s: float = 30.0) -> None:
        """Writes everything pending, waiting up to ``timeout_s`` for a store that is down, then stops."""
        self._closing = True
        for lane in self._lanes.values():
            if lane.outbox or lane.departure is not None:
                self._send_outbox(lane)
        await self.start()
        for lane in self._lanes.values():
            lane.wake.set()
        _, late = await asyncio.wait(self._tasks, timeout=timeout_s)
        for task in late:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        for lane in self._lanes.values():
            if lane.process is not None:
                await lane.process.close()
        if self._pending:
            log.error("%d audit records were not written before shutdown: their store is unreachable", self._pending)
        for lane in self._lanes.values():
            for _, done in lane.waiters:
                if not done.done():
                    done.set_exception(Unavailable("the audit store is unreachable; the record was not written"))
            lane.waiters.clear()

    async def _drain(self, lane: _Lane) -> None:
        """A writer thread's lane: waits for a first record (``_queue`` wakes it), gathers for the window, writes."""
        while True:
            if lane.failing:
                await _nap(lane.wake, lane.backoff_s)
            else:
                if lane.idle and not self._closing:
                    await lane.wake.wait()
                lane.wake.clear()  # (what set it is in the state read below)
                if self._window_s and not (self._closing or lane.waiters or len(lane.queue) >= self._max_batch):
                    await _nap(lane.wake, self._window_s)  # a full batch, ``record_now`` or ``close`` cut it short
            while not lane.idle and await self._write(lane):
                pass
            if self._closing and lane.idle:
                return

    async def _write(self, lane: _Lane) -> bool:
        if lane.batch is None:
            lane.batch = Appending([lane.queue.popleft() for _ in range(min(len(lane.queue), self._max_batch))])
        batch = lane.batch
        before, refused = batch.done, len(batch.refusals)
        try:
            await asyncio.to_thread(batch.run, lane.store)
        except Exception as err:  # the store is down: keep the rest of the batch, retry, say so once per outage
            self._refused(lane, batch.refusals[refused:])
            self._counted(lane, batch.done - before)
            self._failing(lane, err)
            return False
        lane.batch = None
        self._refused(lane, batch.refusals[refused:])
        self._written(lane, batch.done - before)
        return True

    async def _acknowledge(self, lane: _Lane) -> None:
        """A writer process's lane: its records were sent as they came; hear which are durable."""
        process = lane.process
        assert process is not None
        while not (self._closing and process.unacknowledged == 0):
            if process.unacknowledged == 0:
                await _nap(lane.wake, self._poll_s)
                continue
            try:
                count = await process.acknowledged()
            except Unavailable as err:
                self._failing(lane, err)
                if not process.running:
                    await asyncio.sleep(lane.backoff_s)
                    try:
                        await process.start()  # sends again what the dead writer had not acknowledged
                    except Exception as spawn:  # OSError; RuntimeError from a child watcher out of threads
                        log.error("cannot start the audit writer process for %s: %r", lane.store.url, spawn)
                        process.not_started(spawn)
                continue
            if process.refusals:
                self._refused(lane, process.refusals)
                process.refusals = []
            self._written(lane, count)

    def _refused(self, lane: _Lane, refusals: list[tuple[int, str]]) -> None:
        """Records the store refused, each written in its place as an ``audit.unwritable`` record."""
        if not refusals:  # (most writes)
            return
        self.unwritable += len(refusals)
        if self.on_unwritable is not None:
            with contextlib.suppress(Exception):  # (a metric that fails must not stop the trail)
                self.on_unwritable(len(refusals))
        for seq, error in refusals:
            log.error(
                "the audit trail at %s refused a record: written in its place as an audit.unwritable record "
                "(seq %d) that holds it as text (or its length and SHA-256, if refused as text): %s",
                lane.store.url, seq, error,
            )  # fmt: skip

    def _failing(self, lane: _Lane, err: Exception) -> None:
        self.failures += 1
        if isinstance(err, RefusingAll) and not lane.refusing_all:  # (an outage for the queue, said as what it is)
            self._refusing(lane, True)
            log.error("the audit trail at %s: %s", lane.store.url, err.message)
        elif not lane.failing:
            reason = err.message if isinstance(err, DhowError) else repr(err)
            log.error("cannot write to the audit trail at %s, retrying until it works: %s", lane.store.url, reason)
        lane.failing = True
        lane.backoff_s = min(MAX_BACKOFF_S, lane.backoff_s * 2 or FIRST_BACKOFF_S)

    def _written(self, lane: _Lane, count: int) -> None:
        self._counted(lane, count)
        if lane.failing:
            log.warning("the audit trail at %s is writable again; %d records behind", lane.store.url, self._pending)
            lane.failing, lane.backoff_s = False, 0.0
            if lane.refusing_all:
                self._refusing(lane, False)

    def _refusing(self, lane: _Lane, refusing: bool) -> None:
        lane.refusing_all = refusing
        if self.on_refusing_all is None:
            return
        failure: Exception | None = None
        for region in lane.regions:
            try:
                self.on_refusing_all(region, refusing)
            except Exception as exc:  # (a metric that fails must not stop the trail, nor the other regions' series)
                failure = exc
        if failure is not None and not self._refusing_all_failed:
            self._refusing_all_failed = True
            log.error("cannot set dhow_audit_refusing_all (said once, whatever fails later): %r", failure)

    def _counted(self, lane: _Lane, count: int) -> None:
        """``count`` more of the lane's records are durable."""
        lane.written += count
        self.written += count
        self._pending -= count
        while lane.waiters and lane.waiters[0][0] <= lane.written:
            _, done = lane.waiters.popleft()
            if not done.done():
                done.set_result(None)
