"""A chunk of traced requests' records written as OTLP protobuf at once: what tracing's writer process exports.

``tracing.record_fields`` writes a request's spans in about 70 C calls (each 1-3k instructions here): a chunk's
work is done here a fixed number of calls for the whole chunk instead, and a Python step a request that calls
little. Its columns (``zip``) are converted at once: the trace ids' hex in one ``bytes.fromhex`` (with the tags
around them), the span ids in one ``struct`` pack, the request ids in one ``map``; the stages' ids and times of all
requests in one pack; span ids drawn at once. A request's fixed parts (its span's name and attributes, a batch's
prefixes) are looked up once a run of requests of the same model and version, or batch.

The spans come out in another order than ``record_fields`` writes them (the chunk's stages first, then its
requests' own spans): a ``ScopeSpans``' spans may come in any order. A chunk with a record it cannot write raises:
the writer then writes its records one by one, and that one fails alone.
"""

from __future__ import annotations

import struct
from collections.abc import Sequence
from itertools import repeat
from operator import itemgetter
from typing import Any

import orjson

from dhow.monitoring.otlp import (
    AttributesKey,
    attribute,
    attributes_key,
    child_prefix,
    keepable,
    random_ids,
    remember,
    varint,
)
from dhow.monitoring.tracing import PLAIN_STAGES, served_fields

__all__ = ["chunk_fields"]

_dumps = orjson.dumps

_SMALL = [bytes((n,)) for n in range(128)]
#: a varint's bytes by value, for a span's length (two bytes past 127)
_LENGTHS = _SMALL + [bytes(((n & 0x7F) | 0x80, n >> 7)) for n in range(128, 4096)]
#: the request id's key (1) and the tag of its value (2), under which its string (1) goes
_REQUEST_ID = b"\x0a\x0fdhow.request_id\x12"
#: the bytes of a request's span but its parent, attributes and status: trace id (1) and span id (2) and their
#: tags, start and end times and their tags
_SERVER_SIZE = 28 + 18
#: a stage's bytes after its prefix and its id: its trace id and start, its parent and end, with their tags.
#: ``Struct``s of one unit, mapped over a chunk's columns (``map``: no Python step a unit), not one ``Struct`` of the
#: chunk's size: chunks come in ever new sizes, and compiling a ``Struct`` of hundreds of units cost more than
#: packing with it (~1.5 µs a traced request of the ~4 the render took, steps of ~110 requests)
_STAGE = struct.Struct("<19sQ11sQ")
_STAGE_SIZE = 8 + _STAGE.size
#: a request's trace id between the tags around it in its stages; its span id between the tags around it there (its
#: children's parent, then their end's tag); its span's start and end times with their tags; a link (13)
_HEAD, _TAIL, _TIMES, _LINK = (
    struct.Struct("<19s"),
    struct.Struct(">2sQB"),
    struct.Struct("<BQBQ"),
    struct.Struct(">4s16s2sQ"),
)
_TRACE_ID = struct.Struct("16s")


def _pieces(unit: struct.Struct, data: bytes) -> list[bytes]:
    """``data`` cut into ``unit``'s size (one ``s`` field)."""
    return list(map(itemgetter(0), unit.iter_unpack(data)))


def _interleaved(count: int, *columns: Sequence[Any]) -> list[Any]:
    """``columns`` item by item: a ``Struct``'s arguments for ``count`` rows (no Python step a row)."""
    width = len(columns)
    out: list[Any] = [None] * (width * count)
    for n, column in enumerate(columns):
        out[n::width] = column
    return out


def chunk_fields(chunk: Sequence[Sequence[Any]]) -> bytes:
    """The spans of ``chunk``'s records (``tracing.Record``) as fields of a ``ScopeSpans``: the spans
    ``tracing.record_fields`` writes of each. Raises on a record it cannot write."""
    count = len(chunk)
    traces, spans, parents, _, request_ids, _, _, entered, _, _, _, ends, _, batches, links = zip(*chunk, strict=True)
    if {*map(len, traces)} != {32} or not {*map(len, parents)} <= {0, 16}:
        raise ValueError("a trace id of 32 hex digits and a parent of 16 or none expected")
    # each request's trace id between the tags around it in its stages (1, then its start's), its span id between
    # the tags around it in them (their parent, 4, then their end's), its request id's bytes and its span's times
    heads = _pieces(_HEAD, bytes.fromhex("0a10" + "390a10".join(traces) + "39"))
    tails = list(map(_TAIL.pack, repeat(b"\x22\x08"), spans, repeat(0x41)))
    parented = [*filter(None, parents)]
    parent_ids = bytes.fromhex("2208" + "2208".join(parented)) if parented else b""
    encoded = list(map(str.encode, request_ids))
    times = list(map(_TIMES.pack, repeat(0x39), entered, repeat(0x41), ends))
    linked = _links([pair for batch, pairs in zip(batches, links, strict=True) if batch and pairs for pair in pairs])
    prefixes: list[bytes] = []
    # each stage's trace id and start, parent and end, with their tags: ``_STAGE`` a stage
    stages: list[Any] = []
    server: list[bytes] = []
    model_version: Any = None
    shared = b""
    answered_stages: tuple[bytes, ...] = ()
    computed_stages: tuple[bytes, ...] = ()
    served = batch_prefix = b""
    served_size = links_size = n_parent = n_link = 0
    for record, head, tail, request_id, span_times in zip(chunk, heads, tails, encoded, times, strict=True):
        _, _, parent, model, _, version, error, entered_ns, admitted, decoded, answered, end, wait, batch, pairs = (
            record
        )
        if batch:
            start, stop, attributes = batch
            # the requests of a batch come together. Compared as JSON (one call): True, 1 and 1.0, or 0.0 and -0.0,
            # are equal in Python but written apart; values JSON does not tell apart (None, NaN) are never shared
            text = _dumps(attributes)
            if text != shared:
                compute, links_size = child_prefix("compute", attributes), 0
                shared = text if keepable(attributes.values()) else b""
                answered_stages, computed_stages = (*PLAIN_STAGES[3], compute), (*PLAIN_STAGES[1], compute)
            if answered:
                prefixes += answered_stages
                stages += (head, entered_ns, tail, admitted, head, admitted, tail, decoded, head, start - wait, tail,
                           start, head, answered, tail, end, head, start, tail, stop)  # fmt: skip
            else:
                prefixes += computed_stages
                stages += (head, entered_ns, tail, admitted, head, admitted, tail, decoded, head, start - wait, tail,
                           start, head, start, tail, stop)  # fmt: skip
            if pairs:  # the batch's span, its links (13) after its fixed part (fields may come in any order)
                size = 30 * len(pairs)
                if size != links_size:
                    batch_prefix, links_size = _batch_prefix(attributes, size), size
                prefixes.append(batch_prefix + linked[n_link : n_link + size] + b"\x12\x08")
                n_link += size
                stages += (head, start, tail, stop)
        elif answered:
            prefixes += PLAIN_STAGES[2]
            stages += (head, entered_ns, tail, admitted, head, admitted, tail, decoded, head, answered, tail, end)
        else:
            prefixes += PLAIN_STAGES[0]
            stages += (head, entered_ns, tail, admitted, head, admitted, tail, decoded)
        if (model, version) != model_version:
            served, model_version = served_fields(model, version), (model, version)
            served_size = len(served)
        size = len(request_id)
        length = _SERVER_SIZE + served_size + size + 23
        if parent:
            parent_id = parent_ids[n_parent : n_parent + 10]
            n_parent += 10
            length += 10
        else:
            parent_id = b""
        if error:
            status = _status(error)
            length += len(status)
        else:
            status = b""
        if size < 107:  # each of its lengths one byte
            server += (b"\x12", _LENGTHS[length] if length < 4096 else varint(length), b"\x0a\x10", head[2:18],
                       b"\x12\x08", tail[2:10], parent_id, served, b"\x4a", _SMALL[size + 21], _REQUEST_ID,
                       _SMALL[size + 2], b"\x0a", _SMALL[size], request_id, span_times, status)  # fmt: skip
        else:
            own = attribute("dhow.request_id", request_id.decode())
            length += len(own) - size - 23
            server += (b"\x12", varint(length), b"\x0a\x10", head[2:18], b"\x12\x08", tail[2:10], parent_id,
                       served, own, span_times, status)  # fmt: skip
    if n_parent != len(parent_ids) or n_link != len(linked):
        raise ValueError("parents or links left over")
    count = len(prefixes)
    fields = iter(stages)  # (four arguments a stage: the same iterator four times)
    rest = list(map(_STAGE.pack, fields, fields, fields, fields))
    return b"".join(_interleaved(count, prefixes, random_ids(count), rest)) + b"".join(server)


def _links(pairs: list[Any]) -> bytes:
    """Links (13: trace id 1, span id 2) of (trace id as hex, span id as an int), one after the other."""
    if not pairs:
        return b""
    traces, spans = zip(*pairs, strict=True)
    if {*map(len, traces)} != {32}:
        raise ValueError("a linked trace id of 32 hex digits expected")
    trace_ids = _pieces(_TRACE_ID, bytes.fromhex("".join(traces)))
    return b"".join(map(_LINK.pack, repeat(b"\x6a\x1c\x0a\x10"), trace_ids, repeat(b"\x12\x08"), spans))


#: a batch's span's fixed part before its links, by its attributes and its links' size
_BATCH_PREFIXES: dict[tuple[AttributesKey, int], bytes] = {}


def _batch_prefix(attributes: Any, links_size: int) -> bytes:
    """A batch's span's tag and length, name, kind and attributes: ``child_prefix`` without its links and the tag of
    its id, its length counting ``links_size`` bytes of links."""
    key = (attributes_key(attributes), links_size)
    prefix = _BATCH_PREFIXES.get(key)
    if prefix is None:
        plain = child_prefix("batch", attributes)  # its tag and length, then its body ending in its id's tag
        header = 2
        while plain[header - 1] & 0x80:
            header += 1
        written = plain[header:]
        prefix = b"\x12" + varint(len(written) + _STAGE_SIZE + links_size) + written[:-2]
        return remember(_BATCH_PREFIXES, key, prefix, attributes.values())
    return prefix


def _status(error: str) -> bytes:
    """An error's status (15: message 2, code 3 ERROR)."""
    message = error.encode()
    body = b"\x12" + varint(len(message)) + message + b"\x18\x02"
    return b"\x7a" + varint(len(body)) + body
