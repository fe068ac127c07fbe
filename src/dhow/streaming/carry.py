"""What a transport without message headers (Kinesis) carries in the body instead.

A Kinesis record is bytes and a partition key, nothing else. So:

- **requests** are the bodies a client would POST to the REST door, as they are: for ``v2-binary`` the JSON
  header's length, which Kafka carries in a header, is where the JSON object at the start of the body ends
  (``header_length``), so a producer writes exactly the bytes of a binary REST request;
- **replies** keep the request's partition key as theirs; the request id and the model version are the v2
  response's own ``id`` and ``model_version``, and the source's position goes in its ``parameters``
  (``dhow_source_stream``, ``dhow_source_shard``, ``dhow_source_sequence``: scalar values, as the protocol wants
  them). A ``json`` reply gets one more member, ``"_dhow"``, with the same five facts (``model_version``,
  ``request_id``, ``source_stream``, ``source_shard``, ``source_sequence``). A ``v2-binary`` reply's JSON header
  gets the same parameters and is found as a request's is;
- **dead letters** are a JSON envelope: the reason (``error_code``, ``error_reason``), the position, the model,
  the stream's name, when, the partition key, and the original bytes, exactly, in base64 (``data_base64``).

The consumer writes every reply's metadata as headers (the Kafka way); ``carried`` turns them into the above.
"""

from __future__ import annotations

import base64
import json
from typing import Any

import orjson

from dhow.streaming.formats import HEADER_LENGTH
from dhow.streaming.records import Header, Outgoing

__all__ = ["DEAD_LETTER", "carried", "header_length"]

#: the ``carry`` of a sink of dead letters (the others' is the stream's format)
DEAD_LETTER = "dead-letter"

_SOURCE = {"dhow-source-topic": "source_stream", "dhow-source-partition": "source_shard",
           "dhow-source-offset": "source_sequence"}  # fmt: skip
_DEAD = {"dhow-error-code": "error_code", "dhow-error-reason": "error_reason", "dhow-model": "model",
         "dhow-stream": "stream", "dhow-failed-at": "failed_at", **_SOURCE}  # fmt: skip
_DECODER = json.JSONDecoder()


def header_length(body: bytes) -> int | None:
    """Where the JSON object at the start of ``body`` ends (None when it does not start with one)."""
    if body[:1] != b"{":
        return None
    try:
        # latin-1: one character per byte, so the end's index is a byte count whatever follows the object
        _, end = _DECODER.raw_decode(body.decode("latin-1"))
    except ValueError:
        return None
    return end


def carried(message: Outgoing, carry: str) -> bytes:
    """The body that carries ``message`` and its headers (``carry``: the stream's format, or ``DEAD_LETTER``)."""
    headers = _texts(message.headers)
    if carry == DEAD_LETTER:
        return _dead_letter(message, headers)
    if carry == "json":
        document = orjson.loads(message.value)
        document["_dhow"] = {
            "model_version": headers.get("dhow-model-version", ""), "request_id": headers.get("x-request-id", ""),
            **{name: headers.get(header, "") for header, name in _SOURCE.items()},
        }  # fmt: skip
        return orjson.dumps(document)
    length = headers.get(HEADER_LENGTH)
    split = int(length) if length is not None and length.isdigit() else len(message.value)
    response = orjson.loads(message.value[:split])
    parameters = response.get("parameters") or {}
    parameters.update({f"dhow_{name}": headers.get(header, "") for header, name in _SOURCE.items()})
    response["parameters"] = parameters
    if not response.get("id") and headers.get("x-request-id"):
        response["id"] = headers["x-request-id"]
    return orjson.dumps(response) + message.value[split:]


def _dead_letter(message: Outgoing, headers: dict[str, str]) -> bytes:
    envelope: dict[str, Any] = {name: headers.get(header, "") for header, name in _DEAD.items()}
    envelope["partition_key"] = (message.key or b"").decode(errors="replace")
    others = {name: value for name, value in headers.items() if name not in _DEAD}
    if others:
        envelope["headers"] = others
    envelope["data_base64"] = base64.b64encode(message.value).decode()
    return orjson.dumps(envelope)


def _texts(headers: list[Header]) -> dict[str, str]:
    return {name.lower(): (value or b"").decode(errors="replace") for name, value in headers}
