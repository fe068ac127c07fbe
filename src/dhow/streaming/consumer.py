"""A stream consumer: read, admit, score, answer, acknowledge, commit — at least once, with bounded memory.

Each poll's records are one admitted call (``CoreService.call``, action ``infer``, as the stream's service
identity): permission, quota and audit are taken per batch, not per message, and the call's audit record
counts its messages. Inside the call the poll's messages are decoded together and their rows stacked into
requests of up to the model's ``max_batch_size`` rows (``rows``; the model's dynamic batcher still cuts its
batches), and the replies are encoded together.

The replies (and dead letters) of a batch are produced once its call has ended, so the audit record exists
before anything is answered, in one pass with one acknowledgement for all of them (``Sink.send_batch``); the
batch's records are ``done`` once the broker acknowledged every reply and dead letter they became, and only done
records are committed (``OffsetTracker``). At most ``max_in_flight`` records are read and not done: past it the
source is paused, not buffered. A message that cannot be answered (undecodable, wrong shape, refused by a
policy, a model error) goes to the dead-letter destination with its reason, its position and its bytes, and the
consumer goes on. A reply the broker does not take stops the consumer without committing it.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import logging
import secrets
import time
from collections.abc import Awaitable
from pathlib import Path

import numpy as np

from dhow.core.errors import DhowError, InternalError
from dhow.core.model_config import TensorSpec
from dhow.core.types import InferenceRequest, InferenceResponse
from dhow.serving.retries import retrying
from dhow.serving.service import ACTIONS, Call, CoreService, Principal, service_identity
from dhow.streaming.formats import HEADER_LENGTH, message_format
from dhow.streaming.records import DeliveryFailed, Header, Outgoing, Position, Record, Sink, Source, Transactions
from dhow.streaming.rows import run_stack
from dhow.streaming.spec import StreamSpec
from dhow.streaming.status import Meter, StreamStatus

__all__ = ["StreamConsumer", "stream_identity"]

log = logging.getLogger("dhow.streaming")

#: records asked of one poll (one admitted call); the model's batcher splits them into its own batches
_POLL_RECORDS = 500
_POLL_S = 0.1
#: how long the bound of records in flight may stay reached before the source's partitions are paused
_PAUSE_AFTER_S = 1.0
_COMMIT_S = 0.5
_STATUS_S = 2.0
#: how long a stopping consumer lets the records in flight finish
_DRAIN_S = 30.0
#: transactions aborted in a row (each batch read again) before the consumer stops
_ABORTS = 3


#: a NamedTuple made from a tuple in C: ``Outgoing(...)`` runs its Python ``__new__``, per message
_outgoing = tuple.__new__

#: a batch's replies, dead letters and the answered messages' timestamps
_Answers = tuple[list[Outgoing], list[Outgoing], list[int]]


def stream_identity(name: str) -> Principal:
    """The service identity a stream's calls are admitted and audited as (``dhow:stream:<name>``, an invoker)."""
    return service_identity(f"dhow:stream:{name}")


class StreamConsumer:
    def __init__(
        self,
        spec: StreamSpec,
        service: CoreService,
        source: Source,
        replies: Sink | None,
        dead_letters: Sink | None,
        *,
        transactions: Transactions | None = None,
        meter: Meter | None = None,
        status_dir: Path | None = None,
        worker: int = 0,
    ) -> None:
        """``transactions`` (``--exactly-once``): batches are written and committed through it, one at a time,
        instead of through the sinks; ``worker``: which of ``--workers N`` processes this is (its status file)."""
        self.spec = spec
        self.service = service
        self.source = source
        self.replies = replies
        self.dead_letters = dead_letters
        self.transactions = transactions
        self._aborted = 0
        self.meter = meter
        self.status_dir = status_dir
        self.identity = stream_identity(spec.name)
        self.format = message_format(spec.format)
        self.status = StreamStatus(
            spec.name, f"{spec.model}:{spec.version}" if spec.version else spec.model, str(spec.source),
            str(spec.sink), str(spec.dead_letter or ""), spec.group, worker=worker,
        )  # fmt: skip
        #: the room a poll waits for, and the most it reads: a full one (half the bound, when that is less), not what
        #: the last batch freed; two polls in flight, so that the model scores one while the other is acknowledged
        self._poll_size = max(1, min(_POLL_RECORDS, spec.max_in_flight // 2))
        self._room = asyncio.Event()
        self._fault: BaseException | None = None

    async def run(self, stop: asyncio.Event) -> None:
        """Consume until ``stop`` is set (or a reply cannot be delivered); then finish what is in flight,
        commit it, and close the source and the sinks."""
        tasks: set[asyncio.Task[None]] = set()
        background = [asyncio.create_task(self._commit_every()), asyncio.create_task(self._report_every())]
        self.status.state = "running"
        try:
            while not stop.is_set() and self._fault is None:
                room = self.spec.max_in_flight - self.status.in_flight
                # the next poll as soon as a full one fits (one batch done), not once half the bound is free: the
                # model then scores a poll while the one before waits for its acknowledgements
                if room < self._poll_size and await self._room_within(_PAUSE_AFTER_S):
                    continue
                # full for a while: the model is saturated, so the partitions pause (the group still hears
                # from this member) instead of the client fetching more
                self.status.paused = room <= 0
                records = await self.source.poll(min(room, self._poll_size), _POLL_S, paused=room <= 0)
                if records:
                    self.status.in_flight += len(records)
                    self.status.received += len(records)
                    if self.meter is not None:
                        self.meter.received(self.spec.name, len(records))
                    task = asyncio.create_task(self._batch(records))
                    tasks.add(task)
                    task.add_done_callback(tasks.discard)
                    if self.transactions is not None:  # one open transaction: the next poll after this commit
                        await asyncio.wait([task])
        finally:
            self.status.state = "stopping"
            await self._finish(tasks, background)
        if self._fault is not None:
            raise self._fault

    async def _room_within(self, seconds: float) -> bool:
        """Whether the room for a full poll freed within ``seconds``."""
        self._room.clear()
        try:
            await asyncio.wait_for(self._room.wait(), seconds)
        except TimeoutError:
            return False
        return True

    async def _finish(self, tasks: set[asyncio.Task[None]], background: list[asyncio.Task[None]]) -> None:
        if tasks:
            _, pending = await asyncio.wait(tasks, timeout=_DRAIN_S)
            for task in pending:  # not committed: read again by whoever consumes next
                task.cancel()
        for task in background:
            task.cancel()
        with contextlib.suppress(Exception):
            await self.source.commit(wait=True)
        for sink in (self.replies, self.dead_letters, self.transactions):
            if sink is not None:
                await sink.close()
        await self.source.close()
        self.status.state = "failed" if self._fault is not None else "stopped"
        self._write_status()

    # -- one batch --------------------------------------------------------------------------------

    async def _batch(self, records: list[Record]) -> None:
        self.status.batches += 1
        if self.meter is not None:
            self.meter.batch(self.spec.name, len(records))
        try:
            replies, letters, stamps = await self._admitted(records)
        except DhowError as exc:  # the whole batch refused (permission, residency, quota past its retries)
            replies, letters, stamps = [], [self._dead_letter(record, exc) for record in records], []
        except Exception as exc:
            self._stop(exc)
            return
        if self.transactions is not None:
            await self._commit_transaction(records, replies, letters, stamps)
            return
        try:
            sent = [await self.replies.send_batch(replies)] if replies and self.replies is not None else []
            if letters and self.dead_letters is not None:
                sent.append(await self.dead_letters.send_batch(letters))
            await asyncio.gather(*sent)
        except DeliveryFailed as exc:
            self._stop(DeliveryFailed(f"stream {self.spec.name}: an answer to the messages {records[0].position} "
                                      f"to {records[-1].position} was not taken: {exc}"))  # fmt: skip
            return
        self.source.done_batch(records)
        self._finished(records, stamps, len(letters))

    async def _commit_transaction(
        self, records: list[Record], replies: list[Outgoing], letters: list[Outgoing], stamps: list[int]
    ) -> None:
        assert self.transactions is not None
        try:
            await self.transactions.commit(records, replies, letters)
        except DeliveryFailed as exc:  # aborted, the source rewound: the next poll reads the batch again
            self.source.done_batch(records)
            self.status.in_flight -= len(records)
            self._aborted += 1
            if self._aborted >= _ABORTS:
                self._stop(
                    DeliveryFailed(f"stream {self.spec.name}: {self._aborted} transactions aborted in a row: {exc}")
                )
            else:
                log.warning("stream %s: %s", self.spec.name, exc)
            return
        self._aborted = 0
        self.source.done_batch(records)
        self._finished(records, stamps, len(letters))

    def _finished(self, records: list[Record], stamps: list[int], dead: int) -> None:
        """The batch acknowledged: its counts; ``stamps``: the timestamps of the messages answered."""
        status = self.status
        status.in_flight -= len(records)
        if status.in_flight <= self.spec.max_in_flight - self._poll_size:
            self._room.set()
        status.answered += len(stamps)
        if self.spec.dead_letter is None:
            status.skipped += dead
        else:
            status.dead_lettered += dead
        if self.meter is not None and stamps:  # a batch's latencies in a few numpy calls, not a line per reply
            sent = np.asarray(stamps, dtype=np.float64)
            self.meter.answered(self.spec.name, np.where(sent > 0, np.maximum(time.time() - sent / 1000, 0.0), 0.0))

    async def _admitted(self, records: list[Record]) -> _Answers:
        """The batch's replies and dead letters, computed inside one admitted call."""

        async def admitted() -> _Answers:
            async with self.service.call(self.identity, ACTIONS["infer"], self.spec.model) as call:
                answers = await self._answers(call, records)
                call.note(stream=self.spec.name, messages=len(records), failed=len(answers[1]),
                          first=str(records[0].position), last=str(records[-1].position))  # fmt: skip
            return answers

        return await retrying(admitted, first_s=0.05, most_s=2.0)

    async def _answers(self, call: Call, records: list[Record]) -> _Answers:
        """The messages decoded together, their rows sent stacked, the replies encoded together: the replies, the
        dead letters and the answered messages' timestamps."""
        spec = self.spec
        decoded = self.format.decode_batch(records, spec.model, spec.version, self._inputs(), spec.data_region)

        def infer(request: InferenceRequest) -> Awaitable[InferenceResponse]:
            return retrying(lambda: call.infer(request), first_s=0.01, most_s=1.0)

        rows = self.service.dataplane.max_batch_size(spec.model, spec.version)
        results = await asyncio.gather(*(run_stack(infer, stack, rows) for stack in decoded.stacks))
        failures: dict[int, BaseException] = dict(decoded.errors)
        replies: list[Outgoing] = []
        stamps: list[int] = []
        headers = _ReplyHeaders()
        for answers, failed in results:
            failures.update(failed)
            for answered in answers:
                try:
                    encoded = self.format.encode_answered(decoded, answered)
                except Exception as exc:
                    failures.update(dict.fromkeys(answered.indices, exc))
                    continue
                model = headers.model(answered.response)
                for index, body, own, request_id in encoded:
                    record = records[index]
                    reply = (body, record.key, headers.reply(record, own, request_id, model))
                    replies.append(_outgoing(Outgoing, reply))
                    stamps.append(record.timestamp_ms)
        letters = [self._dead_letter(records[index], self._reason(records[index], exc))
                   for index, exc in sorted(failures.items())]  # fmt: skip
        return replies, letters, stamps

    def _inputs(self) -> list[TensorSpec]:
        if self.spec.format != "json":
            return []
        return self.service.dataplane.tensor_specs(self.spec.model, self.spec.version)[0]

    def _reason(self, record: Record, error: BaseException) -> DhowError:
        if isinstance(error, DhowError):
            return error
        error_id = secrets.token_hex(4)
        log.error("stream %s: internal error (id %s) at %s", self.spec.name, error_id, record.position,
                  exc_info=error)  # fmt: skip
        return InternalError(error_id)

    def _dead_letter(self, record: Record, error: DhowError) -> Outgoing:
        headers = [
            *record.headers, ("dhow-error-code", error.code.value.encode()),
            ("dhow-error-reason", error.message.encode()), ("dhow-model", self.spec.model.encode()),
            ("dhow-stream", self.spec.name.encode()), *_source_headers(record),
            ("dhow-failed-at", datetime.datetime.now(datetime.UTC).isoformat().encode()),
        ]  # fmt: skip
        self.status.failed += 1
        self.status.failures[error.code.value] += 1
        if self.meter is not None:
            self.meter.failed(self.spec.name, error.code.value, self.spec.dead_letter is not None)
        if self.spec.dead_letter is None:
            log.warning("stream %s: skipped %s (--on-error skip): %s", self.spec.name, record.position, error.message)
        return Outgoing(record.value, record.key, headers)

    # -- commits and reports --------------------------------------------------------------------------

    def _stop(self, fault: BaseException) -> None:
        if self._fault is None:
            log.error("stream %s stops: %s", self.spec.name, fault)
            self._fault = fault
            self.status.error = str(fault)

    async def _commit_every(self) -> None:
        while True:
            await asyncio.sleep(_COMMIT_S)
            await self.source.commit()

    async def _report_every(self) -> None:
        while True:
            self.status.lag = self.source.lag()
            self.status.assignment = self.source.assignment()
            if self.meter is not None:
                self.meter.lag(self.spec.name, self.status.lag)
            self._write_status()
            await asyncio.sleep(_STATUS_S)

    def _write_status(self) -> None:
        if self.status_dir is None:
            return
        try:
            self.status.write(self.status_dir)
        except OSError as exc:
            log.warning("stream %s: cannot write its status in %s: %s", self.spec.name, self.status_dir, exc)


class _ReplyHeaders:
    """A batch's reply headers, built from pieces made once per batch (model, version, topic, partition): a message
    with no headers of its own gets the shared pieces and its offset's header, nothing else built for it."""

    def __init__(self) -> None:
        self._models: dict[tuple[str, str], list[Header]] = {}
        self._topics: dict[str, Header] = {}
        self._partitions: dict[int | str, Header] = {}
        #: (id of a model's headers, topic, partition): those headers and the source's topic and partition
        self._shared: dict[tuple[int, str, int | str], list[Header]] = {}

    def model(self, response: InferenceResponse) -> list[Header]:
        key = (response.model_name, response.model_version)
        found = self._models.get(key)
        if found is None:
            found = self._models[key] = [("dhow-model", key[0].encode()), ("dhow-model-version", key[1].encode())]
        return found

    def reply(self, record: Record, own: list[Header], request_id: str, model: list[Header]) -> list[Header]:
        position = record.position
        offset = ("dhow-source-offset", str(position.offset).encode())
        if not record.headers and not own and not request_id:  # most replies: the shared pieces and the offset
            key = (id(model), position.topic, position.partition)
            shared = self._shared.get(key)
            if shared is None:
                shared = self._shared[key] = [*model, *self._source(position)]
            return [*shared, offset]
        if record.headers:
            kept = [(k, v) for k, v in record.headers if k.lower() != HEADER_LENGTH]
            if request_id and record.header("x-request-id") is None:
                kept.append(("x-request-id", request_id.encode()))
        else:
            kept = [("x-request-id", request_id.encode())] if request_id else []
        return [*kept, *own, *model, *self._source(position), offset]

    def _source(self, position: Position) -> tuple[Header, Header]:
        topic = self._topics.get(position.topic)
        if topic is None:
            topic = self._topics[position.topic] = ("dhow-source-topic", position.topic.encode())
        partition = self._partitions.get(position.partition)
        if partition is None:
            partition = self._partitions[position.partition] = (
                "dhow-source-partition",
                str(position.partition).encode(),
            )
        return topic, partition


def _source_headers(record: Record) -> list[Header]:
    position = record.position
    return [
        ("dhow-source-topic", position.topic.encode()),
        ("dhow-source-partition", str(position.partition).encode()),
        ("dhow-source-offset", str(position.offset).encode()),
    ]
