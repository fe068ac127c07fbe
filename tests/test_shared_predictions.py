"""The predictions shared through Redis for feedback (``--redis``): written by one process, found and claimed by
another, bounded per process, and a Redis that cannot be reached said, never taken for an unknown id."""

from __future__ import annotations

import asyncio
import gc
import logging
import secrets
import socket
import threading
import warnings
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest
from prometheus_client import CollectorRegistry
from redis import Redis
from redis.asyncio import Redis as AsyncRedis

from dhow.core.errors import Unavailable
from dhow.monitoring.shared_predictions import (
    BUCKETS,
    JOINED,
    STEP,
    SharedPredictions,
    decode_prediction,
    encode_prediction,
    field_of,
)
from tests.conftest import REDIS_URL


@pytest.fixture
def model(redis_url: str) -> Iterator[str]:
    """A model name of this test's own; its keys are removed afterwards."""
    name = f"test-{secrets.token_hex(4)}"
    yield name
    with Redis.from_url(REDIS_URL) as client:
        keys = list(client.scan_iter(f"dhow:feedback:{name}:*"))
        if keys:
            client.delete(*keys)


def _pair(model: str) -> tuple[SharedPredictions, SharedPredictions]:
    return (
        SharedPredictions(REDIS_URL, CollectorRegistry(), owner="worker-1"),
        SharedPredictions(REDIS_URL, CollectorRegistry(), owner="worker-2"),
    )


def test_encoding_round_trips_numbers_and_text() -> None:
    for array in (
        np.array([[0.25, 0.75]], dtype=np.float32),
        np.array([3, 1], dtype=np.int64),
        np.array([True, False]),
        np.array([b"cat", b"dog"], dtype=object),
        np.array(["a", "b"]),
    ):
        version, back = decode_prediction(encode_prediction("12", array))
        assert version == "12"
        expected = [v.decode() if isinstance(v, bytes) else v for v in array.reshape(-1).tolist()]
        assert back.shape == array.shape and back.reshape(-1).tolist() == expected


def test_a_prediction_written_by_one_process_is_found_and_claimed_once_by_another(model: str) -> None:
    async def scenario() -> None:
        one, two = _pair(model)
        try:
            for n in range(3):
                one.add(model, 1000, field_of("default", f"req-{n}"), "1", np.array([[0.1 * n, 1 - 0.1 * n]]))
            one.add(model, 1000, field_of("other", "req-0"), "2", np.array([[0.9, 0.1]]))
            await one.flush()
            found = await two.find(model, [field_of("default", "req-1"), field_of("default", "nope")])
            assert found[1] is None
            assert found[0] is not None
            version, array = decode_prediction(found[0])
            assert version == "1" and array.shape == (1, 2) and array.reshape(-1).tolist() == pytest.approx([0.1, 0.9])
            # one tenant's id never names another's request
            other = await two.find(model, [field_of("other", "req-0")])
            assert other[0] is not None and decode_prediction(other[0])[0] == "2"
            assert await two.claim(model, [field_of("default", "req-1")]) == [True]
            # taken: a label sent again, to any process, finds it labelled; a second claim takes nothing
            assert await one.find(model, [field_of("default", "req-1")]) == [JOINED]
            assert await one.claim(model, [field_of("default", "req-1")]) == [False]
            assert one.counted.labels("written")._value.get() == 4
        finally:
            await one.close()
            await two.close()

    asyncio.run(scenario())


def test_what_a_process_kept_and_did_not_write_yet_is_written_before_a_look_up(model: str) -> None:
    async def scenario() -> None:
        one = SharedPredictions(REDIS_URL, CollectorRegistry(), owner="w")
        try:
            one.add(model, 1000, field_of("default", "fresh"), "1", np.array([1]))
            assert (await one.find(model, [field_of("default", "fresh")]))[0] is not None
        finally:
            await one.close()

    asyncio.run(scenario())


def test_each_process_keeps_about_pending_predictions_the_oldest_dropped_and_counted(model: str) -> None:
    async def scenario() -> None:
        one, two = _pair(model)
        pending = 2 * BUCKETS  # buckets of 2
        try:
            for n in range(40):
                one.add(model, pending, field_of("default", f"r{n}"), "1", np.array([n]))
                if n % 3 == 2:
                    await one.flush()
            await one.flush()
            for n in range(10):  # another process's predictions are its own to drop
                two.add(model, pending, field_of("default", f"t{n}"), "1", np.array([n]))
            await two.flush()
            found = await two.find(model, [field_of("default", f"r{n}") for n in range(40)])
            kept = [n for n, value in enumerate(found) if value is not None]
            assert kept == list(range(40 - pending, 40))
            assert one.dropped == 40 - pending
            assert all(
                value is not None for value in await one.find(model, [field_of("default", f"t{n}") for n in range(10)])
            )
            with Redis.from_url(REDIS_URL) as client:
                assert client.zcard(f"dhow:feedback:{model}:index") == BUCKETS + 5
                assert all(client.ttl(key) > 0 for key in client.scan_iter(f"dhow:feedback:{model}:w*"))
        finally:
            await one.close()
            await two.close()

    asyncio.run(scenario())


def test_a_prediction_kept_again_under_its_key_replaces_the_first(model: str) -> None:
    async def scenario() -> None:
        one = SharedPredictions(REDIS_URL, CollectorRegistry(), owner="w")
        try:
            one.add(model, 1000, field_of("default", "retry"), "1", np.array([0]))
            await one.flush()
            one.add(model, 1000, field_of("default", "retry"), "1", np.array([1]))
            await one.flush()
            found = await one.find(model, [field_of("default", "retry")])
            assert found[0] is not None and decode_prediction(found[0])[1].tolist() == [1]
            assert one.replaced == 1
        finally:
            await one.close()

    asyncio.run(scenario())


def _unused_port() -> int:
    """A port nothing listens on (a Redis that cannot be reached)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def test_a_redis_that_cannot_be_reached_counts_the_writes_failed_and_refuses_the_look_up() -> None:
    port = _unused_port()

    async def scenario() -> None:
        one = SharedPredictions(f"redis://127.0.0.1:{port}/0", CollectorRegistry(), owner="w")
        one.add("m", 1000, field_of("default", "a"), "1", np.array([0]))
        await one.flush()
        assert one.counted.labels("failed")._value.get() == 1
        with pytest.raises(Unavailable, match="send the labels again"):
            await one.find("m", [field_of("default", "a")])
        with pytest.raises(Unavailable):
            await one.claim("m", [field_of("default", "a")])

    asyncio.run(scenario())


def test_the_store_s_password_is_in_no_answer() -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]

    async def scenario() -> None:
        one = SharedPredictions(f"redis://user:s3cret@127.0.0.1:{port}/0", CollectorRegistry(), owner="w")
        with pytest.raises(Unavailable) as refused:
            await one.find("m", [field_of("default", "a")])
        assert "s3cret" not in refused.value.message and f"127.0.0.1:{port}" in refused.value.message

    asyncio.run(scenario())


def test_a_write_that_failed_leaves_no_bucket_unlisted_or_undying(model: str) -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]

    async def scenario() -> None:
        one = SharedPredictions(REDIS_URL, CollectorRegistry(), owner="w")
        working = one._client
        one._client = Redis.from_url(f"redis://127.0.0.1:{port}/0")  # type: ignore[assignment]
        try:
            one.add(model, 1000, field_of("default", "lost"), "1", np.array([0]))
            await one.flush()
            assert one.counted.labels("failed")._value.get() == 1
            one._client = working
            one.add(model, 1000, field_of("default", "kept"), "1", np.array([1]))
            await one.flush()
            found = await one.find(model, [field_of("default", "kept"), field_of("default", "lost")])
            assert found[0] is not None and found[1] is None
            with Redis.from_url(REDIS_URL) as client:
                buckets = client.zrange(f"dhow:feedback:{model}:index", 0, -1)
                assert buckets and all(client.ttl(bucket) > 0 for bucket in buckets)
        finally:
            await one.close()

    asyncio.run(scenario())


def test_a_bucket_dropped_from_the_index_is_listed_again_by_its_next_write(model: str) -> None:
    async def scenario() -> None:
        one, two = _pair(model)
        try:
            one.add(model, 1000, field_of("default", "first"), "1", np.array([0]))
            await one.flush()
            assert await two.claim(model, [field_of("default", "first")]) == [True]
            with Redis.from_url(REDIS_URL) as client:  # the bucket is empty (Redis deleted it): its joined set expires
                for key in client.scan_iter(f"dhow:feedback:{model}:*:joined"):
                    assert client.ttl(key) > 3600
                    client.delete(key)
            assert await two.find(model, [field_of("default", "first")]) == [None]  # (the index forgets the bucket)
            one.add(model, 1000, field_of("default", "second"), "1", np.array([1]))
            await one.flush()
            assert (await two.find(model, [field_of("default", "second")]))[0] is not None
        finally:
            await one.close()
            await two.close()

    asyncio.run(scenario())


def test_one_write_of_more_than_pending_keeps_the_newest_pending(model: str) -> None:
    async def scenario() -> None:
        one = SharedPredictions(REDIS_URL, CollectorRegistry(), owner="w")
        try:
            for n in range(40):
                one.add(model, 3, field_of("default", f"r{n}"), "1", np.array([n]))
            await one.flush()
            found = await one.find(model, [field_of("default", f"r{n}") for n in range(40)])
            assert [n for n, value in enumerate(found) if value is not None] == [37, 38, 39]
            assert one.dropped == 37 and one.pending == 3
        finally:
            await one.close()

    asyncio.run(scenario())


def test_object_outputs_of_numpy_scalars_are_kept() -> None:
    array = np.array([np.float32(0.5), np.int64(2)], dtype=object)
    assert decode_prediction(encode_prediction("1", array))[1].tolist() == [0.5, 2]


def test_many_labels_are_looked_up_in_chunks(model: str) -> None:
    async def scenario() -> None:
        one = SharedPredictions(REDIS_URL, CollectorRegistry(), owner="w")
        try:
            for n in range(0, 200, 7):
                one.add(model, 1000, field_of("default", f"r{n}"), "1", np.array([n]))
            found = await one.find(model, [field_of("default", f"r{n}") for n in range(200)])
            assert [n for n, value in enumerate(found) if value is not None] == list(range(0, 200, 7))
            taken = await one.claim(model, [field_of("default", f"r{n}") for n in range(0, 200, 7)])
            assert all(taken) and one.pending == 0
        finally:
            await one.close()

    asyncio.run(scenario())


def test_the_index_keeps_the_buckets_written_last_and_counts_what_it_deletes(
    model: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("dhow.monitoring.shared_predictions.MAX_INDEXED", 3)

    async def scenario() -> None:
        quiet, busy = _pair(model)
        try:
            quiet.add(model, 8, field_of("default", "quiet-0"), "1", np.array([0]))
            await quiet.flush()
            for n in range(3):  # three buckets of one, written after the quiet process's
                busy.add(model, 8, field_of("default", f"busy-{n}"), "1", np.array([n]))
                await busy.flush()
            assert busy.dropped == 1  # the quiet process's bucket, the oldest written, went
            quiet.add(model, 8, field_of("default", "quiet-1"), "1", np.array([1]))
            await quiet.flush()  # written last now: the busy process's oldest goes
            keys = ("quiet-0", "quiet-1", "busy-0", "busy-2")
            found = await quiet.find(model, [field_of("default", k) for k in keys])
            assert [value is not None for value in found] == [False, True, False, True]
        finally:
            await quiet.close()
            await busy.close()

    asyncio.run(scenario())


def test_a_large_backlog_is_written_in_bounded_steps_so_the_event_loop_never_stalls_long(model: str) -> None:
    """redis-py packs a pipeline's commands on the event loop, in Python (~1 µs a prediction): 100k predictions
    written in one go held the loop ~80 ms, and the requests in flight with it. Each HSET Redis receives (watched
    with MONITOR, on the real server) holds ``STEP`` predictions at most, and every one is written and counted."""
    backlog = 50_000
    seen: list[int] = []
    sentinel = f"done-{model}".encode()
    ready = threading.Event()

    def watch() -> None:
        with Redis.from_url(REDIS_URL) as client, client.monitor() as monitor:
            ready.set()
            while True:
                line = monitor.connection.read_response()
                line = line if isinstance(line, bytes) else str(line).encode()
                if sentinel in line:
                    return
                if b'"HSET"' in line.upper() and model.encode() in line:
                    seen.append(line.count(b"default\\x00req-"))

    async def scenario() -> None:
        one = SharedPredictions(REDIS_URL, CollectorRegistry(), owner="w")
        try:
            for n in range(backlog):
                one.add(model, 100_000, field_of("default", f"req-{n}"), "1", np.array([[0.25, 0.75]]))
            await one.flush()
            assert one.counted.labels("written")._value.get() == backlog
        finally:
            await one.close()

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    try:
        assert ready.wait(10)
        asyncio.run(scenario())
    finally:  # (whatever failed: a MONITOR left reading would copy every command of the shared Redis to this thread)
        with Redis.from_url(REDIS_URL) as client:
            client.echo(sentinel)
        watcher.join(30)
    assert not watcher.is_alive()
    with Redis.from_url(REDIS_URL) as client:
        buckets = client.zrange(f"dhow:feedback:{model}:index", 0, -1)
        assert sum(int(client.hlen(bucket)) for bucket in buckets) == backlog
    assert sum(seen) == backlog
    assert max(seen) <= STEP and len(seen) >= backlog // STEP


@pytest.mark.parametrize("cut", ["before the step is sent", "after Redis ran the step, its answer unread"])
def test_a_flush_cut_off_mid_backlog_writes_each_prediction_once_the_rest_left_to_close(
    model: str, cut: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The watch cancelled mid-backlog (shutdown), at its second step: the step in flight is run to its end (sent
    or not yet, answered or the answer on its way) and counted, the rest handed back and written by ``close``. A
    step handed back after Redis ran it was written again into the next bucket: its labels could join twice."""
    backlog = 3 * STEP
    reached, go = asyncio.Event(), asyncio.Event()

    async def scenario() -> None:
        one = SharedPredictions(REDIS_URL, CollectorRegistry(), owner="w")
        send, steps = one._send, 0

        async def gated(pipe: Any) -> Any:  # (the cut, at the second step: before its round trip, or after it)
            nonlocal steps
            steps += 1
            if steps == 2 and cut.startswith("before"):
                reached.set()
                await go.wait()
            answered = await send(pipe)
            if steps == 2 and cut.startswith("after"):
                reached.set()
                await go.wait()
            return answered

        monkeypatch.setattr(one, "_send", gated)
        try:
            for n in range(backlog):
                one.add(model, 100_000, field_of("default", f"req-{n}"), "1", np.array([n]))
            flushing = asyncio.create_task(one.flush())
            await reached.wait()
            flushing.cancel()
            await asyncio.sleep(0)  # (the cancel delivered before the step goes on)
            go.set()
            with pytest.raises(asyncio.CancelledError):
                await flushing
            await one.flush()  # (as ``close`` does: what was handed back)
            assert one.counted.labels("written")._value.get() == backlog
            assert one.counted.labels("failed")._value.get() == 0 and one.replaced == 0
            in_step = field_of("default", f"req-{STEP + STEP // 2}")  # (a prediction of the step cut)
            assert await one.claim(model, [in_step]) == [True]
            assert await one.find(model, [in_step]) == [JOINED]  # (not found again in another bucket: joined once)
            assert steps == 3  # (the flush's two, the second run to its end; then the third's predictions)
        finally:
            await one.close()
        with Redis.from_url(REDIS_URL) as client:
            buckets = client.zrange(f"dhow:feedback:{model}:index", 0, -1)
            assert sum(int(client.hlen(bucket)) for bucket in buckets) == backlog - 1  # (each once; one claimed)

    asyncio.run(scenario())


def test_a_flush_cancelled_twice_mid_step_leaves_its_step_to_close_counted_once_no_connection_left_open(
    model: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A second cancel (shutdown's, while the first waits for the step in flight) ends the flush at once; the step
    goes on alone. ``close`` waits for it before closing the pool: closed under it, its step was counted failed
    though written, or never counted (4,000 written of 6,000), and a step sent after reopened a connection never
    closed. Its step is released by ``close``'s own flush (the predictions handed back), never by a clock."""
    backlog = 3 * STEP
    reached, go = asyncio.Event(), asyncio.Event()

    async def scenario() -> None:
        one = SharedPredictions(REDIS_URL, CollectorRegistry(), owner="w")
        send, steps = one._send, 0

        async def gated(pipe: Any) -> Any:
            nonlocal steps
            steps += 1
            if steps == 2:  # (the step in flight when the flush is cancelled, held until ``close`` writes the rest)
                reached.set()
                await go.wait()
            if steps == 3:
                go.set()
            return await send(pipe)

        monkeypatch.setattr(one, "_send", gated)
        for n in range(backlog):
            one.add(model, 100_000, field_of("default", f"req-{n}"), "1", np.array([n]))
        flushing = asyncio.create_task(one.flush())
        await reached.wait()
        for _ in range(2):
            flushing.cancel()
            await asyncio.sleep(0)
        with pytest.raises(asyncio.CancelledError):
            await flushing
        await one.close()
        pool = one._client.connection_pool  # (no step left in flight to open a connection after the pool closed)
        assert not any(c.is_connected for c in [*pool._available_connections, *pool._in_use_connections])
        assert steps == 3
        assert one.counted.labels("written")._value.get() == backlog
        assert one.counted.labels("failed")._value.get() == 0
        with Redis.from_url(REDIS_URL) as client:
            buckets = client.zrange(f"dhow:feedback:{model}:index", 0, -1)
            assert sum(int(client.hlen(bucket)) for bucket in buckets) == backlog

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", ResourceWarning)
        asyncio.run(scenario())
        gc.collect()
    assert not [w for w in caught if issubclass(w.category, ResourceWarning)]


def test_a_step_that_breaks_while_its_flush_is_cancelled_is_counted_failed_and_logged(
    model: str, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """An error of the step's own (not Redis's: a bug) after the cancel was taken by ``shield`` unseen, its step
    counted nowhere. It is logged, with its trace, and the step counted failed; the rest is written by ``close``."""
    backlog = 3 * STEP
    reached, go = asyncio.Event(), asyncio.Event()

    async def scenario() -> None:
        one = SharedPredictions(REDIS_URL, CollectorRegistry(), owner="w")
        send, steps = one._send, 0

        async def broken(pipe: Any) -> Any:
            nonlocal steps
            steps += 1
            if steps == 2:
                reached.set()
                await go.wait()
                raise RuntimeError("a step that broke")
            return await send(pipe)

        monkeypatch.setattr(one, "_send", broken)
        try:
            for n in range(backlog):
                one.add(model, 100_000, field_of("default", f"req-{n}"), "1", np.array([n]))
            flushing = asyncio.create_task(one.flush())
            await reached.wait()
            flushing.cancel()
            await asyncio.sleep(0)
            go.set()
            with pytest.raises(asyncio.CancelledError):
                await flushing
            assert one.counted.labels("failed")._value.get() == STEP
        finally:
            await one.close()
        assert one.counted.labels("written")._value.get() == backlog - STEP
        assert one.counted.labels("failed")._value.get() == STEP

    with caplog.at_level(logging.WARNING, logger="dhow.monitoring"):
        asyncio.run(scenario())
    logged = [r for r in caplog.records if r.exc_info and isinstance(r.exc_info[1], RuntimeError)]
    assert len(logged) == 1


async def _never_answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """A Redis that accepts and reads, and never answers (hung, or its answers lost on the way)."""
    try:
        while await reader.read(65536):
            pass
    finally:
        writer.close()


def test_a_redis_that_never_answers_ends_the_flush_at_its_first_step_the_rest_counted_failed(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Each step waits the client's socket timeout for its answer: a backlog of 50 steps held the flush (and every
    label's look-up, waiting on it to answer 503) for minutes. The first step unanswered ends it: what no step took
    is counted failed, and no bucket is named for it."""
    backlog = 3 * STEP

    async def scenario() -> None:
        silent = await asyncio.start_server(_never_answer, "127.0.0.1", 0)
        url = f"redis://127.0.0.1:{silent.sockets[0].getsockname()[1]}/0"
        one = SharedPredictions(url, CollectorRegistry(), owner="w")
        await one._client.aclose()
        one._client = AsyncRedis.from_url(url, socket_timeout=0.2)  # (the same wait as 5 s, shorter)
        send, steps = one._send, 0

        async def counting(pipe: Any) -> Any:
            nonlocal steps
            steps += 1
            return await send(pipe)

        monkeypatch.setattr(one, "_send", counting)
        try:
            for n in range(backlog):
                one.add("m", BUCKETS * STEP, field_of("default", f"req-{n}"), "1", np.array([n]))
            await one.flush()
            assert steps == 1
            assert one.counted.labels("failed")._value.get() == backlog
            assert one.counted.labels("written")._value.get() == 0
            assert one._serial == 1  # (buckets of STEP: the steps not made named none)
        finally:
            await one.close()
            silent.close()
            await silent.wait_closed()

    asyncio.run(scenario())


def test_a_prediction_kept_again_within_a_flush_is_counted_replaced_whatever_the_write() -> None:
    port = _unused_port()

    async def scenario() -> None:
        one = SharedPredictions(f"redis://127.0.0.1:{port}/0", CollectorRegistry(), owner="w")
        one.add("m", 1000, field_of("default", "retry"), "1", np.array([0]))
        one.add("m", 1000, field_of("default", "retry"), "1", np.array([1]))
        await one.flush()
        assert one.counted.labels("failed")._value.get() == 1 and one.replaced == 1

    asyncio.run(scenario())
