"""A paused, saturated consumer's memory stays flat: 200,000 requests wait in the topic, a slow model answers a
few a second, and the consumer's resident memory, sampled from /proc after its bound was first reached, settles
within what the bound of messages in flight can hold (a consumer that buffered the backlog would grow by
hundreds of MiB)."""

from __future__ import annotations

import statistics
import time
from collections.abc import Iterator
from pathlib import Path

import orjson
import pytest

from tests.conftest import wait_until, write_model
from tests.kafka_broker import Broker, start_broker
from tests.stream_processes import start_stream, status_of, stop

BACKLOG = 200_000
IN_FLIGHT = 500
#: what one message in flight may hold at most (its record, request, reply, tasks and futures), generously
PER_MESSAGE = 16 * 1024
#: what one fetch of the Kafka client brings per partition, at most (librdkafka's max.partition.fetch.bytes, set on
#: the source's URL: with its default of 1 MiB, tansu's answers to the fetches after each resume were seen to hold
#: ~50 MiB for a moment, freed at once: the client's buffer, not the consumer's)
PARTITION_FETCH = 256 * 1024
PARTITIONS = 4
#: the allocator's and the client's own drift over a few seconds, whatever the messages
SLACK = 8 * 1024 * 1024

SLOW = """
import time


class Slow:
    def load(self, version_dir):
        pass

    def predict(self, inputs):
        time.sleep(0.25)
        return {"y": inputs["x"] * 2}
"""


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
        "--source", broker.url(source, group_options=True) + f"&max.partition.fetch.bytes={PARTITION_FETCH}",
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
    bound = IN_FLIGHT * PER_MESSAGE + PARTITIONS * PARTITION_FETCH + SLACK
    # flat: where the memory settles at the end (the median of the last five seconds) is within the bound of
    # where it started; a moment's peak (a fetch's buffers after a resume, freed within a second) may reach
    # twice the bound, still far below the hundreds of MiB that a consumer buffering the backlog would hold
    settled = statistics.median(samples[-5:]) - start
    peak = max(samples) - start
    mib = [round(sample / 2**20, 1) for sample in samples]
    assert settled <= bound, f"RSS settled {settled / 2**20:.1f} MiB up (bound {bound / 2**20:.1f} MiB): {mib}"
    assert peak <= 2 * bound, f"RSS peaked {peak / 2**20:.1f} MiB up (bound {2 * bound / 2**20:.1f} MiB): {mib}"
    # it was saturated all along: most of the backlog still waits in the broker, not in the consumer
    assert int(status["received"]) - int(status["answered"]) <= IN_FLIGHT
    assert int(status["received"]) < BACKLOG // 10
