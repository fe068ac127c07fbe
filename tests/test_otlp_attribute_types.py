"""The attributes of exported spans keep their values' types: True, 1 and 1.0 (and False, 0, 0.0 and -0.0) are
equal in Python and hash alike, so caches of written attributes keyed by value alone wrote whichever came first
(an int as a bool, a bool as an int). Each path that writes attributes is fed the values one after the other in one
process, and its output parsed with ``opentelemetry-proto``'s own classes."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import orjson
import pytest

TRACE, SPAN = "4bf92f3577b34da6a3ce929d0e0e4736", "00f067aa0ba902b7"
#: values equal to one another but of other types, in an order that makes each follow another it equals
VALUES: list[Any] = [True, 1, 1.0, 1, True, 1.0, False, 0, 0.0, -0.0, 0.0, False, -0.0, 0]


def _kind(value: Any) -> tuple[str, Any]:
    """The ``AnyValue`` field that ``value`` is written in, and what it holds there."""
    if isinstance(value, bool):
        return "bool_value", value
    if isinstance(value, int):
        return "int_value", value
    return "double_value", value


def _found(any_value: Any) -> tuple[str, Any]:
    kind = any_value.WhichOneof("value")
    return kind, getattr(any_value, kind)


def _assert_written(spans: Any, key: str, value: Any, names: set[str]) -> None:
    """Each span named in ``names`` has attribute ``key`` as ``value``: its kind, its value, a zero's sign."""
    seen = set()
    for span in spans:
        for attribute in span.attributes:
            if attribute.key == key:
                found = _found(attribute.value)
                assert found == _kind(value), f"{value!r} in {span.name}"
                if isinstance(value, float):
                    assert math.copysign(1, found[1]) == math.copysign(1, value), f"{value!r}'s sign in {span.name}"
                seen.add(span.name)
    assert seen == names


def _record(key: str, value: Any, n: int) -> list[Any]:
    """A traced request computed in a batch with attribute ``key`` as ``value``, the first traced request of its
    batch (its batch span has the attributes too), as tracing's writer gets it (JSON)."""
    attributes = {"dhow.model": "m", "dhow.version": "3", key: value}
    own = n + 1
    links = [(TRACE, own), ("ab" * 16, 7)]
    record = (TRACE, own, "", "m", f"r-{n}", "3", "", 10, 20, 30, 55, 60, 10, [40, 50, attributes], links)
    loaded: list[Any] = orjson.loads(orjson.dumps(record))
    assert type(loaded[13][2][key]) is type(value), "JSON keeps the types"
    return loaded


def _span_fields(key: str, value: Any) -> bytes:
    from dhow.monitoring.otlp import SPAN_KIND_SERVER, FinishedSpan, span_fields

    span = FinishedSpan(bytes.fromhex(TRACE), b"\x01" * 8, b"", "s", SPAN_KIND_SERVER, 1, 2, {key: value}, (), "")
    return span_fields([span])


def _record_fields(key: str, value: Any) -> bytes:
    from dhow.monitoring.tracing import record_fields

    return record_fields(_record(key, value, 0))


def _chunk_fields(key: str, value: Any) -> bytes:
    from dhow.monitoring.trace_chunk import chunk_fields

    return chunk_fields([_record(key, value, 0)])


WRITERS: dict[str, tuple[Callable[[str, Any], bytes], set[str]]] = {
    "span_fields": (_span_fields, {"s"}),
    "record_fields": (_record_fields, {"compute", "batch"}),
    "chunk_fields": (_chunk_fields, {"compute", "batch"}),
}


@pytest.mark.parametrize("path", list(WRITERS))
def test_equal_values_of_other_types_are_written_as_their_own_types(path: str) -> None:
    from opentelemetry.proto.trace.v1.trace_pb2 import ScopeSpans

    write, names = WRITERS[path]
    key = f"test.types.{path}"  # a key of its own: the caches are the process's
    for value in VALUES:
        _assert_written(ScopeSpans.FromString(write(key, value)).spans, key, value, names)


def test_a_chunk_of_requests_of_batches_with_equal_attributes_of_other_types_writes_each_its_own() -> None:
    """In a chunk, the requests of one batch share their batch's written attributes: batches one after the other
    whose attributes are equal but of other types must not."""
    from opentelemetry.proto.trace.v1.trace_pb2 import ScopeSpans

    from dhow.monitoring.trace_chunk import chunk_fields

    key = "test.types.chunk"
    spans = list(ScopeSpans.FromString(chunk_fields([_record(key, v, n) for n, v in enumerate(VALUES)])).spans)
    by_request = {span.span_id: span for span in spans if span.name.startswith("infer")}
    assert len(by_request) == len(VALUES)
    for n, value in enumerate(VALUES):
        own = (n + 1).to_bytes(8, "big")
        assert by_request[own].span_id == own
        _assert_written([s for s in spans if s.parent_span_id == own], key, value, {"compute", "batch"})


def test_the_export_request_of_spans_with_equal_values_of_other_types_keeps_each_type() -> None:
    """What the collector gets (``export_request``), as ``opentelemetry-proto``'s service message."""
    from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest

    from dhow.monitoring.otlp import SPAN_KIND_INTERNAL, FinishedSpan, export_request, resource_bytes

    key = "test.types.export"
    spans = [
        FinishedSpan(bytes.fromhex(TRACE), bytes([n + 1]) * 8, b"", f"s{n}", SPAN_KIND_INTERNAL, 1, 2,
                     {"dhow.model": "m", key: value}, (), "")
        for n, value in enumerate(VALUES)
    ]  # fmt: skip
    written = ExportTraceServiceRequest.FromString(export_request(resource_bytes("dhow"), "dhow", spans))
    exported = written.resource_spans[0].scope_spans[0].spans
    assert len(exported) == len(VALUES)
    for n, value in enumerate(VALUES):
        _assert_written([exported[n]], key, value, {f"s{n}"})
