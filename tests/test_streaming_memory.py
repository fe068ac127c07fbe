"""A paused, saturated consumer's memory stays flat: 200,000 requests wait in the topic, a slow model answers a
few a second, and the consumer's resident memory, sampled from /proc after its bound was first reached, falls
back within what the bound of messages in flight can hold (a consumer that buffered the backlog would grow by
hundreds of MiB)."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import orjson
import pytest

from tests.conftest import wait_until, write_model
from tests.kafka_broker import Broker, start_broker
from tests.stream_processes import slow_doubler, start_stream, status_of, stop

BACKLOG = 200_000
IN_FLIGHT = 500
#: what one message in flight may hold at most (its record, request, reply, tasks and futures), generously
PER_MESSAGE = 16 * 1024
#: what the Kafka client holds for a moment after each resume: tansu's answers to the first fetches were seen to
#: take 40-53 MiB for one to four seconds, then fall back to the level before (with max.partition.fetch.bytes and
#: fetch.max.bytes lowered alike): the client's buffers, freed, not messages kept
FETCH_BURST = 64 * 1024 * 1024
#: the allocator's and the client's own drift over a few seconds, whatever the messages
SLACK = 8 * 1024 * 1024

SLOW = slow_doubler(0.25)


@pytest.fixture(scope="module")
def broker() -> Iterator[Broker]:
    yield from start_broker()


def _rss(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError(f"no VmRSS for process {pid}")


def test_a_paused_saturated_consumer_keeps_its_memory_flat(broker: Broker, tmp_path: Path) -> None:
    repository = tmp_path / "models"
    manifest = (
        "runtime: python\ninputs:\n  - {name: x, datatype: FP32, shape: [-1, 1]}\n"
        "outputs:\n  - {name: y, datatype: FP32, shape: [-1, 1]}\nmax_batch_size: 16\n"
    )
    write_model(repository, "slow", manifest, {"1/model.py": SLOW})
    source, sink, dead = "memory.requests", "memory.replies", "memory.dead"
    broker.create_topics(source, sink, dead)
    broker.produce(source, ((str(i).encode(), orjson.dumps({"x": [float(i)]}), []) for i in range(BACKLOG)))
    data = tmp_path / "data"
    args = [
        "--source", broker.url(source, group_options=True),
        "--sink", broker.url(sink), "--dead-letter",
        broker.url(dead), "--model", "slow", "--max-in-flight", str(IN_FLIGHT),
    ]  # fmt: skip
    process = start_stream(repository, data, broker, *args)
    samples: list[int] = []
    try:
        # warmed up: the bound was reached and the partitions paused (the client's prefetch is full by then)
        wait_until(lambda: bool(status_of(data).get("paused")), 120, "the consumer paused at its bound")
        start = _rss(process.pid)
        for _ in range(20):
            time.sleep(1)
            samples.append(_rss(process.pid))
        status = status_of(data)
    finally:
        assert stop(process) == 0, (data / "stream.log").read_text()
    bound = IN_FLIGHT * PER_MESSAGE + SLACK
    # flat: the level memory falls back to between fetches (the least of the last ten seconds: a burst was seen
    # to last up to four) is within the bound of where it started, and a moment's peak within that and one burst
    # of the client's fetch buffers: a consumer buffering the backlog would not fall back, and would hold hundreds
    # of MiB
    floor = min(samples[-10:]) - start
    peak = max(samples) - start
    mib = [round(sample / 2**20, 1) for sample in samples]
    assert floor <= bound, f"RSS stayed {floor / 2**20:.1f} MiB up (bound {bound / 2**20:.1f} MiB): {mib}"
    limit = bound + FETCH_BURST
    assert peak <= limit, f"RSS peaked {peak / 2**20:.1f} MiB up (bound {limit / 2**20:.1f} MiB): {mib}"
    # it was saturated all along: most of the backlog still waits in the broker, not in the consumer
    assert int(status["received"]) - int(status["answered"]) <= IN_FLIGHT
    assert int(status["received"]) < BACKLOG // 10
