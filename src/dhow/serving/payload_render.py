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
"""

from __future__ import annotations

import itertools
import secrets
import time
from typing import Any

import orjson

from dhow.governance.masking import Masker
from dhow.monitoring.payload_log import EVENT_TYPES

__all__ = ["cloud_event"]

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
    """``tensors`` (the protocol's JSON form) with the ones that hold text, or that a field rule names, or that
    carry more than name, datatype, shape and data (a tensor's ``parameters``, another key), masked (copies of
    those); ``names``: every tensor's name masked too (a refused request's names are any text)."""
    fields = masker.policy.fields
    masked = []
    for tensor in tensors:
        if isinstance(tensor, dict):
            name, data = str(tensor.get("name")), tensor.get("data")
            first = data
            while type(first) is list and first:
                first = first[0]
            if names or type(first) is str or name in fields or tensor.get("datatype") == "BYTES" or len(tensor) > 4:
                # (a ragged text tensor may start with an empty list: its datatype says text)
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


def _masked_outputs(masker: Masker, tensors: dict[str, Any]) -> dict[str, Any]:
    """``tensors`` with the ones that hold text, or that a field rule names, masked (``tensors`` itself when none
    does: most events hold numbers only)."""
    fields = masker.policy.fields
    masked = None
    for name, data in tensors.items():
        first = data
        while type(first) is list and first:
            first = first[0]
        if type(first) is str or name in fields:
            if masked is None:
                masked = dict(tensors)
            masked[name] = masker.mask_value(data, name)
    return tensors if masked is None else masked


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
    request = _request_of(event[11], masker, event[14] if len(event) > 14 else -1, event[6] != "success")
    tail = b""
    if outputs is not None:
        written = _dumps(outputs)
        # numbers only (each name its two quotes: a text value or an escaped quote adds more) and no field rule: as
        # they are, without walking them
        if written.count(34) != 2 * len(outputs) or masker.policy.fields:
            written = _dumps(_masked_outputs(masker, outputs))
        tail = b',"outputs":' + written
    if error:
        tail += b',"error":' + _dumps(masker.mask_text(error))  # an error may quote what the request held
    return _EVENT % (
        _ID_PREFIX, next(_ids), fixed[0], second, micro if micro < 1_000_000 else 999_999, _dumps(event[0]),
        fixed[1], latency // 1000, latency % 1000,
        # (masked as the request's own ``parameters`` are: a text parameter may hold what the detectors find)
        _dumps(masker.mask_value({k: v for k, v in parameters.items() if isinstance(v, str | int | float | bool)},
                                 "parameters"))
        if parameters
        else b"{}",
        request if type(request) is bytes else _dumps(request), tail,
    )  # fmt: skip
