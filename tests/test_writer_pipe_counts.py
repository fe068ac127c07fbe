"""What the server hands a writer process is counted once, whatever becomes of the writer: a writer that stops
without reporting all it was handed (killed by the close, or died in it) has the rest counted failed, including
what the close itself handed it."""

from __future__ import annotations

import asyncio
import logging
import sys
import time

import pytest
from prometheus_client import CollectorRegistry

from dhow.monitoring.tracing import Tracing
from tests.test_tracing_units import traced_requests

#: a writer process that answers ready, exports the first ``_EXPORTED`` requests it is handed and holds the rest
#: (as a writer whose collector is slow), reporting after each frame; when its stdin closes it exits without a last
#: report, as a writer that the close had to kill, or that died in it
_EXPORTED = 4
_HOLDING_WRITER = f"""
import os, sys, orjson
from dhow.core.frames import frame, split_frames
buffer, ready, taken = bytearray(), False, 0
def answer(document):
    sys.stdout.buffer.write(frame(orjson.dumps(document)))
    sys.stdout.buffer.flush()
while chunk := os.read(0, 1 << 20):
    buffer += chunk
    for body in split_frames(buffer):
        if not ready:
            ready = True
            answer({{"ready": "holding"}})
            continue
        count = len(orjson.loads(body))
        exported = max(0, min(count, {_EXPORTED} - taken))
        taken += count
        answer({{"logged": exported, "dropped": 0, "failed": 0, "queued": taken - min(taken, {_EXPORTED}),
                 "reason": ""}})
"""


def test_what_a_writer_stopping_in_the_close_did_not_report_is_counted_failed() -> None:
    registry = CollectorRegistry()
    tracing = Tracing(
        "http://127.0.0.1:9", 1.0, command=[sys.executable, "-c", _HOLDING_WRITER], registry=registry, capacity=100
    )

    count, finished = traced_requests(tracing, registry)

    for _ in range(10):  # off an event loop: each handed over at once
        finished()
    deadline = time.monotonic() + 30  # (a deadline for a loaded machine, not a measure of speed)
    while registry.get_sample_value("dhow_tracing_queued") != 6 and time.monotonic() < deadline:
        time.sleep(0.02)
    assert count("exported") == _EXPORTED and registry.get_sample_value("dhow_tracing_queued") == 6

    async def close_with_more_queued() -> None:  # three finish in one turn of the loop: the close hands them over
        for _ in range(3):
            finished()
        tracing.close()

    asyncio.run(close_with_more_queued())
    # the writer reported 4 exported and 6 held, then was handed 3 more and stopped: those 9 are lost with it
    assert (count("exported"), count("failed"), count("dropped")) == (_EXPORTED, 9, 0)
    assert registry.get_sample_value("dhow_tracing_queued") == 0


#: a writer process that reports each request it is handed twice (a sink's bug that counts some twice)
_TWICE_WRITER = _HOLDING_WRITER.replace('{"logged": exported', '{"logged": 2 * count').replace(
    '"queued": taken - min(taken, 4)', '"queued": 0'
)


def test_a_writer_that_reported_more_than_it_was_handed_is_said_in_the_log(caplog: pytest.LogCaptureFixture) -> None:
    """What a writer counted twice would hide as many it lost from the close's count (handed less reported): the
    server says so."""
    registry = CollectorRegistry()
    tracing = Tracing(
        "http://127.0.0.1:9", 1.0, command=[sys.executable, "-c", _TWICE_WRITER], registry=registry, capacity=100
    )
    for _ in range(3):
        trace = tracing.start({}, "m", "r", (1, 2, 3))
        assert trace is not None
        trace.finish("1", 4)
    deadline = time.monotonic() + 30  # (a deadline for a loaded machine, not a measure of speed)
    while not registry.get_sample_value("dhow_tracing_requests_total", {"outcome": "exported"}) and (
        time.monotonic() < deadline
    ):
        time.sleep(0.02)
    with caplog.at_level(logging.ERROR, logger="dhow"):
        tracing.close()
    assert any("more than it was handed" in record.getMessage() for record in caplog.records), caplog.text
