"""Predictions awaiting their label, shared through Redis (``--redis``): a label sent to any worker or pod joins.

Without it a prediction lives in the memory of the process that answered (``quality.PredictionLog``), so with
``--workers N`` or several replicas behind one Service a label reaches the process that made its prediction only
by chance. With ``--redis`` (the store the rate limits already share), each process writes the predictions it
kept into Redis, and a label is looked up there by whichever process receives it.

The request's path only appends to a list (``add``); the watch's task writes what was kept every tick (``flush``:
encoded in a thread, then a round trip, one ``HSET`` per model, per ``STEP`` predictions: the event loop serves the
requests between them). Each process writes into buckets of its own (Redis hashes, ``tenant NUL id`` -> the
prediction), ``pending / BUCKETS`` predictions each; past ``BUCKETS`` buckets its oldest is deleted, so each process
keeps about ``pending`` predictions there, as it would in memory (its drops counted as there). Every write sets its
bucket's life (``BUCKET_TTL_S``, so that a process that died leaves nothing for ever) and lists it in the model's
index, a sorted set the look-ups walk in Redis (two Lua scripts: ``find``, then ``claim`` the predictions whose
labels fit, moving each into its bucket's joined set, so that a label sent again, to any process, is told
``already_joined``). The index lists ``MAX_INDEXED`` buckets at most, ordered by their last write (by Redis's own
count, never a host's clock): the oldest past it, dead processes' first, are deleted and counted dropped, so about
``MAX_INDEXED / BUCKETS`` processes share a model at most without losing predictions early. A look-up takes
``CHUNK`` labels a script: it stops the Redis the rate limits share for a bounded time.

Nothing is dropped unseen: a full list (Redis slower than the requests) drops the newest and counts it, a write
that fails counts its predictions failed (``dhow_feedback_shared_total{outcome}``; a round trip unanswered ends
the flush, the rest counted failed: a hung Redis holds the look-ups one timeout, not one a step), and a label that
cannot be looked up (Redis down) is answered 503, to be sent again.
"""

from __future__ import annotations

import asyncio
import logging
import os
import secrets
import socket
import time
from collections.abc import Iterator
from typing import Any

import numpy as np
from prometheus_client import CollectorRegistry, Counter
from redis.asyncio import Redis
from redis.exceptions import RedisError

from dhow.core.addresses import redis_address
from dhow.core.errors import Unavailable
from dhow.monitoring.shared_encoding import decode_prediction, encode_prediction, encoded_by_model, newest_of

__all__ = [
    "BUCKETS",
    "BUCKET_TTL_S",
    "JOINED",
    "SharedPredictions",
    "decode_prediction",
    "encode_prediction",
    "field_of",
]

#: buckets a process keeps per model (its newest): the bound is ``pending`` predictions, in this many steps
BUCKETS = 8
#: how long a bucket lives at most (a process that died leaves its buckets; they go after this)
BUCKET_TTL_S = 7 * 24 * 3600
#: what ``find`` answers for a prediction labelled already
JOINED = b"\x00joined"
#: predictions waiting for the next ``flush`` at most (past it the newest are dropped and counted)
MAX_OUTGOING = 100_000
#: buckets a model's index lists at most (every process's; the oldest past it are deleted): the look-ups walk them
MAX_INDEXED = 256
#: labels looked up in one script: Redis serves nothing else while a script runs (256 unknown ids over 256 buckets:
#: ~0.2 s; 32: ~25 ms)
CHUNK = 32
#: predictions written in one pipeline at most: redis-py packs a pipeline's commands on the event loop, in Python
#: (~1 µs a prediction), so a backlog of 100k written at once held it ~80 ms; 2,000 hold it a few ms a step
STEP = 2_000
_PREFIX = "dhow:feedback:"
#: the client's timeouts (connecting; an answer): a step unanswered ends the flush after one of them; a step a
#: cancelled flush waits for is given twice this (a slow Redis can exceed it: the step is then counted failed)
_TIMEOUT_S = 5

log = logging.getLogger("dhow.monitoring")

#: KEYS[1]: the model's index (bucket -> the model's count of writes at its last write); ARGV: the fields. For each
#: field, in the newest bucket that holds it: its prediction, else ``JOINED`` if a bucket's joined set has it; then
#: how many predictions await a label (every process's). Buckets gone (expired or deleted) leave the index.
_FIND = """
local buckets = redis.call('ZREVRANGE', KEYS[1], 0, -1)
local live = {}
for _, bucket in ipairs(buckets) do
  if redis.call('EXISTS', bucket) == 1 or redis.call('EXISTS', bucket .. ':joined') == 1 then
    live[#live + 1] = bucket
  else
    redis.call('ZREM', KEYS[1], bucket)
  end
end
local found = {}
for i, field in ipairs(ARGV) do
  found[i] = false
  for _, bucket in ipairs(live) do
    local value = redis.call('HGET', bucket, field)
    if value then found[i] = value break end
  end
  if not found[i] then
    for _, bucket in ipairs(live) do
      if redis.call('SISMEMBER', bucket .. ':joined', field) == 1 then found[i] = '\\0joined' break end
    end
  end
end
local pending = 0
for _, bucket in ipairs(live) do pending = pending + redis.call('HLEN', bucket) end
found[#ARGV + 1] = pending
return found
"""

#: KEYS[1]: the model's index; ARGV[1]: how long a joined set lives; then the fields whose labels joined. Each
#: prediction (in the newest bucket holding it) moves into its bucket's joined set: 1 if this call took it, 0 if
#: another took it first (a label sent twice at once).
_CLAIM = """
local buckets = redis.call('ZREVRANGE', KEYS[1], 0, -1)
local taken = {}
for i = 2, #ARGV do
  taken[i - 1] = 0
  for _, bucket in ipairs(buckets) do
    if redis.call('HDEL', bucket, ARGV[i]) == 1 then
      redis.call('SADD', bucket .. ':joined', ARGV[i])
      redis.call('EXPIRE', bucket .. ':joined', ARGV[1])
      taken[i - 1] = 1
      break
    end
  end
end
return taken
"""

#: KEYS[1]: the model's index, KEYS[2]: its clock; ARGV[1]: a bucket just written, ARGV[2]: how many buckets the
#: index keeps, ARGV[3]: how long they live. The bucket is listed at the model's clock (Redis's count of writes, the
#: same for every host: no host's clock orders it), newest last written last; the oldest past ARGV[2] (dead
#: processes' first: they write no more) are deleted: how many predictions they held.
_LIST = """
local now = redis.call('INCR', KEYS[2])
redis.call('EXPIRE', KEYS[2], ARGV[3])
redis.call('ZADD', KEYS[1], now, ARGV[1])
redis.call('EXPIRE', KEYS[1], ARGV[3])
local old = redis.call('ZREVRANGE', KEYS[1], tonumber(ARGV[2]), -1)
local dropped = 0
for _, bucket in ipairs(old) do
  dropped = dropped + redis.call('HLEN', bucket)
  redis.call('DEL', bucket, bucket .. ':joined')
  redis.call('ZREM', KEYS[1], bucket)
end
return dropped
"""


def field_of(tenant: str, request_id: str) -> bytes:
    return f"{tenant}\x00{request_id}".encode()


class _Buckets:
    """One model's buckets of this process: the one written now, how many it holds, the older ones kept."""

    __slots__ = ("current", "held", "kept")

    def __init__(self, current: str = "", held: int = 0, kept: tuple[str, ...] = ()) -> None:
        self.current = current
        self.held = held
        self.kept = kept


class _Pipe:
    """A pipeline that tells each command's place in its answers, and the ``HSET``s it holds: (its place, the
    model, the fields it writes)."""

    def __init__(self, pipe: Any) -> None:
        self.pipe = pipe
        self.size = 0
        self.fields = 0
        self.added: list[tuple[int, str, int]] = []
        self.listed: list[int] = []  # (the places of ``_LIST``'s answers: what their trims deleted)
        self.deleted: list[tuple[int, str]] = []  # (the places of the HLENs of this process's buckets deleted)
        self.counted = False  # (its predictions counted: written or failed, once whichever path ends it)

    def add(self, command: str, *args: Any, **kwargs: Any) -> int:
        getattr(self.pipe, command)(*args, **kwargs)
        self.size += 1
        return self.size - 1


class SharedPredictions:
    """This process's side of the shared predictions: what it kept and has not written yet, its buckets, and the
    look-ups of the labels it receives."""

    def __init__(self, url: str, registry: CollectorRegistry | None = None, *, owner: str = "") -> None:
        #: where the store is, for messages (never its password)
        self.where = redis_address(url)
        self._client: Redis = Redis.from_url(url, socket_timeout=_TIMEOUT_S, socket_connect_timeout=_TIMEOUT_S)
        #: what names this process's buckets (several processes, on several hosts, write at once)
        self.owner = owner or f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(3)}"
        self._outgoing: list[tuple[str, int, bytes, str, np.ndarray]] = []
        self._buckets: dict[str, _Buckets] = {}
        #: buckets of this process's past its ``BUCKETS``, to delete (again, if the write that would have failed)
        self._doomed: dict[str, str] = {}
        self._serial = 0
        #: one flush at a time: a label's look-up waits for the watch's flush in flight, then writes what is left
        self._flushing = asyncio.Lock()
        #: the steps sent and not ended (a flush cancelled twice leaves its own running): ``close`` waits for them
        self._in_flight: dict[asyncio.Task[bool], _Pipe] = {}
        self._find = self._client.register_script(_FIND)
        self._claim = self._client.register_script(_CLAIM)
        self.counted = Counter(
            "dhow_feedback_shared",
            "Predictions written to the shared store (--redis) for feedback: written, dropped (the list waiting "
            "for Redis was full, or more than the model's pending in one write), failed (Redis refused or was "
            "unreachable, or the prediction could not be encoded)",
            ["outcome"],
            registry=registry,
        )
        #: this process's predictions dropped as the oldest (its buckets past ``BUCKETS``) and replaced
        self.dropped = 0
        self.replaced = 0
        #: the predictions awaiting a label in the store (every process's), as the last ``find`` counted them
        self.pending = 0
        self._last_failure = 0.0

    # -- the request's path --

    def add(self, model: str, pending: int, field: bytes, version: str, prediction: np.ndarray) -> None:
        """Keep a prediction for the next ``flush`` (an append; past ``MAX_OUTGOING`` it is dropped, counted)."""
        if len(self._outgoing) >= MAX_OUTGOING:
            self.counted.labels("dropped").inc()
            return
        self._outgoing.append((model, pending, field, version, prediction))

    # -- the watch's task --

    async def flush(self) -> None:
        """Write what was kept since the last flush, a round trip per ``STEP`` predictions: per model, into this
        process's current bucket (a new one when it is full, its oldest deleted past ``BUCKETS``). Every write sets the
        bucket's life and lists it in the model's index, so a write that failed leaves nothing unlisted or undying
        behind. A failure counts the predictions failed: the labels of those requests will be unmatched."""
        async with self._flushing:
            if not self._outgoing and not self._doomed:
                return
            outgoing, self._outgoing = self._outgoing, []
            try:
                # (encoded in a thread: thousands a tick would hold the event loop)
                by_model, skipped, unfit = await asyncio.to_thread(encoded_by_model, outgoing)
            except asyncio.CancelledError:  # (the watch stopped: ``close`` writes them)
                self._outgoing[:0] = outgoing
                raise
            # (an older answer of the same key, replaced within this flush: so counted whatever the write does)
            self.replaced += sum(repeated for _, _, repeated in by_model.values())
            if skipped:
                self.counted.labels("dropped").inc(skipped)
                self.dropped += skipped
            if unfit:
                self._failed(unfit, TypeError("a prediction that could not be encoded"))
            done: dict[str, int] = {}  # (per model: how many of its items the steps that ended took)
            try:
                await self._write(by_model, done)
            except asyncio.CancelledError:  # (the steps not made: ``close`` writes them)
                left = {
                    (model, field)
                    for model, (_, items, _) in by_model.items()
                    for field, _ in items[done.get(model, 0) :]
                }
                self._outgoing[:0] = newest_of(outgoing, left)
                raise

    async def _write(
        self, by_model: dict[str, tuple[int, list[tuple[bytes, bytes]], int]], done: dict[str, int]
    ) -> None:
        """Each step's pipeline sent and its answers judged before the next is packed (the event loop serves the
        requests in between); ``done`` counts, per model, the predictions of the steps made (answered or failed).
        A step unanswered ends the write: each next step would wait the client's timeout again (Redis hung or
        away: 100k predictions, 50 steps, minutes) while every label's look-up waits on this flush; what no step
        took is counted failed, and no bucket is named for it (``_steps`` goes no further)."""
        for pipe in self._steps(by_model):
            for old, model in self._doomed.items():  # (every step deletes what is doomed, until a DEL goes through)
                pipe.deleted.append((pipe.add("hlen", old), old))
                pipe.add("delete", old, old + ":joined")
                pipe.add("zrem", f"{_PREFIX}{model}:index", old)
            answered = await self._step(pipe, done) if pipe.size else True
            if not answered:
                rest = sum(len(items) for _, items, _ in by_model.values()) - sum(done.values())
                if rest:  # (the step's own failure said why, in the log)
                    self.counted.labels("failed").inc(rest)
                return

    def _steps(self, by_model: dict[str, tuple[int, list[tuple[bytes, bytes]], int]]) -> Iterator[_Pipe]:
        """Pipelines of ``STEP`` predictions at most: each model's into this process's buckets (each written bucket
        given its life and listed again). The buckets' names move as the steps are made, whatever Redis answers (a
        write that failed halfway never reuses a name it may have used)."""
        pipe = _Pipe(self._client.pipeline(transaction=False))
        for model, (pending, items, _) in by_model.items():
            state = self._buckets.get(model) or _Buckets()
            current, held, kept = state.current, state.held, list(state.kept)
            size = -(-pending // BUCKETS)
            buckets = -(-pending // size)  # (``buckets`` of ``size`` hold ``pending``, the least over it)
            start = 0
            while start < len(items):
                if not current or held >= size:
                    self._serial += 1
                    current, held = f"{_PREFIX}{model}:{self.owner}:{self._serial}", 0
                    kept.append(current)
                    while len(kept) > buckets:
                        self._doomed[kept.pop(0)] = model
                room = min(len(items) - start, size - held, STEP - pipe.fields)
                chunk = dict(items[start : start + room])
                pipe.added.append((pipe.add("hset", current, mapping=chunk), model, len(chunk)))
                pipe.fields += len(chunk)
                pipe.add("expire", current, BUCKET_TTL_S)
                index, clock = f"{_PREFIX}{model}:index", f"{_PREFIX}{model}:clock"
                pipe.listed.append(pipe.add("eval", _LIST, 2, index, clock, current, MAX_INDEXED, BUCKET_TTL_S))
                held += room
                start += room
                self._buckets[model] = _Buckets(current, held, tuple(kept))
                if pipe.fields >= STEP:
                    yield pipe
                    pipe = _Pipe(self._client.pipeline(transaction=False))
        yield pipe

    async def _step(self, pipe: _Pipe, done: dict[str, int]) -> bool:
        """``_send``, run to its end even when the flush is cancelled meanwhile, then counted in ``done``: a step
        Redis ran whose answer the cancel cut off, handed back, was written again by ``close`` into the next
        bucket (a label could join twice). A cancelled flush waits twice the client's timeouts for it at most (a
        slow Redis can exceed that: the step is then counted failed); a second cancel leaves it to ``close``."""
        task = asyncio.create_task(self._guarded(pipe))
        self._in_flight[task] = pipe
        task.add_done_callback(self._in_flight.pop)
        try:
            return await asyncio.shield(task)
        except asyncio.CancelledError:
            await self._settle({task})
            raise
        finally:
            for _, model, count in pipe.added:
                done[model] = done.get(model, 0) + count

    async def _guarded(self, pipe: _Pipe) -> bool:
        """``_send``; an error of its own (not Redis's: a bug) is logged, traced, its step counted failed (unless its
        answers were counted), and ends the flush as no answer does: never lost in the task a cancel shields."""
        try:
            return await self._send(pipe)
        except Exception as exc:
            self._failed(0 if pipe.counted else pipe.fields, exc, bug=True)
            pipe.counted = True
            return False

    async def _settle(self, tasks: set[asyncio.Task[bool]]) -> None:
        """Wait for steps in flight, twice the client's timeouts at most; one still running then (a slow Redis) is
        cancelled, its step counted failed: what it wrote is not known, so it is never written again."""
        if tasks:
            _, late = await asyncio.wait(tasks, timeout=2 * _TIMEOUT_S)
            for task in late:
                self._lost(self._in_flight[task], TimeoutError("the step in flight did not end"))
                task.cancel()
            if late:  # (its connection closed before the pool is)
                await asyncio.wait(late, timeout=_TIMEOUT_S)

    async def _send(self, pipe: _Pipe) -> bool:
        """One step's round trip, each command's answer judged on its own: False when it got no answer."""
        try:
            answers = await pipe.pipe.execute(raise_on_error=False)
        except (RedisError, OSError) as exc:  # (not sent, or no answer: what was written is not known)
            self._lost(pipe, exc)
            return False
        if pipe.counted:  # (given up on meanwhile: counted failed)
            return True
        written = failed = 0
        error: BaseException | None = None
        for place, _, count in pipe.added:
            answer = answers[place]
            if isinstance(answer, BaseException):
                failed, error = failed + count, answer
                continue
            written += count
            # (``HSET`` answers how many fields it added: the others replaced a prediction kept under the same key)
            self.replaced += count - int(answer)
        pipe.counted = True
        if written:
            self.counted.labels("written").inc(written)
        if error is not None:
            self._failed(failed, error)
        self.dropped += sum(int(answers[p]) for p in pipe.listed if not isinstance(answers[p], BaseException))
        for place, old in pipe.deleted:
            if not isinstance(answers[place + 1], BaseException):  # (its DEL went through)
                self.dropped += int(answers[place]) if not isinstance(answers[place], BaseException) else 0
                self._doomed.pop(old, None)
        return True

    def _lost(self, pipe: _Pipe, exc: BaseException) -> None:
        """A step's predictions counted failed, unless they were counted already (each step counted once)."""
        if not pipe.counted:
            pipe.counted = True
            self._failed(pipe.fields, exc)

    def _failed(self, count: int, exc: BaseException, *, bug: bool = False) -> None:
        """Counted failed; logged once in 10 s (Redis down fails every tick), an error of our own always, traced."""
        self.counted.labels("failed").inc(count)
        now = time.monotonic()
        if bug or now - self._last_failure > 10:
            self._last_failure = now
            log.warning(
                "feedback: %d prediction(s) could not be written to the shared store (Redis at %s): %s",
                count, self.where, exc, exc_info=exc if bug else None,
            )  # fmt: skip

    # -- the labels --

    async def find(self, model: str, fields: list[bytes]) -> list[bytes | None]:
        """Each field's prediction (``encode_prediction``), ``JOINED`` when it was labelled, or None (unknown, or
        gone with its bucket), ``CHUNK`` fields a script (each a bounded stop of Redis). What was kept here and
        not written yet is written first. Redis unreachable: ``Unavailable`` (the labels are to be sent again)."""
        await self.flush()
        found: list[bytes | None] = []
        try:
            for start in range(0, len(fields), CHUNK):
                answer = await self._find(keys=[f"{_PREFIX}{model}:index"], args=fields[start : start + CHUNK])
                found += [value if value else None for value in answer[:-1]]
                self.pending = int(answer[-1])
        except (RedisError, OSError) as exc:
            raise self._unreachable(exc) from None
        return found

    async def claim(self, model: str, fields: list[bytes]) -> list[bool]:
        """Take the predictions of labels that joined: True for each this call took (False: another took it first,
        the label was sent twice at once)."""
        if not fields:
            return []
        try:  # (one script, not chunks: a claim that failed halfway would leave labels neither joined nor joinable)
            taken = [bool(t) for t in await self._claim(keys=[f"{_PREFIX}{model}:index"], args=[BUCKET_TTL_S, *fields])]
        except (RedisError, OSError) as exc:
            raise self._unreachable(exc) from None
        self.pending = max(0, self.pending - sum(taken))
        return taken

    def _unreachable(self, exc: BaseException) -> Unavailable:
        return Unavailable(
            f"the shared store of predictions (Redis at {self.where}) cannot be reached "
            f"({type(exc).__name__}); send the labels again",
            retry_after=1.0,
        )

    async def close(self) -> None:
        """Write what is left, then wait for the steps in flight (a flush cancelled twice left its own running)
        before the pool closes: closed under a step, it counted it failed though written, or the loop ended
        with the step never counted, and a step sent after reopened a connection nobody closed."""
        await self.flush()
        await self._settle(set(self._in_flight))
        await self._client.aclose()
