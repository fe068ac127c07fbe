"""The OpenAPI 3.1 document of the REST API, derived from the route table (``dhow.protocols.routes``).

Each route is one operation (a model route two: with and without its version); what an operation says
comes from the route's ``Doc``, the shapes it names from ``components``.
"""

from __future__ import annotations

import re
from typing import Any

from dhow import __version__
from dhow.protocols.rest.openapi.components import PATH_PARAMETERS, components
from dhow.protocols.rest.openapi.schema import integer, json_content, ref, string
from dhow.protocols.routes import ROUTES, Route

__all__ = ["openapi_document"]

_TAGS = (
    ("health", "Liveness and readiness."),
    ("server", "Server metadata and metrics."),
    ("models", "Model metadata, readiness, configuration and statistics."),
    ("inference", "Inference (Open Inference Protocol v2)."),
    ("repository", "The model repository and model control."),
    ("monitoring", "Drift against a reference profile, and ground truth for quality (README, Monitoring)."),
    ("deployments", "Deployments: traffic policies over model versions (docs/rollouts.md)."),
    ("admin", "About the API itself."),
    ("access", "API keys and the audit trail (docs/security.md)."),
    ("kserve-v1", "KServe v1 / TensorFlow Serving's REST API, for their clients."),
    ("torchserve", "TorchServe's inference API, for its clients (its management API: see the repository routes)."),
)
_DESCRIPTION = (
    "Model serving over the Open Inference Protocol v2 (KServe/Triton), with Triton's binary tensor data, "
    "classification, model repository, configuration and statistics extensions, and the admin API of "
    "deployments and their traffic policies; beside it, KServe v1 / TensorFlow Serving's REST API and TorchServe's "
    'inference API. Errors answer {"error": "..."} (TorchServe\'s routes add its code, type and message).'
)
_BINARY = {"application/octet-stream": {"schema": string(contentMediaType="application/octet-stream")}}
#: what a model route's summary calls the model, by whether its path names a version
_WHICH = {False: "a model (its newest loaded version, or its deployment)", True: "a version of a model"}


def openapi_document() -> dict[str, Any]:
    """The OpenAPI 3.1 document of every REST route of dhow."""
    paths: dict[str, dict[str, Any]] = {}
    for route in ROUTES:
        for template in route.templates:
            paths.setdefault(template, {})[route.method.lower()] = _operation(route, template)
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "dhow",
            "version": __version__,
            "description": _DESCRIPTION,
            "license": {"name": "Apache-2.0", "identifier": "Apache-2.0"},
        },
        "tags": [{"name": name, "description": description} for name, description in _TAGS],
        "paths": paths,
        "components": components(),
        # every route but the health checks needs a credential (unless the server runs with --auth none)
        "security": [{"bearer": []}],
    }


def _operation(route: Route, template: str) -> dict[str, Any]:
    doc, versioned = route.doc, "{version}" in template
    name = route.name.replace("model_", "model_version_", 1) if versioned else route.name
    operation: dict[str, Any] = {
        "operationId": _camel(name),
        "tags": [doc.tag],
        "summary": doc.summary.replace("{which}", _WHICH[versioned]),
    }
    if doc.description:
        operation["description"] = doc.description
    parameters = [PATH_PARAMETERS[p] for p in re.findall(r"{(\w+)}", template)] + list(doc.parameters)
    if parameters:
        operation["parameters"] = [ref(p, "parameters") for p in parameters]
    if doc.request:
        content = {**json_content(ref(doc.request)), **(_BINARY if doc.binary else {})}
        operation["requestBody"] = {"required": doc.body_required, "content": content}
    operation["responses"] = _responses(route)
    if route.access is None:
        operation["security"] = []  # open: probes and load balancers carry no credentials
    return operation


def _responses(route: Route) -> dict[str, Any]:
    doc = route.doc
    ok: dict[str, Any] = {"description": "Success (an empty body)."}
    if doc.response:
        ok = {"description": "Success.", "content": {doc.answers: {"schema": ref(doc.response)}}}
    if doc.binary:
        ok["description"] = "The outputs; with binary outputs, the JSON header then the raw tensors."
        ok["content"] = {**ok["content"], **_BINARY}
        ok["headers"] = {
            "Inference-Header-Content-Length": {
                "description": "Only on binary answers: the length of the JSON header.",
                "schema": integer(minimum=0),
            }
        }
    errors = {*doc.errors, *((401, 403) if route.access is not None else ())}
    return {"200": ok, **{str(status): ref(f"Error{status}", "responses") for status in sorted(errors)}}


def _camel(name: str) -> str:
    first, *rest = name.split("_")
    return first + "".join(word.capitalize() for word in rest)
