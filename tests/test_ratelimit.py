"""Quotas: the in-process limiter, and the shared one on the real Redis at 127.0.0.1:6379."""

from __future__ import annotations

import asyncio
import os
import secrets
import time
from collections.abc import Awaitable, Callable, Coroutine, Iterator
from typing import Any, TypeVar

import pytest
from redis import Redis

from dhow.access.ratelimit import Limits, LocalRateLimiter, Permit, RateLimiter, RedisRateLimiter
from dhow.core.errors import Overloaded, Unavailable

REDIS_URL = os.environ.get("DHOW_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")
IN_CI = os.environ.get("CI") == "true"
T = TypeVar("T")


def run(coro: Coroutine[Any, Any, T]) -> T:
    return asyncio.run(coro)


async def refusal(
    limiter: RateLimiter, limits: Limits, subject: str = "key:k1", what: str = "key 'ci-bot'"
) -> Overloaded:
    with pytest.raises(Overloaded) as caught:
        await limiter.acquire(subject, limits, what)
    return caught.value


def test_limits_unlimited() -> None:
    assert Limits().unlimited
    assert Limits(burst=5).unlimited
    assert not Limits(rate=1).unlimited
    assert not Limits(concurrency=1).unlimited


# -- in-process --------------------------------------------------------------------------------------------------


def test_local_burst_then_refusal_with_retry_after() -> None:
    async def scenario() -> None:
        limiter, limits = LocalRateLimiter(), Limits(rate=2, burst=3)
        for _ in range(3):
            await limiter.acquire("key:k1", limits, "key 'ci-bot'")
        refused = await refusal(limiter, limits)
        assert refused.message.startswith("rate limit of 2 requests/s (burst 3) for key 'ci-bot' exceeded; retry after")
        assert refused.retry_after is not None and 0.4 < refused.retry_after <= 0.5
        # another subject has its own bucket
        await limiter.acquire("key:k2", limits, "key 'other'")

    run(scenario())


def test_local_default_burst_is_the_rate_rounded_up() -> None:
    async def scenario() -> None:
        limiter, limits = LocalRateLimiter(), Limits(rate=2.5)
        for _ in range(3):
            await limiter.acquire("tenant:acme", limits, "tenant 'acme'")
        assert "(burst 3) for tenant 'acme'" in (await refusal(limiter, limits, "tenant:acme", "tenant 'acme'")).message

    run(scenario())


def test_local_bucket_refills_over_time() -> None:
    async def scenario() -> None:
        limiter, limits = LocalRateLimiter(), Limits(rate=20, burst=1)
        await limiter.acquire("key:k1", limits, "key 'ci-bot'")
        wait = (await refusal(limiter, limits)).retry_after
        assert wait is not None and 0 < wait <= 0.05
        await asyncio.sleep(wait + 0.01)
        await limiter.acquire("key:k1", limits, "key 'ci-bot'")
        await refusal(limiter, limits)  # and no more than one token came back

    run(scenario())


def test_local_concurrency_limit_and_release() -> None:
    async def scenario() -> None:
        limiter, limits = LocalRateLimiter(), Limits(concurrency=2)
        first = await limiter.acquire("key:k1", limits, "key 'ci-bot'")
        await limiter.acquire("key:k1", limits, "key 'ci-bot'")
        refused = await refusal(limiter, limits)
        assert refused.message == "key 'ci-bot' already has 2 requests in flight (its limit); retry when one finishes"
        assert refused.retry_after == 1.0
        first.release()
        await limiter.acquire("key:k1", limits, "key 'ci-bot'")
        await refusal(limiter, limits)

    run(scenario())


def test_local_release_is_idempotent() -> None:
    async def scenario() -> None:
        limiter, limits = LocalRateLimiter(), Limits(concurrency=2)
        first = await limiter.acquire("key:k1", limits, "key 'ci-bot'")
        await limiter.acquire("key:k1", limits, "key 'ci-bot'")
        first.release()
        first.release()  # must not free the second request's slot too
        await limiter.acquire("key:k1", limits, "key 'ci-bot'")
        await refusal(limiter, limits)

    run(scenario())


def test_local_token_not_consumed_on_concurrency_refusal() -> None:
    async def scenario() -> None:
        # a bucket of 2 that does not refill within the test
        limiter, limits = LocalRateLimiter(), Limits(rate=0.001, burst=2, concurrency=1)
        held = await limiter.acquire("key:k1", limits, "key 'ci-bot'")
        assert "in flight" in (await refusal(limiter, limits)).message
        held.release()
        await limiter.acquire("key:k1", limits, "key 'ci-bot'")  # the second token is still there
        assert "rate limit" in (await refusal(limiter, limits)).message

    run(scenario())


def test_local_unlimited_gives_a_permit() -> None:
    async def scenario() -> None:
        limiter = LocalRateLimiter()
        for _ in range(1000):
            (await limiter.acquire("key:k1", Limits(), "key 'ci-bot'")).release()
        await limiter.close()

    run(scenario())


# -- shared through Redis ----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def redis_available(redis_url: str) -> None:
    """(``conftest.redis_url``: skipped without Redis, failed on CI)"""


@pytest.fixture
def prefix(redis_available: None) -> Iterator[str]:
    """A key prefix of this test alone; its keys are deleted afterwards."""
    prefix = f"dhow-test:{secrets.token_hex(6)}:"
    yield prefix
    with Redis.from_url(REDIS_URL) as client:
        stale = list(client.scan_iter(match=f"{prefix}*"))
        if stale:
            client.delete(*stale)


def in_flight(prefix: str, subject: str) -> int:
    with Redis.from_url(REDIS_URL) as client:
        return int(client.zcard(f"{prefix}{{{subject}}}:inflight"))


async def eventually(check: Callable[[], bool], timeout: float = 2.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, "the condition did not come true in time"
        await asyncio.sleep(0.01)


async def two_servers(prefix: str, **options: Any) -> tuple[RedisRateLimiter, RedisRateLimiter]:
    return (
        await RedisRateLimiter.connect(REDIS_URL, prefix=prefix, **options),
        await RedisRateLimiter.connect(REDIS_URL, prefix=prefix, **options),
    )


def with_servers(
    prefix: str, body: Callable[[RedisRateLimiter, RedisRateLimiter], Awaitable[None]], **options: Any
) -> None:
    async def scenario() -> None:
        a, b = await two_servers(prefix, **options)
        try:
            await body(a, b)
        finally:
            await a.close()
            await b.close()

    run(scenario())


def test_redis_two_servers_share_one_bucket(prefix: str) -> None:
    async def body(a: RedisRateLimiter, b: RedisRateLimiter) -> None:
        limits = Limits(rate=2, burst=3)
        await a.acquire("key:k1", limits, "key 'ci-bot'")
        await b.acquire("key:k1", limits, "key 'ci-bot'")
        await a.acquire("key:k1", limits, "key 'ci-bot'")
        for server in (a, b):
            refused = await refusal(server, limits)
            assert refused.message.startswith("rate limit of 2 requests/s (burst 3) for key 'ci-bot' exceeded")
            assert refused.retry_after is not None and 0.3 < refused.retry_after <= 0.5
        await b.acquire("key:k2", limits, "key 'other'")  # another subject, another bucket
        await asyncio.sleep(0.55)
        await b.acquire("key:k1", limits, "key 'ci-bot'")  # refilled

    with_servers(prefix, body)


def test_redis_two_servers_share_one_concurrency_limit(prefix: str) -> None:
    async def body(a: RedisRateLimiter, b: RedisRateLimiter) -> None:
        limits = Limits(concurrency=2)
        first: Permit = await a.acquire("key:k1", limits, "key 'ci-bot'")
        await b.acquire("key:k1", limits, "key 'ci-bot'")
        refused = await refusal(a, limits)
        assert refused.message == "key 'ci-bot' already has 2 requests in flight (its limit); retry when one finishes"
        await refusal(b, limits)
        first.release()
        first.release()  # idempotent: frees this permit only
        await eventually(lambda: in_flight(prefix, "key:k1") == 1)
        await b.acquire("key:k1", limits, "key 'ci-bot'")
        await refusal(a, limits)

    with_servers(prefix, body)


def test_redis_token_not_consumed_on_concurrency_refusal(prefix: str) -> None:
    async def body(a: RedisRateLimiter, b: RedisRateLimiter) -> None:
        limits = Limits(rate=0.001, burst=2, concurrency=1)
        held = await a.acquire("key:k1", limits, "key 'ci-bot'")
        assert "in flight" in (await refusal(b, limits)).message
        held.release()
        await eventually(lambda: in_flight(prefix, "key:k1") == 0)
        await b.acquire("key:k1", limits, "key 'ci-bot'")
        assert "rate limit" in (await refusal(a, limits)).message

    with_servers(prefix, body)


def test_redis_permits_of_a_dead_server_expire(prefix: str) -> None:
    async def body(a: RedisRateLimiter, b: RedisRateLimiter) -> None:
        limits = Limits(concurrency=1)
        await a.acquire("key:k1", limits, "key 'ci-bot'")  # never released: its server "crashed"
        await refusal(b, limits)
        await asyncio.sleep(0.35)
        await b.acquire("key:k1", limits, "key 'ci-bot'")
        assert in_flight(prefix, "key:k1") == 1  # the dead permit was removed, not just outnumbered

    with_servers(prefix, body, permit_ttl_s=0.3)


def test_redis_keys_expire_when_idle(prefix: str) -> None:
    async def body(a: RedisRateLimiter, b: RedisRateLimiter) -> None:
        await a.acquire("key:k1", Limits(rate=10, burst=5, concurrency=3), "key 'ci-bot'")
        with Redis.from_url(REDIS_URL) as client:
            ttls = {key.decode(): client.ttl(key) for key in client.scan_iter(match=f"{prefix}*")}
        assert ttls == {f"{prefix}{{key:k1}}:tokens": 2, f"{prefix}{{key:k1}}:inflight": 301}

    with_servers(prefix, body)


def test_redis_unreachable_is_unavailable_without_the_password() -> None:
    async def scenario() -> None:
        url = "redis://:hunter2@127.0.0.1:1/0"
        with pytest.raises(Unavailable) as caught:
            await RedisRateLimiter.connect(url)
        assert "Redis at 127.0.0.1:1" in caught.value.message and "hunter2" not in caught.value.message
        limiter = RedisRateLimiter(url)
        try:
            with pytest.raises(Unavailable) as caught:
                await limiter.acquire("key:k1", Limits(rate=1), "key 'ci-bot'")
            assert caught.value.message.startswith("the shared rate-limit store (Redis at 127.0.0.1:1) is unreachable")
            assert caught.value.retry_after == 1.0 and "hunter2" not in caught.value.message
            # no limits, no round trip: this works although Redis is not there
            (await limiter.acquire("key:k1", Limits(), "key 'ci-bot'")).release()
        finally:
            await limiter.close()

    run(scenario())
