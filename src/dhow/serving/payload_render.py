"""How the payload log's writer process renders an event (``payload_log.FIELDS``) as a masked CloudEvent's JSON.

An event's work here runs on the core the load generator and the model share with the writer on a small machine:
it is kept to a few Python operations. A REST JSON request comes as the body the client sent and is written as
it is (neither parsed nor written again: parsing and writing its numbers cost ~45k instructions of ~95k an
event) when nothing in it can need masking: the model has no field rule, and either no detectors or a body of the
bare protocol (``{"inputs": [...]}`` whose tensors hold exactly name, datatype, shape and data, and no string but
the keys, names and datatypes, which a count of its quotes against the number of tensors the server decoded shows:
``_counted_bare``), and the request was served (a refused one's tensor names may be any text). Any other body is
parsed, and every string in it that is not one of the protocol's keys, a served tensor's name or a datatype goes
through the masker (text tensors, the request's ``id`` and ``parameters``, a tensor's ``parameters``, any other
key and its name), then written again in the same form.

The sink's thread hands over chunks (``cloud_events``): in one of many events, the common ones are made column by
column, with no Python step of their own, the same bytes ``cloud_event`` writes for each.
"""

from __future__ import annotations

import itertools
import operator
import secrets
import time
from collections.abc import Iterator
from typing import Any

import numpy as np
import orjson

from dhow.governance.masking import Masker
from dhow.monitoring.payload_log import EVENT_TYPES, INPUTS, MASKING, TENSORS, top_level

__all__ = ["FEW", "cloud_event", "cloud_events"]

#: event ids: a random prefix per process and a count, unique per source without a random draw per event
_ID_PREFIX = secrets.token_hex(6).encode()
_ids = itertools.count(1)
_second: tuple[int, bytes] = (-1, b"")
#: the JSON of the parts of an event that its request's model, version, caller and outcome decide, by those
_fixed: dict[tuple[str, ...], tuple[bytes, bytes]] = {}
#: kinds of fixed parts remembered at most (past it they are made again)
_FIXED_LIMIT = 4096
_dumps = orjson.dumps


def _second_of(whole: int) -> bytes:
    """RFC 3339 UTC of a second, to the decimal point (events of one second share it: only the sink's thread
    calls this)."""
    global _second
    _second = (whole, time.strftime("%Y-%m-%dT%H:%M:%S.", time.gmtime(whole)).encode())
    return _second[1]


def _fixed_parts(source: str, key: tuple[str, ...]) -> tuple[bytes, bytes]:
    """The envelope's ``source``, ``type`` and ``subject`` (after its ``id``), and the data's ``model`` to
    ``outcome`` (after its ``request_id``), as JSON."""
    model, version, principal, tenant, region, outcome = key
    envelope = _dumps({
        "source": source, "type": EVENT_TYPES[outcome == "success"],
        "subject": f"{model}/{version}" if version else model,
    })  # fmt: skip
    data = _dumps({"model": model, "version": version, "principal": principal, "tenant": tenant,
                   "data_region": region, "outcome": outcome})  # fmt: skip
    if len(_fixed) >= _FIXED_LIMIT:
        _fixed.clear()
    _fixed[key] = parts = (b"," + envelope[1:-1] + b',"time":"', b"," + data[1:-1])
    return parts


def _request_of(inputs: Any, masker: Masker, tensors: int, failed: bool) -> bytes | dict[str, Any]:
    """The event's ``request``: the Open Inference Protocol request, masked. A JSON body as the client sent it,
    embedded as it is when nothing in it can need masking; else parsed and its tensors masked. Decoded tensors
    (gRPC, the binary extension) in the JSON form: ``{"inputs": [{name, datatype, shape, data}]}``.

    ``tensors``: how many the server decoded from the body (-1: not known, the body is parsed to tell).
    ``failed``: the request was refused, so its tensors' names may be any text (a served request's names are the
    model's own inputs): they are masked too, and the body is never embedded as sent."""
    if type(inputs) is list:
        tensors_json = [{"name": n, "datatype": d, "shape": s, "data": v} for n, d, s, v in inputs]
        return {"inputs": _masked(masker, tensors_json, names=failed)}
    body = inputs.encode() if type(inputs) is str else inputs
    policy = masker.policy
    document: Any = None
    if not policy.fields and (
        not policy.detectors
        or (
            not failed
            and (_counted_bare(body, tensors) if tensors >= 0 else _bare(document := orjson.loads(body), body))
        )
    ):
        # as sent, on one line (JSON's newlines outside strings are spaces; inside them, escaped)
        if 10 in body or 13 in body:  # (a byte's number: ``b"x" in body`` raises and clears an exception, ~2k)
            body = body.replace(b"\n", b" ").replace(b"\r", b" ")
        return body
    if document is None:
        document = orjson.loads(body)  # the server decoded it: an object
    masked: dict[str, Any] = {}
    for key, value in document.items():
        if key == "inputs" and isinstance(value, list):
            masked[key] = _masked(masker, value, names=failed)
        else:  # the request's id and parameters, and whatever else the client sent (its keys too: any text)
            masked[key if key in _REQUEST_MEMBERS else masker.mask_text(key)] = masker.mask_value(value, key)
    return masked


def _shallow_request(inputs: Any, masker: Masker, failed: bool) -> dict[str, Any]:
    """A request whose members are nested past what masking or JSON writing takes (parameters nested hundreds of
    levels deep: a client's choice, answered all the same): its tensors masked as ever (a tensor's own members
    besides name, datatype, shape and data cut as below) and, of its other members, their top-level text, numbers
    and booleans, masked (what an event shows of its own parameters)."""
    document = orjson.loads(inputs) if isinstance(inputs, str | bytes | bytearray | memoryview) else None
    if not isinstance(document, dict):  # decoded tensors: nothing nested but their data
        return {"inputs": _masked(masker, [{"name": n, "datatype": d, "shape": s, "data": v}
                                           for n, d, s, v in inputs], names=failed)}  # fmt: skip
    shallow: dict[str, Any] = {}
    for key, value in document.items():
        if key == "inputs" and isinstance(value, list):
            tensors = [
                {k: v if k in _TENSOR_MEMBERS else top_level(v) for k, v in tensor.items()}
                if isinstance(tensor, dict)
                else top_level(tensor)
                for tensor in value
            ]
            shallow[key] = _masked(masker, tensors, names=failed)
        else:
            name = key if key in _REQUEST_MEMBERS else masker.mask_text(key)
            shallow[name] = masker.mask_value(top_level(value), key)
    return shallow


#: the four members of a bare request's tensor
_TENSOR_MEMBERS = frozenset(("name", "datatype", "shape", "data"))


def _counted_bare(body: bytes, tensors: int) -> bool:
    """Whether a body the server decoded into ``tensors`` tensors is a bare request (no string but the keys, names
    and datatypes), by a count of its quotes alone (no parse: ``orjson`` reading a body of 32 floats costs ~18k
    instructions, a count a few hundred).

    The server decoded it (``wire.v2.decode_request``: a JSON object whose ``inputs`` holds ``tensors`` objects,
    each with a string name and datatype, a shape and data), so it holds at least ``1 + 6 * tensors`` strings:
    ``inputs``, and each tensor's four keys, name and datatype. A quote opens or closes a string or is escaped
    inside one, so ``2 + 12 * tensors`` quotes leave room for no other string (an id, parameters, another key or a
    repeated one, text in ``data``); a body with more is parsed and masked."""
    return body.count(34) == 2 + 12 * tensors  # 34: a quote


def _bare(document: Any, body: bytes) -> bool:
    """Whether ``body`` (parsed: ``document``) is a bare Open Inference Protocol JSON request: ``{"inputs": [...]}``
    whose tensors hold exactly name, datatype, shape and data, its only strings the keys, names and datatypes.

    For a body whose number of tensors is not known (an event handed over without it): parsed, its form checked,
    and its quotes counted as in ``_counted_bare``: a body of ``n`` such tensors whose quotes number ``2 + 12 n``
    holds exactly those ``1 + 6 n`` strings (``inputs``; each tensor's four keys, name and datatype); any other
    string anywhere (a repeated key the parser dropped, text in ``data``, an id, parameters) adds two."""
    if type(document) is not dict or len(document) != 1:
        return False
    tensors = document.get("inputs")
    if type(tensors) is not list:
        return False
    for tensor in tensors:
        if (
            type(tensor) is not dict
            or tensor.keys() != _TENSOR_MEMBERS
            or type(tensor["name"]) is not str
            or type(tensor["datatype"]) is not str
        ):
            return False
    return body.count(34) == 2 + 12 * len(tensors)


#: a tensor's members that hold no text but a name, a datatype or numbers
_PLAIN_MEMBERS = frozenset(("name", "datatype", "shape"))
#: the members of a request and of a tensor that the protocol names (any other key is the client's text)
_REQUEST_MEMBERS = frozenset(("id", "parameters", "inputs", "outputs"))
_KNOWN_MEMBERS = _TENSOR_MEMBERS | {"parameters"}


def _masked(masker: Masker, tensors: list[Any], *, names: bool = False) -> list[Any]:
    """``tensors`` (the protocol's JSON form: a request's inputs, an answer's outputs) with the ones that hold text
    anywhere (not only a first value: ``[1, "a@b.c"]``, ``[null, …]``, ``[[], […]]``), or that a field rule names,
    or that carry more than name, datatype, shape and data (a tensor's ``parameters``, another key), masked (copies
    of those; ``tensors`` itself when none does: most hold numbers only); anything not a tensor masked whole;
    ``names``: every tensor's name masked too (a refused request's names are any text)."""
    fields = masker.policy.fields
    masked = []
    for tensor in tensors:
        if not isinstance(tensor, dict):
            tensor = masker.mask_value(tensor, "")
        else:
            name = str(tensor.get("name"))
            if names or name in fields or len(tensor) > 4 or 34 in _dumps(tensor.get("data")):
                tensor = {
                    (key if key in _KNOWN_MEMBERS else masker.mask_text(str(key))): (
                        (masker.mask_text(value) if names and key == "name" and type(value) is str else value)
                        if key in _PLAIN_MEMBERS
                        else masker.mask_value(value, name if key == "data" else key)
                    )
                    for key, value in tensor.items()
                }
        masked.append(tensor)
    return masked


#: what precedes the outputs in a JSON answer (``wire.v2.encode_response`` writes them last)
_OUTPUTS_KEY = b'"outputs":['
#: where the outputs' array starts after ``_OUTPUTS_KEY`` is found
_CUT = len(_OUTPUTS_KEY) - 1


def _outputs_of(outputs: Any, masker: Masker) -> bytes:
    """The event's ``outputs``, masked, as JSON: the protocol's ``[{name, datatype, shape, data}]``. Of a JSON
    answer (bytes), its ``outputs`` as the client got them, cut out as they are when they hold numbers only (each
    tensor's 12 quotes: its four keys, name and datatype; a text value or an escaped quote adds more) and no field
    rule names one; else parsed and masked. Tensors (gRPC, the binary extension, lists) in that form."""
    if type(outputs) is bytes:
        start = outputs.rfind(_OUTPUTS_KEY)  # (a string cannot hold it: its quotes are escaped)
        if start < 0:  # (not an answer of the protocol: parsed, its outputs taken)
            document = orjson.loads(outputs)
            tensors = document.get("outputs") if type(document) is dict else None
            return _dumps(_masked(masker, tensors if type(tensors) is list else []))
        written = outputs[start + _CUT : -1]  # (the array; the answer's closing brace cut off)
        if written.count(34) == 12 * written.count(b'"datatype":') and not masker.policy.fields:
            return written
        return _dumps(_masked(masker, orjson.loads(written)))
    tensors = [{"name": n, "datatype": d, "shape": s, "data": v} for n, d, s, v in outputs]
    return _dumps(_masked(masker, tensors))


#: a CloudEvent with its parts (``cloud_event``): one formatting per event (each ``%`` alone costs about 1k
#: instructions)
_EVENT = (
    b'{"specversion":"1.0","id":"%s-%d"%s%s%06dZ","datacontenttype":"application/json","data":{"request_id":%s%s,'
    b'"latency_ms":%d.%03d,"parameters":%s,"request":%s%s}}'
)


def cloud_event(event: list[Any], masker: Masker, source: str) -> bytes:
    """The event (``payload_log.FIELDS``, its ``time`` Unix time) masked, as the JSON of a CloudEvents 1.0
    structured event: ``id`` unique per event, ``subject`` the model and version, ``time`` RFC 3339 UTC to the
    microsecond.

    Written as pieces of JSON put together (what the model, version, caller and outcome decide made once for all
    their events, each string by ``orjson``): a dict per event for one ``orjson.dumps`` cost twice as much."""
    key = tuple(event[1:7])
    fixed = _fixed.get(key)
    if fixed is None:
        fixed = _fixed_parts(source, key)
    unix, parameters, outputs, error = event[8], event[10], event[12], event[7]
    whole = int(unix)
    second = _second[1] if _second[0] == whole else _second_of(whole)
    micro = int((unix - whole) * 1e6 + 0.5)  # int(… + 0.5), not round(): its argument parsing costs more
    latency = int(event[9] * 1e6 + 0.5)  # in ms to the µs
    failed = event[6] != "success"
    try:
        request = _request_of(event[11], masker, event[14] if len(event) > 14 else -1, failed)
        request_json = request if type(request) is bytes else _dumps(request)
    except (TypeError, RecursionError):  # members nested past what masking or JSON writing takes (a client's)
        request_json = _dumps(_shallow_request(event[11], masker, failed))
    tail = b"" if outputs is None else b',"outputs":' + _outputs_of(outputs, masker)
    if error:
        tail += b',"error":' + _dumps(masker.mask_text(error))  # an error may quote what the request held
    return _EVENT % (
        _ID_PREFIX, next(_ids), fixed[0], second, micro if micro < 1_000_000 else 999_999, _dumps(event[0]),
        fixed[1], latency // 1000, latency % 1000,
        # (masked as the request's own ``parameters`` are: a text parameter may hold what the detectors find)
        _dumps(masker.mask_value(top_level(parameters), "parameters"))
        if parameters
        else b"{}",
        request_json, tail,
    )  # fmt: skip


#: the constant pieces of a common event's line (``cloud_events``)
_OPENING = b'{"specversion":"1.0","id":"' + _ID_PREFIX + b"-"
_DATA = b'Z","datacontenttype":"application/json","data":{"request_id":"'
_LATENCY, _REQUEST, _OUTPUTS, _CLOSING = b',"latency_ms":', b',"parameters":{},"request":', b',"outputs":', b"}}"
_POINT = b"."
#: a chunk of fewer events is rendered one by one (the columns' calls cost more than they save)
FEW = 24


#: ``_fixed``'s parts as ``cloud_events`` puts them between the others: after the id's digits (its closing quote
#: first), and after the request id (its closing quote first, the latency's name last)
_joints: dict[tuple[str, ...], tuple[bytes, bytes]] = {}


def _joints_of(source: str, key: tuple[str, ...]) -> tuple[bytes, bytes]:
    envelope, data = _fixed.get(key) or _fixed_parts(source, key)
    if len(_joints) >= _FIXED_LIMIT:
        _joints.clear()
    _joints[key] = parts = (b'"' + envelope, b'"' + data + _LATENCY)
    return parts


def cloud_events(
    events: list[list[Any]], maskers: dict[int, Masker], source: str
) -> tuple[list[tuple[str, bytes]], list[tuple[list[Any], Exception]]]:
    """A chunk of events rendered as ``cloud_event`` renders each (the same bytes but the number in the id), in
    their order, and the events that could not be (with why).

    The common event (answered, no parameters, a bare JSON body or a model without detectors, numbers for
    outputs) takes no Python step of its own: the chunk is read as columns (one per field), and each check and
    each part is one call over a column (``map``, ``numpy``, one ``orjson`` call for the numbers and one for the
    request ids), the pieces of each line joined by ``map``. A Python step per event costs ~1-2k instructions,
    formatting an event's ~230 bytes of template by ``%`` ~6k, counting a body's quotes by ``bytes.count`` ~5k.
    Any other event goes through ``cloud_event``, which parses and masks what it must; so does a chunk of fewer
    than ``FEW`` events, or one whose columns raise (a value orjson cannot write: each event then fails alone)."""
    if len(events) < FEW:
        return _one_by_one(events, maskers, source)
    try:
        common = _common(events, maskers)
        if common is None:
            return list(zip([event[0] for event in events], _lines(events, maskers, source), strict=True)), []
        lines = iter(_lines([event for event, plain in zip(events, common, strict=True) if plain], maskers, source))
    except Exception:
        return _one_by_one(events, maskers, source)
    return _one_by_one(events, maskers, source, common, lines)


def _one_by_one(
    events: list[list[Any]],
    maskers: dict[int, Masker],
    source: str,
    common: list[bool] | None = None,
    lines: Iterator[bytes] | None = None,
) -> tuple[list[tuple[str, bytes]], list[tuple[list[Any], Exception]]]:
    """Each event by ``cloud_event``, but those ``common`` marks, whose lines ``lines`` holds in their order."""
    rendered: list[tuple[str, bytes]] = []
    failures: list[tuple[list[Any], Exception]] = []
    for n, event in enumerate(events):
        try:
            if common is not None and lines is not None and common[n]:
                rendered.append((event[0], next(lines)))
            else:
                rendered.append((event[0], cloud_event(event, maskers[event[MASKING]], source)))
        except Exception as exc:  # a value masking or JSON cannot take: that event fails, not the others
            failures.append((event, exc))
    return rendered, failures


def _common(events: list[list[Any]], maskers: dict[int, Masker]) -> list[bool] | None:
    """None when every event of the chunk is of the common kind, each column checked by one call; else which are
    (a Python step per event)."""
    if not events or len(set(map(len, events))) != 1 or len(events[0]) != TENSORS + 1:
        return [_is_common(event, maskers) for event in events]
    columns = list(zip(*events, strict=True))
    numbers = set(columns[MASKING])
    if (
        not numbers.issubset(maskers)
        or any(maskers[number].policy.fields for number in numbers)
        or set(map(type, columns[0])) != {str}
        or set(map(type, columns[INPUTS])) != {bytes}
        or set(map(type, columns[12])) != {bytes}
        or columns[6].count("success") != len(events)
        or any(columns[7])  # an error
        or any(columns[10])  # parameters
    ):
        return [_is_common(event, maskers) for event in events]
    if any(maskers[number].policy.detectors for number in numbers):
        # Each body the server decoded into n tensors holds at least 2 + 12 n quotes (``_counted_bare``): the sum
        # is the sum of those least counts only if each body is bare, and one count over them all tells.
        joined = np.frombuffer(b"".join(columns[INPUTS]), np.uint8)
        if int(np.count_nonzero(joined == 34)) != 2 * len(events) + 12 * sum(columns[TENSORS]):
            return [_is_common(event, maskers) for event in events]
    return None


def _is_common(event: list[Any], maskers: dict[int, Masker]) -> bool:
    """Whether one event is of the common kind (``cloud_events``)."""
    masker = maskers.get(event[MASKING]) if len(event) == TENSORS + 1 else None
    if masker is None or masker.policy.fields:
        return False
    body = event[INPUTS]
    return (
        type(event[0]) is str
        and type(body) is bytes
        and type(event[12]) is bytes
        and event[6] == "success"
        and not event[7]
        and not event[10]
        and (not masker.policy.detectors or _counted_bare(body, event[TENSORS]))
    )


def _lines(events: list[list[Any]], maskers: dict[int, Masker], source: str) -> list[bytes]:
    """Common events (``_common``) as ``cloud_event`` writes them, made column by column."""
    if not events:
        return []
    count = len(events)
    (ids, models, versions, principals, tenants, regions, outcomes, _, times, latencies, _, bodies, outputs,
     _, _) = zip(*events, strict=True)  # fmt: skip
    unix = np.array(times, np.float64)
    whole = np.floor(unix)
    seconds = whole.astype(np.int64).tolist()
    texts = {second: _second_of(second) for second in set(seconds)}
    # the numbers as digits, by one orjson call: id, microseconds + 10⁶ and the latency's ms and µs + 10³ (their
    # leading 1 cut off: zero-padded); made as cloud_event's int(… + 0.5) makes them (the same float arithmetic)
    numbers = np.empty((count, 4), np.int64)
    numbers[:, 0] = np.fromiter(itertools.islice(_ids, count), np.int64, count)
    numbers[:, 1] = np.minimum(((unix - whole) * 1e6 + 0.5).astype(np.int64), 999_999) + 1_000_000
    numbers[:, 2], numbers[:, 3] = np.divmod((np.array(latencies, np.float64) * 1e6 + 0.5).astype(np.int64), 1000)
    numbers[:, 3] += 1000
    digits = _dumps(numbers.ravel(), option=orjson.OPT_SERIALIZE_NUMPY)[1:-1].split(b",")
    cut = operator.itemgetter(slice(1, None))
    # the request ids cut at '","', which no JSON string holds (a quote inside one is escaped)
    quoted = orjson.dumps(ids)[2:-2].split(b'","')
    keys = list(zip(models, versions, principals, tenants, regions, outcomes, strict=True))
    found = list(map(_joints.get, keys))
    joints: list[tuple[bytes, bytes]] = (
        found  # type: ignore[assignment]
        if None not in found
        else [parts or _joints_of(source, key) for parts, key in zip(found, keys, strict=True)]
    )
    each, first, second = itertools.repeat, operator.itemgetter(0), operator.itemgetter(1)
    # the answers' outputs, cut out as they are (``_outputs_of``); numbers only (each tensor's 12 quotes, and no
    # tensor has fewer), else those with text masked
    starts = list(map(bytes.rfind, outputs, each(_OUTPUTS_KEY)))
    written: list[bytes] = list(
        map(operator.getitem, outputs, map(slice, map(operator.add, starts, each(_CUT)), each(-1)))
    )
    joined = b"".join(written)
    if -1 in starts or joined.count(34) != 12 * joined.count(b'"datatype":'):
        for n, (start, piece) in enumerate(zip(starts, written, strict=True)):
            if start < 0 or piece.count(34) != 12 * piece.count(b'"datatype":'):
                written[n] = _outputs_of(outputs[n], maskers[events[n][MASKING]])
    joined = b"".join(bodies)
    if 10 in joined or 13 in joined:  # as sent, on one line (as cloud_event writes it)
        bodies = tuple(body.replace(b"\n", b" ").replace(b"\r", b" ") for body in bodies)
    return list(map(b"".join, zip(
        each(_OPENING), digits[0::4], map(first, joints), map(texts.__getitem__, seconds), map(cut, digits[1::4]),
        each(_DATA), quoted, map(second, joints), digits[2::4], each(_POINT), map(cut, digits[3::4]), each(_REQUEST),
        bodies, each(_OUTPUTS), written, each(_CLOSING), strict=False,  # (the constants repeat without end)
    )))  # fmt: skip
