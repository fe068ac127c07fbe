"""The Kinesis side of the stream door without a server: the shard checkpoints and leases in the registry
database (SQLite and PostgreSQL), the lease rounds that split shards and keep parents before children, and what
a reply or a dead letter carries in a body that has no headers."""

from __future__ import annotations

import base64
import time

import orjson
import pytest

from dhow.registry.checkpoints import CheckpointStore
from dhow.streaming.carry import DEAD_LETTER, carried, header_length
from dhow.streaming.records import Outgoing
from dhow.streaming.shards import ShardInfo, decide


@pytest.fixture
def store(database_url: str) -> CheckpointStore:
    opened = CheckpointStore.open(database_url)
    yield opened  # type: ignore[misc]
    opened.close()


SHARDS = [ShardInfo(f"s{i}", (), None) for i in range(4)]


def test_checkpoints_and_leases_outlive_the_member(store: CheckpointStore) -> None:
    first = decide(store, "g", "orders", "a", SHARDS, set(), 30)
    assert sorted(first.taken) == ["s0", "s1", "s2", "s3"] and first.taken["s0"] == ""
    assert store.checkpoint("g", "orders", "s0", "a", "41")
    assert not store.checkpoint("g", "orders", "s0", "b", "99"), "only the lease holder checkpoints"
    # a second member: the first lets half go (once answered), the second takes it from the checkpoint
    second = decide(store, "g", "orders", "b", SHARDS, set(), 30)
    assert second.taken == {}
    again = decide(store, "g", "orders", "a", SHARDS, set(first.taken), 30)
    assert len(again.extra) == 2 and not again.lost
    for name in again.extra:
        assert store.checkpoint("g", "orders", name, "a", None, release=True)
    second = decide(store, "g", "orders", "b", SHARDS, set(), 30)
    assert sorted(second.taken) == sorted(again.extra)
    # a member that stops lets its shards go at once; another group is another story
    store.leave("g", "orders", "a")
    rows = {row.shard: row for row in store.read("g", "orders")}
    assert rows["s0"].sequence == "41" and rows["s0"].owner == ""
    assert sorted(decide(store, "g", "orders", "b", SHARDS, set(second.taken), 30).taken) != []
    assert sorted(decide(store, "other", "orders", "c", SHARDS, set(), 30).taken) == ["s0", "s1", "s2", "s3"]


def test_an_expired_lease_is_taken_over_and_its_holder_told(store: CheckpointStore) -> None:
    held = set(decide(store, "g", "orders", "dead", SHARDS, set(), 1).taken)
    time.sleep(1.2)  # the lease's own length: nothing renews it
    taken = decide(store, "g", "orders", "alive", SHARDS, set(), 30).taken
    assert sorted(taken) == sorted(held)
    assert sorted(decide(store, "g", "orders", "dead", SHARDS, held, 30).lost) == sorted(held)


def test_children_wait_for_their_parents_to_finish(store: CheckpointStore) -> None:
    shards = [ShardInfo("p", (), 10), ShardInfo("c1", ("p",), None), ShardInfo("c2", ("p",), None)]
    assert list(decide(store, "g", "orders", "a", shards, set(), 30).taken) == ["p"]
    assert store.checkpoint("g", "orders", "p", "a", "10", finished=True)
    assert sorted(decide(store, "g", "orders", "a", shards, set(), 30).taken) == ["c1", "c2"]
    assert [row.finished for row in store.read("g", "orders")] == [False, False, True]


def test_what_a_kinesis_reply_and_dead_letter_carry() -> None:
    source = [("dhow-source-topic", b"orders"), ("dhow-source-partition", b"shardId-1"),
              ("dhow-source-offset", b"77")]  # fmt: skip
    headers = [("x-request-id", b"r1"), ("dhow-model-version", b"2"), *source]
    record = orjson.loads(carried(Outgoing(b'{"y":[2.0]}', b"k", headers), "json"))
    assert record == {"y": [2.0], "_dhow": {"model_version": "2", "request_id": "r1", "source_stream": "orders",
                                            "source_shard": "shardId-1", "source_sequence": "77"}}  # fmt: skip
    response = b'{"model_name":"m","model_version":"2","outputs":[]}'
    v2 = orjson.loads(carried(Outgoing(response, b"k", headers), "v2-json"))
    assert v2["id"] == "r1" and v2["parameters"]["dhow_source_sequence"] == "77"
    header = (
        b'{"model_name":"m","outputs":[{"name":"y","datatype":"FP32","shape":[1],"parameters":{"binary_data_size":4}}]}'
    )
    body = carried(Outgoing(header + b"\x00\x00\x80?", b"k", [("inference-header-content-length", b"%d" % len(header)),
                                                            *headers]), "v2-binary")  # fmt: skip
    length = header_length(body)
    assert length is not None and body[length:] == b"\x00\x00\x80?"
    assert orjson.loads(body[:length])["parameters"]["dhow_source_shard"] == "shardId-1"
    letter = orjson.loads(carried(Outgoing(b"\xff{bad", b"k", [("dhow-error-code", b"INVALID_ARGUMENT"),
                                                               ("dhow-error-reason", b"malformed JSON"), *source]),
                                  DEAD_LETTER))  # fmt: skip
    assert base64.b64decode(letter["data_base64"]) == b"\xff{bad" and letter["error_reason"] == "malformed JSON"
    assert (letter["source_shard"], letter["source_sequence"], letter["partition_key"]) == ("shardId-1", "77", "k")
    assert header_length(b"not json") is None and header_length(b'{"a": 1} tail') == 8
