"""Kinesis through boto3: a source that reads the shards this member leases, and a PutRecords sink.

At-least-once, as with Kafka: a poll's replies are put, Kinesis acknowledges every one of them (each entry of
the PutRecords answers has a sequence number), and only then may the shard's checkpoint pass the poll's
requests (``done_batch``; a poll's records of a shard are one entry of the tracker, their last sequence number,
as with Kafka). Checkpoints (the sequence number up
to which every record is done: ``OffsetTracker``) are written to the registry's database every commit, with the
leases that say which member reads which shard (``shards``). A shard read to its end (closed by a reshard) is
checkpointed as finished once its records are answered; its children are read after it.

The client's calls block: the source's run on a thread of its own (GetRecords, the store's calls), the sink's
on another; backpressure is the consumer's bound: a paused source calls no GetRecords, only renews its leases.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import secrets
import time
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from dhow.core import affinity
from dhow.core.errors import InvalidInput, Unavailable
from dhow.streaming.carry import carried, header_length
from dhow.streaming.endpoints import Endpoint
from dhow.streaming.formats import HEADER_LENGTH
from dhow.streaming.offsets import OffsetTracker
from dhow.streaming.records import DeliveryFailed, Header, Outgoing, Position, Record
from dhow.streaming.shards import ShardInfo, ShardStore, ShardStoreOpener, decide

__all__ = ["KinesisSink", "KinesisSource"]

log = logging.getLogger("dhow.streaming")

#: records asked of one GetRecords (the service's most is 10,000)
_GET_LIMIT = 1000
#: how long a shard that had nothing new is left alone (Kinesis allows 5 GetRecords a second per shard)
_IDLE_S = 0.25
_THROTTLED_S = 1.0


def _client(endpoint: Endpoint) -> Any:
    import boto3
    from botocore.config import Config

    options = endpoint.options
    config = Config(retries={"max_attempts": 10, "mode": "adaptive"}, connect_timeout=5, read_timeout=30)
    return boto3.client(
        "kinesis",
        region_name=options.get("region") or None,
        endpoint_url=options.get("endpoint") or None,
        config=config,
    )


async def _check_stream(client: Any, endpoint: Endpoint, what: str) -> None:
    from botocore.exceptions import BotoCoreError, ClientError, NoRegionError

    try:
        await asyncio.to_thread(client.describe_stream_summary, StreamName=endpoint.topic)
    except NoRegionError:
        raise InvalidInput(f"{what} {endpoint}: no AWS region; add ?region=REGION or set AWS_DEFAULT_REGION") from None
    except ClientError as exc:
        if exc.response.get("Error", {}).get("Code") == "ResourceNotFoundException":
            raise InvalidInput(
                f"{what} {endpoint}: Kinesis has no stream {endpoint.topic!r}; create it first "
                f"(aws kinesis create-stream --stream-name {endpoint.topic} --shard-count N)"
            ) from None
        raise Unavailable(f"{what} {endpoint}: Kinesis refused: {exc}") from None
    except BotoCoreError as exc:
        raise Unavailable(f"{what} {endpoint}: Kinesis did not answer ({exc})") from None


@dataclass(slots=True)
class _Shard:
    info: ShardInfo
    iterator: str | None
    #: the sequence number of the last record read (None: nothing read yet)
    last: int | None
    ended: bool = False
    releasing: bool = False
    rest_until: float = 0.0


class KinesisSource:
    """A member of a consumer group over a Kinesis stream (leases and checkpoints in the registry database)."""

    def __init__(self, endpoint: Endpoint, group: str, stores: ShardStoreOpener, *, carry: str = "v2-json") -> None:
        self.endpoint = endpoint
        self.group = group
        self.stream = endpoint.topic
        self.owner = f"{time.strftime('%Y%m%dT%H%M%S')}-{secrets.token_hex(4)}"
        self.offsets = OffsetTracker()
        self.lease_s = float(endpoint.options.get("lease_s", "10"))
        self._stores = stores
        self._store: ShardStore | None = None
        self._client = _client(endpoint)
        self._binary = carry == "v2-binary"
        self._thread = concurrent.futures.ThreadPoolExecutor(
            1, thread_name_prefix="dhow-kinesis-read", initializer=affinity.as_any
        )
        self._shards: dict[str, _Shard] = {}
        #: the tracker's number of each shard (it keys partitions by number, as Kafka numbers them)
        self._numbers: dict[str, int] = {}
        self._lag: dict[str, int] = {}
        self._next_round = 0.0

    async def start(self) -> None:
        await _check_stream(self._client, self.endpoint, "--source")
        loop = asyncio.get_running_loop()
        self._store = await loop.run_in_executor(self._thread, self._stores)
        await loop.run_in_executor(self._thread, self._round)

    async def poll(self, max_records: int, timeout_s: float, *, paused: bool) -> list[Record]:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._thread, self._poll, max(max_records, 1), timeout_s, paused)

    def _poll(self, max_records: int, timeout_s: float, paused: bool) -> list[Record]:
        deadline = time.monotonic() + timeout_s
        if time.monotonic() >= self._next_round:
            self._round()
        if paused:  # the model is saturated: no GetRecords, the leases stay renewed
            time.sleep(max(deadline - time.monotonic(), 0))
            return []
        records: list[Record] = []
        while True:
            for shard in list(self._shards.values()):
                if len(records) >= max_records:
                    break
                if not (shard.ended or shard.releasing) and shard.rest_until <= time.monotonic():
                    records.extend(self._read(shard, max_records - len(records)))
            left = deadline - time.monotonic()
            if records or left <= 0:
                break
            time.sleep(min(left, 0.05))
        # the poll is one batch, done as a whole (``done_batch``): a shard's last sequence number stands for its records
        last = {str(record.position.partition): record.position.offset for record in records}
        for name, sequence in last.items():
            self.offsets.take(self._key(name), sequence)
        return records

    def _read(self, shard: _Shard, limit: int) -> list[Record]:
        from botocore.exceptions import ClientError

        name = shard.info.shard
        try:
            if shard.iterator is None:
                shard.iterator = self._iterator(name, shard.last)
            answer = self._client.get_records(ShardIterator=shard.iterator, Limit=min(limit, _GET_LIMIT))
        except ClientError as exc:
            code = exc.response.get("Error", {}).get("Code", "")
            if code == "ExpiredIteratorException":
                shard.iterator = None
            else:
                log.warning("stream source %s: shard %s: %s", self.endpoint, name, exc)
                shard.rest_until = time.monotonic() + _THROTTLED_S
            return []
        raw = answer.get("Records") or []
        shard.iterator = answer.get("NextShardIterator")
        self._lag[f"{self.stream}/{name}"] = int(answer.get("MillisBehindLatest") or 0)
        records = [self._record(name, item) for item in raw]
        if records:
            shard.last = records[-1].position.offset
        else:
            shard.rest_until = time.monotonic() + _IDLE_S
        ending = shard.info.ending
        # a closed shard ends where Kinesis says (no next iterator), or once its last record was read
        if shard.iterator is None or (not raw and ending is not None and (shard.last or 0) >= ending):
            shard.ended = True
            log.info("stream source %s: shard %s read to its end", self.endpoint, name)
        return records

    def _iterator(self, shard: str, after: int | None) -> str:
        if after is None:
            answer = self._client.get_shard_iterator(StreamName=self.stream, ShardId=shard,
                                                     ShardIteratorType="TRIM_HORIZON")  # fmt: skip
        else:
            answer = self._client.get_shard_iterator(
                StreamName=self.stream, ShardId=shard, ShardIteratorType="AFTER_SEQUENCE_NUMBER",
                StartingSequenceNumber=str(after),
            )  # fmt: skip
        return str(answer["ShardIterator"])

    def _record(self, shard: str, item: dict[str, Any]) -> Record:
        sequence = int(item["SequenceNumber"])
        value = bytes(item.get("Data") or b"")
        headers: list[Header] = []
        if self._binary:
            length = header_length(value)
            if length is not None and length < len(value):
                headers.append((HEADER_LENGTH, str(length).encode()))
        arrived = item.get("ApproximateArrivalTimestamp")
        stamp = int(arrived.timestamp() * 1000) if arrived is not None else 0
        key = str(item.get("PartitionKey", "")).encode()
        return Record(value, key, headers, Position(self.stream, shard, sequence), stamp)

    def done_batch(self, records: Sequence[Record]) -> None:
        # a poll's records of a shard are taken and done together: its last sequence number stands for them all
        last = {str(record.position.partition): record.position.offset for record in records}
        for shard, sequence in last.items():
            self.offsets.done(self._key(shard), sequence)

    def _key(self, shard: str) -> tuple[str, int]:
        return self.stream, self._numbers.setdefault(shard, len(self._numbers))

    # -- leases and checkpoints (on the reading thread) --------------------------------------------------

    def _round(self) -> None:
        """Renew the leases, take this member's share, let go of what is beyond it (see ``shards``)."""
        self._next_round = time.monotonic() + self.lease_s / 3
        assert self._store is not None
        try:
            listed = self._list()
            decision = decide(self._store, self.group, self.stream, self.owner, listed, set(self._shards), self.lease_s)
        except Exception as exc:  # the store or Kinesis is down for a moment: the leases last lease_s
            log.warning("stream source %s: lease round failed (tried again): %s", self.endpoint, exc)
            self._next_round = time.monotonic() + 1.0
            return
        infos = {info.shard: info for info in listed}
        for name in decision.lost:
            log.warning("stream source %s: lost the lease of shard %s", self.endpoint, name)
            self._drop(name)
        for name, sequence in decision.taken.items():
            self._shards[name] = _Shard(infos[name], None, int(sequence) if sequence else None)
            log.info("stream source %s: reads shard %s from %s", self.endpoint, name, sequence or "its start")
        for name in decision.extra:
            if name in self._shards and not self._shards[name].releasing:
                self._shards[name].releasing = True
                log.info("stream source %s: lets shard %s go to another member", self.endpoint, name)
        for name, shard in self._shards.items():
            shard.info = infos.get(name, shard.info)  # a shard closed since it was taken says where it ends
        self._settle()

    def _list(self) -> list[ShardInfo]:
        shards: list[ShardInfo] = []
        token: str | None = None
        while True:
            answer = (self._client.list_shards(NextToken=token) if token
                      else self._client.list_shards(StreamName=self.stream))  # fmt: skip
            for item in answer.get("Shards") or []:
                parents = tuple(p for p in (item.get("ParentShardId"), item.get("AdjacentParentShardId")) if p)
                ending = (item.get("SequenceNumberRange") or {}).get("EndingSequenceNumber")
                shards.append(ShardInfo(item["ShardId"], parents, int(ending) if ending is not None else None))
            token = answer.get("NextToken")
            if not token:
                return shards

    def _commit(self) -> None:
        assert self._store is not None
        offsets = self.offsets.committable()
        names = {number: name for name, number in self._numbers.items()}
        for key, ready in offsets.items():
            shard = names[key[1]]
            try:
                held = self._store.checkpoint(self.group, self.stream, shard, self.owner, str(ready - 1))
            except Exception as exc:
                log.warning("stream source %s: checkpoint failed, kept for the next one: %s", self.endpoint, exc)
                self.offsets.restore({key: ready})
                continue
            if not held:
                log.warning("stream source %s: shard %s is no longer this member's", self.endpoint, shard)
                self._drop(shard)
        self._settle()

    def _settle(self) -> None:
        """Shards read to their end, or let go, whose records are all answered: finished or released."""
        assert self._store is not None
        for name, shard in list(self._shards.items()):
            key = self._key(name)
            if not (shard.ended or shard.releasing) or self.offsets.in_flight([key]):
                continue
            ready = self.offsets.committable([key]).get(key)
            try:
                self._store.checkpoint(self.group, self.stream, name, self.owner,
                                       None if ready is None else str(ready - 1), finished=shard.ended,
                                       release=True)  # fmt: skip
            except Exception as exc:
                log.warning("stream source %s: cannot let shard %s go yet: %s", self.endpoint, name, exc)
                continue
            log.info("stream source %s: shard %s %s", self.endpoint, name, "finished" if shard.ended else "let go")
            self._drop(name)
            self._next_round = 0.0  # its children (or a share's change) are looked at now

    def _drop(self, name: str) -> None:
        self._shards.pop(name, None)
        self.offsets.forget([self._key(name)])
        self._lag.pop(f"{self.stream}/{name}", None)

    async def commit(self, *, wait: bool = False) -> None:
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(self._thread, self._commit)

    def lag(self) -> dict[str, int]:
        """Milliseconds behind the newest record of each shard read (Kinesis's MillisBehindLatest)."""
        return dict(self._lag)

    def assignment(self) -> list[str]:
        return sorted(f"{self.stream}/{name}" for name in list(self._shards))

    async def close(self) -> None:
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(self._thread, self._leave)
        self._thread.shutdown(wait=True)

    def _leave(self) -> None:
        if self._store is None:
            return
        try:
            self._store.leave(self.group, self.stream, self.owner)
        except Exception as exc:  # its leases expire after lease_s instead
            log.warning("stream source %s: could not let its leases go: %s", self.endpoint, exc)
        self._store.close()
        self._store = None


class _Acknowledged:
    """A batch's acknowledgement: its future settles once Kinesis took every one of its entries, or fails with the
    reason of the first it gave up on."""

    __slots__ = ("future", "left")

    def __init__(self, future: asyncio.Future[None], count: int) -> None:
        self.future = future
        self.left = count

    def taken(self) -> None:
        self.left -= 1
        if self.left == 0 and not self.future.done():
            self.future.set_result(None)

    def refused(self, reason: str) -> None:
        if not self.future.done():
            self.future.set_exception(DeliveryFailed(reason))


@dataclass(slots=True)
class _Put:
    entry: dict[str, Any]
    batch: _Acknowledged
    attempts: int = 0


class KinesisSink:
    """PutRecords to one stream, up to 500 records a call (entries of several batches share a call); an entry
    Kinesis refuses is put again, alone of its call, until it is taken or ``_GIVE_UP_S`` passed (then its batch's
    future fails: the consumer stops uncommitted)."""

    _BATCH = 500
    _BATCH_BYTES = 4 * 1024 * 1024
    _GIVE_UP_S = 60.0

    def __init__(self, endpoint: Endpoint, *, carry: str) -> None:
        self.endpoint = endpoint
        self.url = endpoint.url
        self.carry = carry
        self._client = _client(endpoint)
        self._thread = concurrent.futures.ThreadPoolExecutor(
            1, thread_name_prefix="dhow-kinesis-put", initializer=affinity.as_any
        )
        self._queue: deque[_Put] = deque()
        self._wake = asyncio.Event()
        self._flusher: asyncio.Task[None] | None = None
        #: records taken off the queue whose PutRecords has not ended
        self._sending = 0

    async def start(self) -> None:
        await _check_stream(self._client, self.endpoint, "sink")
        self._flusher = asyncio.create_task(self._flush_forever())

    async def send_batch(self, messages: Sequence[Outgoing]) -> asyncio.Future[None]:
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        try:
            entries = [self._entry(message) for message in messages]
        except Exception as exc:  # a reply dhow wrote itself that it cannot read back: a fault of dhow's
            future.set_exception(DeliveryFailed(f"{self.url}: cannot carry a message to Kinesis: {exc}"))
            return future
        if not entries:
            future.set_result(None)
            return future
        batch = _Acknowledged(future, len(entries))
        self._queue.extend(_Put(entry, batch) for entry in entries)
        self._wake.set()
        return future

    def _entry(self, message: Outgoing) -> dict[str, Any]:
        key = (message.key or b"").decode(errors="replace")[:256] or _fallback_key(message.headers)
        return {"Data": carried(message, self.carry), "PartitionKey": key}

    async def _flush_forever(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            await self._wake.wait()
            self._wake.clear()
            while self._queue:  # a batch's entries were queued together: they go in the same call, up to its limits
                batch: list[_Put] = []
                size = 0
                while self._queue and len(batch) < self._BATCH:
                    entry = self._queue[0].entry
                    weight = len(entry["Data"]) + len(entry["PartitionKey"])
                    if batch and size + weight > self._BATCH_BYTES:
                        break
                    batch.append(self._queue.popleft())
                    size += weight
                self._sending += len(batch)
                try:
                    await self._put(loop, batch)
                finally:
                    self._sending -= len(batch)

    async def _put(self, loop: asyncio.AbstractEventLoop, batch: list[_Put]) -> None:
        started = time.monotonic()
        while batch:
            try:
                answer = await loop.run_in_executor(self._thread, self._call, [put.entry for put in batch])
                results = answer.get("Records") or []
            except Exception as exc:
                results = [{"ErrorCode": type(exc).__name__, "ErrorMessage": str(exc)}] * len(batch)
            again = []
            for put, result in zip(batch, results, strict=True):
                if not result.get("ErrorCode"):
                    put.batch.taken()
                elif time.monotonic() - started > self._GIVE_UP_S:
                    put.batch.refused(f"{self.url}: {result['ErrorCode']}: {result.get('ErrorMessage')}")
                else:
                    put.attempts += 1
                    again.append(put)
            batch = again
            if batch:  # throttled or refused in part: back off, put only those again
                await asyncio.sleep(min(0.05 * 2 ** min(batch[0].attempts, 6), 2.0))

    def _call(self, entries: list[dict[str, Any]]) -> dict[str, Any]:
        answer: dict[str, Any] = self._client.put_records(StreamName=self.endpoint.topic, Records=entries)
        return answer

    async def close(self) -> None:
        deadline = time.monotonic() + 30.0
        while (self._queue or self._sending) and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
        if self._flusher is not None:
            self._flusher.cancel()
        left = [put for put in self._queue if not put.batch.future.done()]
        for put in left:
            put.batch.refused(f"{self.url}: the sink closed before Kinesis took it")
        if left:
            log.error("stream sink %s: %d messages not delivered at close", self.url, len(left))
        self._thread.shutdown(wait=True)


def _fallback_key(headers: list[Header]) -> str:
    """A message without a key (from a Kafka source): spread by its source partition, as Kafka would keep it."""
    for name, value in headers:
        if name == "dhow-source-partition" and value:
            return value.decode(errors="replace")
    return "0"
