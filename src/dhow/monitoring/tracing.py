"""OpenTelemetry tracing of inference requests, exported over OTLP/HTTP (``--otlp-endpoint``).

A traced request is one span (``infer <model>``, kind SERVER) parented by the caller's W3C ``traceparent``
(a REST header or a gRPC metadata entry), with a child per stage: ``admission`` (authentication, roles,
quota), ``decoding`` (the door reading the body into tensors), ``queue`` (waiting in the model's batcher),
``compute`` (its batch running: input assembly, model, output split) and ``encoding`` (the door writing the
answer). Each executed batch that carried a traced request is one ``batch`` span, in the first such request's
trace, linked to every traced request it carried.

Sampling is W3C's and OpenTelemetry's ``ParentBased(TraceIdRatioBased)``: a caller's sampled flag is followed;
without a (valid) parent, ``ratio`` of the requests are traced. The door decides once, as the request comes in
(``sample``): an unsampled request costs a random draw (or, with a ``traceparent``, its parsing) and nothing else,
no object and no clock reading. A sampled one is a ``RequestTrace`` that keeps its stages' times (measured by the
admission point and the batcher anyway); when it ends, its ``Record`` (a tuple) is queued, and once per turn of
the event loop what was queued is one frame into the pipe of tracing's writer process (``WriterPipe``;
``dhow.serving.trace_writer``), which makes the spans (``spans_of``), writes them as OTLP protobuf (``otlp.py``)
and posts them, about a second apart, off the server's interpreter. A full queue drops and counts; a writer that
died fails and counts (``dhow_tracing_requests_total{outcome}``). Not the OpenTelemetry SDK: measured here, its
spans and their encoding cost about 270 µs of CPU per traced request (seven spans). With no endpoint there is no
``Tracing``: a request pays one ``is None`` test.
"""

from __future__ import annotations

import random
import time
from collections.abc import Mapping, Sequence
from typing import Any

import orjson
from prometheus_client import CollectorRegistry

from dhow.core.errors import InvalidInput
from dhow.core.frames import frame
from dhow.monitoring.otlp import SPAN_KIND_INTERNAL, SPAN_KIND_SERVER, FinishedSpan, family_fields
from dhow.monitoring.writer_pipe import WriterPipe

__all__ = [
    "Record",
    "RequestTrace",
    "Sampled",
    "Tracing",
    "parse_traceparent",
    "record_batch",
    "record_fields",
    "spans_of",
    "traces_url",
]

#: traced requests waiting for the writer at most, here and there (past it new ones are dropped and counted:
#: tracing never holds memory without bound)
MAX_QUEUED = 8192
#: a sampled request's trace id and its parent span's id (empty: a root)
Sampled = tuple[bytes, bytes]
_HEX = frozenset("0123456789abcdef")
_NO_ID = bytes(8)


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


class Tracing(WriterPipe):
    """The tracer of one server process: samples, queues what the sampled requests measured for its writer process
    (``command``, given the collector's URL), which makes their spans and exports them."""

    what = "tracing"
    metrics = (
        "dhow_tracing_requests",
        "Traced requests by outcome: exported (the collector took their spans), dropped (the queue was full), "
        "failed (the collector refused them or could not be reached, or the writer process stopped)",
        "dhow_tracing_queued",
        "Traced requests waiting for export",
    )
    outcomes = ("exported", "dropped", "failed")

    def __init__(
        self,
        endpoint: str,
        ratio: float,
        *,
        command: Sequence[str],
        service: str = "dhow",
        registry: CollectorRegistry | None = None,
        capacity: int = MAX_QUEUED,
        close_timeout_s: float = 10.0,
    ) -> None:
        self.url = traces_url(endpoint)
        self.ratio = ratio
        #: the batcher measures with the monotonic clock; spans want Unix nanoseconds
        self.monotonic_offset = time.time_ns() - time.monotonic_ns()
        super().__init__(command, {"url": self.url, "service": service}, capacity=capacity, registry=registry,
                         close_timeout_s=close_timeout_s)  # fmt: skip

    def sample(self, traceparent: str | None) -> Sampled | None:
        """Whether a request is traced, decided once as it comes in: (trace id, parent span id), or None."""
        if traceparent is not None:
            parent = parse_traceparent(traceparent)
            if parent is not None:
                return (parent[0], parent[1]) if parent[2] else None
        if random.random() >= self.ratio:  # ratio 0: never; 1: always
            return None
        return random.getrandbits(128).to_bytes(16, "big"), b""

    def begin(self, sampled: Sampled, model: str, request_id: str, times: tuple[int, int, int]) -> RequestTrace:
        """A sampled request's trace (``times``: entered, admitted, decoded, Unix ns)."""
        return RequestTrace(self, sampled, model, request_id, times)

    def start(
        self, headers: Mapping[str, str], model: str, request_id: str, times: tuple[int, int, int]
    ) -> RequestTrace | None:
        """``sample`` by the request's ``traceparent`` header, then ``begin`` when sampled (None otherwise)."""
        sampled = self.sample(headers.get("traceparent"))
        return None if sampled is None else self.begin(sampled, model, request_id, times)

    def record(self, request: RequestTrace) -> None:
        """Queue a finished request's ``Record`` for the writer (dropped and counted when the queue is full)."""
        if not self._refused():
            self._put(request.record())

    def _frame(self, items: list[Any]) -> bytes:
        return frame(orjson.dumps(items))

    def shutdown(self) -> None:
        """Hand over what is queued; the writer exports what it holds and stops."""
        self.close()


#: a stage of a request measured by the batcher: name, start, end (Unix ns), attributes, links (pairs of hex ids:
#: what the record hands over as it is)
_Stage = tuple[str, int, int, Mapping[str, Any] | None, tuple[tuple[str, str], ...]]


class RequestTrace:
    """One sampled request: its stages' times as they are measured; its spans are made at export."""

    __slots__ = ("answered_ns", "end_ns", "error", "model", "parent_id", "request_id", "span_id", "stages", "times",
                 "trace_id", "tracing", "version")  # fmt: skip

    def __init__(
        self, tracing: Tracing, sampled: Sampled, model: str, request_id: str, times: tuple[int, int, int]
    ) -> None:
        self.tracing = tracing
        self.trace_id, self.parent_id = sampled
        #: hex: what the record and the batch's links hand over
        self.span_id = f"{random.getrandbits(64) or 1:016x}"
        self.model = model
        self.request_id = request_id
        self.times = times
        self.stages: list[_Stage] = []
        self.version = self.error = ""
        self.answered_ns = self.end_ns = 0

    def stage(
        self,
        name: str,
        start_ns: int,
        end_ns: int,
        attributes: Mapping[str, Any] | None = None,
        links: tuple[tuple[str, str], ...] = (),
    ) -> None:
        """A child span of the request over a stage already over (Unix nanoseconds)."""
        self.stages.append((name, start_ns, end_ns, attributes, links))

    def finish(self, version: str, answered_ns: int, error: str = "") -> None:
        """End the request (its ``encoding`` stage from its answer to now, when it was answered) and queue it."""
        self.end_ns = time.time_ns()
        self.version, self.answered_ns, self.error = version, answered_ns, error
        self.tracing.record(self)

    def record(self) -> Record:
        """What the writer makes the spans of: ids as hex, the stages' times (the server's side of ``spans_of``)."""
        return (self.trace_id.hex(), self.span_id, self.parent_id.hex(), self.model, self.request_id,
                self.version, self.error, *self.times, self.answered_ns, self.end_ns, self.stages)  # fmt: skip

    def spans(self) -> list[FinishedSpan]:
        """The request's span (kind SERVER) and its stages' (what the writer process makes of ``record``)."""
        return spans_of(orjson.loads(orjson.dumps(self.record())))


#: a finished request as the writer process gets it (JSON): trace id, span id, parent span id (hex, "" for a root),
#: model, request id, version, error, entered, admitted, decoded, answered, ended (Unix ns; answered 0: not
#: answered), stages (name, start, end, attributes, links as pairs of hex ids)
Record = tuple[Any, ...]


def spans_of(record: Sequence[Any], ids: bytes = b"") -> list[FinishedSpan]:
    """A request's span (kind SERVER) and its stages' from its ``Record``: what ``record_fields`` writes, as
    objects (the stages' span ids: the 8-byte slices of ``ids``, else random)."""
    trace, span, parent, model, request_id, version, error, entered, _, _, _, end, _ = record
    stages = _stages_of(record)
    ids = ids or _span_ids(len(stages))
    trace_id, span_id = bytes.fromhex(trace), bytes.fromhex(span)
    spans = []
    for n, (name, start, stop, attributes, links) in enumerate(stages):
        spans.append(FinishedSpan(trace_id, ids[8 * n : 8 * n + 8], span_id, name, SPAN_KIND_INTERNAL, start, stop,
                                  attributes, _links(links), ""))  # fmt: skip
    spans.append(FinishedSpan(trace_id, span_id, bytes.fromhex(parent), f"infer {model}", SPAN_KIND_SERVER,
                              entered, end, _attributes(model, request_id, version), (), error))  # fmt: skip
    return spans


def record_fields(record: Sequence[Any], ids: bytes = b"") -> bytes:
    """A request's spans from its ``Record``, written as OTLP protobuf (``otlp.span_fields`` of ``spans_of``'s
    spans, byte for byte, with the same ``ids``): what tracing's writer process exports."""
    trace, span, parent, model, request_id, version, error, entered, _, _, _, end, _ = record
    stages = _stages_of(record)
    return family_fields(bytes.fromhex(trace), bytes.fromhex(span), bytes.fromhex(parent), f"infer {model}",
                         (entered, end), _attributes(model, request_id, version), error, stages,
                         ids or _span_ids(len(stages)))  # fmt: skip


def _stages_of(record: Sequence[Any]) -> list[Any]:
    """A request's stages: those the door measured (admission, decoding, encoding) and the batcher's."""
    entered, admitted, decoded, answered, end, more = record[7:]
    stages: list[Any] = [("admission", entered, admitted, None, ()), ("decoding", admitted, decoded, None, ())]
    stages += more
    if answered:
        stages.append(("encoding", answered, end, None, ()))
    return stages


def _attributes(model: str, request_id: str, version: str) -> dict[str, str]:
    attributes = {"dhow.model": model, "dhow.request_id": request_id}
    if version:
        attributes["dhow.version"] = version
    return attributes


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
    first.stage("batch", start, end, attributes, tuple((r.trace_id.hex(), r.span_id) for r, _ in carried))


def _links(links: Sequence[Sequence[str]]) -> tuple[tuple[bytes, bytes], ...]:
    return tuple((bytes.fromhex(trace), bytes.fromhex(span)) for trace, span in links)


def _span_ids(count: int) -> bytes:
    """``count`` random span ids, 8 bytes each, none all zero (W3C: an invalid id)."""
    ids = random.randbytes(8 * count)
    while _NO_ID in ids:  # one chance in 2**64 a span (a zero run across two ids draws again too: harmless)
        ids = random.randbytes(8 * count)
    return ids
