"""OpenTelemetry tracing of inference requests, exported over OTLP/HTTP (``--otlp-endpoint``).

A traced request is one span (``infer <model>``, kind SERVER) parented by the caller's W3C ``traceparent``
(a REST header or a gRPC metadata entry), with a child per stage: ``admission`` (authentication, roles,
quota), ``decoding`` (the door reading the body into tensors), ``queue`` (waiting in the model's batcher),
``compute`` (its batch running: input assembly, model, output split) and ``encoding`` (the door writing the
answer). Each executed batch that carried a traced
request is one ``batch`` span, in the first such request's trace, linked to every traced request it carried.

The spans are made when the stages are over, from times the admission point and the batcher measure anyway, so
the stages themselves do no tracing work. With no endpoint there is no ``Tracing`` at all: a request pays one
``is None`` test. Sampling: a caller's sampled flag is followed; without a parent, ``ratio`` of the requests.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from typing import Any

from opentelemetry import trace
from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter
from opentelemetry.sdk.trace.sampling import ParentBased, TraceIdRatioBased
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

from dhow.core.errors import InvalidInput

__all__ = ["RequestTrace", "Tracing", "record_batch", "traces_url"]

_PROPAGATOR = TraceContextTextMapPropagator()


def traces_url(endpoint: str) -> str:
    """The OTLP/HTTP traces URL of a collector's base URL (``http://host:4318`` → ``…/v1/traces``)."""
    if not endpoint.startswith(("http://", "https://")):
        raise InvalidInput(f"--otlp-endpoint {endpoint!r}: expected an OTLP/HTTP URL such as http://127.0.0.1:4318")
    return endpoint if endpoint.rstrip("/").endswith("/v1/traces") else endpoint.rstrip("/") + "/v1/traces"


class Tracing:
    """The tracer of one server process: spans sampled, batched and exported in the SDK's background thread."""

    def __init__(
        self, endpoint: str, ratio: float, *, service: str = "dhow", exporter: SpanExporter | None = None
    ) -> None:
        self._provider = TracerProvider(
            resource=Resource.create({"service.name": service}), sampler=ParentBased(TraceIdRatioBased(ratio))
        )
        self._provider.add_span_processor(BatchSpanProcessor(exporter or OTLPSpanExporter(traces_url(endpoint))))
        self.tracer = self._provider.get_tracer("dhow")
        #: the batcher measures with the monotonic clock; spans want Unix nanoseconds
        self.monotonic_offset = time.time_ns() - time.monotonic_ns()

    def start(
        self, headers: Mapping[str, str], model: str, request_id: str, times: tuple[int, int, int]
    ) -> RequestTrace | None:
        """The request's span, begun when it entered the admission point, with its ``admission`` and ``decoding``
        children (``times``: entered, admitted, decoded, Unix ns); None when the sampler leaves it out."""
        entered_ns, admitted_ns, decoded_ns = times
        parent = _PROPAGATOR.extract(headers)
        span = self.tracer.start_span(
            f"infer {model}",
            context=parent,
            kind=trace.SpanKind.SERVER,
            attributes={"dhow.model": model, "dhow.request_id": request_id},
            start_time=entered_ns,
        )
        if not span.is_recording():
            return None
        request = RequestTrace(self, span)
        request.stage("admission", entered_ns, admitted_ns)
        request.stage("decoding", admitted_ns, decoded_ns)
        return request

    def shutdown(self) -> None:
        """Export what is left and stop the exporter's thread."""
        self._provider.shutdown()


class RequestTrace:
    """One sampled request's span and what its stages add to it."""

    __slots__ = ("context", "span", "tracing")

    def __init__(self, tracing: Tracing, span: trace.Span) -> None:
        self.tracing = tracing
        self.span = span
        self.context = trace.set_span_in_context(span)

    def stage(self, name: str, start_ns: int, end_ns: int, attributes: Mapping[str, Any] | None = None) -> None:
        """A child span of the request over a stage already over (Unix nanoseconds)."""
        span = self.tracing.tracer.start_span(name, context=self.context, attributes=attributes, start_time=start_ns)
        span.end(end_time=end_ns)

    def finish(self, version: str, answered_ns: int, error: str = "") -> None:
        """End the request: its ``encoding`` stage (from its answer to now) when it was answered, its outcome."""
        now = time.time_ns()
        if answered_ns:
            self.stage("encoding", answered_ns, now)
        if version:
            self.span.set_attribute("dhow.version", version)
        if error:
            self.span.set_status(trace.Status(trace.StatusCode.ERROR, error))
        self.span.end(end_time=now)


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
    links = [trace.Link(request.span.get_span_context()) for request, _ in carried]
    batch = first.tracing.tracer.start_span(
        "batch", context=first.context, links=links, attributes=attributes, start_time=start
    )
    batch.end(end_time=end)
