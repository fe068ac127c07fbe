"""The stream door's pieces that need no broker: endpoints, stream settings, offsets, message formats."""

from __future__ import annotations

import json
import threading
from pathlib import Path

import numpy as np
import orjson
import pytest

from dhow.core.errors import DhowError, InvalidInput
from dhow.core.model_config import TensorSpec
from dhow.core.types import InferenceRequest, InferenceResponse, Tensor
from dhow.settings import resolve_settings
from dhow.streaming import StreamSpec, parse_streams
from dhow.streaming.endpoints import parse_endpoint
from dhow.streaming.formats import Decoded, message_format
from dhow.streaming.offsets import OffsetTracker
from dhow.streaming.records import Position, Record
from dhow.streaming.rows import Answered, run_stack, split_rows, stack_requests

KAFKA = "kafka://127.0.0.1:9092"


def test_endpoints_say_what_is_wrong() -> None:
    endpoint = parse_endpoint(f"{KAFKA},10.0.0.2:9093/requests?security.protocol=SSL", "--source")
    assert endpoint.servers == "127.0.0.1:9092,10.0.0.2:9093" and endpoint.topic == "requests"
    assert endpoint.options == {"security.protocol": "SSL"} and "SSL" not in str(endpoint)
    for text, words in [
        ("127.0.0.1:9092/requests", "expects kafka://HOST:PORT/TOPIC"),
        ("kafka://127.0.0.1/requests", "no HOST:PORT"),
        (f"{KAFKA}/", "no valid topic"),
        (f"{KAFKA}/a b", "no valid topic"),
    ]:
        with pytest.raises(InvalidInput, match=words):
            parse_endpoint(text, "--source")
    kinesis = parse_endpoint("kinesis://orders?region=eu-west-1&lease_s=5", "--source")
    assert (kinesis.scheme, kinesis.topic, kinesis.options["region"], str(kinesis)) == (
        "kinesis", "orders", "eu-west-1", "kinesis://orders",
    )  # fmt: skip
    for text, words in [
        ("kinesis://", "no valid stream"),
        ("kinesis://orders?regoin=eu-west-1", "unknown option 'regoin'"),
        ("kinesis://orders?endpoint=localhost:4567", "must be an http:// or https:// URL"),
        ("kinesis://orders?lease_s=0", "lease_s must be a number of seconds"),
    ]:
        with pytest.raises(InvalidInput, match=words):
            parse_endpoint(text, "--source")


_BASE = {"model": "tabular", "source": f"{KAFKA}/in", "sink": f"{KAFKA}/out", "dead_letter": f"{KAFKA}/dlq"}


def _spec(**fields: str) -> StreamSpec:
    return StreamSpec.build(**{**_BASE, **fields})  # type: ignore[arg-type]


def test_a_stream_that_could_lose_a_message_is_refused() -> None:
    spec = _spec(model="tabular:2")
    assert (spec.model, spec.version, spec.name, spec.group) == ("tabular", "2", "tabular.in", "dhow.tabular.in")
    with pytest.raises(InvalidInput, match=r"no dead-letter destination.*--on-error skip"):
        _spec(dead_letter="")
    assert _spec(dead_letter="", on_error="skip").dead_letter is None
    with pytest.raises(InvalidInput, match="choose one"):
        _spec(on_error="skip")
    with pytest.raises(InvalidInput, match="write into the topic it reads"):
        _spec(sink=f"{KAFKA}/in")
    with pytest.raises(InvalidInput, match="version after ':' must be an integer"):
        _spec(model="tabular:latest")
    with pytest.raises(InvalidInput, match="format 'avro'"):
        _spec(format="avro")


def test_exactly_once_with_a_kinesis_end_is_refused() -> None:
    kinesis = "kinesis://orders?region=eu-west-1"
    cases = [
        ({"source": kinesis}, "source is a Kinesis stream"), ({"sink": kinesis}, "sink is a Kinesis stream"),
        ({"dead_letter": kinesis}, "dead_letter is a Kinesis stream"),
        ({"source": kinesis, "sink": "kinesis://replies"}, "source and sink are Kinesis streams"),
    ]  # fmt: skip
    for fields, ends in cases:
        assert not StreamSpec.build(**{**_BASE, **fields}).exactly_once  # type: ignore[arg-type]
        with pytest.raises(InvalidInput, match=rf"needs Kafka transactions and Kinesis has none: its {ends}; "
                           "run it without --exactly-once"):  # fmt: skip
            StreamSpec.build(**{**_BASE, **fields}, exactly_once=True)  # type: ignore[arg-type]
    with pytest.raises(InvalidInput, match=r"^settings: streams\[0\]: stream 'tabular.orders': exactly_once"):
        parse_streams([{**_BASE, "source": kinesis, "exactly_once": True}], "settings")
    assert StreamSpec.build(**_BASE, exactly_once=True).exactly_once  # Kafka ends: taken


def test_streams_of_the_settings_file_and_environment(tmp_path: object) -> None:
    entry = {"model": "tabular", "source": f"{KAFKA}/in", "sink": f"{KAFKA}/out", "dead-letter": f"{KAFKA}/dlq"}
    settings = resolve_settings({}, env={"DHOW_STREAMS": orjson.dumps([entry]).decode()})
    (spec,) = parse_streams(list(settings.streams), "settings 'streams'")
    assert spec.dead_letter is not None and spec.dead_letter.topic == "dlq"
    with pytest.raises(InvalidInput, match=r"streams\[0\]: unknown field 'sinks'"):
        parse_streams([{**entry, "sinks": "x"}], "settings")
    with pytest.raises(InvalidInput, match=r"streams\[0\] needs 'sink'"):
        parse_streams([{"model": "tabular", "source": f"{KAFKA}/in"}], "settings")
    with pytest.raises(InvalidInput, match="two streams are named"):
        parse_streams([entry, entry], "settings")
    (once,) = parse_streams([{**entry, "exactly_once": True}], "settings")
    assert once.exactly_once and not spec.exactly_once
    with pytest.raises(InvalidInput, match="exactly_once must be true or false"):
        parse_streams([{**entry, "exactly_once": "yes"}], "settings")
    with pytest.raises(InvalidInput, match="dead-letter topic must be on the sink's brokers"):
        parse_streams([{**entry, "exactly_once": True, "dead_letter": "kafka://elsewhere:9092/dlq"}], "settings")
    with pytest.raises(DhowError, match="'streams' expects"):
        resolve_settings({}, env={"DHOW_STREAMS": "just text"})


def test_offsets_commit_past_the_done_records_only() -> None:
    offsets = OffsetTracker()
    partition = ("in", 0)
    for offset in range(10, 15):
        offsets.take(partition, offset)
    offsets.done(partition, 12)
    offsets.done(partition, 11)
    assert offsets.committable() == {}  # 10 is not done: nothing after it may be committed
    offsets.done(partition, 10)
    assert offsets.committable() == {partition: 13} and offsets.committable() == {}
    assert offsets.in_flight() == 2
    offsets.restore({partition: 13})  # a failed commit is tried again with the next one
    assert offsets.committable() == {partition: 13}

    # a revoked partition waits for its records in flight, which finish on another thread
    finisher = threading.Timer(0.05, lambda: [offsets.done(partition, o) for o in (13, 14)])
    finisher.start()
    assert offsets.wait_drained([partition], timeout_s=10)
    assert offsets.committable([partition]) == {partition: 15}
    offsets.forget([partition])
    offsets.done(partition, 15)  # a record of a partition let go is ignored
    assert offsets.committable() == {}


def _record(value: bytes, *headers: tuple[str, bytes]) -> Record:
    return Record(value, b"k", list(headers), Position("in", 0, 7))


_INPUTS = [TensorSpec("input", "FP32", (-1, 3)), TensorSpec("mask", "BOOL", (-1,), optional=True)]


def test_json_records_are_rows_of_the_model() -> None:
    json = message_format("json")
    request = json.decode(_record(b'{"input": [1, 2, 3]}', ("X-Request-Id", b"abc")), "m", "", _INPUTS)
    assert request.id == "abc" and request.inputs[0].shape == [1, 3]
    np.testing.assert_array_equal(request.inputs[0].data, np.array([[1, 2, 3]], dtype=np.float32))
    for value, words in [
        (b"[1, 2]", "must be an object"),
        (b'{"input": [1, 2, 3], "extra": 1}', "no input 'extra'; its inputs are: input, mask"),
        (b'{"mask": true}', "the record has no 'input'"),
        (b'{"input": [[1, 2], [3]]}', "ragged"),
        (b'{"input": [[1, 2, 3]]}', r"expected a row of shape \[3\]"),
        (b'{"input": ["a", "b", "c"]}', "FP32 data must be numbers"),
        (b"{", "malformed JSON"),
    ]:
        with pytest.raises(InvalidInput, match=words):
            json.decode(_record(value), "m", "", _INPUTS)
    outputs = [
        Tensor("label", "INT64", [1], np.array([4])),
        Tensor("p", "FP32", [1, 2], np.array([[0.25, 0.75]], np.float32)),
    ]
    response = InferenceResponse("m", "1", outputs)
    body, headers = json.encode(request, response)
    assert orjson.loads(body) == {"label": 4, "p": [0.25, 0.75]} and headers == []


def test_v2_messages_use_the_rest_codec() -> None:
    blob = np.array([[1, 2, 3]], "<f4").tobytes()
    header = (
        b'{"inputs": [{"name": "input", "datatype": "FP32", "shape": [1, 3], "parameters": {"binary_data_size": 12}}]}'
    )
    binary = message_format("v2-binary")
    record = _record(header + blob, ("inference-header-content-length", str(len(header)).encode()))
    request = binary.decode(record, "m", "2", [])
    assert request.model_version == "2" and request.parameters["binary_data_output"] is True
    response = InferenceResponse("m", "2", [Tensor("label", "INT64", [1], np.array([4]))])
    body, headers = binary.encode(request, response)
    length = int(dict(headers)["inference-header-content-length"])
    assert np.frombuffer(body[length:], "<i8").tolist() == [4]
    with pytest.raises(InvalidInput, match="must be a number of bytes"):
        binary.decode(_record(header, ("inference-header-content-length", b"many")), "m", "", [])
    body, headers = message_format("v2-json").encode(message_format("v2-json").decode(_record(
        b'{"inputs": [{"name": "input", "datatype": "FP32", "shape": [1, 3], "data": [1, 2, 3]}]}'), "m", "", []),
        response)  # fmt: skip
    assert orjson.loads(body)["outputs"][0]["data"] == [4] and headers == []


def test_one_row_messages_are_stacked_and_a_bad_row_answered_alone() -> None:
    import asyncio

    calls: list[int] = []

    async def infer(request: InferenceRequest) -> InferenceResponse:
        x = request.inputs[0].data
        calls.append(len(x))
        if (x < 0).any():
            raise InvalidInput(f"negative value in row(s) of {len(x)}")
        return InferenceResponse("m", "1", [Tensor("y", "FP32", list(x.shape), x * 2)], id=request.id)

    def row(value: float, width: int = 1) -> InferenceRequest:
        data = np.full((1, width), value, np.float32)
        return InferenceRequest("m", [Tensor("x", "FP32", [1, width], data)], id=f"id{value}")

    requests = dict(enumerate([row(1), row(2), row(-3), row(4), row(5), row(6, width=2)]))
    stacks = stack_requests(requests)
    assert [s.indices for s in stacks] == [[0, 1, 2, 3, 4], [5]]  # another row shape: a stack of its own

    async def answers() -> list[tuple[list[Answered], dict[int, BaseException]]]:
        return await asyncio.gather(*(run_stack(infer, stack, 4) for stack in stacks))

    answered: dict[int, InferenceResponse] = {}
    failed: dict[int, BaseException] = {}
    for done, errors in asyncio.run(answers()):
        failed.update(errors)
        for a in done:
            answered.update(zip(a.indices, split_rows(a, [requests[i].id for i in a.indices]), strict=True))
    assert {i: r.outputs[0].data.tolist() for i, r in answered.items()} == {
        0: [[2.0]], 1: [[4.0]], 3: [[8.0]], 4: [[10.0]], 5: [[12.0, 12.0]]
    }  # fmt: skip
    assert [answered[i].id for i in (0, 1, 3, 4, 5)] == ["id1", "id2", "id4", "id5", "id6"]
    assert list(failed) == [2] and isinstance(failed[2], InvalidInput) and "of 1" in failed[2].message
    # the first four in one request, refused, then one by one; the fifth alone (the rest of the stack), the
    # sixth alone (another shape)
    assert sorted(calls) == [1, 1, 1, 1, 1, 1, 4]


def test_json_messages_are_decoded_together_and_bad_ones_set_aside() -> None:
    json = message_format("json")
    inputs = [TensorSpec("input", "FP32", (-1, 3))]
    values = [b'{"input": [1, 2, 3]}', b"{", b'{"input": [4, 5, 6]}', b'{"input": [[7]]}', b'{"input": [0, 1, 0]}']
    records = [Record(v, str(i).encode(), [], Position("in", 0, i)) for i, v in enumerate(values)]
    decoded = json.decode_batch(records, "m", "", inputs, "eu")
    # the rows that fit, in one stack; each bad one with its own reason
    assert [s.indices for s in decoded.stacks] == [[0, 2, 4]]
    stack = decoded.stacks[0].request
    assert stack.inputs[0].shape == [3, 3] and stack.parameters == {"data_region": "eu"}
    np.testing.assert_array_equal(stack.inputs[0].data, np.array([[1, 2, 3], [4, 5, 6], [0, 1, 0]], np.float32))
    assert sorted(decoded.errors) == [1, 3]
    assert "malformed JSON" in decoded.errors[1].message and "of shape [3]" in decoded.errors[3].message
    # a boolean among the rows: the batch is decoded one by one, and only that row refused; a row of another
    # length goes alone (the model says what is wrong with it)
    records.append(Record(b'{"input": [1, true, 0]}', b"b", [], Position("in", 0, 5)))
    records.append(Record(b'{"input": [1, 2]}', b"c", [], Position("in", 0, 6)))
    decoded = json.decode_batch(records, "m", "", inputs, "")
    assert sorted(decoded.errors) == [1, 3, 5] and [s.indices for s in decoded.stacks] == [[0, 2, 4], [6]]
    outputs = [
        Tensor("label", "INT64", [2], np.array([4, 5])),
        Tensor("p", "FP32", [2, 2], np.array([[0.25, 0.75], [0.5, 0.5]], np.float32)),
    ]
    replies = json.encode_answered(decoded, Answered(InferenceResponse("m", "1", outputs), [0, 2]))
    assert [(i, orjson.loads(body)) for i, body, _, _ in replies] == [
        (0, {"label": 4, "p": [0.25, 0.75]}), (2, {"label": 5, "p": [0.5, 0.5]})
    ]  # fmt: skip


@pytest.mark.parametrize("name", ["json", "v2-json", "v2-binary"])
def test_a_message_with_nan_or_infinity_is_refused_saying_json_has_none(name: str) -> None:
    """Python's json.dumps writes NaN and Infinity, which JSON has not: the message is set aside (its rows' stack
    goes on without it) with the parser's place and the way its sender can send them."""
    fmt = message_format(name)
    inputs = [TensorSpec("input", "FP32", (-1, 3))]

    def message(row: list[float]) -> bytes:
        if name == "json":
            return json.dumps({"input": row}).encode()
        return json.dumps({"inputs": [{"name": "input", "datatype": "FP32", "shape": [1, 3], "data": row}]}).encode()

    values = [message([1, 2, 3]), message([1.0, float("nan"), 2.0]), message([4, 5, 6]), message([float("inf"), 0, 0])]
    records = [
        Record(v, str(i).encode(), [("inference-header-content-length", str(len(v)).encode())] * (name == "v2-binary"),
               Position("in", 0, i))
        for i, v in enumerate(values)
    ]  # fmt: skip
    decoded = fmt.decode_batch(records, "m", "", inputs, "")
    assert sorted(decoded.errors) == [1, 3] and [s.indices for s in decoded.stacks] == [[0, 2]]
    for index in (1, 3):
        message_text = decoded.errors[index].message
        assert message_text.startswith("malformed JSON") and "column" in message_text, message_text
        assert "JSON has no NaN or Infinity" in message_text, message_text
        if name == "json":  # the sender's way is a consumer of another format: the consumer's option, named so
            assert "consumer run with --format v2-binary" in message_text, message_text
        else:  # a v2 sender's own way: binary tensors, whichever v2 format the consumer reads
            assert "binary data extension" in message_text and "inference-header-content-length" in message_text
            assert "--format" not in message_text, message_text


@pytest.mark.parametrize(
    "poison",
    [b'{"input": [1, false, 0]}', b'{"input": [1, true, 0]}', b'{"input": [null, 1, 0]}',
     b'{"\\u0069nput": [1, true, 0]}', b'{"input": [1, 2, 3], "input": [1, false, 0]}',
     b'{"in\\u0070ut": [1, false, 0]}'],
)  # fmt: skip
def test_a_json_boolean_among_stacked_rows_is_found_by_the_letter_counts(poison: bytes) -> None:
    """The rows' booleans are looked for by counting u and l over all messages at once (no search in each): a
    true, false or null in a value, a key written with an escape or twice, each makes the counts differ, and the
    one message is refused instead of read as 1 or 0."""
    json = message_format("json")
    inputs = [TensorSpec("input", "FP32", (-1, 3))]
    values = [b'{"input": [1, 2, 3]}', poison, b'{ "input" : [4.5e-3, -5, 6] }']
    records = [Record(v, str(i).encode(), [], Position("in", 0, i)) for i, v in enumerate(values)]
    decoded = json.decode_batch(records, "m", "", inputs, "")
    assert list(decoded.errors) == [1], decoded.errors
    assert any(word in decoded.errors[1].message for word in ("boolean", "nulls")), decoded.errors[1].message
    rows = np.concatenate([s.request.inputs[0].data for s in decoded.stacks])
    np.testing.assert_array_equal(rows, np.array([[1, 2, 3], [4.5e-3, -5, 6]], np.float32))


def test_a_batch_of_latencies_lands_in_the_buckets_observe_would_choose() -> None:
    from prometheus_client import CollectorRegistry, Histogram, generate_latest

    from dhow.monitoring.streams import _LATENCY, StreamMetrics

    seconds = [0.001, 0.005, 0.0051, 0.3, 99.0, 60.0, 2.5, 0.0]
    batched = CollectorRegistry()
    StreamMetrics(batched).answered("s", seconds)
    one_by_one = CollectorRegistry()
    histogram = Histogram("dhow_stream_latency_seconds", "", ["stream"], buckets=_LATENCY, registry=one_by_one)
    for value in seconds:
        histogram.labels("s").observe(value)

    def series(registry: CollectorRegistry) -> list[str]:
        lines = generate_latest(registry).decode().splitlines()
        return [line for line in lines if line.startswith("dhow_stream_latency_seconds_") and "_created" not in line]

    assert series(batched) == series(one_by_one) and len(series(batched)) == len(_LATENCY) + 3


def test_json_replies_cut_from_one_serialization_equal_a_row_at_a_time() -> None:
    json = message_format("json")
    rng = np.random.default_rng(1)
    outputs = [
        Tensor("label", "INT64", [3], np.array([4, -5, 6])),
        Tensor("p", "FP32", [3, 2], rng.random((3, 2)).astype(np.float32)),
        Tensor("cube", "FP64", [3, 2, 2], rng.random((3, 2, 2))),
        Tensor("flag", "BOOL", [3, 1], np.array([[True], [False], [True]])),
    ]
    for chosen in (outputs, [*outputs, Tensor("word", "BYTES", [3], np.array([b"a", b"b", b"c"], dtype=object))]):
        response = InferenceResponse("m", "1", chosen)
        replies = json.encode_answered(Decoded(), Answered(response, [0, 1, 2]))
        for j, (index, body, _, _) in enumerate(replies):
            one = InferenceResponse(
                "m", "1", [Tensor(t.name, t.datatype, [1, *t.shape[1:]], t.data[j : j + 1]) for t in chosen]
            )
            assert index == j and orjson.loads(body) == orjson.loads(json.encode(None, one)[0])  # type: ignore[arg-type]
            assert body == json.encode(None, one)[0]  # type: ignore[arg-type]


def test_v2_replies_cut_from_one_serialization_equal_the_rest_codecs() -> None:
    v2 = message_format("v2-json")
    rng = np.random.default_rng(2)
    outputs = [
        Tensor("label", "INT64", [3], np.array([4, -5, 6])),
        Tensor("p", "FP32", [3, 2], rng.random((3, 2)).astype(np.float32)),
        Tensor("cube", "FP64", [3, 2, 2], rng.random((3, 2, 2))),
    ]
    requests = {
        i: InferenceRequest("m", [Tensor("x", "FP32", [1, 1], np.zeros((1, 1), np.float32))], id=name)
        for i, name in enumerate(["a", "", "c"])
    }
    for parameters in ({}, {"sequence": 7}):
        response = InferenceResponse("m", "3", outputs, parameters=parameters)
        decoded = Decoded(requests=requests)
        replies = v2.encode_answered(decoded, Answered(response, [0, 1, 2]))
        rows = [
            InferenceResponse("m", "3", [Tensor(t.name, t.datatype, [1, *t.shape[1:]], t.data[j : j + 1])
                                         for t in outputs], id=requests[j].id, parameters=parameters)
            for j in range(3)
        ]  # fmt: skip
        assert [body for _, body, _, _ in replies] == [v2.encode(requests[j], rows[j])[0] for j in range(3)]
        assert [request_id for _, _, _, request_id in replies] == ["a", "", "c"]


def test_plain_v2_requests_are_decoded_together_and_others_by_the_rest_codec() -> None:
    v2 = message_format("v2-json")

    def request(data: object, **extra: object) -> bytes:
        return orjson.dumps({"inputs": [{"name": "x", "datatype": "FP32", "shape": [1, 2], "data": data}], **extra})

    values = [
        request([1, 2], id="a"),
        request([3, 4]),
        b"{",  # malformed: the codec says so
        request([5, 6], outputs=[{"name": "y"}]),  # outputs of its own: alone, by the codec
        request([7, 8], parameters={"p": 1}),  # other parameters: a stack of its own
        request([9, True]),  # a boolean among numbers: refused by the codec, alone
        request([[10, 11]], id="k"),  # nested data of the same shape: stacked with the first two
    ]
    records = [Record(v, str(i).encode(), [], Position("in", 0, i)) for i, v in enumerate(values)]
    decoded = v2.decode_batch(records, "m", "", [], "eu")
    assert sorted(decoded.errors) == [2, 5]
    assert "malformed JSON" in decoded.errors[2].message and "boolean" in decoded.errors[5].message
    by_indices = {tuple(s.indices): s for s in decoded.stacks}
    assert set(by_indices) == {(0, 1, 6), (4,), (3,)}
    stack = by_indices[(0, 1, 6)].request
    np.testing.assert_array_equal(stack.inputs[0].data, np.array([[1, 2], [3, 4], [10, 11]], np.float32))
    assert stack.inputs[0].shape == [3, 2] and stack.parameters == {"data_region": "eu"}
    assert by_indices[(4,)].request.parameters == {"p": 1, "data_region": "eu"}
    assert [decoded.requests[i].id for i in (0, 1, 6)] == ["a", "", "k"]
    assert decoded.requests[3].outputs is not None and by_indices[(3,)].whole


def test_each_worker_writes_its_own_status_and_status_finds_them_by_the_stream_s_name(tmp_path: Path) -> None:
    from dhow.streaming.status import StreamStatus, read_statuses, status_folder

    for worker in (1, 2):
        StreamStatus("s.x", "m", "in", "out", "", "g", worker=worker).write(status_folder(tmp_path))
    StreamStatus("s.x.2", "m", "in", "out", "", "g").write(status_folder(tmp_path))
    assert [(s["name"], s["worker"]) for s in read_statuses(tmp_path, "s.x")] == [("s.x", 1), ("s.x", 2)]
    assert [s["name"] for s in read_statuses(tmp_path)] == ["s.x.2", "s.x", "s.x"]
    with pytest.raises(InvalidInput, match=r"streams: s\.x, s\.x\.2\)"):
        read_statuses(tmp_path, "nope")
