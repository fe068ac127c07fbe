"""Bodies of TorchServe's inference API: what ``POST /predictions/{model}`` takes and answers, and its errors.

TorchServe hands a request's body to the model's handler as it came, so its clients send either raw bytes
(``curl -T kitten.jpg``) or JSON. dhow reads them against the model's declared inputs:

- raw bytes (any content type but JSON) for a model whose one input is BYTES: the body is that input's one element;
- JSON: one instance (the value of a model's one input, or an object keyed by input name), answered unwrapped, as
  TorchServe answers one request; or a list of instances, answered as a list. Which of the two a list is, its
  nesting tells: an instance of an input declared ``[-1, 32]`` is a list of 32 numbers, a list of those is a batch.

An error answers TorchServe's ``{"code", "type", "message"}``, with dhow's ``error`` beside them.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import orjson

from dhow.core.errors import InvalidInput
from dhow.core.model_config import TensorSpec
from dhow.core.types import Tensor
from dhow.core.wire.json_refusals import json_refusal
from dhow.protocols.rest.tfserving import Specs, instance_ranks

__all__ = ["error_body", "instances_of", "raw_tensor", "refuse_forms", "takes_raw"]

#: TorchServe's exception names by HTTP status (its frontend's ``type``)
_TYPES = {
    400: "BadRequestException",
    401: "InvalidKeyException",
    403: "ForbiddenException",
    404: "ModelNotFoundException",
    405: "MethodNotAllowedException",
    413: "RequestEntityTooLargeException",
    429: "ServiceUnavailableException",
    500: "InternalServerException",
    501: "NotImplementedException",
    503: "ServiceUnavailableException",
    504: "RequestTimeoutException",
}


def error_body(status: int, message: str) -> bytes:
    kind = _TYPES.get(status, "InternalServerException" if status >= 500 else "BadRequestException")
    return orjson.dumps({"code": status, "type": kind, "message": message, "error": message})


def refuse_forms(content_type: bytes) -> None:
    """Refuse a multipart form (``curl -F data=@file``), which TorchServe reads and dhow does not: taken as the
    body of a BYTES input it would hand the model the form's boundaries and headers as data."""
    if content_type[:10].lower() == b"multipart/" and content_type.split(b";", 1)[0].strip().lower() == (
        b"multipart/form-data"
    ):  # (other multipart types, a MIME document, may be a BYTES model's raw body, as TorchServe takes them)
        raise InvalidInput(
            "multipart form bodies are not taken: send the file as the body "
            "(curl -T FILE, or --data-binary @FILE), or JSON instances"
        )


def takes_raw(specs: Specs, content_type: bytes) -> bool:
    """Whether the body is the one element of the model's one BYTES input, not JSON."""
    if len(specs) != 1 or specs[0].datatype != "BYTES":
        return False
    media = content_type.split(b";", 1)[0].strip().lower()
    return not (media == b"application/json" or media.endswith(b"+json"))


def raw_tensor(body: bytes, spec: TensorSpec) -> Tensor:
    """The body as one element of the BYTES input, shaped as one row of it: ``[1]``, ``[1, 1]``, …"""
    shape = [1] * max(len(spec.shape), 1)
    array = np.empty(1, dtype=np.object_)
    array[0] = bytes(body)
    return Tensor(spec.name, "BYTES", shape, array.reshape(shape))


def instances_of(body: bytes, model: str, specs: Specs) -> tuple[list[Any], bool]:
    """The instances a JSON body holds, and whether it held one (then answered unwrapped)."""
    try:
        document = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise InvalidInput(
            f"the body is not JSON ({json_refusal(exc)}); model '{model}' takes {_described(specs)}: "
            "send one instance or a list of them as JSON"
        ) from None
    if isinstance(document, dict):
        names = {spec.name for spec in specs}
        if not document or not set(document) <= names:
            raise InvalidInput(
                f"the body is an object with the keys {sorted(document)}, but model '{model}' takes "
                f"{_described(specs)}: an object's keys are input names"
            )
        return [document], True
    if isinstance(document, list) and document and isinstance(document[0], dict):
        return document, False
    if len(specs) != 1:
        raise InvalidInput(
            f"model '{model}' takes {_described(specs)}: send an object keyed by input name (or a list of them)"
        )
    squeezed, full = instance_ranks(specs[0].shape)
    depth = _depth(document)
    # an instance may leave out its trailing dimensions of size 1: that reading wins where both fit
    single = depth == squeezed or (depth == full and depth != squeezed + 1)
    if single:
        return [document], True
    if depth not in (squeezed + 1, full + 1):
        raise InvalidInput(
            f"model '{model}' takes {_described(specs)}: the body nests {depth} lists deep; one instance nests "
            f"{squeezed} (or {full}), a list of instances one more"
        )
    return document, False


def _depth(value: Any) -> int:
    depth = 0
    while isinstance(value, list) and value:
        depth += 1
        value = value[0]
    return depth


def _described(specs: Specs) -> str:
    return ", ".join(f"input '{s.name}' ({s.datatype} {list(s.shape)})" for s in specs)
