"""The payload log's sinks as ``--payload-log`` names them: bad URLs refused saying what is expected, a file
rotated keeping ``backups`` files, one file per worker when several share the ports; the writer process's
rendering of an event, masked."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from dhow.core.errors import InvalidInput
from dhow.core.frames import decode_frames
from dhow.governance.masking import Masker, parse_masking
from dhow.monitoring.payload_log import encode_frame
from dhow.monitoring.payload_sinks import FileSink, open_sink, worker_sink_url
from dhow.serving.payload_render import cloud_event


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
    microseconds, the latency in milliseconds to the microsecond, numbers and outputs as they came."""
    masker = Masker(parse_masking(None, "pii"), b"")
    body = json.dumps({"inputs": [{"name": "x", "shape": [1, 3], "datatype": "FP32", "data": [0.1, -2, 3e-7]}]},
                      indent=2)  # fmt: skip
    event = ["r-3", "tabular", "2", "alice", "acme", "eu", "success", "", 1_700_000_000.25, 0.0012344, {"k": 1},
             body, {"label": [1], "p": [[0.25, 0.75]]}, 1]  # fmt: skip
    written = cloud_event(event, masker, "dhow://test")
    assert b"\n" not in written and b"\r" not in written
    document = json.loads(written)
    assert document.pop("id")
    assert document == {
        "specversion": "1.0", "source": "dhow://test", "type": "io.dhow.inference.response",
        "subject": "tabular/2", "time": "2023-11-14T22:13:20.250000Z", "datacontenttype": "application/json",
        "data": {"request_id": "r-3", "model": "tabular", "version": "2", "principal": "alice", "tenant": "acme",
                 "data_region": "eu", "outcome": "success", "latency_ms": 1.234, "parameters": {"k": 1},
                 "inputs": {"x": [[0.1, -2, 3e-7]]}, "outputs": {"label": [1], "p": [[0.25, 0.75]]}},
    }  # fmt: skip


def test_each_worker_gets_a_file_of_its_own() -> None:
    assert worker_sink_url("file:///var/log/e.jsonl?max_bytes=5", 2) == "file:///var/log/e.worker-2.jsonl?max_bytes=5"
    assert worker_sink_url("/var/log/e.jsonl", 1) == "/var/log/e.worker-1.jsonl"
    assert worker_sink_url("kafka://a:9092/t", 3) == "kafka://a:9092/t"
    assert worker_sink_url("", 3) == ""


def test_the_writer_masks_text_tensors_and_errors_and_keeps_numbers_as_sent() -> None:
    """The writer process renders what the server handed over (``payload_log.FIELDS``, after a JSON frame): text
    tensors and the error message masked by the model's rules, numbers as they came, a field rule applied."""
    masker = Masker.from_spec(Masker(parse_masking({"fields": {"account": "hash"}}, "pii"), b"k" * 32).spec())
    frame = encode_frame([[], [[
        "r-1", "notes", "1", "key:bot", "acme", "ae", "INVALID_ARGUMENT", "no such user bob@example.com", 1.5, 0.002,
        {"mode": "fast", "nested": {"x": 1}}, {"text": np.array([[b"mail bob@example.com"]], dtype=object),
        "x": np.array([[0.5, 2.0]], np.float32), "account": np.array([[12345678]], np.int64)}, None, 7,
    ]]])  # fmt: skip
    event = decode_frames(bytearray(frame))[0][1][0]
    data = json.loads(cloud_event(event, masker, "dhow://test"))["data"]
    assert data["inputs"]["text"] == [["mail [REDACTED:email]"]]
    assert data["inputs"]["x"] == [[0.5, 2.0]]
    assert data["inputs"]["account"][0][0].startswith("hash:"), "a field rule masks numbers too"
    assert data["error"] == "no such user [REDACTED:email]" and data["outcome"] == "INVALID_ARGUMENT"
    assert data["parameters"] == {"mode": "fast"} and "outputs" not in data
    assert data["latency_ms"] == 2.0


def test_the_writer_reads_the_inputs_of_a_json_body_as_the_client_sent_it() -> None:
    """A REST JSON request's inputs go to the writer as the body's text (not written again on the event loop):
    they come out as the decoded tensors would, shaped, text masked."""
    masker = Masker(parse_masking(None, "pii"), b"")
    body = json.dumps({"inputs": [
        {"name": "text", "shape": [1, 1], "datatype": "BYTES", "data": ["to bob@example.com"]},
        {"name": "x", "shape": [2, 2], "datatype": "FP32", "data": [1.5, 2, 3, 4]},
    ]})  # fmt: skip
    event = ["r-2", "notes", "1", "", "", "", "success", "", 1.0, 0.0, {}, body, {"y": [[3.0]]}, 1]
    data = json.loads(cloud_event(event, masker, "dhow://test"))["data"]
    assert data["inputs"] == {"text": [["to [REDACTED:email]"]], "x": [[1.5, 2], [3, 4]]}
    assert data["outputs"] == {"y": [[3.0]]} and "error" not in data
