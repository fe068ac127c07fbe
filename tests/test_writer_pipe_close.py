"""The close of a writer pipe (the payload log's, tracing's) against a writer process that stopped reading (a hung
sink, a stopped process): it keeps to about its time, kills the writer, and counts every item once; and it leaves
the event loop's watch on the pipe to the loop's own thread, whether the loop still runs, hangs or was closed. And
what waits for such a writer's pipe when it dies is counted failed then, without a close."""

from __future__ import annotations

import asyncio
import collections
import json
import logging
import os
import signal
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from prometheus_client import CollectorRegistry

from dhow.governance.masking import Masker, parse_masking
from dhow.monitoring.payload_log import PayloadLog
from dhow.serving.composition import PAYLOAD_WRITER

#: a request's JSON body of ~250 KB: a few fill the writer's pipe (1 MiB, or 64 KiB where it cannot be widened)
_BODY = json.dumps({"inputs": [{"name": "x", "shape": [50_000], "datatype": "FP32", "data": [0.5] * 50_000}]})
_MASKER = Masker(parse_masking(None, "pii"), b"")


def _log(tmp_path: Path) -> tuple[PayloadLog, CollectorRegistry]:
    """A payload log with its real writer process (to a file), started and ready, and its metrics."""
    registry = CollectorRegistry()
    log = PayloadLog(f"file://{tmp_path}/payloads.jsonl", capacity=10_000, source="dhow://test",
                     command=PAYLOAD_WRITER, registry=registry)  # fmt: skip
    return log, registry


def _stopped_log(tmp_path: Path) -> tuple[PayloadLog, CollectorRegistry]:
    """A payload log whose writer then was stopped (SIGSTOP): it reads nothing more, and its pipe fills."""
    log, registry = _log(tmp_path)
    os.kill(log._process.pid, signal.SIGSTOP)
    return log, registry


def _offer(log: PayloadLog, n: int) -> None:
    log.offer([f"r-{n}", "m", "1", "", "", "", "success", "", 1.0, 0.0, {}, (_BODY.encode(), 1), None], _MASKER)


def _counted(registry: CollectorRegistry) -> int:
    """Events counted logged, dropped or failed."""
    return sum(
        int(registry.get_sample_value("dhow_payload_log_events_total", {"sink": "file", "outcome": outcome}) or 0)
        for outcome in ("logged", "dropped", "failed")
    )


def _close_in_a_thread(log: PayloadLog) -> list[BaseException]:
    """``log.close(1.0)`` in a thread of its own (as the server's shutdown does): asserts it returned (a bound for a
    loaded machine, not a measure of speed); what it raised, if anything."""
    raised: list[BaseException] = []

    def close() -> None:
        try:
            log.close(1.0)
        except BaseException as exc:  # (reported to the test)
            raised.append(exc)

    closing = threading.Thread(target=close, daemon=True)
    closing.start()
    closing.join(30)
    assert not closing.is_alive(), "the close waits for ever on a writer that stopped reading"
    return raised


def test_the_close_kills_a_writer_that_stopped_reading_and_counts_every_event_once(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    log, registry = _stopped_log(tmp_path)
    try:
        offered = 0
        while offered < 200 and not (log._unsent and len(log._queue) >= 3):  # a frame's rest waits, more queued
            _offer(log, offered)  # (not on an event loop: each handed over at once)
            offered += 1
        assert log._unsent and log._queue
        with caplog.at_level(logging.ERROR, "dhow.payload_log"):
            assert _close_in_a_thread(log) == []
    finally:
        if log._process.poll() is None:  # (a close that hangs: its write fails once the writer is gone)
            log._process.kill()
    assert log._process.returncode == -signal.SIGKILL
    assert _counted(registry) == offered  # none logged: every event failed, counted once
    assert any("did not take its last frames within 1 s" in record.getMessage() for record in caplog.records)


@pytest.mark.parametrize("loop_state", ["running", "closed"])
def test_the_close_from_another_thread_leaves_the_loops_watch_on_the_pipe_to_the_loops_thread(
    tmp_path: Path, loop_state: str
) -> None:
    """The events come on an event loop (its own thread), which watches the full pipe for room (``add_writer``);
    the close comes from another thread: the watch is removed on the loop's thread (its methods are not
    thread-safe), or not at all once the loop was closed, and the close neither raises nor hangs."""
    log, registry = _stopped_log(tmp_path)
    loop = asyncio.new_event_loop()
    removed_on: list[int] = []
    remove_writer = loop.remove_writer

    def recorded(fd: int) -> bool:
        removed_on.append(threading.get_ident())
        return remove_writer(fd)

    loop.remove_writer = recorded  # type: ignore[method-assign]
    runner = threading.Thread(target=loop.run_forever, daemon=True)
    runner.start()

    try:
        offered = asyncio.run_coroutine_threadsafe(_fill(log), loop).result(60)
        assert log._unsent
        if loop_state == "closed":
            loop.call_soon_threadsafe(loop.stop)
            runner.join(30)
            loop.close()
        assert _close_in_a_thread(log) == []
    finally:
        if log._process.poll() is None:
            log._process.kill()
        if not loop.is_closed():
            loop.call_soon_threadsafe(loop.stop)
            runner.join(30)
            loop.close()
    assert set(removed_on) <= {runner.ident}, "the loop's watch was removed from the close's thread"
    assert removed_on or loop_state == "closed"
    assert _counted(registry) == offered


async def _fill(log: PayloadLog) -> int:
    """On the loop: events offered, each handed over by its timer, until the pipe of a writer that stopped reading
    is full (a frame's rest waits), then three queued behind that rest; how many were offered."""
    offered = 0
    while offered < 200 and not log._unsent:
        _offer(log, offered)
        offered += 1
        await asyncio.sleep(log.flush_s * 2)
    for _ in range(3):
        _offer(log, offered)
        offered += 1
    return offered


class _QueuedMeanwhile(collections.deque[Any]):
    """A queue to which the loop appends one more item the first time the close takes from it (or clears it): an
    interleaving the interpreter lock allows between two of the close's steps."""

    def __init__(self, items: Any, extra: Any) -> None:
        super().__init__(items)
        self.extra = extra

    def _meanwhile(self) -> None:
        if self.extra is not None:
            extra, self.extra = self.extra, None
            self.append(extra)

    def popleft(self) -> Any:
        self._meanwhile()
        return super().popleft()

    def clear(self) -> None:
        self._meanwhile()
        super().clear()


def test_an_event_queued_while_the_close_takes_the_queue_is_counted(tmp_path: Path) -> None:
    """The close takes the queue while the loop's thread may still append to it: an event appended between its
    steps is framed or counted failed, never cleared unseen."""
    log, registry = _log(tmp_path)
    loop = asyncio.new_event_loop()
    try:

        async def offer_three() -> None:
            for n in range(3):  # queued, their hand-over due in 10 ms
                _offer(log, n)

        loop.run_until_complete(offer_three())
        assert len(log._queue) == 3
        late = (["r-late", "m", "1", "", "", "", "success", "", 1.0, 0.0, {}, (b"{}", 0), None, 1],)  # (as offered)
        log._queue = _QueuedMeanwhile(log._queue, late)
        assert _close_in_a_thread(log) == []
    finally:
        loop.close()
    assert _counted(registry) == 4


def test_an_offer_that_passed_its_test_before_the_close_and_queued_after_it_is_counted(tmp_path: Path) -> None:
    """An offer on the loop's thread that found room before the close began, then queued its event once the close
    had ended (the close ran meanwhile in another thread): the hand-over its queueing scheduled counts it failed."""
    log, registry = _log(tmp_path)
    loop = asyncio.new_event_loop()
    runner = threading.Thread(target=loop.run_forever, daemon=True)
    runner.start()

    def offer_across_the_close() -> None:
        assert not log._refused()  # room: the offer goes on...
        assert _close_in_a_thread(log) == []  # ...while the server's shutdown closes the log
        log._put((["r-late", "m", "1", "", "", "", "success", "", 1.0, 0.0, {}, (b"{}", 0), None, 1],))  # (as offered)

    try:
        asyncio.run_coroutine_threadsafe(asyncio.to_thread(lambda: None), loop).result(30)  # (the loop runs)
        loop.call_soon_threadsafe(offer_across_the_close)
        asyncio.run_coroutine_threadsafe(asyncio.sleep(0.2), loop).result(30)  # the loop's next turns
    finally:
        loop.call_soon_threadsafe(loop.stop)
        runner.join(30)
        loop.close()
    assert not log._queue, "an event stayed queued after the close, never counted"
    assert _counted(registry) == 1


def _numbers_up_to(number: int) -> list[int]:
    """Descriptors opened (on /dev/null) until one is numbered ``number`` or past it: each takes the lowest free
    number, so ``number`` is among them when it was free."""
    opened = [os.open(os.devnull, os.O_RDONLY)]
    while opened[-1] < number:
        opened.append(os.open(os.devnull, os.O_RDONLY))
    return opened


class _HangingLoop:
    """An event loop running in a thread of its own, which the test can keep busy (``hang``) past the second a
    close waits for it; ``offered`` makes it the pipe's loop, with one event offered there."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self._runner = threading.Thread(target=self.loop.run_forever, daemon=True)
        self._runner.start()
        self._hanging, self.release = threading.Event(), threading.Event()

    def offered(self, log: PayloadLog) -> None:
        async def offer_one() -> None:
            _offer(log, 0)

        asyncio.run_coroutine_threadsafe(offer_one(), self.loop).result(30)

    def hang(self) -> None:
        def hung() -> None:
            self._hanging.set()
            self.release.wait(60)

        self.loop.call_soon_threadsafe(hung)
        assert self._hanging.wait(30)

    def stop(self) -> None:
        self.release.set()
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._runner.join(30)
        self.loop.close()


def test_a_close_while_the_loop_hangs_keeps_the_pipe_s_number_until_the_loop_removed_its_watch(tmp_path: Path) -> None:
    """The close (another thread) leaves the removal of the loop's watch on the pipe to the loop's thread, and the
    loop is busy past the second the close waits for it: the number stays taken until the removal ran (freed
    before, a new connection could have it, and the late removal would take that one's watch), while the writer
    reads its end all the same, delivers what it was handed and exits."""
    log, registry = _log(tmp_path)
    hanging = _HangingLoop()
    try:
        hanging.offered(log)  # (the pipe's loop is this one)
        hanging.hang()
        assert _close_in_a_thread(log) == []
        taken = _numbers_up_to(log._in)
        for number in taken:
            os.close(number)
        assert log._in not in taken, "the pipe's number was free before the loop removed its watch on it"
        hanging.release.set()
        # (after the removal, scheduled before)
        asyncio.run_coroutine_threadsafe(asyncio.sleep(0), hanging.loop).result(30)
        assert log._process.stdin is not None and log._process.stdin.closed
    finally:
        hanging.release.set()
        if log._process.poll() is None:
            log._process.kill()
        hanging.stop()
    assert log._process.returncode == 0
    assert registry.get_sample_value("dhow_payload_log_events_total", {"sink": "file", "outcome": "logged"}) == 1
    assert _counted(registry) == 1


def test_a_second_close_touches_nothing_though_the_pipe_s_number_is_another_s_by_then(tmp_path: Path) -> None:
    """Closed once, the pipe's number is free for anything the server opens next (here /dev/null, as a new
    connection's socket would be). A second close, while the loop is busy past the second a close waits for it,
    must leave that descriptor alone: it neither takes its place (a stand-in put under the pipe's number) nor asks
    the loop to remove a watch on it."""
    log, registry = _log(tmp_path)
    hanging = _HangingLoop()
    taken: list[int] = []
    try:
        hanging.offered(log)
        assert _close_in_a_thread(log) == []  # (the loop is free: the pipe closed at once)
        taken = _numbers_up_to(log._in)
        assert log._in in taken  # (its number is another's now: a file of the test's, in place of the /dev/null)
        other = tmp_path / "another"
        other.write_bytes(b"")
        opened = os.open(other, os.O_RDONLY)
        os.dup2(opened, log._in)
        os.close(opened)
        hanging.hang()
        assert _close_in_a_thread(log) == []
        assert os.fstat(log._in).st_ino == other.stat().st_ino, "the second close took another's descriptor"
    finally:
        for number in taken:
            os.close(number)
        hanging.stop()
    assert _counted(registry) == 1


def test_what_waits_behind_a_frame_s_rest_when_the_writer_dies_is_counted_failed_then(tmp_path: Path) -> None:
    """The writer stopped reading: events wait behind a frame's rest for the pipe, their timer come and gone (it
    hands nothing over meanwhile). It then dies: the loop's watch on the pipe learns it, and those events are
    counted failed then, not left queued and uncounted until a close that may come much later."""
    log, registry = _stopped_log(tmp_path)
    loop = asyncio.new_event_loop()
    runner = threading.Thread(target=loop.run_forever, daemon=True)
    runner.start()
    try:
        offered = asyncio.run_coroutine_threadsafe(_fill(log), loop).result(60)
        _wait_for(lambda: log._timer is None, "the queued events' timer")  # (now nothing but the pipe hands over)
        assert log._unsent and len(log._queue) == 3
        log._process.kill()
        log._process.wait()
        log._reader.join(10)  # (what the writer was handed: counted failed as its pipe closed)
        _wait_for(lambda: not log._unsent, "the loop's watch on the pipe")  # (it found the writer gone)
        asyncio.run_coroutine_threadsafe(asyncio.sleep(0), loop).result(30)  # (after that watch's callback)
        assert not log._queue, "events queued behind the frame's rest stayed queued, uncounted"
        assert _counted(registry) == offered
        log.close(1.0)
        assert _counted(registry) == offered  # (counted once)
    finally:
        if log._process.poll() is None:
            log._process.kill()
        loop.call_soon_threadsafe(loop.stop)
        runner.join(30)
        loop.close()


def _wait_for(condition: Callable[[], bool], what: str) -> None:
    deadline = time.monotonic() + 30
    while not condition():
        assert time.monotonic() < deadline, f"{what} did not come within 30 s"
        time.sleep(0.01)


class _Config:
    def __init__(self, name: str) -> None:
        self.name = name


def _answers(log: PayloadLog, names: tuple[str, ...], parameters: dict[str, Any] | None = None) -> None:
    """Answered requests of the models ``names`` (their configs made anew, as a reload would), queued together."""
    from dhow.core.types import Caller, InferenceRequest, InferenceResponse, Tensor

    answer = InferenceResponse("m", "1", [Tensor("y", "FP32", [1], np.array([0.5], np.float32))])
    for name in names:
        sent = InferenceRequest("m", [Tensor("x", "FP32", [1], np.array([2.0], np.float32))])
        sent.parameters = parameters or {}
        # off an event loop a hand-over would be due at once: one is said to be scheduled, the test hands over
        log._scheduled = True
        log.answered((_Config(name), "", None, Caller("key:ci#1", "acme", f"r-{name}")), 1.0, sent, answer)


def _outcomes(registry: CollectorRegistry) -> tuple[int, ...]:
    """Events counted logged, failed and dropped."""
    return tuple(
        int(registry.get_sample_value("dhow_payload_log_events_total", {"sink": "file", "outcome": outcome}) or 0)
        for outcome in ("logged", "failed", "dropped")
    )


def _masking_of(config: _Config) -> Masker:
    if config.name == "broken":
        raise ValueError("pii: no such detector")
    return _MASKER


def test_a_clients_parameters_json_cannot_hold_cost_only_what_the_event_never_shows(tmp_path: Path) -> None:
    """Parameters nested past what JSON writing takes, or text with a lone surrogate (a client's choice, answered
    all the same): that event is logged with its top-level scalar parameters, as any event shows them, masked by
    the model's field rules (``parameters.<name>``), and the frame's other events as they are."""
    registry = CollectorRegistry()
    log = PayloadLog(f"file://{tmp_path}/payloads.jsonl", capacity=100, source="dhow://test", command=PAYLOAD_WRITER,
                     registry=registry)  # fmt: skip
    hashing = Masker(parse_masking({"fields": {"parameters.customer": "hash"}}, "pii"), b"k" * 32)
    log.use_masking(lambda config: hashing)
    for depth in (300, 1010):  # past orjson's limit; past Python's too, in the writing's second try (as lists)
        deep: dict[str, Any] = {}
        for _ in range(depth):
            deep = {"d": deep}
        _answers(log, (f"deep-{depth}",), {"customer": "C-123", "k": 2**70, "deep": deep})
    _answers(log, ("surrogate",), {"customer": "C-123", "note": "a\ud800b"})
    _answers(log, ("fine",), {"customer": "C-123", "k": 1})
    log._flush()
    log.close(30)
    assert _outcomes(registry) == (4, 0, 0)
    lines = [json.loads(line)["data"] for line in (tmp_path / "payloads.jsonl").read_text().splitlines()]
    by_model = {line["model"]: line["parameters"] for line in lines}
    hashed = by_model["fine"]["customer"]
    assert hashed != "C-123" and by_model["fine"] == {"customer": hashed, "k": 1}
    assert by_model["deep-300"] == by_model["deep-1010"] == {"customer": hashed, "k": str(2**70)}
    assert by_model["surrogate"] == {"customer": hashed, "note": "a\\ud800b"}
    assert "C-123" not in (tmp_path / "payloads.jsonl").read_text()


def test_events_that_cannot_be_framed_are_counted_failed_once_and_the_frame_keeps_its_maskings(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With the real writer: an answered request whose model's masking cannot be made is counted failed once, not
    handed over; a frame that cannot be made at all counts each of its events failed once and hands its models'
    masking rules on to the next frame (whose events the writer then logs); a close whose last frame cannot be
    made still closes, and counts it; the writer never reports more than it was handed."""
    import dhow.monitoring.payload_log as payload_log

    log, registry = _log(tmp_path)
    log.use_masking(_masking_of)
    making = payload_log.frame_events
    failing = {"next": False}

    def frame_events(*args: Any, **kwargs: Any) -> bytes:
        if failing["next"]:
            failing["next"] = False
            raise RuntimeError("a frame that cannot be made")
        return making(*args, **kwargs)

    monkeypatch.setattr(payload_log, "frame_events", frame_events)
    with caplog.at_level(logging.ERROR):
        failing["next"] = True
        _answers(log, ("broken", "new", "new"))  # the masking of "new" numbered in a frame that fails
        log._flush()
        assert _outcomes(registry)[1] == 3
        _answers(log, ("new", "broken"))
        log._flush()
        failing["next"] = True
        _answers(log, ("new",))
        log.close(30)
    assert log._process.poll() is not None
    assert _outcomes(registry) == (1, 5, 0)
    assert len((tmp_path / "payloads.jsonl").read_text().splitlines()) == 1
    assert "counted twice" not in caplog.text and "could not be written: counted failed" in caplog.text
