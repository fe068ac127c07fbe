"""Tracing against a real server: spans exported over OTLP/HTTP to a receiver in the test (it decodes the protobuf
export as a collector does), parented by the caller's W3C traceparent over REST and gRPC; a batch span links the
requests it carried; a tracer stopped with requests still waiting for the hand-over to its writer exports them."""

from __future__ import annotations

import asyncio
import http.client
import http.server
import json
import secrets
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from prometheus_client import CollectorRegistry

from dhow.monitoring.tracing import Tracing
from dhow.serving.composition import TRACE_WRITER
from tests.conftest import DhowProcess, free_port, start_dhow
from tests.monitoring_models import doubler_repository

# batches wait a second for company: two requests sent together share one, even on a loaded machine
BATCHING = "batching: {max_queue_delay_ms: 1000}\n"
BODY = json.dumps({"inputs": [{"name": "x", "shape": [1, 1], "datatype": "FP32", "data": [1.0]}]})


class _Receiver(http.server.BaseHTTPRequestHandler):
    spans: list[Any]

    def do_POST(self) -> None:
        assert self.path == "/v1/traces" and self.headers["content-type"] == "application/x-protobuf"
        export = ExportTraceServiceRequest.FromString(self.rfile.read(int(self.headers["content-length"])))
        for resource in export.resource_spans:
            for scope in resource.scope_spans:
                self.spans.extend(scope.spans)
        self.send_response(200)
        self.send_header("content-type", "application/x-protobuf")
        self.send_header("content-length", "0")
        self.end_headers()

    def log_message(self, *args: Any) -> None:
        pass


@pytest.fixture
def otlp_receiver() -> Iterator[tuple[int, list[Any]]]:
    spans: list[Any] = []
    handler = type("Receiver", (_Receiver,), {"spans": spans})
    port = free_port()
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", port), handler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    yield port, spans
    httpd.shutdown()


def _traceparent() -> tuple[str, str, str]:
    trace_id, parent_id = secrets.token_hex(16), secrets.token_hex(8)
    return f"00-{trace_id}-{parent_id}-01", trace_id, parent_id


def _rest(server: DhowProcess, headers: dict[str, str]) -> None:
    connection = http.client.HTTPConnection("127.0.0.1", server.http_port, timeout=60)
    connection.request("POST", "/v2/models/doubler/infer", body=BODY, headers=headers)
    answer = connection.getresponse()
    assert answer.status == 200, answer.read()
    answer.read()
    connection.close()


def _grpc(server: DhowProcess, headers: dict[str, str]) -> None:
    import tritonclient.grpc as grpcclient

    client = grpcclient.InferenceServerClient(server.grpc_url)
    data = grpcclient.InferInput("x", [1, 1], "FP32")
    data.set_data_from_numpy(np.ones((1, 1), np.float32))
    client.infer("doubler", [data], headers=headers, request_id="grpc-1")  # its own id, no x-request-id
    client.close()


def test_spans_follow_the_callers_traceparent_and_a_batch_links_its_requests(
    tmp_path: Path, otlp_receiver: tuple[int, list[Any]]
) -> None:
    port, spans = otlp_receiver
    repository = doubler_repository(tmp_path, BATCHING)
    # ratio 0: only what a sampled caller asks for is traced
    server = start_dhow(
        repository, tmp_path, "--otlp-endpoint", f"http://127.0.0.1:{port}", "--trace-sample-ratio", "0"
    )
    rest_parent, grpc_parent, first, second = (_traceparent() for _ in range(4))
    try:
        _rest(server, {"traceparent": rest_parent[0], "x-request-id": "rest-1"})
        _grpc(server, {"traceparent": grpc_parent[0]})
        _rest(server, {"x-request-id": "unsampled"})  # no parent, ratio 0: not traced
        with ThreadPoolExecutor(2) as pool:  # sent together: one batch carries both
            list(pool.map(lambda parent: _rest(server, {"traceparent": parent[0]}), (first, second)))
    finally:
        assert server.stop() == 0, server.log()  # the exporter sends what it holds when the server stops

    roots = {span.trace_id.hex(): span for span in spans if span.name == "infer doubler"}
    assert set(roots) == {p[1] for p in (rest_parent, grpc_parent, first, second)}, "exactly the sampled callers"
    for _, trace_id, parent_id in (rest_parent, grpc_parent, first, second):
        root = roots[trace_id]
        assert root.parent_span_id.hex() == parent_id, "the caller's span is the parent"
        assert root.kind == root.SPAN_KIND_SERVER
        children = {s.name: s for s in spans if s.trace_id.hex() == trace_id and s.parent_span_id == root.span_id}
        assert {"admission", "decoding", "queue", "compute", "encoding"} <= set(children)
        assert root.start_time_unix_nano <= children["admission"].start_time_unix_nano
        assert children["queue"].end_time_unix_nano <= children["compute"].end_time_unix_nano
        assert children["compute"].end_time_unix_nano <= root.end_time_unix_nano
    attributes = {kv.key: kv.value.string_value for kv in roots[rest_parent[1]].attributes}
    assert attributes["dhow.request_id"] == "rest-1" and attributes["dhow.version"] == "1"
    attributes = {kv.key: kv.value.string_value for kv in roots[grpc_parent[1]].attributes}
    assert attributes["dhow.request_id"] == "grpc-1", "a request named in its body only is traced by that name"

    batches = [s for s in spans if s.name == "batch"]
    linked = [{link.span_id for link in batch.links} for batch in batches]
    pair = {roots[first[1]].span_id, roots[second[1]].span_id}
    assert pair in linked, f"one batch span links both requests it carried: {linked}"


def test_what_waits_for_the_hand_over_when_the_tracer_stops_is_exported(
    otlp_receiver: tuple[int, list[Any]],
) -> None:
    """Requests finished in the ``writer_pipe.FLUSH_S`` before a stop are still queued in the server: the stop hands
    them over, and the writer exports them before it exits."""
    port, spans = otlp_receiver
    registry = CollectorRegistry()
    tracing = Tracing(f"http://127.0.0.1:{port}", 1.0, command=TRACE_WRITER, registry=registry)

    async def finish_and_stop() -> None:  # the stop comes before the hand-over that this loop scheduled
        for n in range(5):
            trace = tracing.start({}, "m", f"r-{n}", (1, 2, 3))
            assert trace is not None
            trace.finish("1", 4)
        tracing.shutdown()

    asyncio.run(finish_and_stop())
    counted = ("dhow_tracing_requests_total", "exported", "failed")
    counts = {outcome: registry.get_sample_value(counted[0], {"outcome": outcome}) for outcome in counted[1:]}
    assert counts == {"exported": 5, "failed": 0}
    exported = {kv.value.string_value for span in spans for kv in span.attributes if kv.key == "dhow.request_id"}
    assert exported == {f"r-{n}" for n in range(5)}
