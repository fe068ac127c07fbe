"""The document's ``components``: schemas, the error answers, the parameters that routes name."""

from __future__ import annotations

from typing import Any

from dhow.protocols.rest.openapi.access import access_schemas, audit_parameters
from dhow.protocols.rest.openapi.deployments import deployment_schemas
from dhow.protocols.rest.openapi.inference import inference_schemas
from dhow.protocols.rest.openapi.monitoring import monitoring_schemas
from dhow.protocols.rest.openapi.peers import peer_schemas
from dhow.protocols.rest.openapi.schema import integer, json_content, ref, string

__all__ = ["PATH_PARAMETERS", "components"]

#: every error status the API answers, with what it means here
_ERRORS: dict[int, str] = {
    400: "Refused: the request is malformed or invalid (the message names the field).",
    401: "No credential, or one that is not valid (unknown, revoked or expired key; a JWT that fails a check).",
    403: "Not allowed: the principal lacks the permission on this model or tenant, the data's region may not be "
    "processed here, or the server's settings forbid it (model control mode, uploads).",
    404: "Unknown model, version, deployment or route.",
    409: "The edit names a revision that is no longer the deployment's current one: read it again and retry.",
    413: "The request body is over --max-request-bytes.",
    415: "Content-Encoding other than gzip or deflate.",
    429: "The model's queue is full (max_queue_size), or a key's or tenant's quota is used up; retry after "
    "Retry-After seconds.",
    500: "The model itself failed; the message carries an error id that the server log also has.",
    501: "Not provided: the route is there for a peer's clients, but dhow has no such feature (KServe's :explain).",
    503: "Not available: the server or model is not ready, a version is loading or failed to load, "
    "or the registry cannot be reached.",
    504: "The request timed out while waiting in the model's queue.",
}
_RETRY_AFTER = (429, 503)

#: a path template's parameter -> the component parameter that describes it
PATH_PARAMETERS = {"model": "Model", "version": "Version", "name": "Deployment", "id": "KeyId"}


def _error_responses() -> dict[str, Any]:
    responses: dict[str, Any] = {}
    for status, description in _ERRORS.items():
        response: dict[str, Any] = {"description": description, "content": json_content(ref("Error"))}
        if status in _RETRY_AFTER:
            response["headers"] = {"Retry-After": {"description": "Seconds to wait.", "schema": integer()}}
        responses[f"Error{status}"] = response
    return responses


def _parameters() -> dict[str, Any]:
    path = {"in": "path", "required": True, "schema": string()}
    return {
        "Model": {"name": "model", **path, "description": "The model (or deployment)."},
        "Version": {"name": "version", **path, "description": "A model version."},
        "Deployment": {"name": "name", **path, "description": "The deployment (a model)."},
        "KeyId": {"name": "id", **path, "description": "The key's id."},
        "Actor": {
            "name": "x-dhow-actor",
            "in": "header",
            "required": False,
            "schema": string(),
            "description": "Who makes the change, for the history (default: the authenticated principal, "
            "else anonymous).",
        },
        "InferenceHeaderContentLength": {
            "name": "Inference-Header-Content-Length",
            "in": "header",
            "required": False,
            "schema": integer(minimum=0),
            "description": "Binary tensor data extension: the length of the JSON header that starts the body.",
        },
        "ContentEncoding": {
            "name": "Content-Encoding",
            "in": "header",
            "required": False,
            "schema": string(enum=["gzip", "x-gzip", "deflate"]),
            "description": "The request body is compressed.",
        },
        **audit_parameters(),
    }


def components() -> dict[str, Any]:
    return {
        "securitySchemes": {
            "bearer": {
                "type": "http",
                "scheme": "bearer",
                "description": "A dhow API key (dhow_<id>_<secret>) or a JWT of the configured issuer.",
            }
        },
        "schemas": {
            **inference_schemas(),
            **deployment_schemas(),
            **access_schemas(),
            **peer_schemas(),
            **monitoring_schemas(),
        },
        "responses": _error_responses(),
        "parameters": _parameters(),
    }
