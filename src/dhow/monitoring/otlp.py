"""OTLP's ``ExportTraceServiceRequest`` written as protobuf bytes directly, for the spans tracing records.

Building ``opentelemetry-proto``'s message objects costs about 6 µs per span here; writing the few fields a span
of dhow has costs a fifth of that. The field numbers are ``opentelemetry/proto/trace/v1/trace.proto``'s (and
``common.proto``'s); ``tests/test_tracing_units.py`` parses what this writes with ``opentelemetry-proto`` and
compares it with the same message built from its classes. The resource and scope, written once, are
``opentelemetry-proto``'s own encoding.
"""

from __future__ import annotations

import struct
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, NamedTuple

from opentelemetry.proto.common.v1.common_pb2 import AnyValue, InstrumentationScope, KeyValue
from opentelemetry.proto.resource.v1.resource_pb2 import Resource

__all__ = [
    "SPAN_KIND_INTERNAL",
    "SPAN_KIND_SERVER",
    "FinishedSpan",
    "export_request",
    "export_request_of",
    "family_fields",
    "span_fields",
]

SPAN_KIND_INTERNAL, SPAN_KIND_SERVER = 1, 2
_STATUS_CODE_ERROR = 2
#: the start (field 7) and end (field 8) times: two fixed64 under their tags
_TIMES = struct.Struct("<BQBQ")
_DOUBLE = struct.Struct("<d")


class FinishedSpan(NamedTuple):
    """One span, over: what tracing records on the request's path and this module writes later."""

    trace_id: bytes
    span_id: bytes
    parent_id: bytes
    name: str
    kind: int
    start_ns: int
    end_ns: int
    attributes: Mapping[str, Any] | None
    #: (trace id, span id) of each linked span
    links: tuple[tuple[bytes, bytes], ...]
    #: an error's description ("" when none): the span's status is then ERROR
    error: str


_SMALL = [bytes((n,)) for n in range(128)]
#: encoded attributes by (key, value): a model's name, version and batch sizes repeat in every span
_ATTRIBUTES: dict[tuple[str, Any], bytes] = {}
_MAX_CACHED = 4096
#: encoded name and kind by (name, kind): "infer <model>", "queue", ...
_NAMED: dict[tuple[str, int], bytes] = {}


def _varint(value: int) -> bytes:
    if value < 128:
        return _SMALL[value]
    out = bytearray()
    while value > 0x7F:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def _field(tag: bytes, payload: bytes) -> bytes:
    """A length-delimited field (bytes, string, message) under its tag byte (field number << 3 | 2)."""
    return tag + _varint(len(payload)) + payload


def _any_value(value: Any) -> bytes:
    if isinstance(value, bool):
        return b"\x10\x01" if value else b"\x10\x00"
    if isinstance(value, int):
        return b"\x18" + _varint(value & 0xFFFFFFFFFFFFFFFF)  # int64: two's complement as a varint
    if isinstance(value, float):
        return b"\x21" + _DOUBLE.pack(value)
    return _field(b"\x0a", str(value).encode())


def _attribute(key: str, value: Any) -> bytes:
    """Span field 9, a ``KeyValue``: key (1) and an ``AnyValue`` (2)."""
    cached = _ATTRIBUTES.get((key, value))
    if cached is None:
        cached = _field(b"\x4a", _field(b"\x0a", key.encode()) + _field(b"\x12", _any_value(value)))
        if len(_ATTRIBUTES) >= _MAX_CACHED:  # request ids never repeat: the cache must not grow with them
            _ATTRIBUTES.clear()
        _ATTRIBUTES[(key, value)] = cached
    return cached


def _named(name: str, kind: int) -> bytes:
    """A span's name (5) and kind (6), which repeat in every request: encoded once."""
    named = _NAMED.get((name, kind))
    if named is None:
        if len(_NAMED) >= _MAX_CACHED:
            _NAMED.clear()
        named = _NAMED[(name, kind)] = _field(b"\x2a", name.encode()) + b"\x30" + _SMALL[kind]
    return named


def _status(error: str) -> bytes:
    """An error's status (15: message 2, code 3)."""
    return _field(b"\x7a", _field(b"\x12", error.encode()) + b"\x18" + _SMALL[_STATUS_CODE_ERROR])


def _span(span: FinishedSpan) -> bytes:
    """A ``Span``: trace id (1), span id (2), parent (4), name and kind, start (7) and end (8) times,
    attributes (9), links (13: trace id 1, span id 2), status. Written as parts joined once."""
    parts = [b"\x0a\x10", span.trace_id, b"\x12\x08", span.span_id]
    if span.parent_id:
        parts += (b"\x22\x08", span.parent_id)
    parts += (_named(span.name, span.kind), _TIMES.pack(0x39, span.start_ns, 0x41, span.end_ns))
    if span.attributes:
        parts += [_attribute(key, value) for key, value in span.attributes.items()]
    for trace_id, span_id in span.links:
        parts += (b"\x6a\x1c\x0a\x10", trace_id, b"\x12\x08", span_id)
    if span.error:
        parts.append(_status(span.error))
    return b"".join(parts)


#: encoded name and kind of a child span by its name; encoded attributes by their items (a batch's repeat in each
#: of its requests)
_CHILDREN: dict[str, bytes] = {}
_ATTRIBUTE_SETS: dict[tuple[tuple[str, Any], ...], bytes] = {}


def _child_named(name: str) -> bytes:
    if len(_CHILDREN) >= _MAX_CACHED:
        _CHILDREN.clear()
    named = _CHILDREN[name] = _named(name, SPAN_KIND_INTERNAL)
    return named


def _attribute_set(attributes: Mapping[str, Any]) -> bytes:
    if len(_ATTRIBUTE_SETS) >= _MAX_CACHED:
        _ATTRIBUTE_SETS.clear()
    written = _ATTRIBUTE_SETS[tuple(attributes.items())] = b"".join(_attribute(k, v) for k, v in attributes.items())
    return written


#: a child of ``family_fields``: name, start, end (Unix ns), attributes, links (pairs of hex ids)
Child = tuple[str, int, int, Mapping[str, Any] | None, Iterable[Sequence[str]]]


def family_fields(
    trace_id: bytes,
    span_id: bytes,
    parent_id: bytes,
    name: str,
    times: tuple[int, int],
    attributes: Mapping[str, Any],
    error: str,
    children: Iterable[Child],
    ids: bytes,
) -> bytes:
    """A span of kind SERVER and its children (INTERNAL, ids the 8-byte slices of ``ids`` in order) as
    ``span_fields`` writes the same spans (children first), without a ``FinishedSpan`` each: what every child
    shares (the trace, the parent) is written once, and each child is one join."""
    head, tail = b"\x0a\x10" + trace_id + b"\x12\x08", b"\x22\x08" + span_id
    parts: list[bytes] = []
    at = 0
    for child, start, end, more, links in children:
        named = _CHILDREN.get(child) or _child_named(child)
        body = [head, ids[at : at + 8], tail, named, _TIMES.pack(0x39, start, 0x41, end)]
        at += 8
        if more:
            body.append(_ATTRIBUTE_SETS.get(tuple(more.items())) or _attribute_set(more))
        for linked_trace, linked_span in links:
            body += (b"\x6a\x1c\x0a\x10", bytes.fromhex(linked_trace), b"\x12\x08", bytes.fromhex(linked_span))
        written = b"".join(body)
        parts += (b"\x12", _SMALL[len(written)] if len(written) < 128 else _varint(len(written)), written)
    body = [b"\x0a\x10", trace_id, b"\x12\x08", span_id]
    if parent_id:
        body += (b"\x22\x08", parent_id)
    body += (_named(name, SPAN_KIND_SERVER), _TIMES.pack(0x39, times[0], 0x41, times[1]))
    body += [_attribute(key, value) for key, value in attributes.items()]
    if error:
        body.append(_status(error))
    written = b"".join(body)
    parts += (b"\x12", _varint(len(written)), written)
    return b"".join(parts)


def resource_bytes(service: str) -> bytes:
    """A ``Resource`` naming the service, as ``opentelemetry-proto`` writes it."""
    return bytes(
        Resource(attributes=[KeyValue(key="service.name", value=AnyValue(string_value=service))]).SerializeToString()
    )


def export_request(resource: bytes, scope_name: str, spans: Iterable[FinishedSpan]) -> bytes:
    """An ``ExportTraceServiceRequest`` of one resource and one instrumentation scope holding ``spans``."""
    return export_request_of(resource, scope_name, span_fields(spans))


def span_fields(spans: Iterable[FinishedSpan]) -> bytes:
    """``spans`` as the fields of a ``ScopeSpans``: what ``export_request_of`` joins, a request's spans at a time."""
    return b"".join([_field(b"\x12", _span(span)) for span in spans])


def export_request_of(resource: bytes, scope_name: str, fields: bytes) -> bytes:
    """An ``ExportTraceServiceRequest`` of one resource and one instrumentation scope holding spans already written
    (``span_fields``)."""
    scope = bytes(InstrumentationScope(name=scope_name).SerializeToString())
    scope_spans = _field(b"\x0a", scope) + fields
    return _field(b"\x0a", _field(b"\x0a", resource) + _field(b"\x12", scope_spans))
