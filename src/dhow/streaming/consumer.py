"""A stream consumer: read, admit, score, answer, acknowledge, commit — at least once, with bounded memory.

Each poll's records are one admitted call (``CoreService.call``, action ``infer``, as the stream's service
identity): permission, quota and audit are taken per batch, not per message, and the call's audit record
counts its messages. Inside the call every message is its own request to the model, so the model's dynamic
batcher cuts the batches it was configured for, as it does for REST and gRPC requests.

The replies (and dead letters) of a batch are produced once its call has ended, so the audit record exists
before anything is answered; a record is ``done`` once the broker acknowledged what it became, and only done
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

from dhow.core.errors import DhowError, InternalError
from dhow.core.model_config import TensorSpec
from dhow.core.types import InferenceRequest, InferenceResponse
from dhow.serving.retries import retrying
from dhow.serving.service import ACTIONS, Call, CoreService, Principal, service_identity
from dhow.streaming.formats import HEADER_LENGTH, message_format
from dhow.streaming.records import DeliveryFailed, Header, Outgoing, Record, Sink, Source
from dhow.streaming.rows import Infer, RowStacker
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


def stream_identity(name: str) -> Principal:
    """The service identity a stream's calls are admitted and audited as (``dhow:stream:<name>``, an invoker)."""
    return service_identity(f"dhow:stream:{name}")


class StreamConsumer:
    def __init__(
        self,
        spec: StreamSpec,
        service: CoreService,
        source: Source,
        replies: Sink,
        dead_letters: Sink | None,
        *,
        meter: Meter | None = None,
        status_dir: Path | None = None,
    ) -> None:
        self.spec = spec
        self.service = service
        self.source = source
        self.replies = replies
        self.dead_letters = dead_letters
        self.meter = meter
        self.status_dir = status_dir
        self.identity = stream_identity(spec.name)
        self.format = message_format(spec.format)
        self.status = StreamStatus(
            spec.name, f"{spec.model}:{spec.version}" if spec.version else spec.model, str(spec.source),
            str(spec.sink), str(spec.dead_letter or ""), spec.group,
        )  # fmt: skip
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
                if room <= 0 and await self._room_within(_PAUSE_AFTER_S):
                    continue
                # full for a while: the model is saturated, so the partitions pause (the group still hears
                # from this member) instead of the client fetching more
                self.status.paused = room <= 0
                records = await self.source.poll(min(room, _POLL_RECORDS), _POLL_S, paused=room <= 0)
                if records:
                    self.status.in_flight += len(records)
                    self.status.received += len(records)
                    if self.meter is not None:
                        self.meter.received(self.spec.name, len(records))
                    task = asyncio.create_task(self._batch(records))
                    tasks.add(task)
                    task.add_done_callback(tasks.discard)
        finally:
            self.status.state = "stopping"
            await self._finish(tasks, background)
        if self._fault is not None:
            raise self._fault

    async def _room_within(self, seconds: float) -> bool:
        """Whether the records in flight fell to half the bound within ``seconds``."""
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
        for sink in (self.replies, self.dead_letters):
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
            answers = await self._admitted(records)
        except DhowError as exc:  # the whole batch refused (permission, residency, quota past its retries)
            answers = [self._dead_letter(record, exc) for record in records]
        except Exception as exc:
            self._stop(exc)
            return
        await asyncio.gather(*(self._deliver(record, answer) for record, answer in zip(records, answers, strict=True)))

    async def _admitted(self, records: list[Record]) -> list[tuple[Outgoing, bool]]:
        """The batch's answers (a reply, or a dead letter: ``True``), computed inside one admitted call."""

        async def admitted() -> list[tuple[Outgoing, bool]]:
            async with self.service.call(self.identity, ACTIONS["infer"], self.spec.model) as call:
                specs, infer = self._inputs(), self._inferrer(call)
                answers = await asyncio.gather(*(self._answer(infer, record, specs) for record in records))
                call.note(stream=self.spec.name, messages=len(records), failed=sum(dead for _, dead in answers),
                          first=str(records[0].position), last=str(records[-1].position))  # fmt: skip
            return answers

        return await retrying(admitted, first_s=0.05, most_s=2.0)

    def _inputs(self) -> list[TensorSpec]:
        if self.spec.format != "json":
            return []
        return self.service.dataplane.tensor_specs(self.spec.model, self.spec.version)[0]

    def _inferrer(self, call: Call) -> Infer:
        """How a message's request runs in the batch's call: alone, or (one-row messages) stacked with others."""

        def alone(request: InferenceRequest) -> Awaitable[InferenceResponse]:
            return retrying(lambda: call.infer(request), first_s=0.01, most_s=1.0)

        if self.spec.format != "json":
            return alone
        rows = self.service.dataplane.max_batch_size(self.spec.model, self.spec.version)
        return RowStacker(alone, rows).infer if rows > 1 else alone

    async def _answer(self, infer: Infer, record: Record, specs: list[TensorSpec]) -> tuple[Outgoing, bool]:
        try:
            request = self.format.decode(record, self.spec.model, self.spec.version, specs)
            if self.spec.data_region:
                request.parameters.setdefault("data_region", self.spec.data_region)
            response = await infer(request)
            body, headers = self.format.encode(request, response)
        except DhowError as exc:
            return self._dead_letter(record, exc)
        except Exception as exc:
            error_id = secrets.token_hex(4)
            log.error("stream %s: internal error (id %s) at %s", self.spec.name, error_id, record.position,
                      exc_info=exc)  # fmt: skip
            return self._dead_letter(record, InternalError(error_id))
        return Outgoing(body, record.key, self._reply_headers(record, request, response, headers)), False

    def _reply_headers(
        self, record: Record, request: InferenceRequest, response: InferenceResponse, own: list[Header]
    ) -> list[Header]:
        kept = [(k, v) for k, v in record.headers if k.lower() != HEADER_LENGTH]
        if request.id and record.header("x-request-id") is None:
            kept.append(("x-request-id", request.id.encode()))
        return [
            *kept, *own, ("dhow-model", response.model_name.encode()),
            ("dhow-model-version", response.model_version.encode()), *_source_headers(record),
        ]  # fmt: skip

    def _dead_letter(self, record: Record, error: DhowError) -> tuple[Outgoing, bool]:
        headers = [
            *record.headers, ("dhow-error-code", error.code.value.encode()),
            ("dhow-error-reason", error.message.encode()), ("dhow-model", self.spec.model.encode()),
            ("dhow-stream", self.spec.name.encode()), *_source_headers(record),
            ("dhow-failed-at", datetime.datetime.now(datetime.UTC).isoformat().encode()),
        ]  # fmt: skip
        self.status.failed += 1
        self.status.failures[error.code.value] += 1
        if self.meter is not None:
            self.meter.failed(self.spec.name, error.code.value, self.dead_letters is not None)
        if self.dead_letters is None:
            log.warning("stream %s: skipped %s (--on-error skip): %s", self.spec.name, record.position, error.message)
        return Outgoing(record.value, record.key, headers), True

    # -- delivery and commits -----------------------------------------------------------------------

    async def _deliver(self, record: Record, answer: tuple[Outgoing, bool]) -> None:
        message, dead = answer
        sink = self.dead_letters if dead else self.replies
        try:
            if sink is not None:
                await (await sink.send(message))
        except DeliveryFailed as exc:
            where = sink.url if sink is not None else ""
            self._stop(DeliveryFailed(f"stream {self.spec.name}: {where} did not take the answer to "
                                      f"{record.position}: {exc}"))  # fmt: skip
            return
        self.source.done(record)
        self.status.in_flight -= 1
        if self.status.in_flight <= self.spec.max_in_flight // 2:
            self._room.set()
        if not dead:
            self.status.answered += 1
            if self.meter is not None:
                latency = time.time() - record.timestamp_ms / 1000 if record.timestamp_ms else 0.0
                self.meter.answered(self.spec.name, max(latency, 0.0))
        elif sink is None:
            self.status.skipped += 1
        else:
            self.status.dead_lettered += 1

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


def _source_headers(record: Record) -> list[Header]:
    position = record.position
    return [
        ("dhow-source-topic", position.topic.encode()),
        ("dhow-source-partition", str(position.partition).encode()),
        ("dhow-source-offset", str(position.offset).encode()),
    ]
