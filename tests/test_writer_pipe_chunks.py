"""A writer pipe frames what is queued in chunks of ``frame_items``, one a turn of the event loop: a backlog (a
burst, or a writer that fell behind and let its pipe fill) never holds the loop for one frame of all of it, and
every item is still handed over, each once."""

from __future__ import annotations

import asyncio
import itertools
import os
import signal
import time
from pathlib import Path
from typing import Any

from prometheus_client import CollectorRegistry

from dhow.monitoring.payload_log import PayloadLog
from dhow.serving.composition import PAYLOAD_WRITER
from tests.test_writer_pipe_close import _MASKER, _counted, _offer


def _framing(log: PayloadLog) -> list[int]:
    """The number of items of each frame the log makes from now on."""
    sizes: list[int] = []
    make = log._frame

    def frame(items: list[Any]) -> bytes:
        sizes.append(len(items))
        return make(items)

    log._frame = frame  # type: ignore[method-assign]
    return sizes


async def _all_counted(registry: CollectorRegistry, count: int) -> None:
    deadline = time.monotonic() + 60
    while _counted(registry) < count and time.monotonic() < deadline:
        await asyncio.sleep(0.01)


def _small(log: PayloadLog, n: int) -> None:
    body = b'{"inputs": [{"name": "x", "shape": [1], "datatype": "FP32", "data": [0.5]}]}'
    log.offer([f"r-{n}", "m", "1", "", "", "", "success", "", 1.0, 0.0, {}, (body, 1), None], _MASKER)


def test_a_burst_is_framed_in_chunks_one_a_turn(tmp_path: Path) -> None:
    registry = CollectorRegistry()
    log = PayloadLog(f"file://{tmp_path}/payloads.jsonl", capacity=10_000, source="dhow://test",
                     command=PAYLOAD_WRITER, registry=registry, priority="normal")  # fmt: skip
    log.frame_items = 8
    sizes = _framing(log)
    turns: list[int] = []

    async def main() -> None:
        for n in range(43):  # in one turn: queued together
            _small(log, n)
        deadline = time.monotonic() + 30
        while len(sizes) < 6 and time.monotonic() < deadline:  # the frames made by each turn of the loop
            turns.append(len(sizes))
            await asyncio.sleep(0)
        turns.append(len(sizes))
        await _all_counted(registry, 43)
        assert _counted(registry) == 43, "items left queued with nothing to hand them over"

    try:
        asyncio.run(main())
    finally:
        log.close()
    assert sizes == [8, 8, 8, 8, 8, 3]
    steps = [later - earlier for earlier, later in itertools.pairwise(turns)]
    assert max(steps) == 1 and turns[turns.index(1) :][:6] == [1, 2, 3, 4, 5, 6], "one chunk each turn, at once"
    logged = registry.get_sample_value("dhow_payload_log_events_total", {"sink": "file", "outcome": "logged"})
    assert logged == 43
    assert _request_ids(tmp_path) == [f"r-{n}" for n in range(43)], "in the order they were queued"


def _request_ids(folder: Path) -> list[str]:
    lines = (folder / "payloads.jsonl").read_text().splitlines()
    return [line.split('"request_id":"')[1].split('"')[0] for line in lines]


def test_a_backlog_behind_a_full_pipe_is_framed_in_chunks_once_it_drains(tmp_path: Path) -> None:
    """The writer stopped (its pipe full: the queue grows meanwhile), then resumed: what waited goes in chunks as the
    pipe takes them, every event logged once."""
    registry = CollectorRegistry()
    log = PayloadLog(f"file://{tmp_path}/payloads.jsonl", capacity=10_000, source="dhow://test",
                     command=PAYLOAD_WRITER, registry=registry, priority="normal")  # fmt: skip
    log.frame_items = 4
    sizes = _framing(log)
    count = 40  # of ~250 KB each: 10 MB, ten times what the pipe holds

    async def main() -> None:
        os.kill(log._process.pid, signal.SIGSTOP)
        try:
            for n in range(count):
                _offer(log, n)
                await asyncio.sleep(0.012)  # each its own hand-over, until the pipe is full
            waiting = len(log._queue)
            assert log._unsent, "the pipe never filled"
        finally:
            os.kill(log._process.pid, signal.SIGCONT)
        await _all_counted(registry, count)
        assert waiting > log.frame_items
        assert _counted(registry) == count, "items left queued with nothing to hand them over"
        assert log._bytes == 0, "the bytes of what was taken in chunks were not all counted out"

    try:
        asyncio.run(main())
    finally:
        log.close()
    assert max(sizes) <= 4 and sum(sizes) == count
    logged = registry.get_sample_value("dhow_payload_log_events_total", {"sink": "file", "outcome": "logged"})
    assert logged == count
    assert _request_ids(tmp_path) == [f"r-{n}" for n in range(count)], "in the order they were queued"
