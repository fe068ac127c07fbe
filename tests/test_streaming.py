"""`dhow stream run` against a real Kafka-protocol broker (tansu, started here): requests in, correct replies out,
dead letters with their reason, no loss across kill -9, partitions shared by a group, refusals at start.

The first test sends the issue's 10,000 requests (10,000 correct replies out); the others 2,000, to keep the
suite's time (the code path is the same).
"""

from __future__ import annotations

import json
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import orjson
import pytest

from dhow.governance.audit import AuditStore
from tests.conftest import wait_until, write_model
from tests.kafka_broker import Broker, start_broker
from tests.reference import run_directly
from tests.stream_processes import (
    features,
    headers_of,
    replies_by_key,
    row_messages,
    run_stream,
    slow_doubler,
    start_stream,
    status_of,
    stop,
)

COUNT = 2000
#: "10,000 requests in, 10,000 correct replies out" (issue 14)
REQUESTS = 10_000


@pytest.fixture(scope="module")
def broker() -> Iterator[Broker]:
    yield from start_broker()


def _topics(broker: Broker, name: str) -> tuple[str, str, str]:
    topics = (f"{name}.requests", f"{name}.replies", f"{name}.dead")
    broker.create_topics(*topics)
    return topics


def _args(broker: Broker, source: str, sink: str, dead: str | None, *extra: str) -> list[str]:
    return [
        "--source", broker.url(source, group_options=True), "--sink", broker.url(sink),
        *(("--dead-letter", broker.url(dead)) if dead else ()), *extra,
    ]  # fmt: skip


def test_every_request_answered_correctly_and_poison_dead_lettered(
    broker: Broker, demo_repository: Path, tmp_path: Path
) -> None:
    source, sink, dead = _topics(broker, "all")
    x = features(REQUESTS, seed=3)
    poison = [
        (b"p-json", b"{not json", [("trace", b"t1")]),
        (b"p-shape", orjson.dumps({"input": [1.0, 2.0]}), []),
        (b"p-name", orjson.dumps({"inputs": x[0].tolist()}), []),
        # Python's json.dumps writes NaN, which JSON has not
        (b"p-nan", json.dumps({"input": [float("nan"), *x[1, 1:].tolist()]}).encode(), []),
    ]
    messages = row_messages(x[:1000]) + poison + row_messages(x[1000:], first=1000)
    broker.produce(source, messages)
    data = tmp_path / "data"
    process = start_stream(demo_repository, data, broker, *_args(broker, source, sink, dead))
    try:
        replies = broker.read_all(sink, REQUESTS)
        dead_letters = broker.read_all(dead, len(poison), timeout=20)
        wait_until(lambda: status_of(data).get("answered") == REQUESTS and not status_of(data)["in_flight"], 10,
                   "status")  # fmt: skip
    finally:
        assert stop(process) == 0, (data / "stream.log").read_text()

    by_key = replies_by_key(replies)
    assert sorted(by_key) == list(range(REQUESTS)) and all(len(v) == 1 for v in by_key.values())
    expected = run_directly(demo_repository, "tabular", 2, {"input": x})
    got = [orjson.loads(by_key[i][0].value()) for i in range(REQUESTS)]
    np.testing.assert_array_equal([g["label"] for g in got], expected["label"])
    # float32 sums differ in the last bits with the batch a row ran in
    np.testing.assert_allclose([g["probabilities"] for g in got], expected["probabilities"], rtol=1e-5, atol=1e-6)
    headers = headers_of(by_key[7][0])
    assert headers["x-request-id"] == b"r7" and headers["dhow-model-version"] == b"2"
    assert headers["dhow-source-topic"] == source.encode()
    position = (int(headers["dhow-source-partition"]), int(headers["dhow-source-offset"]))
    assert position in {(m.partition(), m.offset()) for m in broker.read_all(source, len(messages)) if m.key() == b"7"}

    letters = {m.key(): m for m in dead_letters}
    assert set(letters) == {b"p-json", b"p-shape", b"p-name", b"p-nan"}
    assert letters[b"p-json"].value() == b"{not json" and headers_of(letters[b"p-json"])["trace"] == b"t1"
    reasons = {key: headers_of(m)["dhow-error-reason"].decode() for key, m in letters.items()}
    assert "malformed JSON" in reasons[b"p-json"]
    assert "shape" in reasons[b"p-shape"]
    assert "no input 'inputs'" in reasons[b"p-name"]
    assert "JSON has no NaN or Infinity" in reasons[b"p-nan"]
    assert "consumer run with --format v2-binary" in reasons[b"p-nan"]  # the consumer's option, said to be
    nan_at = headers_of(letters[b"p-nan"])  # where it was: the source's partition and offset, as every letter says
    sent = {(m.partition(), m.offset()) for m in broker.read_all(source, len(messages)) if m.key() == b"p-nan"}
    assert {(int(nan_at["dhow-source-partition"]), int(nan_at["dhow-source-offset"]))} == sent
    assert letters[b"p-nan"].value() == poison[3][1]
    assert all(headers_of(m)["dhow-error-code"] == b"INVALID_ARGUMENT" for m in dead_letters)
    assert all(headers_of(m)["dhow-source-topic"] == source.encode() for m in dead_letters)

    status = status_of(data)
    assert status["state"] == "stopped" and status["answered"] == REQUESTS and status["dead_lettered"] == len(poison)
    shown = subprocess.run(
        [*_cli(), "stream", "status", "--data-dir", str(data)], capture_output=True, text=True, check=True
    ).stdout
    assert f"answered        {REQUESTS}" in shown and f"dead_lettered   {len(poison)}" in shown

    # audited per batch, as the stream's identity: far fewer records than messages, every message counted
    store = AuditStore.open(f"sqlite:///{data / 'audit.sqlite3'}")
    try:
        records = store.read(limit=1000, actor="dhow:stream:tabular.all.requests")
    finally:
        store.close()
    batches = [r for r in records if r["action"] == "infer"]
    assert 0 < len(batches) < REQUESTS / 4
    assert sum(r["details"]["messages"] for r in batches) == REQUESTS + len(poison)
    assert [r["details"]["phase"] for r in records if r["action"] == "stream.run"] == ["start", "end"]


def _doubler(tmp_path: Path, seconds_per_batch: float, max_batch_size: int) -> Path:
    """A repository with the model ``slow``: y = 2x, taking ``seconds_per_batch`` for each batch."""
    repository = tmp_path / "models"
    manifest = (
        "runtime: python\ninputs:\n  - {name: x, datatype: FP32, shape: [-1, 1]}\n"
        f"outputs:\n  - {{name: y, datatype: FP32, shape: [-1, 1]}}\nmax_batch_size: {max_batch_size}\n"
    )
    write_model(repository, "slow", manifest, {"1/model.py": slow_doubler(seconds_per_batch)})
    return repository


def _cli() -> list[str]:
    import sys

    return [sys.executable, "-m", "dhow.cli"]


def test_kill_9_mid_stream_and_restart_loses_nothing(broker: Broker, tmp_path: Path) -> None:
    # a model of 800 rows a second, so that the kill comes while most of the topic is still unanswered
    repository = _doubler(tmp_path, seconds_per_batch=0.01, max_batch_size=8)
    source, sink, dead = _topics(broker, "kill")
    broker.produce(source, [(str(i).encode(), orjson.dumps({"x": [float(i)]}), []) for i in range(COUNT)])
    data = tmp_path / "data"
    args = _args(broker, source, sink, dead, "--model", "slow", "--max-in-flight", "200")
    replies_seen = broker.tail(sink)
    first = start_stream(repository, data, broker, *args)
    try:
        wait_until(lambda: replies_seen.count() >= 300, 60, "some replies")
    finally:
        first.kill()  # SIGKILL: no goodbye, no last commit
        first.wait()
    # every reply it wrote (read to the end however slowly the tail reads: all of them may be answered again, when
    # the kill came before its first commit)
    answered_before = len(replies_seen.to_end())
    assert answered_before < COUNT, "the consumer finished before it was killed: nothing was proved"
    second = start_stream(repository, data, broker, *args)
    try:
        replies = replies_seen.until_keys({str(i).encode() for i in range(COUNT)})
    finally:
        replies_seen.close()
        assert stop(second) == 0, (data / "stream.log").read_text()
    by_key = replies_by_key(replies)
    assert sorted(by_key) == list(range(COUNT)), f"lost: {sorted(set(range(COUNT)) - set(by_key))[:20]}"
    twice = sum(len(v) - 1 for v in by_key.values())
    # at-least-once: only what was answered but not yet committed at the kill is answered again
    assert twice <= answered_before, twice
    assert all(orjson.loads(m.value())["y"] == [2.0 * i] for i, v in by_key.items() for m in v)


def test_two_consumers_of_a_group_share_the_partitions(broker: Broker, demo_repository: Path, tmp_path: Path) -> None:
    source, sink, dead = _topics(broker, "group")
    x = features(COUNT, seed=5)
    half = COUNT // 2
    broker.produce(source, row_messages(x[:half]))
    args = _args(broker, source, sink, dead, "--group", "scorers", "--max-in-flight", "100")
    replies_seen = broker.tail(sink)
    first = start_stream(demo_repository, tmp_path / "a", broker, *args)
    second = None
    try:
        wait_until(lambda: replies_seen.count() >= 200, 60, "the first consumer's replies")
        second = start_stream(demo_repository, tmp_path / "b", broker, *args)
        wait_until(lambda: _assigned(tmp_path / "b") and _assigned(tmp_path / "a"), 60, "both consumers assigned")
        broker.produce(source, row_messages(x[half:], first=half))
        replies = replies_seen.until_keys({str(i).encode() for i in range(COUNT)})
        wait_until(lambda: status_of(tmp_path / "b").get("answered", 0) > 0, 10, "the second consumer's answers")
        a, b = _assigned(tmp_path / "a"), _assigned(tmp_path / "b")
    finally:
        replies_seen.close()
        for process in (first, second):
            if process is not None:
                stop(process)
    assert a and b and not a & b and a | b == {f"{source}/{p}" for p in range(4)}
    assert sorted(replies_by_key(replies)) == list(range(COUNT))


def _assigned(data: Path) -> set[str]:
    try:
        return set(status_of(data).get("assignment", ()))
    except FileNotFoundError:
        return set()


def test_refused_without_a_dead_letter_destination_unless_skipping(
    broker: Broker, demo_repository: Path, tmp_path: Path
) -> None:
    source, sink, _ = _topics(broker, "skip")
    refused = run_stream(demo_repository, tmp_path / "data", broker, *_args(broker, source, sink, None))
    assert refused.returncode == 2 and "no dead-letter destination" in refused.stderr
    assert "--on-error skip" in refused.stderr

    broker.produce(source, [*row_messages(features(2, seed=6)), (b"bad", b"[]", [])])
    data = tmp_path / "skipping"
    process = start_stream(demo_repository, data, broker, *_args(broker, source, sink, None, "--on-error", "skip"))
    try:
        wait_until(lambda: status_of(data).get("answered") == 2 and status_of(data)["skipped"] == 1, 60, "the count")
    finally:
        assert stop(process) == 0
    replies = broker.tail(sink)
    try:
        assert len(replies.until_keys({b"0", b"1"}, timeout=20)) == 2
    finally:
        replies.close()


def test_refused_at_start_by_residency_or_a_missing_topic(
    broker: Broker, demo_repository: Path, tmp_path: Path
) -> None:
    source, sink, dead = _topics(broker, "refusals")
    args = _args(broker, source, sink, dead)
    region = run_stream(demo_repository, tmp_path / "data", broker, *args, "--data-region", "eu", "--region", "ae")
    assert region.returncode == 2 and "data of region 'eu' may not be processed in region 'ae'" in region.stderr
    missing = run_stream(demo_repository, tmp_path / "data", broker, *_args(broker, "nowhere", sink, dead))
    assert missing.returncode == 2 and "has no topic 'nowhere'" in missing.stderr


SLOW_MODEL = """
import time


class Slow:
    def load(self, version_dir):
        pass

    def predict(self, inputs):
        time.sleep(0.5)  # a saturated model: 8 rows a second
        return {"y": inputs["x"] * 2}
"""


def test_a_saturated_consumer_reads_no_more_than_its_bound(broker: Broker, tmp_path: Path) -> None:
    repository = _doubler(tmp_path, seconds_per_batch=0.5, max_batch_size=4)  # saturated: 8 rows a second
    source, sink, dead = _topics(broker, "slow")
    broker.produce(source, [(str(i).encode(), orjson.dumps({"x": [float(i)]}), []) for i in range(400)])
    data = tmp_path / "data"
    args = _args(broker, source, sink, dead, "--model", "slow", "--max-in-flight", "24")
    process = start_stream(repository, data, broker, *args)
    samples: list[dict[str, object]] = []
    try:
        wait_until(lambda: bool(status_of(data).get("answered")), 60, "the first answers")
        # the status is written every 2 s, and ``paused`` is the moment's: sampled until it shows (a loaded machine
        # can catch the consumer between a batch's answers and its next pause three times in a row)
        for _ in range(10):
            time.sleep(2)
            samples.append(status_of(data))
            if len(samples) >= 3 and any(sample["paused"] for sample in samples):
                break
    finally:
        assert stop(process) == 0, (data / "stream.log").read_text()
    # a backlog of 400, and never more than 24 read and not answered: the rest waits in the broker
    for sample in samples:
        received, answered = int(sample["received"]), int(sample["answered"])  # type: ignore[call-overload]
        assert received - answered <= 24 and received < 400, sample
    assert any(sample["paused"] for sample in samples), samples
    final = status_of(data)
    assert final["in_flight"] == 0 and final["received"] == final["answered"] < 400
