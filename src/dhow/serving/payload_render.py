"""How the payload log's writer process renders an event (``payload_log.FIELDS``) as a masked CloudEvent's JSON.

One event costs tens of thousands of instructions here, on the core the load generator and the model share with
the writer on a small machine: the work per event is kept to a few Python operations. A REST JSON request's inputs
come as the body the client sent, parsed once and shaped; tensors are masked only when they hold text or a field
rule names them (numbers carry nothing for the detectors), and copied only then. (Tried: cutting the numeric arrays
out of the body and writing them back as the text they were, ``orjson.Fragment``, to spare parsing and writing
their numbers again; finding them in Python cost about as much as orjson's parsing and writing, 1k of 77k an event.)
"""

from __future__ import annotations

import itertools
import secrets
import time
from typing import Any

import numpy as np
import orjson

from dhow.governance.masking import Masker
from dhow.monitoring.payload_log import EVENT_TYPES

__all__ = ["cloud_event"]

#: event ids: a random prefix per process and a count, unique per source without a random draw per event
_ID_PREFIX = secrets.token_hex(6)
_ids = itertools.count(1)
_second: tuple[int, str] = (0, "")


def _rfc3339(unix: float) -> str:
    global _second
    whole = int(unix)
    if _second[0] != whole:  # events of one second share its formatting (only the sink's thread calls this)
        _second = (whole, time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(whole)))
    # int(… + 0.5), not round(): round's argument parsing cost more than the rest of the formatting
    return f"{_second[1]}.{min(999_999, int((unix - whole) * 1e6 + 0.5)):06d}Z"


def _shaped(data: Any, shape: list[int]) -> Any:
    """Row-major ``data`` (flat, or nested as the protocol also allows) as nested lists of ``shape``."""
    if not isinstance(data, list) or not shape:
        return data
    if data and isinstance(data[0], list):  # nested already (a tensor's items are all alike)
        return np.asarray(data, dtype=object).reshape(shape).tolist()
    if len(shape) == 1:
        return data
    if len(shape) == 2 and shape[0] == 1:
        return [data]  # one row: most requests
    step = len(data) // shape[0] if shape[0] else 0
    return [_shaped(data[i * step : (i + 1) * step], shape[1:]) for i in range(shape[0])]


def _inputs_of(body: str, masker: Masker) -> dict[str, Any]:
    """The inputs of an Open Inference Protocol JSON body (as the client sent it, already accepted by the server)
    as name -> nested lists of their shape, as the decoded tensors would be written, masked."""
    inputs: dict[str, Any] = {}
    for tensor in orjson.loads(body).get("inputs") or ():
        inputs[str(tensor.get("name"))] = _of_shape(tensor.get("data"), tensor.get("shape"))
    return _masked(masker, inputs)


def _of_shape(data: Any, shape: Any) -> Any:
    try:
        return _shaped(data, [int(n) for n in shape])
    except (ValueError, TypeError):  # the server took it: never expected, but written as sent
        return data


def _masked(masker: Masker, tensors: dict[str, Any]) -> dict[str, Any]:
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


def cloud_event(event: list[Any], masker: Masker, source: str) -> bytes:
    """The event (``payload_log.FIELDS``) masked, as the JSON of a CloudEvents 1.0 structured event: ``id`` unique
    per event, ``subject`` the model and version."""
    request_id, model, version, principal, tenant, region, outcome, error, unix, latency_s, parameters = event[:11]
    inputs, outputs = event[11], event[12]
    data: dict[str, Any] = {
        "request_id": request_id,
        "model": model,
        "version": version,
        "principal": principal,
        "tenant": tenant,
        "data_region": region,
        "outcome": outcome,
        "latency_ms": int(latency_s * 1e6 + 0.5) / 1000,  # to the µs (round(x, 3) formats x as text first)
        "parameters": {k: v for k, v in parameters.items() if isinstance(v, str | int | float | bool)}
        if parameters
        else {},
        "inputs": _inputs_of(inputs, masker) if isinstance(inputs, str) else _masked(masker, inputs),
    }
    if outputs is not None:
        data["outputs"] = _masked(masker, outputs)
    if error:
        data["error"] = masker.mask_text(error)  # an error may quote what the request held
    return orjson.dumps(
        {
            "specversion": "1.0",
            "id": f"{_ID_PREFIX}-{next(_ids)}",
            "source": source,
            "type": EVENT_TYPES[outcome == "success"],
            "subject": f"{model}/{version}" if version else model,
            "time": _rfc3339(unix),
            "datacontenttype": "application/json",
            "data": data,
        }
    )
