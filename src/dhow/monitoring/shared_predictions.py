"""Predictions awaiting their label, shared through Redis (``--redis``): a label sent to any worker or pod joins.

Without it a prediction lives in the memory of the process that answered (``quality.PredictionLog``), so with
``--workers N`` or several replicas behind one Service a label reaches the process that made its prediction only
by chance. With ``--redis`` (the store the rate limits already share), each process writes the predictions it
kept into Redis, and a label is looked up there by whichever process receives it.

The request's path only appends to a list (``add``); the watch's task writes what was kept every tick
(``flush``: one round trip, one ``HSET`` per model). Each process writes into buckets of its own (Redis hashes,
``tenant NUL id`` -> the prediction), ``pending / BUCKETS`` predictions each; past ``BUCKETS`` buckets its oldest is
deleted, so each process keeps about ``pending`` predictions there, as it would in memory (its drops counted as
there). A bucket also expires ``BUCKET_TTL_S`` after it was started, so that those of a process that died go too.
Every bucket of a model is listed in a sorted set (its index), newest first, which the look-ups walk in Redis
(two Lua scripts: ``find``, then ``claim`` the predictions whose labels fit, moving each into its bucket's
joined set, so that a label sent again, to any process, is told ``already_joined``).

Nothing is dropped unseen: a full list (Redis slower than the requests) drops the newest and counts it, a write
that fails counts its predictions failed (``dhow_feedback_shared_total{outcome}``), and a label that cannot be
looked up (Redis down) is answered 503, to be sent again.
"""

from __future__ import annotations

import logging
import os
import secrets
import socket
import time
from collections import deque
from typing import Any

import numpy as np
import orjson
from prometheus_client import CollectorRegistry, Counter
from redis.asyncio import Redis
from redis.exceptions import RedisError

from dhow.core.errors import Unavailable

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
_PREFIX = "dhow:feedback:"

log = logging.getLogger("dhow.monitoring")

#: KEYS[1]: the model's index (bucket -> start time); ARGV: the fields. For each field, in the newest bucket that
#: knows it: its prediction, or ``JOINED`` if it was labelled there; then how many predictions await a label (every
#: process's). Buckets gone (expired) leave the index.
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
local pending = 0
for _, bucket in ipairs(live) do pending = pending + redis.call('HLEN', bucket) end
for i, field in ipairs(ARGV) do
  found[i] = false
  for _, bucket in ipairs(live) do
    local value = redis.call('HGET', bucket, field)
    if value then found[i] = value break end
    if redis.call('SISMEMBER', bucket .. ':joined', field) == 1 then found[i] = '\\0joined' break end
  end
end
found[#ARGV + 1] = pending
return found
"""

#: KEYS[1]: the model's index; ARGV: the fields whose labels joined. Each prediction is moved into its bucket's
#: joined set: 1 if this call took it, 0 if another took it first (a label sent twice at once).
_CLAIM = """
local buckets = redis.call('ZREVRANGE', KEYS[1], 0, -1)
local taken = {}
for i, field in ipairs(ARGV) do
  taken[i] = 0
  for _, bucket in ipairs(buckets) do
    if redis.call('HDEL', bucket, field) == 1 then
      redis.call('SADD', bucket .. ':joined', field)
      redis.call('EXPIRE', bucket .. ':joined', redis.call('TTL', bucket) > 0 and redis.call('TTL', bucket) or 60)
      taken[i] = 1
      break
    end
  end
end
return taken
"""


def encode_prediction(version: str, array: np.ndarray) -> bytes:
    """A kept prediction as its bucket holds it: the version, then the array (numbers as their bytes, dtype and
    shape in front; any other array as JSON)."""
    array = np.asarray(array)
    if array.dtype.kind in "biuf":
        shape = ",".join(map(str, array.shape))
        return b"\x00".join([version.encode(), array.dtype.str.encode(), shape.encode(), array.tobytes()])
    items = [v.decode("utf-8", "replace") if isinstance(v, bytes) else v for v in array.reshape(-1).tolist()]
    shape = ",".join(map(str, array.shape))
    return b"\x00".join([version.encode(), b"json", shape.encode(), orjson.dumps(items)])


def decode_prediction(value: bytes) -> tuple[str, np.ndarray]:
    """``encode_prediction``'s version and array."""
    version, dtype, shape, data = value.split(b"\x00", 3)
    dims = tuple(int(n) for n in shape.split(b",")) if shape else ()
    if dtype == b"json":
        array = np.asarray(orjson.loads(data), dtype=object).reshape(dims)
    else:
        array = np.frombuffer(data, dtype=np.dtype(dtype.decode())).reshape(dims)
    return version.decode(), array


def field_of(tenant: str, request_id: str) -> bytes:
    return f"{tenant}\x00{request_id}".encode()


class _Buckets:
    """One model's buckets of this process: the one written now, how many it holds, the older ones kept."""

    def __init__(self) -> None:
        self.current = ""
        self.held = 0
        self.kept: deque[str] = deque()


class _Pipe:
    """A pipeline that tells each command's place in its answers."""

    def __init__(self, pipe: Any) -> None:
        self.pipe = pipe
        self.size = 0

    def add(self, command: str, *args: Any, **kwargs: Any) -> int:
        getattr(self.pipe, command)(*args, **kwargs)
        self.size += 1
        return self.size - 1


class SharedPredictions:
    """This process's side of the shared predictions: what it kept and has not written yet, its buckets, and the
    look-ups of the labels it receives."""

    def __init__(self, url: str, registry: CollectorRegistry | None = None, *, owner: str = "") -> None:
        self.url = url
        self._client: Redis = Redis.from_url(url, socket_timeout=5, socket_connect_timeout=5)
        #: what names this process's buckets (several processes, on several hosts, write at once)
        self.owner = owner or f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(3)}"
        self._outgoing: list[tuple[str, int, bytes, str, np.ndarray]] = []
        self._buckets: dict[str, _Buckets] = {}
        self._serial = 0
        self._find = self._client.register_script(_FIND)
        self._claim = self._client.register_script(_CLAIM)
        self.counted = Counter(
            "dhow_feedback_shared",
            "Predictions written to the shared store (--redis) for feedback: written, dropped (the list waiting "
            "for Redis was full), failed (Redis refused or was unreachable)",
            ["outcome"],
            registry=registry,
        )
        #: this process's predictions dropped as the oldest (its buckets past ``BUCKETS``) and replaced
        self.dropped = 0
        #: the predictions awaiting a label in the store (every process's), as the last ``find`` counted them
        self.pending = 0
        self.replaced = 0
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
        """Write what was kept since the last flush: per model, into this process's current bucket (a new one
        when it is full, the oldest deleted past ``BUCKETS``), in one round trip. A failure counts them failed:
        the labels of those requests will be unmatched."""
        if not self._outgoing:
            return
        outgoing, self._outgoing = self._outgoing, []
        by_model: dict[str, list[tuple[int, bytes, str, np.ndarray]]] = {}
        for model, pending, field, version, prediction in outgoing:
            by_model.setdefault(model, []).append((pending, field, version, prediction))
        pipe = _Pipe(self._client.pipeline(transaction=False))
        added: list[tuple[int, int]] = []  # (the HSET's place in the pipe, how many fields it wrote)
        dropped: list[int] = []  # (the places of the HLENs of buckets deleted)
        for model, kept in by_model.items():
            buckets = self._buckets.setdefault(model, _Buckets())
            size = max(1, kept[-1][0] // BUCKETS)  # (the model's ``pending`` as its newest prediction had it)
            start = 0
            while start < len(kept):
                fresh = not buckets.current or buckets.held >= size
                if fresh:
                    dropped += self._rotate(pipe, model, buckets)
                room = min(len(kept) - start, size - buckets.held)
                mapping = {field: encode_prediction(version, prediction)
                           for _, field, version, prediction in kept[start : start + room]}  # fmt: skip
                added.append((pipe.add("hset", buckets.current, mapping=mapping), len(mapping)))
                if fresh:  # (a key's life is set once it exists: after its first fields)
                    pipe.add("expire", buckets.current, BUCKET_TTL_S)
                buckets.held += len(mapping)
                start += room
        try:
            results = await pipe.pipe.execute()
        except (RedisError, OSError) as exc:
            self._failed(len(outgoing), exc)
            return
        self.counted.labels("written").inc(len(outgoing))
        # (``HSET`` answers how many fields it added: the others replaced a prediction kept under the same key)
        self.replaced += sum(count - int(results[place]) for place, count in added)
        self.dropped += sum(int(results[place]) for place in dropped)

    def _rotate(self, pipe: _Pipe, model: str, buckets: _Buckets) -> list[int]:
        """Start a new bucket; the oldest past ``BUCKETS`` goes: the places of the counts of what they held."""
        self._serial += 1
        bucket = f"{_PREFIX}{model}:{self.owner}:{self._serial}"
        index = f"{_PREFIX}{model}:index"
        buckets.current, buckets.held = bucket, 0
        buckets.kept.append(bucket)
        pipe.add("zadd", index, {bucket: time.time()})
        pipe.add("expire", index, BUCKET_TTL_S)
        counts: list[int] = []
        while len(buckets.kept) > BUCKETS:
            old = buckets.kept.popleft()
            counts.append(pipe.add("hlen", old))
            pipe.add("delete", old, old + ":joined")
            pipe.add("zrem", index, old)
        return counts

    def _failed(self, count: int, exc: BaseException) -> None:
        self.counted.labels("failed").inc(count)
        now = time.monotonic()
        if now - self._last_failure > 10:
            self._last_failure = now
            log.warning(
                "feedback: %d prediction(s) could not be written to the shared store at %s: %s", count, self.url, exc
            )

    # -- the labels --

    async def find(self, model: str, fields: list[bytes]) -> list[bytes | None]:
        """Each field's prediction (``encode_prediction``), ``JOINED`` when it was labelled, or None (unknown, or
        gone with its bucket). What was kept here and not written yet is written first. Redis unreachable:
        ``Unavailable`` (the labels are to be sent again)."""
        await self.flush()
        try:
            found = await self._find(keys=[f"{_PREFIX}{model}:index"], args=fields)
        except (RedisError, OSError) as exc:
            raise self._unreachable(exc) from None
        self.pending = int(found[-1])
        return [value if value else None for value in found[:-1]]

    async def claim(self, model: str, fields: list[bytes]) -> list[bool]:
        """Take the predictions of labels that joined: True for each this call took (False: another took it first,
        the label was sent twice at once)."""
        if not fields:
            return []
        try:
            taken = await self._claim(keys=[f"{_PREFIX}{model}:index"], args=fields)
        except (RedisError, OSError) as exc:
            raise self._unreachable(exc) from None
        self.pending = max(0, self.pending - sum(map(int, taken)))
        return [bool(t) for t in taken]

    def _unreachable(self, exc: BaseException) -> Unavailable:
        return Unavailable(
            f"the shared store of predictions (--redis {self.url}) cannot be reached ({exc}); send the labels again",
            retry_after=1.0,
        )

    async def close(self) -> None:
        await self.flush()
        await self._client.aclose()
