"""`dhow serve` running the `streams:` of its settings beside its REST and gRPC doors: v2 requests with binary
tensors from a topic, v2 replies to another, the stream's figures on the server's /metrics."""

from __future__ import annotations

import json
import struct
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import yaml

from tests.conftest import start_dhow, wait_until
from tests.kafka_broker import Broker, start_broker
from tests.reference import run_directly
from tests.stream_processes import features, headers_of

COUNT = 200
_LAG = 'dhow_stream_consumer_lag{partition="v2.requests/0",stream="scoring"} 0.0'
_ANSWERED = 'dhow_stream_messages_total{outcome="answered",stream="scoring"} 200.0'


@pytest.fixture(scope="module")
def broker() -> Iterator[Broker]:
    yield from start_broker()


def _binary_request(row: np.ndarray, index: int) -> tuple[bytes, bytes, list[tuple[str, bytes]]]:
    blob = row.astype("<f4").tobytes()
    header = json.dumps({
        "id": f"req-{index}",
        "inputs": [
            {"name": "input", "datatype": "FP32", "shape": [1, 32], "parameters": {"binary_data_size": len(blob)}}
        ],
    }).encode()  # fmt: skip
    return str(index).encode(), header + blob, [("inference-header-content-length", str(len(header)).encode())]


def _binary_outputs(value: bytes, header_length: int) -> dict[str, np.ndarray]:
    document = json.loads(value[:header_length])
    outputs, offset = {}, header_length
    for output in document["outputs"]:
        size = output["parameters"]["binary_data_size"]
        dtype = {"INT64": "<i8", "FP32": "<f4"}[output["datatype"]]
        outputs[output["name"]] = np.frombuffer(value[offset : offset + size], dtype).reshape(output["shape"])
        offset += size
    assert offset == len(value)
    return outputs


def test_serve_runs_the_streams_of_its_settings(broker: Broker, demo_repository: Path, tmp_path: Path) -> None:
    broker.create_topics("v2.requests", "v2.replies", "v2.dead", partitions=2)
    settings = tmp_path / "dhow.yaml"
    settings.write_text(yaml.safe_dump({"streams": [{
        "name": "scoring", "model": "tabular:2", "format": "v2-binary",
        "source": broker.url("v2.requests", group_options=True), "sink": broker.url("v2.replies"),
        "dead_letter": broker.url("v2.dead"),
    }]}))  # fmt: skip
    x = features(COUNT, seed=7)
    broker.produce("v2.requests", [_binary_request(row, i) for i, row in enumerate(x)])
    server = start_dhow(demo_repository, tmp_path, "--config", str(settings))
    replies = broker.tail("v2.replies")
    try:
        messages = replies.until_keys({str(i).encode() for i in range(COUNT)})
        # the lag is measured by the Kafka client every 2 s, from the offsets committed
        wait_until(lambda: _LAG in _metrics(server.http_url) and _ANSWERED in _metrics(server.http_url), 20, "metrics")
        metrics = _metrics(server.http_url)
    finally:
        replies.close()
        assert server.stop() == 0, server.log()
    assert len(messages) == COUNT
    expected = run_directly(demo_repository, "tabular", 2, {"input": x})
    for message in messages:
        index, headers = int(message.key()), headers_of(message)
        outputs = _binary_outputs(message.value(), int(headers["inference-header-content-length"]))
        assert outputs["label"][0] == expected["label"][index]
        np.testing.assert_allclose(outputs["probabilities"][0], expected["probabilities"][index], rtol=1e-5, atol=1e-6)
        assert headers["x-request-id"] == f"req-{index}".encode() and headers["dhow-model-version"] == b"2"
    assert 'dhow_stream_messages_total{outcome="received",stream="scoring"} 200.0' in metrics
    assert 'dhow_stream_latency_seconds_count{stream="scoring"} 200.0' in metrics
    assert "dhow_stream_batch_messages_bucket" in metrics
    assert struct.calcsize("<f") == 4  # (the blobs above are little-endian float32, as the extension says)


def _metrics(http_url: str) -> str:
    with urllib.request.urlopen(f"http://{http_url}/metrics", timeout=5) as answer:
        return str(answer.read().decode())
