"""Quotas per API key and per tenant: requests per second (a token bucket) and requests in flight.

``LocalRateLimiter`` keeps the counts in this process; ``RedisRateLimiter`` keeps them in Redis, so that every
server sharing it enforces one quota. Both refuse with ``Overloaded`` (429 with Retry-After), and neither costs
anything for a subject without limits.
"""

from __future__ import annotations

import asyncio
import logging
import math
import secrets
import time
from dataclasses import dataclass
from typing import Protocol

from redis.asyncio import Redis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import RedisError

from dhow.core.addresses import redis_address
from dhow.core.errors import InvalidInput, Overloaded, Unavailable

__all__ = ["Limits", "LocalRateLimiter", "Permit", "RateLimiter", "RedisRateLimiter"]

log = logging.getLogger("dhow.access")

#: a permit of a server that died is reclaimed after this long, rather than holding a slot forever
PERMIT_TTL_S = 300.0


@dataclass(frozen=True, slots=True)
class Limits:
    """Quotas: requests per second with a burst, and requests in flight; 0 = unlimited."""

    rate: float = 0.0
    #: the bucket's size; 0 means max(1, ceil(rate))
    burst: int = 0
    concurrency: int = 0

    @property
    def unlimited(self) -> bool:
        return _unlimited(self)


class Permit(Protocol):
    def release(self) -> None:
        """Give the request's slot back when it ends (also on error); idempotent and cheap."""


class RateLimiter(Protocol):
    async def acquire(self, subject: str, limits: Limits, what: str) -> Permit:
        """Count a request of ``subject`` (``key:ab12``, ``tenant:acme``); ``what`` names it in a refusal."""
        ...

    async def close(self) -> None: ...


# the limits are read field by field, so that any object with rate, burst and concurrency works
def _unlimited(limits: Limits) -> bool:
    return limits.rate <= 0 and limits.concurrency <= 0


def _bucket_size(limits: Limits) -> int:
    return limits.burst if limits.burst > 0 else max(1, math.ceil(limits.rate))


def _rate_exceeded(limits: Limits, what: str, wait_s: float) -> Overloaded:
    shown = str(math.ceil(wait_s)) if wait_s >= 10 else f"{max(wait_s, 0.001):.2g}"
    return Overloaded(
        f"rate limit of {limits.rate:g} requests/s (burst {_bucket_size(limits)}) for {what} exceeded; "
        f"retry after {shown} s",
        retry_after=wait_s,
    )


def _too_many(limits: Limits, what: str) -> Overloaded:
    return Overloaded(
        f"{what} already has {limits.concurrency} requests in flight (its limit); retry when one finishes",
        retry_after=1.0,
    )


class _FreePermit:
    """What a request without a concurrency limit holds: nothing to give back."""

    __slots__ = ()

    def release(self) -> None:
        pass


_FREE = _FreePermit()


@dataclass(slots=True)
class _Bucket:
    tokens: float
    stamp: float


class _LocalPermit:
    __slots__ = ("_counts", "_subject")

    def __init__(self, counts: dict[str, int], subject: str) -> None:
        self._counts: dict[str, int] | None = counts
        self._subject = subject

    def release(self) -> None:
        counts, self._counts = self._counts, None
        if counts is None:
            return
        left = counts.get(self._subject, 1) - 1
        if left > 0:
            counts[self._subject] = left
        else:
            counts.pop(self._subject, None)


class LocalRateLimiter:
    """Token buckets on ``time.monotonic()`` and in-flight counters, for one process (one event loop)."""

    def __init__(self) -> None:
        self._buckets: dict[str, _Bucket] = {}
        self._in_flight: dict[str, int] = {}

    async def acquire(self, subject: str, limits: Limits, what: str) -> Permit:
        return self.take(subject, limits, what) or _FREE

    def take(self, subject: str, limits: Limits, what: str) -> Permit | None:
        """Check and count in one step of the event loop (no await: atomic), in one function: the guard calls it
        for every request of a key with a quota (each Python call on that path costs ~1k instructions). None: the
        request holds nothing to give back (no concurrency limit)."""
        rate = limits.rate
        bucket = None
        if rate > 0:  # the bucket, refilled
            now = time.monotonic()
            size = limits.burst if limits.burst > 0 else max(1, math.ceil(rate))
            bucket = self._buckets.get(subject)
            if bucket is None:
                bucket = self._buckets[subject] = _Bucket(size, now)
            else:
                tokens = bucket.tokens + (now - bucket.stamp) * rate
                bucket.tokens, bucket.stamp = (size if tokens > size else tokens), now
            if bucket.tokens < 1:
                raise _rate_exceeded(limits, what, (1 - bucket.tokens) / rate)
        permit: Permit | None = None
        if limits.concurrency > 0:
            count = self._in_flight.get(subject, 0)
            if count >= limits.concurrency:
                raise _too_many(limits, what)  # before the token is taken: a refused request costs none
            self._in_flight[subject] = count + 1
            permit = _LocalPermit(self._in_flight, subject)
        if bucket is not None:
            bucket.tokens -= 1
        return permit

    async def close(self) -> None:
        pass


# One round trip, atomic. Redis's clock, not ours: the servers sharing a bucket may disagree on the time.
# Returns {0, ""} (admitted), {1, seconds until a token} (rate) or {2, ""} (concurrency).
_ACQUIRE = """
if redis.replicate_commands then redis.replicate_commands() end
local clock = redis.call('TIME')
local now = tonumber(clock[1]) + tonumber(clock[2]) / 1000000
local rate, burst, limit = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
local tokens = burst
if rate > 0 then
  local state = redis.call('HMGET', KEYS[1], 'tokens', 'ts')
  if state[1] then
    tokens = math.min(burst, tonumber(state[1]) + math.max(0, now - tonumber(state[2])) * rate)
  end
  if tokens < 1 then
    return {1, string.format('%.6f', (1 - tokens) / rate)}
  end
end
if limit > 0 then
  redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', string.format('%.6f', now))
  if redis.call('ZCARD', KEYS[2]) >= limit then
    return {2, ''}
  end
  local ttl = tonumber(ARGV[5])
  redis.call('ZADD', KEYS[2], string.format('%.6f', now + ttl), ARGV[4])
  redis.call('EXPIRE', KEYS[2], math.ceil(ttl) + 1)
end
if rate > 0 then
  redis.call('HSET', KEYS[1], 'tokens', string.format('%.6f', tokens - 1), 'ts', string.format('%.6f', now))
  -- a bucket left alone refills to full; at that point it may as well not exist
  redis.call('EXPIRE', KEYS[1], math.ceil(burst / rate) + 1)
end
return {0, ''}
"""


class _RedisPermit:
    __slots__ = ("_key", "_limiter", "_permit_id")

    def __init__(self, limiter: RedisRateLimiter, key: str, permit_id: str) -> None:
        self._limiter: RedisRateLimiter | None = limiter
        self._key = key
        self._permit_id = permit_id

    def release(self) -> None:
        limiter, self._limiter = self._limiter, None
        if limiter is not None:
            limiter._release(self._key, self._permit_id)


class RedisRateLimiter:
    """Quotas shared by every server using the same Redis: a token bucket (hash) and permits (sorted set)."""

    def __init__(self, url: str, *, prefix: str = "dhow:quota:", permit_ttl_s: float = PERMIT_TTL_S) -> None:
        self.prefix = prefix
        self.permit_ttl_s = permit_ttl_s
        self.where = redis_address(url)
        try:
            # short timeouts and one quick retry (a pooled connection the server closed): a request waits on
            # this, and a store that does not answer must turn into a 503, not a hang
            self._client = Redis.from_url(
                url, socket_connect_timeout=2.0, socket_timeout=2.0, retry=Retry(NoBackoff(), 1)
            )
        except ValueError:
            scheme = url.partition("://")[0][:16]
            raise InvalidInput(
                f"the rate-limit store's URL must look like redis://[:password@]host:port/db "
                f"(or rediss://, unix://), not {scheme}://..."
            ) from None
        self._script = self._client.register_script(_ACQUIRE)
        # release() schedules a ZREM; the loop keeps only weak references to tasks, so we hold them
        self._releases: set[asyncio.Task[None]] = set()

    @classmethod
    async def connect(
        cls, url: str, *, prefix: str = "dhow:quota:", permit_ttl_s: float = PERMIT_TTL_S
    ) -> RedisRateLimiter:
        """A limiter whose Redis answered (``Unavailable`` if not), with the script loaded for EVALSHA."""
        limiter = cls(url, prefix=prefix, permit_ttl_s=permit_ttl_s)
        try:
            await limiter._client.ping()
            await limiter._client.script_load(_ACQUIRE)
        except (RedisError, OSError) as exc:
            await limiter._client.aclose()
            raise limiter._unreachable(exc) from None
        return limiter

    async def acquire(self, subject: str, limits: Limits, what: str) -> Permit:
        if _unlimited(limits):
            return _FREE
        permit_id = secrets.token_hex(8) if limits.concurrency > 0 else ""
        # the hash tag puts both keys in one Redis Cluster slot, as a script touching both needs
        bucket, in_flight = f"{self.prefix}{{{subject}}}:tokens", f"{self.prefix}{{{subject}}}:inflight"
        args = (limits.rate, _bucket_size(limits), limits.concurrency, permit_id, self.permit_ttl_s)
        try:
            verdict, wait = await self._script(keys=[bucket, in_flight], args=args)
        except (RedisError, OSError) as exc:
            raise self._unreachable(exc) from None
        if int(verdict) == 1:
            raise _rate_exceeded(limits, what, float(wait))
        if int(verdict) == 2:
            raise _too_many(limits, what)
        return _RedisPermit(self, in_flight, permit_id) if permit_id else _FREE

    async def close(self) -> None:
        if self._releases:
            await asyncio.gather(*self._releases, return_exceptions=True)
        await self._client.aclose()

    def _release(self, key: str, permit_id: str) -> None:
        try:
            task = asyncio.get_running_loop().create_task(self._remove(key, permit_id))
        except RuntimeError:  # no loop any more (shutdown): the permit expires by itself
            return
        self._releases.add(task)
        task.add_done_callback(self._releases.discard)

    async def _remove(self, key: str, permit_id: str) -> None:
        try:
            await self._client.zrem(key, permit_id)
        except (RedisError, OSError) as exc:
            log.warning(
                "could not give back a rate-limit permit to Redis at %s (it expires within %g s): %s",
                self.where,
                self.permit_ttl_s,
                exc,
            )

    def _unreachable(self, exc: BaseException) -> Unavailable:
        return Unavailable(
            f"the shared rate-limit store (Redis at {self.where}) is unreachable: {type(exc).__name__}: {exc}",
            retry_after=1.0,
        )
