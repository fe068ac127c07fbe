"""OTLP's ``ExportTraceServiceRequest`` written as protobuf bytes directly, for the spans tracing records.

Building ``opentelemetry-proto``'s message objects costs about 6 µs per span here; writing the few fields a span
of dhow has costs a fifth of that (``span_fields``). A request's child spans are written by ``family_fields`` in
one ``struct`` pack, what varies in each after what does not (written once a name or a set of attributes: a
message's fields may come in any order): no Python step a span. The field numbers are
``opentelemetry/proto/trace/v1/trace.proto``'s (and ``common.proto``'s); ``tests/test_tracing_units.py`` parses what
``span_fields`` writes with ``opentelemetry-proto`` and compares it with the same message built from its classes, and
what ``family_fields`` writes with what ``span_fields`` writes of the same spans. The resource and scope, written
once, are ``opentelemetry-proto``'s own encoding.
"""

from __future__ import annotations

import math
import random
import struct
from collections.abc import Iterable, Mapping, Sequence
from operator import itemgetter
from typing import Any, NamedTuple

from opentelemetry.proto.common.v1.common_pb2 import AnyValue, InstrumentationScope, KeyValue
from opentelemetry.proto.resource.v1.resource_pb2 import Resource

__all__ = [
    "SPAN_KIND_INTERNAL",
    "SPAN_KIND_SERVER",
    "AttributesKey",
    "FinishedSpan",
    "attribute",
    "attribute_set",
    "attributes_key",
    "child_prefix",
    "export_request",
    "export_request_of",
    "family_fields",
    "keepable",
    "random_ids",
    "remember",
    "repeated",
    "server_prefix",
    "span_fields",
    "split_ids",
    "varint",
]

SPAN_KIND_INTERNAL, SPAN_KIND_SERVER = 1, 2
_STATUS_CODE_ERROR = 2
#: the start (field 7) and end (field 8) times: two fixed64 under their tags
_TIMES = struct.Struct("<BQBQ")
_START, _END = 0x39, 0x41
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
#: encoded attributes by (key, type, value): a model's name, version and batch sizes repeat in every span. The type is
#: in the key because True, 1 and 1.0 are equal and hash alike but are written as a bool, an int and a double
_ATTRIBUTES: dict[tuple[str, type, Any], bytes] = {}
_MAX_CACHED = 4096
#: encoded name and kind by (name, kind): "infer <model>", "queue", ...
_NAMED: dict[tuple[str, int], bytes] = {}
#: the types whose equal values are written alike (floats too, but 0.0 and -0.0: equal, written apart; and not NaN,
#: which equals nothing, nor infinities: JSON writes both as null, as None, where ``trace_chunk`` compares them)
_KEPT_TYPES = frozenset((str, int, bool))
#: attributes by their items and their values' types (``attributes_key``)
AttributesKey = tuple[tuple[tuple[str, Any], ...], tuple[type, ...]]


def keepable(values: Iterable[Any]) -> bool:
    """Whether what is written of ``values`` may be kept by value: equal values of one type are written alike, but
    0.0 and -0.0 and values of other types (written as their ``str``: ``Decimal("1.0") == Decimal("1.00")``); and
    their JSON tells them apart (finite floats)."""
    return all(type(value) in _KEPT_TYPES or (type(value) is float and value != 0 and math.isfinite(value))
               for value in values)  # fmt: skip


def remember(cache: dict[Any, bytes], key: Any, written: bytes, values: Iterable[Any]) -> bytes:
    """``written`` kept in ``cache`` under ``key`` when its ``values`` are ``keepable`` (the cache emptied first when
    it holds ``_MAX_CACHED``: what is written from request ids never repeats, and must not grow it); ``written``."""
    if keepable(values):
        if len(cache) >= _MAX_CACHED:
            cache.clear()
        cache[key] = written
    return written


def attributes_key(attributes: Mapping[str, Any]) -> AttributesKey:
    """What caches of written attributes are keyed by: their items and their values' types (True, 1 and 1.0 are
    equal and hash alike, but are written apart). Attributes are kept only when ``keepable``: a key of others finds
    nothing (a 0.0 is never kept for a -0.0 to find)."""
    return tuple(attributes.items()), tuple(map(type, attributes.values()))


def varint(value: int) -> bytes:
    """A protobuf varint."""
    if value < 128:
        return _SMALL[value]
    if value < 16384:  # a span's length, mostly: two bytes without a loop
        return bytes(((value & 0x7F) | 0x80, value >> 7))
    out = bytearray()
    while value > 0x7F:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def _field(tag: bytes, payload: bytes) -> bytes:
    """A length-delimited field (bytes, string, message) under its tag byte (field number << 3 | 2)."""
    return tag + varint(len(payload)) + payload


def _any_value(value: Any) -> bytes:
    if isinstance(value, bool):
        return b"\x10\x01" if value else b"\x10\x00"
    if isinstance(value, int):
        return b"\x18" + varint(value & 0xFFFFFFFFFFFFFFFF)  # int64: two's complement as a varint
    if isinstance(value, float):
        return b"\x21" + _DOUBLE.pack(value)
    return _field(b"\x0a", str(value).encode())


def _attribute(key: str, value: Any) -> bytes:
    """Span field 9, a ``KeyValue``: key (1) and an ``AnyValue`` (2)."""
    typed = (key, type(value), value)
    cached = _ATTRIBUTES.get(typed)
    if cached is None:
        # (never 0.0 kept: -0.0 would find it, they are equal)
        written = _field(b"\x4a", _field(b"\x0a", key.encode()) + _field(b"\x12", _any_value(value)))
        return remember(_ATTRIBUTES, typed, written, (value,))
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


#: of a child span (``family_fields``), what does not vary (its tag and length, name, kind, attributes, links, and
#: the tag of its id), by name and attributes (``attributes_key``; when it has no links: a batch's attributes repeat
#: in its requests)
_PREFIXES: dict[tuple[str, AttributesKey], bytes] = {}
#: a child's fields after its prefix: its id, its trace id (1) and the tag of its start, its start (7), its parent (4)
#: and the tag of its end, its end (8); ``family_fields`` writes them after each prefix with one ``Struct``, by the
#: prefixes' lengths
_IDS_AND_TIMES = "8s19sQ11sQ"
#: ``family_fields``' ids: its children's trace id and the tag of their start (19 bytes), their parent and the tag of
#: their end (11), the span's own trace id and id (28), big-endian (a span id as an int is its bytes so)
_SHARED = struct.Struct(">2s16sB2sQB2s16s2sQ")
#: a link (13): its tag and length, its trace id (1), its span id (2)
_LINK = struct.Struct(">4s16s2sQ")
_STRUCTS: dict[tuple[int, ...], Any] = {}
_IDS_AND_TIMES_SIZE = struct.calcsize("<" + _IDS_AND_TIMES)
#: encoded attributes by ``attributes_key`` (a batch's repeat in each of its requests)
_ATTRIBUTE_SETS: dict[AttributesKey, bytes] = {}
#: an attribute's key (1) and the tag of its value (2), by key
_KEYS: dict[str, bytes] = {}
#: ``Struct``s splitting ``count`` span ids (8 bytes each), by count
#: ``repeated``'s: by unit and count, and the repetitions they hold in all (cleared past the bound)
_REPEATED: dict[tuple[str, int], struct.Struct] = {}
_struct_items = 0
MAX_STRUCT_ITEMS = 1 << 15


def child_prefix(name: str, attributes: Mapping[str, Any] | None = None, links: Sequence[Sequence[Any]] = ()) -> bytes:
    """What is fixed in a child span (INTERNAL) of ``family_fields``: all but its ids and times. A message's fields
    may come in any order: these come first. ``links``: (trace id as hex, span id as an int) of each linked span."""
    if links:
        return _prefix(name, attributes, links)
    key = (name, attributes_key(attributes) if attributes else ((), ()))
    prefix = _PREFIXES.get(key)
    if prefix is None:
        return remember(_PREFIXES, key, _prefix(name, attributes, ()), attributes.values() if attributes else ())
    return prefix


def _prefix(name: str, attributes: Mapping[str, Any] | None, links: Sequence[Sequence[Any]]) -> bytes:
    body = [_named(name, SPAN_KIND_INTERNAL)]
    if attributes:
        body.append(attribute_set(attributes))
    if links:  # links (13): trace id 1, span id 2
        body += [
            _LINK.pack(b"\x6a\x1c\x0a\x10", bytes.fromhex(trace_id), b"\x12\x08", span_id)
            for trace_id, span_id in links
        ]
    body.append(b"\x12\x08")
    written = b"".join(body)
    return b"\x12" + varint(len(written) + _IDS_AND_TIMES_SIZE) + written


def family_fields(
    prefixes: Sequence[bytes],
    child_ids: Sequence[bytes],
    starts: list[int],
    ends: list[int],
    ids: tuple[str, int, str],
    written: bytes,
    times: tuple[int, int],
    error: str,
) -> bytes:
    """A span of kind SERVER (``ids``: trace, span and parent span, hex but the span an int; the parent "" for a
    root) with its name, kind and attributes already ``written`` (``server_prefix``, ``attribute``) and an error's
    status, and its children (INTERNAL), as fields
    of a ``ScopeSpans``: children first, each its prefix (``child_prefix``) then its id, its times and the ids it
    shares with the others, at the same place in ``child_ids``, ``starts`` and ``ends``: one ``pack`` for them all,
    its arguments laid out by slices (no Python step a span)."""
    trace_id, span_id, parent_id = ids
    # what the children share (their trace id and the tag of their start; their parent and the tag of their end),
    # then the span's own ids, in one pack (an int's hex costs more than its bytes)
    trace = bytes.fromhex(trace_id)
    shared = _SHARED.pack(
        b"\x0a\x10", trace, _START, b"\x22\x08", span_id, _END, b"\x0a\x10", trace, b"\x12\x08", span_id
    )
    if parent_id:
        shared += bytes.fromhex(f"2208{parent_id}")
    count = len(prefixes)
    arguments: list[Any] = [shared[:19]] * (6 * count)
    arguments[0::6] = prefixes
    arguments[1::6] = child_ids
    arguments[3::6] = starts
    arguments[4::6] = [shared[19:30]] * count
    arguments[5::6] = ends
    lengths = tuple(map(len, prefixes))
    pack = _STRUCTS.get(lengths) or _struct(lengths)
    body = [shared[30:], written, _TIMES.pack(_START, times[0], _END, times[1])]
    if error:
        body.append(_status(error))
    server = b"".join(body)
    return b"".join((pack(*arguments), b"\x12", varint(len(server)), server))


def server_prefix(name: str, attributes: Mapping[str, Any]) -> bytes:
    """A span of kind SERVER's name (5), kind (6) and attributes (9): for ``family_fields``."""
    return _named(name, SPAN_KIND_SERVER) + attribute_set(attributes)


def _struct(lengths: tuple[int, ...]) -> Any:
    if len(_STRUCTS) >= _MAX_CACHED:
        _STRUCTS.clear()
    pack = _STRUCTS[lengths] = struct.Struct("<" + "".join(f"{n}s{_IDS_AND_TIMES}" for n in lengths)).pack
    return pack


def attribute_set(attributes: Mapping[str, Any]) -> bytes:
    """Attributes (span field 9) that repeat from span to span: written once (by their items)."""
    key = attributes_key(attributes)
    written = _ATTRIBUTE_SETS.get(key)
    if written is None:
        return remember(_ATTRIBUTE_SETS, key, b"".join(_attribute(k, v) for k, v in attributes.items()),
                        attributes.values())  # fmt: skip
    return written


def attribute(key: str, value: str) -> bytes:
    """A string attribute (span field 9) that never repeats (a request's id): written, not kept."""
    head = _KEYS.get(key)
    if head is None:
        if len(_KEYS) >= _MAX_CACHED:
            _KEYS.clear()
        head = _KEYS[key] = _field(b"\x0a", key.encode()) + b"\x12"
    encoded = value.encode()
    size = len(encoded)
    if len(head) + size + 3 < 128:  # most: each length one byte, the attribute one format
        return b"\x4a%c%s%c\x0a%c%s" % (len(head) + size + 3, head, size + 2, size, encoded)
    any_value = b"\x0a" + varint(size) + encoded
    key_value = head + varint(len(any_value)) + any_value
    return b"\x4a" + varint(len(key_value)) + key_value


def repeated(unit: str, count: int) -> struct.Struct:
    """A ``Struct`` of ``count`` times ``unit`` (little-endian but where ``unit``'s first character says otherwise),
    remembered. A chunk's holds an item per field of each of its spans, so the memory is bounded by the items its
    ``Struct``s hold (``MAX_STRUCT_ITEMS``), not by their number: chunks of ever new sizes would otherwise keep
    hundreds of MB."""
    global _struct_items
    made = _REPEATED.get((unit, count))
    if made is None:
        if _struct_items + count > MAX_STRUCT_ITEMS:
            _REPEATED.clear()
            _struct_items = 0
        made = _REPEATED[(unit, count)] = struct.Struct(unit[0] + unit[1:] * count)
        _struct_items += count
    return made


def split_ids(ids: bytes) -> tuple[bytes, ...]:
    """Span ids, 8 bytes each, in one string apart."""
    return repeated("<8s", len(ids) // 8).unpack(ids)


def random_ids(count: int) -> list[bytes]:
    """``count`` random span ids, none all zero (W3C: an invalid id), drawn at once (cut by a ``Struct`` of one id:
    a chunk's count is ever new, and a ``Struct`` of ``count`` ids would be compiled each time)."""
    ids = list(map(itemgetter(0), _ID.iter_unpack(random.getrandbits(64 * count).to_bytes(8 * count, "little"))))
    while _NO_ID in ids:  # one chance in 2**64 a span
        ids = list(map(itemgetter(0), _ID.iter_unpack(random.getrandbits(64 * count).to_bytes(8 * count, "little"))))
    return ids


_NO_ID = bytes(8)
_ID = struct.Struct("8s")


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
