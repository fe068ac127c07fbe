"""The payload log's sinks as ``--payload-log`` names them: bad URLs refused saying what is expected, a file
rotated keeping ``backups`` files, one file per worker when several share the ports; the writer process's
rendering of an event, masked."""

from __future__ import annotations

import collections
import json
import re
import threading
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from dhow.core.errors import InvalidInput
from dhow.core.frames import split_frames
from dhow.core.types import Caller, InferenceRequest, InferenceResponse, Tensor
from dhow.core.wire.v2 import decode_request, encode_response
from dhow.governance.masking import Masker, parse_masking
from dhow.monitoring.payload_log import ANSWER, MASKING, TENSORS, PayloadLog, frame_events, read_events
from dhow.monitoring.payload_sinks import FileSink, open_sink, worker_sink_url
from dhow.serving.payload_render import cloud_event, cloud_events
from tests.payload_kafka_broker import KafkaBroker, payload_kafka_broker  # noqa: F401 (a fixture)


class _Counts:
    def __init__(self) -> None:
        self.logged_count = 0
        self.failures: list[str] = []

    def logged(self, count: int) -> None:
        self.logged_count += count

    def dropped(self, count: int) -> None:
        raise AssertionError("a file sink has no buffer of its own to drop from")

    def failed(self, count: int, reason: str) -> None:
        self.failures.append(reason)


@pytest.mark.parametrize(
    ("url", "said"),
    [
        ("ftp://host/x", "expected file:///PATH.jsonl, kafka://HOST:PORT/TOPIC or http(s)://HOST/PATH"),
        ("kafka://127.0.0.1:9092", "expected kafka://HOST:PORT[,HOST:PORT]/TOPIC"),
        ("kafka://127.0.0.1:9092/a/b", "expected kafka://HOST:PORT[,HOST:PORT]/TOPIC"),
        ("file:///tmp/x.jsonl?max_size=1", "unknown option(s) ['max_size']; known: max_bytes, backups"),
        ("file:///tmp/x.jsonl?max_bytes=-1", "max_bytes must be a positive number"),
        ("http://127.0.0.1:1/e?mode=binary", "mode must be batch or structured"),
        ("http://127.0.0.1:1/e?timeout=soon", "timeout must be a positive number"),
    ],
)
def test_a_bad_url_is_refused_saying_what_is_expected(url: str, said: str) -> None:
    with pytest.raises(InvalidInput) as refused:
        open_sink(url)
    assert said in refused.value.message and repr(url) in refused.value.message


def test_a_file_url_whose_host_is_not_localhost_is_refused_showing_the_path_meant(tmp_path: Path) -> None:
    """``file://walk/tmp/...`` names the path /tmp/... on the host ``walk``: never what its writer meant."""
    url = f"file://walk{tmp_path}/e.jsonl"
    with pytest.raises(InvalidInput) as refused:
        open_sink(url)
    assert repr(url) in refused.value.message and f"write file:///walk{tmp_path}/e.jsonl" in refused.value.message
    assert not (tmp_path / "e.jsonl").exists()
    assert worker_sink_url(url, 2) == url  # each worker refuses the URL as its user wrote it
    local = open_sink(f"file://localhost{tmp_path}/e.jsonl")
    assert isinstance(local, FileSink) and local.path == tmp_path / "e.jsonl"
    local.close(1)


def test_a_file_urls_path_is_percent_decoded_and_its_query_holds_the_options(tmp_path: Path) -> None:
    """RFC 8089 file URLs percent-encode: ``my%20logs`` is the folder ``my logs``; a ``#`` ends the path (a
    fragment follows), so it is refused showing ``%23``; a plain path is the file name as written."""
    sink = open_sink(f"file://{tmp_path}/my%20logs/run%233.jsonl?max_bytes=100&backups=2")
    assert isinstance(sink, FileSink) and sink.path == tmp_path / "my logs" / "run#3.jsonl"
    assert (sink.max_bytes, sink.backups) == (100, 2)
    sink.close(1)
    url = f"file://{tmp_path}/run#3/e.jsonl"
    with pytest.raises(InvalidInput) as refused:
        open_sink(url)
    assert refused.value.message.endswith(f"write # as %23: file://{tmp_path}/run%233/e.jsonl")
    assert not (tmp_path / "run").exists()
    plain = open_sink(f"{tmp_path}/run#3/my%20logs.jsonl")
    assert isinstance(plain, FileSink) and plain.path == tmp_path / "run#3" / "my%20logs.jsonl"
    plain.close(1)


@pytest.mark.parametrize("query", ["max_bytes=1000", "backups=2&max_bytes=5", "max_bytes=1000&colour=red"])
def test_a_plain_path_with_the_options_of_a_file_url_is_refused_showing_that_url(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, query: str
) -> None:
    """A plain path is the file name as written, so ``e.jsonl?max_bytes=1000`` would silently be a file of that
    name with the default options: refused, showing the file URL whose query the options are (an absolute path,
    percent-encoded); a plain ``?`` that holds no option is still part of the name."""
    monkeypatch.chdir(tmp_path)
    for url, meant in ((f"{tmp_path}/my logs/e.jsonl?{query}", f"file://{tmp_path}/my%20logs/e.jsonl?{query}"),
                       (f"run#1/e.jsonl?{query}", f"file://{tmp_path}/run%231/e.jsonl?{query}"),
                       (f"a?b/e.jsonl?{query}", f"file://{tmp_path}/a%3Fb/e.jsonl?{query}")):  # fmt: skip
        with pytest.raises(InvalidInput) as refused:
            open_sink(url)
        assert repr(url) in refused.value.message and refused.value.message.endswith(meant)
        assert worker_sink_url(url, 2) == url  # each worker refuses it as its user wrote it
    assert not any(tmp_path.iterdir())
    plain = open_sink(f"{tmp_path}/e?v2.jsonl")
    assert isinstance(plain, FileSink) and plain.path == tmp_path / "e?v2.jsonl"
    plain.close(1)


def test_a_kafka_setting_librdkafka_refuses_is_named() -> None:
    with pytest.raises(InvalidInput, match=r"no\.such\.setting"):
        open_sink("kafka://127.0.0.1:9/topic?no.such.setting=1")


def test_the_file_rotates_keeping_backups(tmp_path: Path) -> None:
    sink = open_sink(f"file://{tmp_path}/events.jsonl?max_bytes=100&backups=2")
    assert isinstance(sink, FileSink)
    counts = _Counts()
    for n in range(10):
        sink.write([(str(n), b'{"n": %d, "pad": "%s"}' % (n, b"x" * 40))], counts)
    sink.close(1)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["events.jsonl", "events.jsonl.1", "events.jsonl.2"]
    assert counts.logged_count == 10 and not counts.failures
    newest = (tmp_path / "events.jsonl").read_text().splitlines()
    assert newest[-1].startswith('{"n": 9') and all(len(p.read_bytes()) <= 100 for p in tmp_path.iterdir())


def test_a_chunk_written_at_once_still_rotates_before_the_line_that_would_overflow(tmp_path: Path) -> None:
    """The sink writes a chunk of events in one write when it fits, line by line when it would pass max_bytes."""
    sink = open_sink(f"file://{tmp_path}/events.jsonl?max_bytes=200&backups=3")
    counts = _Counts()
    lines = [b'{"n": %d, "pad": "%s"}' % (n, b"x" * 40) for n in range(6)]  # 60 bytes a line with its newline
    sink.write([(str(n), line) for n, line in enumerate(lines[:3])], counts)  # 180 bytes: fits, one write
    sink.write([(str(n), line) for n, line in enumerate(lines[3:], 3)], counts)  # rotates before the 4th line
    sink.close(1)
    current, older = (tmp_path / "events.jsonl").read_bytes(), (tmp_path / "events.jsonl.1").read_bytes()
    assert older == b"".join(line + b"\n" for line in lines[:3])
    assert current == b"".join(line + b"\n" for line in lines[3:])
    assert counts.logged_count == 6 and not counts.failures


def test_the_event_is_one_line_of_a_cloudevent_with_its_envelope() -> None:
    """The rendered bytes: one line of JSON (JSON Lines), the CloudEvents envelope, the time in RFC 3339 with
    microseconds, the latency in milliseconds to the microsecond, the request as the client sent it (its newlines
    made spaces) and the outputs as the client got them, cut out of the JSON answer as they are."""
    masker = Masker(parse_masking(None, "pii"), b"")
    body = json.dumps({"inputs": [{"name": "x", "shape": [1, 3], "datatype": "FP32", "data": [0.1, -2, 3e-7]}]},
                      indent=2)  # fmt: skip
    answer = _answer(Tensor("label", "INT64", [1], np.array([1])),
                     Tensor("p", "FP32", [1, 2], np.array([[0.25, 0.75]], np.float32)))  # fmt: skip
    event = ["r-3", "tabular", "2", "alice", "acme", "eu", "success", "", 1_700_000_000.25, 0.0012344, {"k": 1},
             body, answer, 1]  # fmt: skip
    written = cloud_event(event, masker, "dhow://test")
    assert b"\n" not in written and b"\r" not in written
    document = json.loads(written)
    assert document.pop("id")
    assert document == {
        "specversion": "1.0", "source": "dhow://test", "type": "io.dhow.inference.response",
        "subject": "tabular/2", "time": "2023-11-14T22:13:20.250000Z", "datacontenttype": "application/json",
        "data": {"request_id": "r-3", "model": "tabular", "version": "2", "principal": "alice", "tenant": "acme",
                 "data_region": "eu", "outcome": "success", "latency_ms": 1.234, "parameters": {"k": 1},
                 "request": json.loads(body), "outputs": json.loads(answer)["outputs"]},
    }  # fmt: skip
    assert document["data"]["outputs"] == [
        {"name": "label", "datatype": "INT64", "shape": [1], "data": [1]},
        {"name": "p", "datatype": "FP32", "shape": [1, 2], "data": [0.25, 0.75]},
    ]
    assert json.dumps(json.loads(body), indent=2).replace("\n", " ").encode() in written, "embedded as it came"
    assert answer[answer.index(b'"outputs":') + 10 : -1] in written, "the answer's outputs as they are"


def _answer(*tensors: Tensor, id: str = "", parameters: dict[str, Any] | None = None) -> bytes:
    """A JSON answer as the REST door sends it (``wire.v2.encode_response``)."""
    response = InferenceResponse("notes", "1", list(tensors), id=id, parameters=parameters or {})
    return encode_response(response, InferenceRequest("notes", []))[0]


def test_each_worker_gets_a_file_of_its_own() -> None:
    assert worker_sink_url("file:///var/log/e.jsonl?max_bytes=5", 2) == "file:///var/log/e.worker-2.jsonl?max_bytes=5"
    assert worker_sink_url("/var/log/e.jsonl", 1) == "/var/log/e.worker-1.jsonl"
    # the name is read decoded (an escaped dot starts the suffix), the URL stays encoded; a plain path as written
    assert worker_sink_url("file:///my%20logs/e%2Ejsonl?backups=2", 2) == "file:///my%20logs/e.worker-2.jsonl?backups=2"
    assert worker_sink_url("file:///logs/run%233.jsonl", 2) == "file:///logs/run%233.worker-2.jsonl"
    assert worker_sink_url("/logs/run#3/my%20e.jsonl", 1) == "/logs/run#3/my%20e.worker-1.jsonl"
    assert worker_sink_url("file:///logs/run#3/e.jsonl", 1) == "file:///logs/run#3/e.jsonl"  # refused at open
    assert worker_sink_url("kafka://a:9092/t", 3) == "kafka://a:9092/t"
    assert worker_sink_url("", 3) == ""


def test_the_writer_masks_text_tensors_and_errors_and_keeps_numbers_as_sent() -> None:
    """The writer process renders what the server handed over (``payload_log.FIELDS``, in a frame of events): text
    tensors and the error message masked by the model's rules, numbers as they came, a field rule applied; decoded
    tensors (gRPC, binary) in the JSON form of the protocol."""
    masker = Masker.from_spec(Masker(parse_masking({"fields": {"account": "hash"}}, "pii"), b"k" * 32).spec())
    tensors = [["text", "BYTES", [1, 1], np.array([[b"mail bob@example.com"]], dtype=object)],
               ["x", "FP32", [1, 2], np.array([[0.5, 2.0]], np.float32)],
               ["account", "INT64", [1, 1], np.array([[12345678]], np.int64)]]  # fmt: skip
    frame = frame_events([], 1000.0, [[
        "r-1", "notes", "1", "key:bot", "acme", "ae", "INVALID_ARGUMENT", "no such user bob@example.com", 1.5, 0.002,
        {"mode": "fast", "nested": {"x": 1}}, tensors, None, 7,
    ]], [])  # fmt: skip
    maskings, events = read_events(split_frames(bytearray(frame))[0])
    assert maskings == [] and events[0][8] == 1001.5, "the perf_counter time made Unix time by the frame's clock"
    data = json.loads(cloud_event(events[0], masker, "dhow://test"))["data"]
    text, x, account = data["request"]["inputs"]
    assert text == {"name": "text", "datatype": "BYTES", "shape": [1, 1], "data": [["mail [REDACTED:email]"]]}
    assert x == {"name": "x", "datatype": "FP32", "shape": [1, 2], "data": [[0.5, 2.0]]}
    assert account["data"][0][0].startswith("hash:"), "a field rule masks numbers too"
    assert data["error"] == "no such user [REDACTED:email]" and data["outcome"] == "INVALID_ARGUMENT"
    assert data["parameters"] == {"mode": "fast"} and "outputs" not in data
    assert data["latency_ms"] == 2.0


def test_a_json_body_with_text_or_named_fields_is_parsed_and_masked() -> None:
    """A REST JSON request goes to the writer as the body the client sent; when a tensor holds text (and the model
    has detectors) or a field rule names one, it is parsed, masked and written again in the same form."""
    body = json.dumps({"id": "c-1", "inputs": [
        {"name": "text", "shape": [1, 1], "datatype": "BYTES", "data": ["to bob@example.com"]},
        {"name": "x", "shape": [2, 2], "datatype": "FP32", "data": [1.5, 2, 3, 4]},
    ]}).encode()  # fmt: skip
    event = ["r-2", "notes", "1", "", "", "", "success", "", 1.0, 0.0, {}, body, [["y", "FP32", [1, 1], [[3.0]]]], 1]
    data = json.loads(cloud_event(event, Masker(parse_masking(None, "pii"), b""), "dhow://test"))["data"]
    text, x = data["request"]["inputs"]
    assert text["data"] == ["to [REDACTED:email]"] and x["data"] == [1.5, 2, 3, 4] and data["request"]["id"] == "c-1"
    assert data["outputs"] == [{"name": "y", "datatype": "FP32", "shape": [1, 1], "data": [[3.0]]}]
    assert "error" not in data

    numbers = json.dumps({"inputs": [{"name": "account", "shape": [1], "datatype": "INT64", "data": [42]}]}).encode()
    named = Masker(parse_masking({"fields": {"account": "hash"}}, "pii"), b"k" * 32)
    event = ["r-3", "notes", "1", "", "", "", "success", "", 1.0, 0.0, {}, numbers, None, 1]
    (account,) = json.loads(cloud_event(event, named, "dhow://test"))["data"]["request"]["inputs"]
    assert account["data"][0].startswith("hash:"), "a field rule on a numeric tensor: parsed and masked"


def test_a_body_that_may_hide_text_is_parsed_not_embedded() -> None:
    """An escaped datatype (``BYT\\u0045S`` is ``BYTES``) cannot slip text past the detectors."""
    body = b'{"inputs": [{"name": "t", "shape": [1], "datatype": "BYT\\u0045S", "data": ["bob@example.com"]}]}'
    event = ["r-4", "notes", "1", "", "", "", "success", "", 1.0, 0.0, {}, body, None, 1]
    written = cloud_event(event, Masker(parse_masking(None, "pii"), b""), "dhow://test")
    assert b"bob@example.com" not in written
    assert json.loads(written)["data"]["request"]["inputs"][0]["data"] == ["[REDACTED:email]"]


_NUMBERS = {"name": "x", "datatype": "FP32", "shape": [1], "data": [1.0]}
_EMAIL = "bob@example.com"


#: bodies the server decodes (``wire.v2.decode_request``) that hold a string besides the protocol's
_DECODABLE = [
    json.dumps({"id": _EMAIL, "inputs": [_NUMBERS]}),
    json.dumps({"parameters": {"c": {"e": _EMAIL}}, "inputs": [_NUMBERS]}),
    json.dumps({"note": _EMAIL, "inputs": [_NUMBERS]}),
    # four members and one more: a repeated key hides a string (the server keeps the last one)
    '{"inputs": [{"name": "x", "datatype": "FP32", "shape": [1], "data": ["bob@example.com"], "data": [1.0]}]}',
    json.dumps({"inputs": [{**_NUMBERS, "parameters": {"w": _EMAIL}}]}),
    # strings that count like a bare request's: six of them in an object of their own
    json.dumps({"inputs": [_NUMBERS], "p": {"datatype": _EMAIL, "b": "c", "d": 1}}),
    # an escaped quote makes one string of what counts as two
    json.dumps({"inputs": [{"name": 'a", "b', "datatype": "BYTES", "shape": [1], "data": [_EMAIL]}]}),
    # keys are text a client chose too: unknown members the server ignores, and a parameter's name
    json.dumps({_EMAIL: 1, "inputs": [_NUMBERS]}),
    json.dumps({"inputs": [{**_NUMBERS, _EMAIL: [1]}]}),
    json.dumps({"parameters": {_EMAIL: 1}, "inputs": [_NUMBERS]}),
]
#: bodies the server refuses (no event holds them with a count of tensors): a ragged text tensor whose first
#: element is an empty list, and strings whose count is made up by text
_REFUSED = [
    json.dumps({"inputs": [{"name": "t", "datatype": "BYTES", "shape": [1], "data": [[], _EMAIL]}]}),
    json.dumps({"inputs": [{"datatype": "FP32", "shape": [1], "data": [_EMAIL], "x": 1}]}),
    json.dumps({"inputs": [{"name": 1, "datatype": "FP32", "shape": [1], "data": [_EMAIL]}]}),
    json.dumps({"inputs": [{**_NUMBERS, "data": _EMAIL}]}),
]


@pytest.mark.parametrize("body", _DECODABLE + _REFUSED)
def test_no_string_outside_a_bare_requests_names_escapes_the_detectors(body: str) -> None:
    """Only a bare request (``{"inputs": [...]}``, tensors of name, datatype, shape and numbers) is written as
    sent; an id, parameters, another key or a repeated one, anywhere, is parsed and masked. Here the event does not
    say how many tensors the server decoded: the body is parsed to tell."""
    masker = Masker(parse_masking(None, "pii"), b"")
    event = ["r-5", "notes", "1", "", "", "", "success", "", 1.0, 0.0, {}, body.encode(), None, 1]
    written = cloud_event(event, masker, "dhow://test")
    assert _EMAIL.encode() not in written
    json.loads(written)
    bare = {"inputs": [_NUMBERS, {**_NUMBERS, "name": "y"}]}
    event[11] = json.dumps(bare).encode()
    assert json.loads(cloud_event(event, masker, "dhow://test"))["data"]["request"] == bare


@pytest.mark.parametrize("body", _DECODABLE)
def test_a_bodys_quotes_counted_against_its_tensors_let_no_other_string_through(body: str) -> None:
    """With the number of tensors the server decoded from the body (as ``PayloadLog.offer`` hands it over), a
    count of its quotes alone tells a bare request: every body above has a string more, and is masked."""
    tensors = len(decode_request(body.encode(), "notes").inputs)
    masker = Masker(parse_masking(None, "pii"), b"")
    event = ["r-5", "notes", "1", "", "", "", "success", "", 1.0, 0.0, {}, body.encode(), None, 1, tensors]
    written = cloud_event(event, masker, "dhow://test")
    assert _EMAIL.encode() not in written
    json.loads(written)
    bare = json.dumps({"inputs": [_NUMBERS, {**_NUMBERS, "name": "y"}]}, indent=1).encode()
    event[11], event[14] = bare, 2
    assert bare.replace(b"\n", b" ") in cloud_event(event, masker, "dhow://test"), "embedded as it came"


_ANSWERED = (Tensor("y", "FP32", [1, 1], np.array([[3.0]], np.float32)), Tensor("label", "INT64", [1], np.array([1])))
_ANSWER = _answer(*_ANSWERED)


def _chunk_events() -> list[list[Any]]:
    """Events of every kind a chunk may mix: common ones (a bare body, numbers out) and the others."""
    bare = json.dumps({"inputs": [_NUMBERS, {**_NUMBERS, "name": "y"}]}).encode()

    def event(body: bytes, tensors: int, **changes: Any) -> list[Any]:
        made = ["r-1", "notes", "1", "alice", "acme", "eu", "success", "", 1_700_000_000.2500004, 0.0012344, {},
                body, _ANSWER, 1, tensors]  # fmt: skip
        for index, value in changes.items():
            made[int(index[1:])] = value
        return made

    events = [event(bare, 2, i0=f"r-{n}", i8=1_700_000_000 + n / 7) for n in range(8)]
    events += [event(body.encode(), len(decode_request(body.encode(), "notes").inputs)) for body in _DECODABLE]
    events += [
        event(bare, 2, i6="INVALID_ARGUMENT", i7=f"no such user {_EMAIL}", i12=None),
        event(bare, 2, i10={"mode": _EMAIL}),
        event(bare, 2, i12=_answer(Tensor("y", "BYTES", [1, 1], np.array([[_EMAIL.encode()]], object)))),
        event(bare, 2, i12=_answer(Tensor("z", "FP32", [1], np.array([1.5], np.float32)), id=_EMAIL)),
        # the outputs' key in a text the answer holds before its outputs: cut at the outputs
        event(bare, 2, i12=_answer(*_ANSWERED, parameters={"note": '"outputs":[' + _EMAIL})),
        event(bare, 2, i12=b'{"result": "' + _EMAIL.encode() + b'"}'),  # (not an answer of the protocol)
        # outputs as tensors (gRPC, the binary extension, an event made in this process)
        event(bare, 2, i12=[["y", "BYTES", [1, 1], [[_EMAIL]]], ["z", "FP32", [1], [1.5]]]),
        event(bare, 2, i13=2),  # a field rule on x
        event(json.dumps({"inputs": [_NUMBERS]}, indent=1).encode(), 1),  # newlines: as spaces
        event(bare, 2, i0='a","b\\', i8=1_700_000_000.9999996),  # a quote in the id; a time rounded up
        event(bare, 2)[:TENSORS],  # no count of tensors: parsed
    ]
    return events


def test_a_chunk_is_rendered_as_each_event_alone() -> None:
    """The sink's thread renders a chunk column by column (``cloud_events``): each event's line is what
    ``cloud_event`` writes for it alone (but its id, unique), in their order; no text escapes the masking, in a
    chunk of common events alone, of others alone, or mixed."""
    maskers = {1: Masker(parse_masking(None, "pii"), b""),
               2: Masker(parse_masking({"fields": {"x": "hash"}}, "pii"), b"k" * 32)}  # fmt: skip
    events = _chunk_events()
    common = events[:8]
    for chunk in (common * 4, events * 2, events[8:] * 2, common * 3 + events[8:9], events[:1] * 3):
        rendered, failures = cloud_events(chunk, maskers, "dhow://test")
        assert not failures and [key for key, _ in rendered] == [event[0] for event in chunk]
        lines = [line for _, line in rendered]
        assert all(_EMAIL.encode() not in line and b"\n" not in line for line in lines)
        assert len({json.loads(line)["id"] for line in lines}) == len(chunk)
        for event, line in zip(chunk, lines, strict=True):
            alone = cloud_event(event, maskers[event[MASKING]], "dhow://test")
            assert re.sub(rb'"id":"[^"]*"', b"", line) == re.sub(rb'"id":"[^"]*"', b"", alone)


def test_an_event_that_cannot_be_rendered_fails_alone() -> None:
    """An event whose masking the writer was never told of fails, as does one with a value JSON cannot write; the
    others of their chunk are rendered."""
    events = _chunk_events()[:8] * 4
    events[5] = [*events[5][:MASKING], 9, 2]
    events[7] = [*events[7][:12], [["y", "FP32", [1], object()]], 1, 2]
    rendered, failures = cloud_events(events, {1: Masker(parse_masking(None, "pii"), b"")}, "dhow://test")
    assert len(rendered) == 30 and [event for event, _ in failures] == [events[5], events[7]]


def _unstarted_log() -> PayloadLog:
    """A payload log without its writer process: what ``offer`` and ``answered`` queue stays in its queue (no
    flush is due); its counters count."""
    log = PayloadLog.__new__(PayloadLog)
    log._queue, log.capacity, log._gone, log._scheduled = collections.deque(), 100, False, True
    log._maskings, log._new_maskings, log._masking_count, log._by_config = {}, [], 0, {}
    log._numbering, log._unmasked, log._unframed, log._masking_of = threading.Lock(), set(), 0, None
    log._dropped, log._failed = _Count(), _Count()
    log.capacity_bytes, log._bytes = 1 << 30, 0
    return log


def test_a_json_body_goes_to_the_writer_with_its_tensors_count() -> None:
    """An offered JSON body goes after the frame's events, its number of tensors in the event (``TENSORS``)."""
    log = _unstarted_log()
    body = json.dumps({"inputs": [_NUMBERS, {**_NUMBERS, "name": "y"}]}).encode()
    masker = Masker(parse_masking(None, "pii"), b"")
    outputs = [["y", "FP64", [1], np.ones(1)]]
    log.offer(["r-6", "notes", "1", "", "", "", "success", "", 1.0, 0.0, {}, (body, 2), outputs], masker)
    log.offer(["r-7", "notes", "1", "", "", "", "success", "", 1.0, 0.0, {}, [["x", "FP32", [1], np.ones(1)]],
               None], masker)  # fmt: skip
    maskings, events = read_events(split_frames(bytearray(log._frame(list(log._queue))))[0])
    assert [len(event) for event in events] == [15, 14]
    assert events[0][11] == body and events[0][TENSORS] == 2 and events[0][MASKING] == events[1][MASKING] == 1
    assert maskings == [[1, masker.spec()]]
    written = json.loads(cloud_event(events[0], Masker.from_spec(masker.spec()), "dhow://test"))
    assert written["data"]["request"] == json.loads(body)


class _Config:
    """What ``PayloadLog.answered`` reads of a model's config: its name (a reload is another object)."""

    def __init__(self, name: str) -> None:
        self.name = name


class _Count:
    def __init__(self) -> None:
        self.value = 0

    def inc(self, count: int = 1) -> None:
        self.value += count


def test_an_answered_request_becomes_its_event_when_the_frame_is_made() -> None:
    """``answered`` queues what the request holds; the frame makes its event: the caller's id and names, the
    version that answered, its time and latency, its parameters, the JSON body as sent (its tensors' count) or the
    decoded tensors, the JSON answer the door put in the item (``payload_item``) after the body or else the
    answer's tensors, and the number of its model's masking, found once per config (a reloaded config finds it
    again); in a frame with offered events (errors), each keeps its own body and outputs; a full queue drops and
    counts, a writer gone fails and counts."""
    log = _unstarted_log()
    masker = Masker(parse_masking(None, "pii"), b"")
    asked: list[str] = []
    log.use_masking(lambda config: asked.append(config.name) or masker)
    config, reloaded, caller = _Config("notes"), _Config("notes"), Caller("key:ci#1", "acme", "r-1")
    body = json.dumps({"inputs": [_NUMBERS, {**_NUMBERS, "name": "y"}]}).encode()
    sent = decode_request(body, "notes", "", None)
    sent.json_body, sent.parameters = body, {"priority": 2}
    answer = InferenceResponse("notes", "3", [Tensor("y", "FP32", [1], np.array([0.5], np.float32))])
    log.answered((config, "ae", None, caller), 0.0, sent, answer)
    item = sent.payload_item
    assert item is log._queue[0] and item[ANSWER] is answer and len(item) == ANSWER + 1
    rendered = encode_response(answer, sent)[0]
    item[-1] = rendered  # as the REST door does once it sent the answer
    error = ["r-e", "notes", "3", "", "", "", "INVALID_ARGUMENT", "bad", 5.0, 0.0, {}, (b'{"inputs": []}', 0), None]
    log.offer(error, masker)
    binary = InferenceRequest("notes", [Tensor("x", "FP32", [1], np.array([2.0], np.float32))])
    log.answered((reloaded, "", None, replace(caller, request_id="r-2")), 1.0, binary, answer)
    assert binary.payload_item is None, "no JSON body: the answer goes as tensors"
    log.answered((reloaded, "", None, replace(caller, request_id="r-3")), 1.0, sent, answer)
    offered = [["z", "FP64", [2], np.ones(2)]]
    log.offer(["r-o", "notes", "3", "", "", "", "success", "", 1.0, 0.0, {}, (body, 2), offered], masker)
    maskings, events = read_events(split_frames(bytearray(log._frame(list(log._queue))))[0])
    assert asked == ["notes", "notes"] and maskings == [[1, masker.spec()]]
    first, failed, second, third, offered = events
    assert first[:8] == ["r-1", "notes", "3", "key:ci#1", "acme", "ae", "success", ""]
    assert first[8] > 1e9 and first[9] > 0 and first[10] == {"priority": 2}
    assert first[11] == body and first[12] == rendered and first[TENSORS] == 2
    assert first[MASKING] == second[MASKING] == 1
    assert failed[11] == b'{"inputs": []}' and failed[12] is None and failed[TENSORS] == 0
    assert second[0] == "r-2" and second[11] == [["x", "FP32", [1], [2.0]]] and len(second) == 14
    assert second[12] == third[12] == [["y", "FP32", [1], [0.5]]], "the door did not put an answer: its tensors"
    assert third[0] == "r-3" and third[11] == body and offered[11] == body
    assert offered[12] == [["z", "FP64", [2], [1.0, 1.0]]]
    expected = [{"name": "y", "datatype": "FP32", "shape": [1], "data": [0.5]}]
    for event in (first, second, third):
        assert json.loads(cloud_event(event, masker, "dhow://test"))["data"]["outputs"] == expected
    written = json.loads(cloud_event(first, masker, "dhow://test"))["data"]
    assert written["request"] == json.loads(body)
    assert json.loads(cloud_event(offered, masker, "dhow://test"))["data"]["outputs"] == [
        {"name": "z", "datatype": "FP64", "shape": [2], "data": [1.0, 1.0]}
    ]
    log._queue.clear()
    log.capacity = 1
    log.answered((config, "ae", None, caller), 1.0, sent, answer)
    log.answered((config, "ae", None, caller), 1.0, sent, answer)
    log._gone = True
    log.answered((config, "ae", None, caller), 1.0, sent, answer)
    assert len(log._queue) == 1 and log._dropped.value == 1 and log._failed.value == 1


def test_an_answer_whose_masking_cannot_be_made_fails_alone(caplog: pytest.LogCaptureFixture) -> None:
    """A model whose masking cannot be made (its ``pii:`` rules, say): its answered events are counted failed and
    logged once, not handed over; the frame's other events go as they are."""
    log = _unstarted_log()
    masker = Masker(parse_masking(None, "pii"), b"")

    def masking_of(config: _Config) -> Masker:
        if config.name == "broken":
            raise ValueError("pii: no such detector 'emial'")
        return masker

    log.use_masking(masking_of)
    caller = Caller("key:ci#1", "acme", "r-1")
    sent = InferenceRequest("m", [Tensor("x", "FP32", [1], np.array([2.0], np.float32))])
    answer = InferenceResponse("m", "1", [Tensor("y", "FP32", [1], np.array([0.5], np.float32))])
    for name in ("broken", "fine", "broken"):
        log.answered((_Config(name), "", None, caller), 1.0, sent, answer)
    _, events = read_events(split_frames(bytearray(log._frame(list(log._queue))))[0])
    assert [event[1] for event in events] == ["fine"] and log._unframed == 2 and log._failed.value == 2
    assert caplog.text.count("model broken: its masking could not be made") == 1


@pytest.mark.parametrize("depth", [300, 1010])
def test_a_json_body_nested_past_what_masking_takes_is_logged_with_its_top_level_scalars(depth: int) -> None:
    """A JSON body whose parameters are nested past what JSON writing (~255 levels) or masking (Python's recursion)
    takes, for a model with field rules (the body is parsed and masked): its tensors as ever and, of its
    parameters, the top-level scalars, masked by the same rules; nothing of the masked value is written."""
    nested = b'{"d":' * depth + b"{}" + b"}" * depth
    tensor = json.dumps(_NUMBERS).encode()[:-1] + b', "parameters": {"customer": "C-123", "deep": ' + nested + b"}}"
    body = b'{"inputs": [' + tensor + b'], "parameters": {"customer": "C-123", "deep": ' + nested + b"}}"
    masker = Masker(parse_masking({"fields": {"parameters.customer": "hash"}}, "pii"), b"k" * 32)
    event = ["r-1", "m", "1", "", "", "", "success", "", 1.7e9, 0.001, {"customer": "C-123"}, body, None, 1, 1]
    line = cloud_event(event, masker, "dhow://test")
    data = json.loads(line)["data"]
    hashed = data["parameters"]["customer"]
    assert hashed != "C-123" and data["request"]["parameters"] == {"customer": hashed}
    assert data["request"]["inputs"] == [{**_NUMBERS, "parameters": {"customer": hashed}}] and b"C-123" not in line


def test_outputs_that_json_cannot_hold_as_they_are_and_text_in_them_are_written_masked() -> None:
    """An answer's tensors (not sent as JSON: gRPC, the binary extension) go in the event as arrays: the writer
    masks those that hold text; arrays orjson cannot take as they are (not native-endian, integers past 64 bits)
    are written all the same, and the frame's other events with them."""
    log = _unstarted_log()
    body = json.dumps({"inputs": [_NUMBERS]}).encode()
    masker = Masker(parse_masking(None, "pii"), b"")
    outputs: list[list[list[Any]]] = [
        [["y", "FP32", [1, 2], np.array([[0.25, 0.5]], np.float32)], ["label", "INT64", [1], np.array([1])]],
        [["note", "BYTES", [1, 1], np.array([[_EMAIL.encode()]], object)], ["y", "FP64", [1], np.ones(1)]],
        [["big", "INT64", [1], np.array([2**70], object)], ["swapped", "FP64", [1], np.array([1.5], ">f8")]],
        [["swapped", "FP64", [1], np.array([2.5], ">f8")]],
    ]
    for n, each in enumerate(outputs):
        log.offer([f"r-{n}", "notes", "1", "", "", "", "success", "", 1.0, 0.0, {}, (body, 1), each], masker)
    _, events = read_events(split_frames(bytearray(log._frame(list(log._queue))))[0])
    assert [event[11] for event in events] == [body] * 4
    written = [json.loads(cloud_event(event, masker, "dhow://test"))["data"]["outputs"] for event in events]
    assert written[0] == [{"name": "y", "datatype": "FP32", "shape": [1, 2], "data": [[0.25, 0.5]]},
                          {"name": "label", "datatype": "INT64", "shape": [1], "data": [1]}]  # fmt: skip
    assert written[1][0]["data"] == [["[REDACTED:email]"]] and written[1][1]["data"] == [1.0]
    assert written[2][0]["name"] == "big" and len(written[2][0]["data"]) == 1 and written[2][1]["data"] == [1.5]
    assert written[3] == [{"name": "swapped", "datatype": "FP64", "shape": [1], "data": [2.5]}]
    rendered, failures = cloud_events(events * 10, {1: masker}, "dhow://test")
    assert not failures and all(_EMAIL.encode() not in line for _, line in rendered)


#: JSON answers as the REST door sends them, each with text a client or a model chose
_TEXT_ANSWERS = [
    _answer(Tensor("y", "BYTES", [1], np.array([_EMAIL.encode()], object))),
    _answer(Tensor("y", "BYTES", [2], np.array([b"1", _EMAIL.encode()], object))),  # text not first
    _answer(*_ANSWERED, Tensor("t", "BYTES", [1], np.array([('x"outputs":[' + _EMAIL).encode()], object))),
    _answer(Tensor('a"b', "BYTES", [1], np.array([_EMAIL.encode()], object))),  # an escaped quote in a name
    _answer(*_ANSWERED, id=_EMAIL, parameters={"note": f'"outputs":[{{"name":"{_EMAIL}"}}]'}),
]


def test_an_answers_text_outputs_are_masked_and_what_precedes_its_outputs_is_left_out() -> None:
    """The writer cuts the outputs out of the JSON answer (the answer's id and parameters, before them, are the
    request's and the model's: not the outputs), embeds them as they are when they hold numbers only, and masks
    any that holds text, wherever it is, alone and in a chunk of common events."""
    masker = Masker(parse_masking(None, "pii"), b"")
    events = [[f"r-{n}", "m", "1", "", "", "", "success", "", 1.0, 0.0, {}, b'{"inputs":[]}', answer, 1, 0]
              for n, answer in enumerate(_TEXT_ANSWERS)]  # fmt: skip
    for event, answer in zip(events, _TEXT_ANSWERS, strict=True):
        written = cloud_event(event, masker, "dhow://test")
        outputs = json.loads(written)["data"]["outputs"]
        assert _EMAIL.encode() not in written
        assert [o["name"] for o in outputs] == [o["name"] for o in json.loads(answer)["outputs"]]
    assert json.loads(cloud_event(events[-1], masker, "dhow://test"))["data"]["outputs"] == [
        {"name": "y", "datatype": "FP32", "shape": [1, 1], "data": [3.0]},  # (flat: as the client got it)
        {"name": "label", "datatype": "INT64", "shape": [1], "data": [1]},
    ]
    common = [[*events[0][:12], _ANSWER, 1, 0]] * 30
    for chunk in (events * 6, common + events, events + common):
        rendered, failures = cloud_events(chunk, {1: masker}, "dhow://test")
        assert not failures and len(rendered) == len(chunk)
        assert all(_EMAIL.encode() not in line for _, line in rendered)


def test_a_frame_carries_json_bodies_and_answers_after_the_events_as_they_came() -> None:
    """Bodies and answers travel unescaped after the events' JSON, each event holding their lengths (its body's
    before its answer's); decoded tensors in the JSON; every event's time made Unix time by the frame's clock."""
    first, second = b'{"inputs": [{"name": "x", "data": [1]}]}', b'{"inputs":\n[]}'
    events = [["a", "m", "", "", "", "", "success", "", 2.0, 0.1, {}, len(first), len(_ANSWER), 1],
              ["b", "m", "", "", "", "", "success", "", 3.0, 0.1, {}, [["x", "FP32", [1], np.ones(1)]], 5, 1],
              ["c", "m", "", "", "", "", "success", "", 4.0, 0.1, {}, len(second), None, 1]]  # fmt: skip
    buffer = bytearray(frame_events([[1, {"k": 1}]], 10.0, events, [first, _ANSWER, b"[1.0]", second]) * 2)
    bodies = split_frames(buffer)
    assert len(bodies) == 2 and not buffer
    maskings, decoded = read_events(bodies[1])
    assert maskings == [[1, {"k": 1}]]
    assert [event[8] for event in decoded] == [12.0, 13.0, 14.0]
    assert [event[11] for event in decoded] == [first, [["x", "FP32", [1], [1.0]]], second]
    assert [event[12] for event in decoded] == [_ANSWER, b"[1.0]", None]


def test_strings_a_client_chose_are_written_as_json_strings() -> None:
    """The event is joined from pieces of JSON: quotes, backslashes, newlines and non-ASCII text in the request
    id, the caller's names and the error are escaped as JSON, whatever the model or caller of earlier events."""
    masker = Masker(parse_masking(None, "pii"), b"")
    odd = 'a"b\\c\nd\u2028é'
    body = b'{"inputs": [{"name": "x", "shape": [1], "datatype": "FP32", "data": [1]}]}'
    for principal in ("key:bot", odd):
        event = [
            odd,
            "m",
            "",
            principal,
            odd,
            "",
            "INVALID_ARGUMENT",
            f"bad {odd}",
            1.0,
            0.0,
            {"p": odd},
            body,
            None,
            1,
        ]
        written = cloud_event(event, masker, 'dhow://h"1')
        assert b"\n" not in written
        document = json.loads(written)
        assert document["subject"] == "m" and document["source"] == 'dhow://h"1'
        assert document["type"] == "io.dhow.inference.error" and document["time"] == "1970-01-01T00:00:01.000000Z"
        data = document["data"]
        assert data["request_id"] == odd and data["principal"] == principal and data["tenant"] == odd
        assert data["error"] == f"bad {odd}" and data["parameters"] == {"p": odd} and data["latency_ms"] == 0
        assert data["version"] == "" and data["request"] == json.loads(body)


def test_text_outputs_are_masked_and_numbers_written_as_they_are() -> None:
    """Outputs of numbers only go as they are; an output holding text goes through the detectors, a field rule
    names an output too (in an answer as sent and in tensors alike)."""
    body = b'{"inputs": [{"name": "x", "shape": [1], "datatype": "FP32", "data": [1]}]}'
    tensors = [Tensor("label", "BYTES", [1, 1], np.array([[b"mail bob@example.com"]], object)),
               Tensor("p", "FP32", [1, 2], np.array([[0.25, 0.75]], np.float32)),
               Tensor("account", "INT64", [1], np.array([7]))]  # fmt: skip
    masker = Masker(parse_masking({"fields": {"account": "redact"}}, "pii"), b"")
    # (as the frame brings tensors: their data as JSON lists, text as text)
    as_lists = [[t.name, t.datatype, t.shape, json.loads(json.dumps(t.data.tolist(), default=bytes.decode))]
                for t in tensors]  # fmt: skip
    for outputs in (_answer(*tensors), as_lists):
        event = ["r-5", "m", "1", "", "", "", "success", "", 1.0, 0.0, {}, body, outputs, 1]
        label, p, account = json.loads(cloud_event(event, masker, "dhow://test"))["data"]["outputs"]
        assert label["data"] in (["mail [REDACTED:email]"], [["mail [REDACTED:email]"]]), label
        assert p["data"] in ([0.25, 0.75], [[0.25, 0.75]]) and p["shape"] == [1, 2]
        assert account["data"] != [7], "a field rule masks a numeric output"
    plain = Masker(parse_masking(None, "pii"), b"")
    answer = _answer(Tensor('a"b', "FP32", [1], np.array([1.5], np.float32)))
    event = ["r-6", "m", "1", "", "", "", "success", "", 1.0, 0.0, {}, body, answer, 1]
    assert json.loads(cloud_event(event, plain, "dhow://test"))["data"]["outputs"] == [
        {"name": 'a"b', "datatype": "FP32", "shape": [1], "data": [1.5]}
    ]


def test_the_requests_parameters_are_masked_as_the_request_is() -> None:
    """``data.parameters`` (the request's parameters the model saw) goes through the detectors and the field rules,
    as the same parameters inside ``data.request`` do."""
    body = json.dumps({"inputs": [_NUMBERS], "parameters": {"note": _EMAIL}}).encode()
    event = ["r-6", "notes", "1", "", "", "", "success", "", 1.0, 0.0, {"note": _EMAIL, "n": 3}, body, None, 1, 1]
    written = cloud_event(event, Masker(parse_masking(None, "pii"), b""), "dhow://test")
    assert _EMAIL.encode() not in written
    assert json.loads(written)["data"]["parameters"] == {"note": "[REDACTED:email]", "n": 3}
    ruled = Masker(parse_masking({"fields": {"parameters.n": "redact"}}, "pii"), b"")
    assert json.loads(cloud_event(event, ruled, "dhow://test"))["data"]["parameters"]["n"] == "[REDACTED:parameters.n]"


def test_a_refused_requests_tensor_names_are_masked() -> None:
    """A served request's tensor names are the model's inputs; a refused one's are any text the client sent (the
    server refuses an unknown input after decoding it): masked, in the body and in decoded tensors alike."""
    body = json.dumps({"inputs": [{**_NUMBERS, "name": _EMAIL}]}).encode()
    masker = Masker(parse_masking(None, "pii"), b"")
    error = f"model 'notes' has no input '{_EMAIL}'"
    event = ["r-7", "notes", "1", "", "", "", "INVALID_ARGUMENT", error, 1.0, 0.0, {}, body, None, 1, 1]
    written = cloud_event(event, masker, "dhow://test")
    assert _EMAIL.encode() not in written
    assert json.loads(written)["data"]["request"]["inputs"][0]["name"] == "[REDACTED:email]"
    event[11] = [[_EMAIL, "FP32", [1], np.array([1.0])]]  # decoded tensors (gRPC)
    assert _EMAIL.encode() not in cloud_event(event, masker, "dhow://test")
    event[6], event[7], event[11] = "success", "", body
    assert body in cloud_event(event, masker, "dhow://test"), "a served request's bare body is still written as sent"


class _Tally:
    """What a sink counts, summed (a sink may report any outcome)."""

    def __init__(self) -> None:
        self.logged_count = self.dropped_count = self.failed_count = 0
        self.reasons: list[str] = []

    def logged(self, count: int) -> None:
        self.logged_count += count

    def dropped(self, count: int) -> None:
        self.dropped_count += count

    def failed(self, count: int, reason: str) -> None:
        self.failed_count += count
        self.reasons.append(reason)


def test_an_event_the_kafka_client_refuses_fails_alone_and_each_event_is_counted_once(
    payload_kafka_broker: KafkaBroker,  # noqa: F811 (the fixture)
) -> None:
    """An event larger than the producer's ``message.max.bytes``, among others: the client refuses it outright,
    it alone fails, the others are delivered, and none is counted twice (``write`` never raises once some are
    queued: the writer would count them all failed, and their delivery reports logged)."""
    from dhow.monitoring.payload_sinks import KafkaSink

    payload_kafka_broker.create_topic("payloads")
    sink = KafkaSink(payload_kafka_broker.bootstrap, "payloads", {"message.max.bytes": "2000", "linger.ms": "5"})
    tally = _Tally()
    small = b'{"event": "small"}'
    events = [(str(n), small) for n in range(3)] + [("big", b"x" * 10_000)] + [(str(n), small) for n in range(3, 6)]
    sink.write(events, tally)
    sink.close(30)
    assert (tally.logged_count, tally.failed_count, tally.dropped_count) == (6, 1, 0), tally.reasons
    assert len(tally.reasons) == 1 and "refused by the Kafka client" in tally.reasons[0], tally.reasons


def test_an_event_whose_post_raises_fails_alone_in_one_event_per_post_mode() -> None:
    """One event per POST: an error that is not httpx's own (here, a body httpx cannot send) fails that event
    alone, after the events posted before it were counted logged, so ``write`` never raises (the writer would
    count them all failed again)."""
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
    from threading import Thread
    from typing import cast

    from dhow.monitoring.payload_sinks import HttpSink

    class _Ok(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            self.rfile.read(int(self.headers["content-length"]))
            self.send_response(200)
            self.send_header("content-length", "0")
            self.end_headers()

        def log_message(self, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), _Ok)
    Thread(target=server.serve_forever, daemon=True).start()
    sink = HttpSink(f"http://127.0.0.1:{server.server_port}/events", batch=False, timeout_s=10)
    tally = _Tally()
    try:
        sink.write([("a", b"{}"), ("b", cast(bytes, 5)), ("c", b"{}")], tally)
    finally:
        sink.close(1)
        server.shutdown()
        server.server_close()
    assert (tally.logged_count, tally.failed_count, tally.dropped_count) == (2, 1, 0), tally.reasons


def test_the_queue_drops_past_its_bytes_and_counts_them_out_as_they_are_taken() -> None:
    """Past ``capacity_bytes`` of queued requests (JSON bodies, decoded arrays) a request's event is dropped and
    counted, whatever the count of events; what a frame takes is counted out (a chunk by its items' bytes)."""
    log = _unstarted_log()
    log.use_masking(lambda config: Masker(parse_masking(None, "pii"), b""))
    log.capacity_bytes = 1000
    body = b'{"inputs": []}' + b" " * 286  # 300 bytes
    sent = InferenceRequest("m", [])
    sent.json_body = body
    answer = InferenceResponse("m", "1", [])
    caller = Caller("key:ci#1", "acme", "r-1")
    for _ in range(4):
        log.answered((_Config("m"), "", None, caller), 1.0, sent, answer)
    assert len(log._queue) == 3 and log._bytes == 900 and log._dropped.value == 1
    array = InferenceRequest("m", [Tensor("x", "FP64", [20], np.zeros(20))])  # 160 bytes: past the room left
    log.answered((_Config("m"), "", None, caller), 1.0, array, answer)
    log.offer(["r-e", "m", "1", "", "", "", "INVALID_ARGUMENT", "bad", 1.0, 0.0, {}, (body, 0), None],
              Masker(parse_masking(None, "pii"), b""))  # fmt: skip
    assert log._dropped.value == 3 and len(log._queue) == 3
    log._took([log._queue.popleft()], everything=False)
    assert log._bytes == 600
    log.answered((_Config("m"), "", None, caller), 1.0, array, answer)
    assert log._bytes == 760 and len(log._queue) == 3
    log._took(list(log._queue), everything=True)
    assert log._bytes == 0
    # a bound below one request: one at a time still goes (into an empty queue), never none
    log._queue.clear()
    log.capacity_bytes = 100
    log.answered((_Config("m"), "", None, caller), 1.0, sent, answer)
    log.answered((_Config("m"), "", None, caller), 1.0, sent, answer)
    assert len(log._queue) == 1 and log._bytes == 300 and log._dropped.value == 4
