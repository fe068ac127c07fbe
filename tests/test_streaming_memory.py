"""A paused, saturated consumer's memory stays flat: 200,000 requests wait in the topic, a slow model answers a
few a second, and the consumer's resident memory, sampled from /proc once its bound was first reached and the
first fetch bursts passed, climbs no more than what the bound of messages in flight can hold (a consumer that
buffered the backlog would grow by hundreds of MiB)."""

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
#: seconds after the pause before the windows: the first bursts of fetches come and go (every ~4 s)
WARM_UP = 5
#: seconds a window: long enough to hold at least two bursts, whose highest level is the one compared
WINDOW = 12
#: samples a second: a burst's top is caught, not its tail
RATE = 4

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
        for _ in range((WARM_UP + 2 * WINDOW) * RATE):
            time.sleep(1 / RATE)
            samples.append(_rss(process.pid))
        status = status_of(data)
    finally:
        assert stop(process) == 0, (data / "stream.log").read_text()
    bound = IN_FLIGHT * PER_MESSAGE + SLACK
    # flat: after the first fetch bursts came and went (the allocator keeps some of what they took: where the
    # level settles depends on when the first sample fell in a burst, 193-243 MiB over six runs that settled at
    # 233-248), the highest level of the last window is within the bound of the highest of the window before: a
    # consumer buffering the backlog would keep climbing by hundreds of MiB; and no moment's peak is beyond the
    # bound and one burst of the client's fetch buffers above where it paused
    early = max(samples[WARM_UP * RATE : (WARM_UP + WINDOW) * RATE])
    late = max(samples[(WARM_UP + WINDOW) * RATE :])
    peak = max(samples) - start
    mib = [round(sample / 2**20, 1) for sample in samples[::RATE]]  # one a second, for the message
    growth = late - early
    assert growth <= bound, f"RSS climbed {growth / 2**20:.1f} MiB (bound {bound / 2**20:.1f} MiB): {mib}"
    limit = bound + FETCH_BURST
    assert peak <= limit, f"RSS peaked {peak / 2**20:.1f} MiB up (bound {limit / 2**20:.1f} MiB): {mib}"
    # it was saturated all along: most of the backlog still waits in the broker, not in the consumer
    assert int(status["received"]) - int(status["answered"]) <= IN_FLIGHT
    assert int(status["received"]) < BACKLOG // 10
