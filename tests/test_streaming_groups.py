"""Kafka consumer groups as members come: two consumers share a topic's partitions, and a third joining while
they answer loses nothing (every request answered; a rebalance finishes and commits the revoked partitions'
records before they move)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import orjson
import pytest

from tests.conftest import wait_until, write_model
from tests.kafka_broker import Broker, start_broker
from tests.stream_processes import replies_by_key, start_stream, status_of, stop

COUNT = 3000

#: y = 2x after 0.08 s a batch of at most 8 (~100 rows a second per consumer); no batch begins while the file HOLD
#: exists, which the test holds from the first 300 replies until the third's join has the first two revoking: so
#: the join comes with most of the first half unanswered and records in flight, whatever the third's start takes
#: (before, ~6 s of the first two's answering had to outlast it: at 0.04 s a batch, ~3 s, a fast machine's two
#: answered the whole first half first, and the test proved nothing)
DOUBLER = """
import time
from pathlib import Path

HOLD = Path({hold!r})


class Slow:
    def load(self, version_dir):
        pass

    def predict(self, inputs):
        while HOLD.exists():
            time.sleep(0.01)
        time.sleep(0.08)
        return {{"y": inputs["x"] * 2}}
"""


@pytest.fixture(scope="module")
def broker() -> Iterator[Broker]:
    yield from start_broker()


def _doubler(tmp_path: Path, hold: Path) -> Path:
    """The model ``slow``: y = 2x, ~100 rows a second per consumer, so that the topic is still flowing when the third
    consumer joins; none while ``hold`` exists."""
    repository = tmp_path / "models"
    manifest = (
        "runtime: python\ninputs:\n  - {name: x, datatype: FP32, shape: [-1, 1]}\n"
        "outputs:\n  - {name: y, datatype: FP32, shape: [-1, 1]}\nmax_batch_size: 8\n"
    )
    write_model(repository, "slow", manifest, {"1/model.py": DOUBLER.format(hold=str(hold))})
    return repository


def test_a_third_consumer_joining_a_group_loses_nothing(broker: Broker, tmp_path: Path) -> None:
    hold = tmp_path / "hold"
    repository = _doubler(tmp_path, hold)
    source, sink, dead = "join.requests", "join.replies", "join.dead"
    broker.create_topics(source, sink, dead)
    messages = [(str(i).encode(), orjson.dumps({"x": [float(i)]}), []) for i in range(COUNT)]
    broker.produce(source, messages[: COUNT // 2])
    args = [
        "--source", broker.url(source, group_options=True), "--sink", broker.url(sink), "--dead-letter",
        broker.url(dead), "--model", "slow", "--group", "joiners", "--max-in-flight", "100",
    ]  # fmt: skip
    replies_seen = broker.tail(sink)
    members = [tmp_path / name for name in ("a", "b", "c")]
    processes = []
    try:
        processes = [start_stream(repository, folder, broker, *args) for folder in members[:2]]
        wait_until(lambda: all(_assigned(folder) for folder in members[:2]), 90, "both first consumers assigned")
        wait_until(lambda: replies_seen.count() >= 300, 90, "the first replies")
        hold.touch()  # the first two answer no more (past the batches they began): what they read waits in flight
        # (the revokes of the first two's own joins are in their logs already: the join's are counted after them)
        revoked = [_said(f, ": revoked ") for f in members[:2]]
        processes.append(start_stream(repository, members[2], broker, *args))
        # its join's rebalance: the first two revoke their partitions, with records in flight, before they answer
        # any more (they hold none until it ends); only then may they go on, to finish them and let them go
        wait_until(lambda: all(_said(f, ": revoked ") > n for f, n in zip(members[:2], revoked, strict=True)), 90,
                   "the first two revoking")  # fmt: skip
        hold.unlink()
        wait_until(lambda: _logged(members[2], ": assigned "), 90, "the third consumer assigned")
        answered_at_join = replies_seen.count()
        broker.produce(source, messages[COUNT // 2 :])  # the third's partitions have work whenever it joined
        replies = replies_seen.until_keys({str(i).encode() for i in range(COUNT)}, timeout=180)
        wait_until(lambda: status_of(members[2]).get("answered", 0) > 0, 30, "the third consumer's answers")
        shares = [_assigned(folder) for folder in members]
    finally:
        hold.unlink(missing_ok=True)
        replies_seen.close()
        for process in processes:
            stop(process)
    assert answered_at_join < COUNT // 2, "the topic was answered before the third joined: nothing was proved"
    assert not any(_logged(f, "still had records in flight") for f in members), "revoked records were not finished"
    by_key = replies_by_key(replies)
    assert sorted(by_key) == list(range(COUNT)), f"lost: {sorted(set(range(COUNT)) - set(by_key))[:20]}"
    assert all(orjson.loads(m.value())["y"] == [2.0 * i] for i, v in by_key.items() for m in v)
    # the partitions split three ways, each to one member
    assert (
        all(shares) and sum(len(s) for s in shares) == 4 and set().union(*shares) == {f"{source}/{p}" for p in range(4)}
    )


def _logged(data: Path, text: str) -> bool:
    """Whether the consumer's log has said ``text``."""
    return _said(data, text) > 0


def _said(data: Path, text: str) -> int:
    """How many times the consumer's log has said ``text``."""
    log = data / "stream.log"
    return log.read_text(errors="replace").count(text) if log.exists() else 0


def _assigned(data: Path) -> set[str]:
    try:
        return set(status_of(data).get("assignment", ()))
    except (FileNotFoundError, orjson.JSONDecodeError):
        return set()
