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
    OPENAPI = "GET openapi"
    DEPLOYMENTS = "GET deployments"
    DEPLOYMENT = "GET deployment"
    PUT_DEPLOYMENT = "PUT deployment"
    DELETE_DEPLOYMENT = "DELETE deployment"
    DEPLOYMENT_ACTION = "POST deployment action"
    DEPLOYMENT_HISTORY = "GET deployment history"
    DEPLOYMENT_EVENTS = "GET deployment events"
    KEYS = "GET keys"
    CREATE_KEY = "POST create key"
    REVOKE_KEY = "DELETE key"
    ROTATE_KEY = "POST rotate key"
    AUDIT = "GET audit"
    AUDIT_VERIFY = "GET audit verify"

    @property
    def method(self) -> str:
        return _METHODS[self]


_METHODS = {endpoint: endpoint.value.split(" ", 1)[0] for endpoint in Endpoint}


@dataclass(frozen=True, slots=True)
class Match:
    endpoint: Endpoint
    #: the model, the deployment of an admin route, or the id of an API key
    model: str = ""
    version: str = ""
    #: a deployment action: promote, rollback, switch or release
    action: str = ""


_FIXED: dict[str, Match] = {
    "/v2": Match(Endpoint.SERVER_METADATA),
    "/v2/health/live": Match(Endpoint.LIVE),
    "/v2/health/ready": Match(Endpoint.READY),
    "/v2/models/stats": Match(Endpoint.ALL_STATISTICS),
    "/v2/repository/index": Match(Endpoint.REPOSITORY_INDEX),
    "/metrics": Match(Endpoint.METRICS),
    "/v2/admin/openapi.json": Match(Endpoint.OPENAPI),
    "/v2/admin/deployments": Match(Endpoint.DEPLOYMENTS),
    "/v2/admin/keys": Match(Endpoint.KEYS),
    "/v2/admin/audit": Match(Endpoint.AUDIT),
    "/v2/admin/audit/verify": Match(Endpoint.AUDIT_VERIFY),
}
#: fixed paths that answer a second method
_FIXED_OTHER: dict[tuple[str, str], Match] = {("/v2/admin/keys", "POST"): Match(Endpoint.CREATE_KEY)}
_MODEL_ACTIONS = {
    "ready": Endpoint.MODEL_READY,
    "config": Endpoint.MODEL_CONFIG,
    "stats": Endpoint.MODEL_STATISTICS,
    "infer": Endpoint.INFER,
}
_REPOSITORY_ACTIONS = {"load": Endpoint.LOAD, "unload": Endpoint.UNLOAD}
_DEPLOYMENT_METHODS = {
    "GET": Endpoint.DEPLOYMENT,
    "PUT": Endpoint.PUT_DEPLOYMENT,
    "DELETE": Endpoint.DELETE_DEPLOYMENT,
}
_DEPLOYMENT_READS = {"history": Endpoint.DEPLOYMENT_HISTORY, "events": Endpoint.DEPLOYMENT_EVENTS}
DEPLOYMENT_ACTIONS = ("promote", "rollback", "switch", "release")


def allowed_methods(path: str) -> list[str]:
    """The methods a known path answers (for a 405's Allow header)."""
    return sorted({m for m in ("GET", "PUT", "DELETE", "POST") if (r := resolve(path, m)) and r.endpoint.method == m})


def resolve(path: str, method: str = "GET") -> Match | None:
    """The endpoint a path names, with its model and version; None for an unknown path.

    ``method`` picks among the endpoints of a path that answers several (an admin deployment);
    the caller still checks that the match's method is the request's.
    """
    fixed = _FIXED_OTHER.get((path, method)) or _FIXED.get(path)
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
    if parts[2] == "admin" and parts[3] == "deployments" and len(parts) in (5, 6) and parts[4]:
        return _deployment_route(parts[4], parts[5] if len(parts) == 6 else None, method)
    if parts[2] == "admin" and parts[3] == "keys" and parts[4:5] != [""]:
        if len(parts) == 5:
            return Match(Endpoint.REVOKE_KEY, parts[4])
        if len(parts) == 6 and parts[5] == "rotate":
            return Match(Endpoint.ROTATE_KEY, parts[4])
    return None


def _deployment_route(name: str, tail: str | None, method: str) -> Match | None:
    if tail is None:
        return Match(_DEPLOYMENT_METHODS.get(method, Endpoint.DEPLOYMENT), name)
    if tail in DEPLOYMENT_ACTIONS:
        return Match(Endpoint.DEPLOYMENT_ACTION, name, action=tail)
    endpoint = _DEPLOYMENT_READS.get(tail)
    return Match(endpoint, name) if endpoint is not None else None


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
