"""The payload log against real servers and real sinks: every request (answers and errors) masked, as
CloudEvents, to a rotating file, a Kafka topic (a real broker) and an HTTP endpoint; a sink that hangs or goes
away costs counted events, never an answer."""

from __future__ import annotations

import http.client
import http.server
import json
import re
import struct
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import DhowProcess, free_port, start_dhow, wait_until
from tests.payload_kafka_broker import KafkaBroker, payload_kafka_broker  # noqa: F401 (a fixture)

NOTES_MODEL = """
import numpy as np


class Notes:
    def load(self):
        pass

    def predict(self, inputs):
        if float(inputs["x"].reshape(-1)[0]) < 0:
            raise RuntimeError("negative")
        return {"y": inputs["x"] * 2}
"""
NOTES = (
    "runtime: python\nmax_batch_size: 4\n{extra}"
    "inputs: [{{name: text, datatype: BYTES, shape: [-1, 1]}}, {{name: x, datatype: FP32, shape: [-1, 1]}}]\n"
    "outputs: [{{name: y, datatype: FP32, shape: [-1, 1]}}]\n"
)
EMAIL = "bob@example.com"


def _repository(root: Path) -> Path:
    repository = root / "models"
    for name, extra in (("notes", "pii: {action: redact}\n"), ("quiet", "payload_log: false\n")):
        (repository / name / "1").mkdir(parents=True)
        (repository / name / "1" / "model.py").write_text(NOTES_MODEL)
        (repository / name / "model.yaml").write_text(NOTES.format(extra=extra))
    return repository


def _body(x: float | int, text: str = f"write to {EMAIL}", datatype: str = "FP32") -> str:
    return json.dumps(
        {
            "inputs": [
                {"name": "text", "shape": [1, 1], "datatype": "BYTES", "data": [text]},
                {"name": "x", "shape": [1, 1], "datatype": datatype, "data": [x]},
            ]
        }
    )


def _post(server: DhowProcess, model: str, body: str, request_id: str = "") -> int:
    connection = http.client.HTTPConnection("127.0.0.1", server.http_port, timeout=60)
    try:
        headers = {"content-type": "application/json", **({"x-request-id": request_id} if request_id else {})}
        connection.request("POST", f"/v2/models/{model}/infer", body=body, headers=headers)
        answer = connection.getresponse()
        answer.read()
        return answer.status
    finally:
        connection.close()


def _counts(server: DhowProcess, sink: str) -> dict[str, float]:
    connection = http.client.HTTPConnection("127.0.0.1", server.http_port, timeout=60)
    connection.request("GET", "/metrics")
    text = connection.getresponse().read().decode()
    connection.close()
    counts = {"logged": 0.0, "dropped": 0.0, "failed": 0.0}
    pattern = r'dhow_payload_log_events_total\{outcome="(\w+)",sink="' + sink + r'"\} ([0-9.e+]+)'
    for outcome, value in re.findall(pattern, text):
        counts[outcome] = float(value)
    return counts


def _send_mix(server: DhowProcess) -> None:
    """Two answers, a refused request (the wrong datatype for the model), a model fault, and a request of a model
    that opted out."""
    assert _post(server, "notes", _body(1.0), "req-ok-1") == 200
    assert _post(server, "notes", _body(2.0), "req-ok-2") == 200
    assert _post(server, "notes", _body(1, datatype="INT64"), "req-bad") == 400
    assert _post(server, "notes", _body(-1.0), "req-fault") == 500
    assert _post(server, "quiet", _body(1.0), "req-quiet") == 200


def _check_events(events: list[dict[str, Any]]) -> None:
    by_id = {event["data"]["request_id"]: event for event in events}
    assert set(by_id) == {"req-ok-1", "req-ok-2", "req-bad", "req-fault"}, "every request of notes, none of quiet"
    ok = by_id["req-ok-1"]
    assert ok["specversion"] == "1.0" and ok["type"] == "io.dhow.inference.response"
    assert ok["subject"] == "notes/1" and ok["datacontenttype"] == "application/json"
    assert ok["data"]["outcome"] == "success"
    assert ok["data"]["outputs"] == [{"name": "y", "datatype": "FP32", "shape": [1, 1], "data": [2.0]}], "as answered"
    inputs = {tensor["name"]: tensor for tensor in ok["data"]["request"]["inputs"]}
    assert inputs["x"] == {"name": "x", "shape": [1, 1], "datatype": "FP32", "data": [1.0]}, "as the client sent it"
    assert EMAIL not in json.dumps(events), "the model's PII masking applies to the payload log"
    assert inputs["text"]["data"] == ["write to [REDACTED:email]"]
    bad, fault = by_id["req-bad"], by_id["req-fault"]
    assert bad["type"] == fault["type"] == "io.dhow.inference.error"
    assert bad["data"]["outcome"] == "INVALID_ARGUMENT" and "INT64" in bad["data"]["error"]
    assert fault["data"]["outcome"] == "INTERNAL" and "outputs" not in fault["data"]
    assert fault["subject"] == "notes/1"
    assert "error id" in fault["data"]["error"]


def test_every_request_and_error_is_logged_masked_to_a_rotating_file(tmp_path: Path) -> None:
    log_file = tmp_path / "payloads" / "events.jsonl"
    server = start_dhow(_repository(tmp_path), tmp_path, "--payload-log", f"file://{log_file}?max_bytes=1500&backups=3")
    try:
        _send_mix(server)
        wait_until(lambda: _counts(server, "file")["logged"] == 4, what="4 events logged")
        files = sorted(log_file.parent.iterdir())
        assert len(files) >= 2, f"rotated at 1500 bytes: {files}"
        assert all(f.stat().st_size <= 1500 for f in files)
        events = [json.loads(line) for f in files for line in f.read_text().splitlines()]
        _check_events(events)
        assert _counts(server, "file") == {"logged": 4, "dropped": 0, "failed": 0}
    finally:
        assert server.stop() == 0, server.log()


class _Collector(http.server.BaseHTTPRequestHandler):
    """An HTTP endpoint that takes CloudEvents batches, and hangs while ``hold`` is set."""

    received: list[tuple[str, list[dict[str, Any]]]]
    hold: threading.Event

    def do_POST(self) -> None:
        while self.hold.is_set():
            time.sleep(0.05)
        body = self.rfile.read(int(self.headers["content-length"]))
        self.received.append((self.headers["content-type"], json.loads(body)))
        self.send_response(202)
        self.send_header("content-length", "0")
        self.end_headers()

    def log_message(self, *args: Any) -> None:
        pass


@pytest.fixture
def collector() -> Iterator[tuple[int, type[_Collector]]]:
    handler = type("Collector", (_Collector,), {"received": [], "hold": threading.Event()})
    port = free_port()
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", port), handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield port, handler
    handler.hold.clear()
    httpd.shutdown()


def test_a_hanging_http_sink_drops_and_counts_never_blocks(
    tmp_path: Path, collector: tuple[int, type[_Collector]]
) -> None:
    port, handler = collector
    handler.hold.set()
    url = f"http://127.0.0.1:{port}/events?timeout=60"
    server = start_dhow(_repository(tmp_path), tmp_path, "--payload-log", url, "--payload-log-queue", "4")
    try:
        statuses = [_post(server, "notes", _body(1.0), f"req-{n}") for n in range(24)]
        assert statuses == [200] * 24, "inference is unaffected by a sink that does not answer"
        # the writer holds one chunk in the hanging POST, the queue 4 more: the rest are dropped and counted
        wait_until(lambda: _counts(server, "http")["dropped"] >= 15, what="dropped events counted")
        handler.hold.clear()
        # once it answers, what was queued is logged: every request is logged or dropped, none failed
        wait_until(lambda: sum(_counts(server, "http").values()) == 24, what="every event logged or dropped")
        counts = _counts(server, "http")
        assert counts["logged"] >= 1 and counts["failed"] == 0
        content_type, events = handler.received[0]
        assert content_type == "application/cloudevents-batch+json"
        assert events[0]["data"]["request_id"] == "req-0" and events[0]["source"].startswith("dhow://")
    finally:
        assert server.stop() == 0, server.log()


def test_large_bodies_behind_a_hanging_sink_are_dropped_at_the_queues_bytes_not_held(
    tmp_path: Path, collector: tuple[int, type[_Collector]]
) -> None:
    """Events of 100 KB bodies behind a sink that does not answer: the writer's queue, far from its count of
    events, holds no more than ``--payload-log-queue-bytes`` of them (about three here); the rest are dropped and
    counted, none held, inference unaffected; once the sink answers, what was held is logged."""
    port, handler = collector
    handler.hold.set()
    url = f"http://127.0.0.1:{port}/events?timeout=60"
    server = start_dhow(_repository(tmp_path), tmp_path, "--payload-log", url, "--payload-log-queue-bytes", "350000")
    try:
        statuses = [_post(server, "notes", _body(1.0, "x" * 100_000), f"req-{n}") for n in range(24)]
        assert statuses == [200] * 24, "inference is unaffected by a sink that does not answer"
        wait_until(lambda: _counts(server, "http")["dropped"] >= 15, what="dropped events counted")
        handler.hold.clear()
        wait_until(lambda: sum(_counts(server, "http").values()) == 24, what="every event logged or dropped")
        counts = _counts(server, "http")
        assert 1 <= counts["logged"] <= 24 - 15 and counts["failed"] == 0, counts
        # what was held counted out as it went: the queues take large bodies again (one at a time, as sent here)
        assert [_post(server, "notes", _body(1.0, "x" * 100_000)) for _ in range(3)] == [200] * 3
        wait_until(lambda: _counts(server, "http")["logged"] == counts["logged"] + 3, what="3 more logged")
    finally:
        assert server.stop() == 0, server.log()


def test_kafka_topic_gets_every_event_and_a_lost_broker_is_counted(
    tmp_path: Path,
    payload_kafka_broker: KafkaBroker,  # noqa: F811 (the fixture)
) -> None:
    from confluent_kafka import OFFSET_BEGINNING, Consumer, TopicPartition

    payload_kafka_broker.create_topic("payloads")
    url = f"kafka://{payload_kafka_broker.bootstrap}/payloads?message.timeout.ms=3000&linger.ms=5"
    server = start_dhow(_repository(tmp_path), tmp_path, "--payload-log", url)
    try:
        _send_mix(server)
        wait_until(lambda: _counts(server, "kafka")["logged"] == 4, what="4 events acknowledged by the broker")
        consumer = Consumer({"bootstrap.servers": payload_kafka_broker.bootstrap, "group.id": "payload-test"})
        consumer.assign([TopicPartition("payloads", 0, OFFSET_BEGINNING)])
        messages: list[Any] = []
        deadline = time.monotonic() + 30
        while len(messages) < 4 and time.monotonic() < deadline:
            message = consumer.poll(0.5)
            if message is not None and message.error() is None:
                messages.append(message)
        consumer.close()
        events = [json.loads(m.value()) for m in messages]
        _check_events(events)
        assert {m.key().decode() for m in messages} == {e["data"]["request_id"] for e in events}
        assert all(("content-type", b"application/cloudevents+json") in m.headers() for m in messages)

        payload_kafka_broker.stop()
        statuses = [_post(server, "notes", _body(1.0), f"lost-{n}") for n in range(10)]
        assert statuses == [200] * 10, "inference is unaffected by a broker that went away"
        wait_until(lambda: _counts(server, "kafka")["failed"] == 10, timeout=60, what="undelivered events counted")
        assert _counts(server, "kafka")["logged"] == 4
    finally:
        assert server.stop() == 0, server.log()


def test_each_worker_writes_a_file_of_its_own(tmp_path: Path) -> None:
    log_file = tmp_path / "payloads" / "events.jsonl"
    server = start_dhow(_repository(tmp_path), tmp_path, "--workers", "2", "--payload-log", f"file://{log_file}")
    try:
        wait_until(lambda: "workers are ready" in server.log(), what="both workers ready")
        # a connection per request: the kernel spreads them over the two workers
        ids = [f"w-{n}" for n in range(40)]
        assert [_post(server, "notes", _body(1.0), request_id) for request_id in ids] == [200] * 40

        def written() -> list[str]:
            return [json.loads(line)["data"]["request_id"] for f in log_file.parent.iterdir()
                    for line in f.read_text().splitlines()]  # fmt: skip

        wait_until(lambda: len(written()) == 40, what="40 events written")
        assert sorted(written()) == sorted(ids), "every request once, none lost to two writers of one file"
        names = sorted(f.name for f in log_file.parent.iterdir())
        assert names == ["events.worker-1.jsonl", "events.worker-2.jsonl"], names
    finally:
        assert server.stop() == 0, server.log()


PLAIN = (
    "runtime: python\nmax_batch_size: 4\n"
    "inputs: [{name: x, datatype: FP32, shape: [-1, 1]}]\noutputs: [{name: y, datatype: FP32, shape: [-1, 1]}]\n"
)


def test_a_json_body_is_logged_as_sent_and_binary_tensors_in_the_json_form(tmp_path: Path) -> None:
    """A model of numbers only: a JSON body goes into the event as the client sent it (its own id, newlines made
    spaces: one event a line), and the outputs as the JSON answer held them; a request with the binary tensor
    extension, as its decoded tensors in the protocol's JSON form, and its outputs so too."""
    repository = tmp_path / "models"
    (repository / "plain" / "1").mkdir(parents=True)
    (repository / "plain" / "1" / "model.py").write_text(NOTES_MODEL)
    (repository / "plain" / "model.yaml").write_text(PLAIN)
    log_file = tmp_path / "payloads" / "events.jsonl"
    server = start_dhow(repository, tmp_path, "--payload-log", f"file://{log_file}")
    try:
        sent = {"id": "mine", "inputs": [{"name": "x", "shape": [1, 1], "datatype": "FP32", "data": [1.5]}]}
        assert _post(server, "plain", json.dumps(sent, indent=2), "as-sent") == 200
        header = json.dumps({"inputs": [{"name": "x", "shape": [1, 1], "datatype": "FP32",
                                         "parameters": {"binary_data_size": 4}}]}).encode()  # fmt: skip
        connection = http.client.HTTPConnection("127.0.0.1", server.http_port, timeout=60)
        connection.request("POST", "/v2/models/plain/infer", body=header + struct.pack("<f", 3.0), headers={
            "content-type": "application/octet-stream", "inference-header-content-length": str(len(header)),
            "x-request-id": "binary"})  # fmt: skip
        assert connection.getresponse().status == 200
        connection.close()
        wait_until(lambda: _counts(server, "file")["logged"] == 2, what="2 events logged")
        lines = log_file.read_text().splitlines()
        assert len(lines) == 2
        by_id = {event["data"]["request_id"]: event["data"] for event in map(json.loads, lines)}
        assert by_id["as-sent"]["request"] == sent
        assert by_id["as-sent"]["outputs"] == [{"name": "y", "datatype": "FP32", "shape": [1, 1], "data": [3.0]}]
        (tensor,) = by_id["binary"]["request"]["inputs"]
        assert {k: tensor[k] for k in ("name", "datatype", "shape", "data")} == {
            "name": "x", "datatype": "FP32", "shape": [1, 1], "data": [[3.0]]}  # fmt: skip
        assert by_id["binary"]["outputs"] == [{"name": "y", "datatype": "FP32", "shape": [1, 1], "data": [[6.0]]}]
    finally:
        assert server.stop() == 0, server.log()
