"""OpenTelemetry tracing of inference requests, exported over OTLP/HTTP (``--otlp-endpoint``).

A traced request is one span (``infer <model>``, kind SERVER) parented by the caller's W3C ``traceparent``
(a REST header or a gRPC metadata entry), with a child per stage: ``admission`` (authentication, roles,
quota), ``decoding`` (the door reading the body into tensors), ``queue`` (waiting in the model's batcher),
``compute`` (its batch running: input assembly, model, output split) and ``encoding`` (the door writing the
answer). Each executed batch that carried a traced request is one ``batch`` span, in the first such request's
trace, linked to every traced request it carried.

Sampling is W3C's and OpenTelemetry's ``ParentBased(TraceIdRatioBased)``: a caller's sampled flag is followed;
without a (valid) parent, ``ratio`` of the requests are traced. The door decides once, as the request comes in
(``sample``): an unsampled request costs a count down (``sampling.sampling_gap``: the door counts down itself and
calls ``sample`` only for the request whose turn it is, or one with a ``traceparent``, which costs its parsing) and
nothing else, no object and no clock reading. A sampled one is a ``RequestTrace`` that keeps the times the door and
the batcher measure anyway as they are (trace ids as hex, span ids as ints, its batch one tuple its requests share:
no object a stage); when it ends, its ``Record`` (a flat tuple) is queued, and every ``FLUSH_S`` (or once
``FLUSH_AT`` are queued) what was queued is one frame into the pipe of tracing's writer process (``WriterPipe``;
``dhow.serving.trace_writer``), which writes its spans as OTLP protobuf (``record_fields``, ``otlp.py``: a request's
stages in one ``struct`` pack) and posts them, about a second apart, off the server's interpreter. A full queue
drops and counts; a writer that died fails and counts (``dhow_tracing_requests_total{outcome}``). Not the
OpenTelemetry SDK: measured here, its spans and their encoding cost about 270 µs of CPU per traced request (seven
spans). With no endpoint there is no ``Tracing``: a request pays one ``is None`` test.
"""

from __future__ import annotations

import random
import time
from collections.abc import Mapping, Sequence
from itertools import compress
from typing import Any

import orjson
from prometheus_client import CollectorRegistry

from dhow.core.errors import InvalidInput
from dhow.core.frames import frame
from dhow.monitoring.otlp import (
    SPAN_KIND_INTERNAL,
    SPAN_KIND_SERVER,
    FinishedSpan,
    attribute,
    child_prefix,
    family_fields,
    random_ids,
    server_prefix,
    split_ids,
)
from dhow.monitoring.sampling import sampling_gap
from dhow.monitoring.writer_pipe import WriterPipe

__all__ = [
    "FLUSH_AT",
    "FLUSH_S",
    "PLAIN_STAGES",
    "Record",
    "RequestTrace",
    "Sampled",
    "Tracing",
    "parse_traceparent",
    "record_batch",
    "record_fields",
    "served_fields",
    "spans_of",
    "traces_url",
]

#: traced requests waiting for the writer at most, here and there (past it new ones are dropped and counted:
#: tracing never holds memory without bound)
MAX_QUEUED = 8192
#: how long a traced request waits here to be handed over with the others (``WriterPipe.flush_s``), unless ``FLUSH_AT``
#: are queued before: the writer posts about a second apart anyway, and each frame wakes two of its threads (the pipe's
#: reader, then the sink's). At the 50 ms the payload log took then, tracing's writer woke ~53 times a second at 700
#: traced requests a second (``tabular``, REST, ~7,000 requests a second at ratio 0.1) and took 16.4 µs of CPU a traced
#: request; at 0.5 s, ~16 times and ~12 µs (``benchmarks/trace_writer_cpu.py``, 2026-12-06)
FLUSH_S = 0.5
#: traced requests queued that are handed over on the loop's next turn, whatever the time: a frame stays a few
#: hundred KB (~290 bytes a request; more only when more end in that one turn) and the loop's stall to write it short
#: (~0.2 ms), at ratio 1 too
FLUSH_AT = 1024
#: a sampled request's trace id and its parent span's id (empty: a root), as hex: what its record hands over as it
#: is, and what a ``traceparent`` holds already
Sampled = tuple[str, str]
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
    parsed = _parsed_traceparent(value)
    return None if parsed is None else (bytes.fromhex(parsed[0]), bytes.fromhex(parsed[1]), parsed[2])


def _parsed_traceparent(value: str | None) -> tuple[str, str, bool] | None:
    """``parse_traceparent``'s ids left as the hex they came as."""
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
    return trace_id, span_id, bool(int(flags, 16) & 1)


class Tracing(WriterPipe):
    """The tracer of one server process: samples, queues what the sampled requests measured for its writer process
    (``command``, given the collector's URL), which makes their spans and exports them."""

    what = "tracing"
    flush_s = FLUSH_S
    #: all it may hold in one frame (a record's frame is one ``orjson`` value: all ``MAX_QUEUED`` take ~1.6 ms, a
    #: ``FLUSH_AT`` ~0.2 ms), never split below ``FLUSH_AT``'s
    frame_items = MAX_QUEUED
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
        priority: str = "idle",
    ) -> None:
        self.url = traces_url(endpoint)
        self.ratio = ratio
        #: requests without a parent to let by until the next traced one, that one included (``sample``, and the
        #: door's own count down before it calls ``sample``: ``serving.service.Call``)
        self.skip = sampling_gap(ratio)
        #: the batcher measures with the monotonic clock; spans want Unix nanoseconds
        self.monotonic_offset = time.time_ns() - time.monotonic_ns()
        #: a hand-over on the loop's next turn is on its way (``_hand_over_soon``)
        self._soon = False
        super().__init__(command, {"url": self.url, "service": service, "priority": priority}, capacity=capacity,
                         registry=registry, close_timeout_s=close_timeout_s)  # fmt: skip

    def sample(self, traceparent: str | None) -> Sampled | None:
        """Whether a request is traced, decided once as it comes in: (trace id, parent span id), or None."""
        if traceparent is not None:
            parent = _parsed_traceparent(traceparent)
            if parent is not None:
                return (parent[0], parent[1]) if parent[2] else None
        if self.skip > 1:  # ratio 0: never (a gap past any lifetime); 1: always (every gap 1)
            self.skip -= 1
            return None
        self.skip = sampling_gap(self.ratio)
        # 32 hex digits by ``to_bytes`` and ``hex``: less than half what a format spec ("032x") takes
        return (random.getrandbits(128) or 1).to_bytes(16, "big").hex(), ""

    def begin(self, sampled: Sampled, model: str, request_id: str, times: tuple[int, int, int]) -> RequestTrace:
        """A sampled request's trace (``times``: entered, admitted, decoded, Unix ns)."""
        return RequestTrace(self, sampled, model, request_id, times)

    def start(
        self, headers: Mapping[str, str], model: str, request_id: str, times: tuple[int, int, int]
    ) -> RequestTrace | None:
        """``sample`` by the request's ``traceparent`` header, then ``begin`` when sampled (None otherwise)."""
        sampled = self.sample(headers.get("traceparent"))
        return None if sampled is None else self.begin(sampled, model, request_id, times)

    def record(self, record: Record) -> None:
        """Queue a finished request's ``Record`` for the writer (dropped and counted when the queue is full), handed
        over without waiting for ``flush_s`` once ``FLUSH_AT`` are queued (``_hand_over_soon``)."""
        queued = len(self._queue)
        if queued < self.capacity and not self._gone:  # ``_refused``'s test, spelt out: one call fewer
            self._put(record)
            if queued + 1 >= FLUSH_AT and not self._soon and not self._unsent:
                self._hand_over_soon()
        else:  # (counted here: a close may empty the queue meanwhile, and ``_refused``'s test would then pass)
            self._refuse()

    def _hand_over_soon(self) -> None:
        """Hand the queue over on the loop's next turn, in place of its timer: once a turn at most, whatever comes
        meanwhile (a hand-over now would leave a timer for a frame of a few records, and one per record after it
        in the same turn). Not while the pipe has not taken the last frame (``_unsent``): that waits for the pipe,
        and the queue for its timer, as for the payload log."""
        if self._timer is None or self._loop is None:  # (not on a loop: ``_put`` handed it over already)
            return
        self._timer.cancel()
        self._soon = True
        self._loop.call_soon(self._hand_over)

    def _hand_over(self) -> None:
        self._soon = False
        self._flush()

    def _frame(self, items: list[Any]) -> bytes:
        return frame(orjson.dumps(items))

    def shutdown(self) -> None:
        """Hand over what is queued; the writer exports what it holds and stops."""
        self.close()


#: a batch as the requests it carried keep it: its start and end (Unix ns) and its attributes
_Batch = tuple[int, int, Mapping[str, Any]]


class RequestTrace:
    """One sampled request: the times the door and the batcher measure anyway, kept as they are; its spans are made
    by the writer process (``spans_of``, ``record_fields``), not here."""

    __slots__ = ("batch", "finished", "links", "model", "parent_id", "request_id", "span_id", "times", "trace_id",
                 "tracing", "wait")  # fmt: skip

    def __init__(
        self, tracing: Tracing, sampled: Sampled, model: str, request_id: str, times: tuple[int, int, int]
    ) -> None:
        self.tracing = tracing
        self.trace_id, self.parent_id = sampled
        #: an int: made hex by the writer, not here
        self.span_id = random.getrandbits(64) or 1
        self.model = model
        self.request_id = request_id
        self.times = times
        #: the batch that computed it (``record_batch``) and how long it waited for it
        self.batch: _Batch | None = None
        self.wait = 0
        #: the ids of the traced requests its batch carried, when it was the first of them (its batch span's links)
        self.links: list[tuple[str, int]] | tuple[()] = ()
        #: queued already (``finish``): what its batch brings later is not in its record
        self.finished = False

    def finish(self, version: str, answered_ns: int, error: str = "") -> None:
        """End the request (its ``encoding`` stage from its answer to now, when it was answered) and queue it."""
        self.finished = True
        self.tracing.record(self.record(version, answered_ns, error, time.time_ns()))

    def record(self, version: str, answered_ns: int, error: str, end_ns: int) -> Record:
        """What the writer makes the spans of: a flat tuple of what was measured (JSON as it is)."""
        return (self.trace_id, self.span_id, self.parent_id, self.model, self.request_id, version, error,
                *self.times, answered_ns, end_ns, self.wait, self.batch, self.links)  # fmt: skip


#: a finished request as the writer process gets it (JSON): trace id (hex), span id (int), parent span id (hex, ""
#: for a root), model, request id, version, error, entered, admitted, decoded, answered, ended (Unix ns; answered 0:
#: not answered), the wait for its batch (ns), its batch (start, end, attributes; None: not computed), its batch span's
#: links (trace id and span id of each request its batch carried; empty when it has no batch span: not its first)
Record = tuple[Any, ...]


def spans_of(record: Sequence[Any], ids: bytes = b"") -> list[FinishedSpan]:
    """A request's span (kind SERVER) and its stages' from its ``Record``, as objects: what ``record_fields`` writes
    (the stages' span ids: the 8-byte slices of ``ids`` in ``_stages_of``'s order, else random)."""
    trace, span, parent, model, request_id, version, error, entered, _, _, _, end = record[:12]
    stages = _stages_of(record)
    ids = ids or _span_ids(len(stages))
    trace_id, span_id = bytes.fromhex(trace), span.to_bytes(8, "big")
    spans = []
    for n, (name, start, stop, attributes, links) in enumerate(stages):
        linked = tuple((bytes.fromhex(other), other_span.to_bytes(8, "big")) for other, other_span in links)
        spans.append(FinishedSpan(trace_id, ids[8 * n : 8 * n + 8], span_id, name, SPAN_KIND_INTERNAL, start, stop,
                                  attributes, linked, ""))  # fmt: skip
    attributes = {"dhow.model": model, **({"dhow.version": version} if version else {}), "dhow.request_id": request_id}
    spans.append(FinishedSpan(trace_id, span_id, bytes.fromhex(parent), f"infer {model}", SPAN_KIND_SERVER,
                              entered, end, attributes, (), error))  # fmt: skip
    return spans


def _stages_of(record: Sequence[Any]) -> list[Any]:
    """A request's stages: those without attributes first (``PLAIN_STAGES``: the door's admission, decoding and
    encoding, its wait for its batch), then its batch's compute and the batch's own span when it was its first traced
    request."""
    entered, admitted, decoded, answered, end, wait, batch, links = record[7:]
    stages: list[Any] = [("admission", entered, admitted, None, ()), ("decoding", admitted, decoded, None, ())]
    if batch:
        stages.append(("queue", batch[0] - wait, batch[0], None, ()))
    if answered:
        stages.append(("encoding", answered, end, None, ()))
    if batch:
        stages.append(("compute", *batch, ()))
    if links:
        stages.append(("batch", *batch, links))
    return stages


#: a request's stages without attributes, by whether it was computed (1) and answered (2), as ``child_prefix``
#: writes them
PLAIN_STAGES = tuple(
    tuple(child_prefix(name) for name in names)
    for names in (("admission", "decoding"), ("admission", "decoding", "queue"), ("admission", "decoding", "encoding"),
                  ("admission", "decoding", "queue", "encoding"))
)  # fmt: skip
#: a request's span's name, kind and attributes but its id, written, by model and version
_SERVED: dict[tuple[str, str], bytes] = {}


def record_fields(record: Sequence[Any], ids: bytes = b"") -> bytes:
    """A request's spans from its ``Record``, written as OTLP protobuf: the spans of ``spans_of`` with the same
    ``ids`` (``otlp.span_fields`` writes the same messages, its fields in another order): what tracing's writer
    process exports. Its stages are one ``struct`` pack (``otlp.family_fields``): no Python step a span."""
    trace, span, parent, model, request_id, version, error, entered, admitted, decoded, answered, end, wait, batch, \
        links = record  # fmt: skip
    if batch:  # the stages in ``_stages_of``'s order, each shape spelt out: lists made at once
        start, stop, attributes = batch
        if answered:
            starts, ends = [entered, admitted, start - wait, answered, start], [admitted, decoded, start, end, stop]
            prefixes = PLAIN_STAGES[3] + (child_prefix("compute", attributes),)
        else:
            starts, ends = [entered, admitted, start - wait, start], [admitted, decoded, start, stop]
            prefixes = PLAIN_STAGES[1] + (child_prefix("compute", attributes),)
        if links:
            prefixes += (child_prefix("batch", attributes, links),)
            starts.append(start)
            ends.append(stop)
    elif answered:
        starts, ends, prefixes = [entered, admitted, answered], [admitted, decoded, end], PLAIN_STAGES[2]
    else:
        starts, ends, prefixes = [entered, admitted], [admitted, decoded], PLAIN_STAGES[0]
    served = served_fields(model, version)
    return family_fields(prefixes, split_ids(ids) if ids else random_ids(len(prefixes)), starts, ends,
                         (trace, span, parent), served + attribute("dhow.request_id", request_id), (entered, end),
                         error)  # fmt: skip


def served_fields(model: str, version: str) -> bytes:
    """A request's span's name, kind and attributes but its id (``otlp.server_prefix``), by model and version."""
    served = _SERVED.get((model, version))
    if served is not None:
        return served
    if len(_SERVED) >= 4096:
        _SERVED.clear()
    attributes = {"dhow.model": model, "dhow.version": version} if version else {"dhow.model": model}
    served = _SERVED[(model, version)] = server_prefix(f"infer {model}", attributes)
    return served


def record_batch(
    traces: Sequence[object | None],
    label: Mapping[str, Any],
    start_mono_ns: int,
    end_mono_ns: int,
    waits: Sequence[int],
) -> None:
    """One executed batch: kept by each traced request it carried (its ``queue`` and ``compute`` stages), the first
    of them also keeping the others' ids (the ``batch`` span, in its trace, links to all of them). ``traces`` and
    ``waits`` follow the batch's requests in order (a trace is a ``RequestTrace`` or None)."""
    # the traced ones picked in C (``filter``, ``compress``): a batch of many requests carries few traced at a low ratio
    carried: list[RequestTrace] = list(filter(None, traces))  # type: ignore[arg-type]
    if not carried:
        return
    offset = carried[0].tracing.monotonic_offset
    batch = (start_mono_ns + offset, end_mono_ns + offset, {**label, "dhow.batch.requests": len(traces)})
    # the batch span goes with the first request still to be queued: one whose client went away while the batch
    # computed was queued already, without it (none left: the batch has no span). Found in the same loop: a
    # generator's ``next`` cost a third of the rest
    first = None
    for request, wait in zip(carried, compress(waits, traces), strict=True):
        request.batch, request.wait = batch, wait
        if first is None and not request.finished:
            first = request
    if first is not None:
        first.links = [(request.trace_id, request.span_id) for request in carried]


def _span_ids(count: int) -> bytes:
    """``count`` random span ids, 8 bytes each, none all zero (W3C: an invalid id)."""
    ids = random.getrandbits(64 * count).to_bytes(8 * count, "little")  # ``randbytes``, a Python call fewer
    while _NO_ID in ids:  # one chance in 2**64 a span (a zero run across two ids draws again too: harmless)
        ids = random.getrandbits(64 * count).to_bytes(8 * count, "little")
    return ids
