"""OpenTelemetry tracing of inference requests, exported over OTLP/HTTP (``--otlp-endpoint``).

A traced request is one span (``infer <model>``, kind SERVER) parented by the caller's W3C ``traceparent``
(a REST header or a gRPC metadata entry), with a child per stage: ``admission`` (authentication, roles,
quota), ``decoding`` (the door reading the body into tensors), ``queue`` (waiting in the model's batcher),
``compute`` (its batch running: input assembly, model, output split) and ``encoding`` (the door writing the
answer). Each executed batch that carried a traced request is one ``batch`` span, in the first such request's
trace, linked to every traced request it carried.

Sampling is W3C's and OpenTelemetry's ``ParentBased(TraceIdRatioBased)``: a caller's sampled flag is followed;
without a (valid) parent, ``ratio`` of the requests are traced. The spans are made when their stages are over,
from times the admission point and the batcher measure anyway, as plain tuples; a thread writes them as
OTLP protobuf (``otlp.py``) and posts them. Not the OpenTelemetry SDK: measured here, its spans and
their encoding cost about 270 µs of CPU per traced request (seven spans), a fifth of the server's CPU at ratio
0.1; these cost about 25 µs. With no endpoint there is no ``Tracing``: a request pays one ``is None`` test.
"""

from __future__ import annotations

import collections
import logging
import random
import threading
import time
from collections.abc import Mapping, Sequence
from typing import Any

import httpx

from dhow.core.errors import InvalidInput
from dhow.monitoring.otlp import SPAN_KIND_INTERNAL, SPAN_KIND_SERVER, FinishedSpan, export_request, resource_bytes

__all__ = ["RequestTrace", "Tracing", "parse_traceparent", "record_batch", "traces_url"]

log = logging.getLogger("dhow.tracing")

#: spans waiting for export at most (past it new ones are dropped: tracing never holds memory without bound)
MAX_QUEUED_SPANS = 65_536
#: how often the exporter sends what was recorded, and the most spans in one export
_EXPORT_EVERY_S, _EXPORT_MAX = 1.0, 4096
_HEX = frozenset("0123456789abcdef")


def traces_url(endpoint: str) -> str:
    """The OTLP/HTTP traces URL of a collector's base URL (``http://host:4318`` → ``…/v1/traces``)."""
    if not endpoint.startswith(("http://", "https://")):
        raise InvalidInput(f"--otlp-endpoint {endpoint!r}: expected an OTLP/HTTP URL such as http://127.0.0.1:4318")
    return endpoint if endpoint.rstrip("/").endswith("/v1/traces") else endpoint.rstrip("/") + "/v1/traces"


def parse_traceparent(value: str | None) -> tuple[bytes, bytes, bool] | None:
    """A W3C ``traceparent`` (``00-<32 hex trace id>-<16 hex span id>-<2 hex flags>``) as (trace id, parent span
    id, sampled), or None when absent or malformed (then the request starts a trace of its own)."""
    if not value or len(value) < 55:
        return None
    version, trace_id, span_id, flags = value[:2], value[3:35], value[36:52], value[53:55]
    if value[2] != "-" or value[35] != "-" or value[52] != "-" or version == "ff":
        return None
    if version == "00" and len(value) != 55:  # a later version may append fields; version 00 may not
        return None
    if not _HEX.issuperset(version + trace_id + span_id + flags):
        return None
    if trace_id == "0" * 32 or span_id == "0" * 16:
        return None
    return bytes.fromhex(trace_id), bytes.fromhex(span_id), bool(int(flags, 16) & 1)


class Tracing:
    """The tracer of one server process: samples, records finished spans, exports them in a thread."""

    def __init__(self, endpoint: str, ratio: float, *, service: str = "dhow") -> None:
        self.url = traces_url(endpoint)
        self.ratio = ratio
        #: the batcher measures with the monotonic clock; spans want Unix nanoseconds
        self.monotonic_offset = time.time_ns() - time.monotonic_ns()
        self.dropped = 0
        self._resource = resource_bytes(service)
        self._spans: collections.deque[FinishedSpan] = collections.deque()
        self._stopping = threading.Event()
        self._last_failure = 0.0
        self._client = httpx.Client(timeout=10)
        self._thread = threading.Thread(target=self._export_loop, name="dhow-otlp-export", daemon=True)
        self._thread.start()

    def start(
        self, headers: Mapping[str, str], model: str, request_id: str, times: tuple[int, int, int]
    ) -> RequestTrace | None:
        """The request's trace when it is sampled (None otherwise), with its ``admission`` and ``decoding`` spans
        (``times``: entered, admitted, decoded, Unix ns)."""
        parent = parse_traceparent(headers.get("traceparent"))
        if parent is None:
            if self.ratio <= 0 or random.random() >= self.ratio:
                return None
            trace_id, parent_id = random.getrandbits(128).to_bytes(16, "big"), b""
        elif not parent[2]:
            return None
        else:
            trace_id, parent_id = parent[0], parent[1]
        entered_ns, admitted_ns, decoded_ns = times
        request = RequestTrace(self, trace_id, parent_id, f"infer {model}", entered_ns)
        request.attributes = {"dhow.model": model, "dhow.request_id": request_id}
        request.stage("admission", entered_ns, admitted_ns)
        request.stage("decoding", admitted_ns, decoded_ns)
        return request

    def record(self, span: FinishedSpan) -> None:
        if len(self._spans) >= MAX_QUEUED_SPANS:
            self.dropped += 1
            return
        self._spans.append(span)

    # -- the exporter's thread --

    def _export_loop(self) -> None:
        while not self._stopping.wait(_EXPORT_EVERY_S):
            self._export_all()
        self._export_all()

    def _export_all(self) -> None:
        while self._spans:
            batch = [self._spans.popleft() for _ in range(min(_EXPORT_MAX, len(self._spans)))]
            self._send(batch)

    def _send(self, batch: list[FinishedSpan]) -> None:
        body = export_request(self._resource, "dhow", batch)
        try:
            answer = self._client.post(self.url, content=body, headers={"content-type": "application/x-protobuf"})
            failure = "" if answer.is_success else f"the collector answered {answer.status_code}"
        except httpx.HTTPError as exc:
            failure = repr(exc)
        now = time.monotonic()
        if failure and now - self._last_failure > 60:  # one line a minute: a collector that is down must not flood
            self._last_failure = now
            log.warning("tracing: %d span(s) not exported to %s: %s", len(batch), self.url, failure)

    def shutdown(self) -> None:
        """Export what is left and stop the exporter's thread."""
        self._stopping.set()
        self._thread.join(15)
        self._client.close()


class RequestTrace:
    """One sampled request: its span (ended by ``finish``) and its stages' spans."""

    __slots__ = ("attributes", "name", "parent_id", "span_id", "start_ns", "trace_id", "tracing")

    def __init__(self, tracing: Tracing, trace_id: bytes, parent_id: bytes, name: str, start_ns: int) -> None:
        self.tracing = tracing
        self.trace_id = trace_id
        self.parent_id = parent_id
        self.span_id = _span_id()
        self.name = name
        self.start_ns = start_ns
        self.attributes: dict[str, Any] = {}

    def stage(
        self,
        name: str,
        start_ns: int,
        end_ns: int,
        attributes: Mapping[str, Any] | None = None,
        links: tuple[tuple[bytes, bytes], ...] = (),
    ) -> None:
        """A child span of the request over a stage already over (Unix nanoseconds)."""
        span = FinishedSpan(self.trace_id, _span_id(), self.span_id, name, SPAN_KIND_INTERNAL, start_ns, end_ns,
                     attributes, links, "")  # fmt: skip
        self.tracing.record(span)

    def finish(self, version: str, answered_ns: int, error: str = "") -> None:
        """End the request: its ``encoding`` stage (from its answer to now) when it was answered, its outcome."""
        now = time.time_ns()
        if answered_ns:
            self.stage("encoding", answered_ns, now)
        if version:
            self.attributes["dhow.version"] = version
        span = FinishedSpan(self.trace_id, self.span_id, self.parent_id, self.name, SPAN_KIND_SERVER, self.start_ns,
                     now, self.attributes, (), error)  # fmt: skip
        self.tracing.record(span)


def record_batch(
    traces: Sequence[object | None],
    label: Mapping[str, Any],
    start_mono_ns: int,
    end_mono_ns: int,
    waits: Sequence[int],
) -> None:
    """One executed batch: a ``queue`` and a ``compute`` stage in each traced request it carried, and a ``batch``
    span linked to all of them. ``traces`` and ``waits`` follow the batch's requests in order."""
    carried = [(t, wait) for t, wait in zip(traces, waits, strict=True) if isinstance(t, RequestTrace)]
    if not carried:
        return
    first = carried[0][0]
    offset = first.tracing.monotonic_offset
    start, end = start_mono_ns + offset, end_mono_ns + offset
    attributes = {**label, "dhow.batch.requests": len(traces)}
    for request, wait in carried:
        request.stage("queue", start - wait, start)
        request.stage("compute", start, end, attributes)
    first.stage("batch", start, end, attributes, tuple((r.trace_id, r.span_id) for r, _ in carried))


def _span_id() -> bytes:
    return (random.getrandbits(64) or 1).to_bytes(8, "big")
