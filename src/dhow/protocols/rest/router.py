"""The routes of the REST door: fixed paths by one dict look-up, model routes by splitting the path.

Versions are optional on every model route: ``/v2/models/{m}[/versions/{v}][/ready|config|stats|infer]``.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

__all__ = ["Endpoint", "Match", "resolve"]


class Endpoint(enum.Enum):
    """Every endpoint; the value is the one HTTP method it answers, then a unique name."""

    SERVER_METADATA = "GET server"
    LIVE = "GET live"
    READY = "GET ready"
    METRICS = "GET metrics"
    ALL_STATISTICS = "GET all statistics"
    MODEL_METADATA = "GET model"
    MODEL_READY = "GET model ready"
    MODEL_CONFIG = "GET model config"
    MODEL_STATISTICS = "GET model statistics"
    INFER = "POST infer"
    REPOSITORY_INDEX = "POST index"
    LOAD = "POST load"
    UNLOAD = "POST unload"

    @property
    def method(self) -> str:
        return _METHODS[self]


_METHODS = {endpoint: endpoint.value.split(" ", 1)[0] for endpoint in Endpoint}


@dataclass(frozen=True, slots=True)
class Match:
    endpoint: Endpoint
    model: str = ""
    version: str = ""


_FIXED: dict[str, Match] = {
    "/v2": Match(Endpoint.SERVER_METADATA),
    "/v2/health/live": Match(Endpoint.LIVE),
    "/v2/health/ready": Match(Endpoint.READY),
    "/v2/models/stats": Match(Endpoint.ALL_STATISTICS),
    "/v2/repository/index": Match(Endpoint.REPOSITORY_INDEX),
    "/metrics": Match(Endpoint.METRICS),
}
_MODEL_ACTIONS = {
    "ready": Endpoint.MODEL_READY,
    "config": Endpoint.MODEL_CONFIG,
    "stats": Endpoint.MODEL_STATISTICS,
    "infer": Endpoint.INFER,
}
_REPOSITORY_ACTIONS = {"load": Endpoint.LOAD, "unload": Endpoint.UNLOAD}


def resolve(path: str) -> Match | None:
    """The endpoint a path names, with its model and version; None for an unknown path."""
    fixed = _FIXED.get(path)
    if fixed is not None:
        return fixed
    parts = path.split("/")
    # parts[0] is "" for the leading slash
    if len(parts) < 4 or parts[0] or parts[1] != "v2":
        return None
    if parts[2] == "models":
        return _model_route(parts[3:])
    if parts[2] == "repository" and len(parts) == 6 and parts[3] == "models" and parts[4]:
        endpoint = _REPOSITORY_ACTIONS.get(parts[5])
        return Match(endpoint, parts[4]) if endpoint is not None else None
    return None


def _model_route(parts: list[str]) -> Match | None:
    model = parts[0]
    if not model:
        return None
    version = ""
    rest = parts[1:]
    if len(rest) >= 2 and rest[0] == "versions":
        version = rest[1]
        if not version:
            return None
        rest = rest[2:]
    if not rest:
        return Match(Endpoint.MODEL_METADATA, model, version)
    if len(rest) == 1:
        endpoint = _MODEL_ACTIONS.get(rest[0])
        if endpoint is not None:
            return Match(endpoint, model, version)
    return None
