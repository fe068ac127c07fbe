"""The transport-neutral request and response every door builds and the data plane serves.

Tensors hold numpy arrays: the doors decode wire bytes straight into them (``frombuffer``)
and encode them back; nothing in between knows which door a request came through.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

Parameters = dict[str, Any]


@dataclass(slots=True)
class Tensor:
    name: str
    datatype: str
    shape: list[int]
    data: np.ndarray
    parameters: Parameters = field(default_factory=dict)


@dataclass(slots=True)
class RequestedOutput:
    """An output the client asked for; ``parameters`` carries e.g. ``binary_data``, ``classification``."""

    name: str
    parameters: Parameters = field(default_factory=dict)


class LazyHeaders(Mapping[str, str]):
    """A transport's headers, decoded on first use: most requests are never asked for one."""

    __slots__ = ("_decoded", "_read")

    def __init__(self, read: Callable[[], Iterable[tuple[str | bytes, str | bytes]]]) -> None:
        self._read = read
        self._decoded: dict[str, str] | None = None

    def _headers(self) -> dict[str, str]:
        if self._decoded is None:
            self._decoded = {
                (k.decode("latin-1") if isinstance(k, bytes) else k).lower(): (
                    v.decode("latin-1") if isinstance(v, bytes) else v
                )
                for k, v in self._read()
            }
        return self._decoded

    def __getitem__(self, name: str) -> str:
        return self._headers()[name]

    def get(self, name: str, default: Any = None) -> Any:
        """One header (``name`` in lower case) by a scan of the raw pairs: the data plane asks every request
        for one or two, which must not cost decoding them all."""
        if self._decoded is not None:
            return self._decoded.get(name, default)
        found = default
        raw_name = name.encode("latin-1")
        for key, value in self._read():
            if (key.lower() == raw_name) if isinstance(key, bytes) else (key.lower() == name):
                found = value.decode("latin-1") if isinstance(value, bytes) else value
        return found

    def __iter__(self) -> Iterator[str]:
        return iter(self._headers())

    def __len__(self) -> int:
        return len(self._headers())


@dataclass(frozen=True, slots=True)
class Caller:
    """Who sent a request, as admission established it; nothing writes into it afterwards."""

    #: how the audit trail names them: ``key:ci-bot#<id>``, ``jwt:alice``, ``cert:svc-a``, ``dhow:shadow``
    principal: str
    tenant: str
    request_id: str
    #: the data region of the principal's requests when a request names none ("" = none)
    default_region: str = ""


@dataclass(frozen=True, slots=True)
class Outcome:
    """What serving one inference decided, returned to the admission point for the audit record."""

    #: the version that answered ("" when none did)
    version: str = ""
    #: the request's data region, as placement decided it
    data_region: str = ""
    #: a masked sample of the inputs and outputs, when the model's payload sampling picked this request
    payload: dict[str, Any] | None = None


@dataclass(slots=True)
class InferenceRequest:
    model_name: str
    inputs: list[Tensor]
    #: "" lets the server choose (the latest ready version)
    model_version: str = ""
    id: str = ""
    parameters: Parameters = field(default_factory=dict)
    #: None asks for every output of the model
    outputs: list[RequestedOutput] | None = None
    #: the transport's headers (HTTP headers, gRPC metadata), names in lower case
    headers: Mapping[str, str] = field(default_factory=dict)
    #: whether the client has gone (its connection closed): then the request is dropped before it is computed
    gone: Callable[[], bool] | None = None
    #: the request's tracing when it is traced (set by the admission point; opaque below it), else None
    trace: object | None = None
    #: the body as the client sent it, when it is an Open Inference Protocol JSON body (the REST door sets it):
    #: the payload log hands it over as it is instead of writing the decoded tensors again
    json_body: bytes | None = None
    #: the payload log's item for this request (set by it; opaque here), where the door that sends the answer as
    #: JSON puts those bytes (``payload_log.ANSWER``): the log then writes the answer as the client got it
    payload_item: list[Any] | None = field(default=None, repr=False, compare=False)


@dataclass(slots=True)
class InferenceResponse:
    model_name: str
    model_version: str
    outputs: list[Tensor]
    id: str = ""
    parameters: Parameters = field(default_factory=dict)
    #: the model's feedback output as it computed it, when ``outputs`` do not hold it so (the client asked for
    #: other outputs only, or for it as classes): what the feedback join keeps; no door sends it
    prediction: np.ndarray | None = None
