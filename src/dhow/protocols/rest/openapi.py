"""The OpenAPI 3.1 document of dhow's REST API (served at ``GET /v2/admin/openapi.json``).

Built from plain dicts: the inference routes of the Open Inference Protocol v2 (with Triton's
extensions), the repository routes, ``/metrics`` and the admin routes of deployments
(docs/rollouts.md). Shared shapes live once under ``components`` and are referred to by ``$ref``.
"""

from __future__ import annotations

from typing import Any

from dhow import __version__
from dhow.core.datatypes import NUMPY_DTYPE

__all__ = ["openapi_document"]

Schema = dict[str, Any]

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
    503: "Not available: the server or model is not ready, a version is loading or failed to load, "
    "or the registry cannot be reached.",
    504: "The request timed out while waiting in the model's queue.",
}
_RETRY_AFTER = (429, 503)

#: policy kind -> the name of its schema
_POLICY_KINDS = {
    "pinned": "PinnedPolicy",
    "canary": "CanaryPolicy",
    "ab": "ABPolicy",
    "shadow": "ShadowPolicy",
    "bluegreen": "BlueGreenPolicy",
}
_MODEL_SUFFIXES = ("", "/ready", "/config", "/stats", "/infer")
_ACTIONS: dict[str, str] = {
    "promote": "Canary: advance to the next step; past the last step the canary is promoted.",
    "rollback": "Canary: send all traffic back to the primary (weight 0, state rolled_back).",
    "switch": "Blue/green: swap the active colour.",
    "release": "Blue/green: pin the deployment to the active version, releasing the other.",
}


# -- helpers ---------------------------------------------------------------------------------


def _ref(name: str, kind: str = "schemas") -> Schema:
    return {"$ref": f"#/components/{kind}/{name}"}


def _object(properties: dict[str, Schema], required: tuple[str, ...] = (), **extra: Any) -> Schema:
    schema: Schema = {"type": "object", "properties": properties}
    if required:
        schema["required"] = list(required)
    schema.update(extra)
    return schema


def _array(items: Schema, **extra: Any) -> Schema:
    return {"type": "array", "items": items, **extra}


def _string(description: str = "", **extra: Any) -> Schema:
    schema: Schema = {"type": "string", **extra}
    if description:
        schema["description"] = description
    return schema


def _integer(description: str = "", **extra: Any) -> Schema:
    schema: Schema = {"type": "integer", **extra}
    if description:
        schema["description"] = description
    return schema


def _number(description: str = "", **extra: Any) -> Schema:
    schema: Schema = {"type": "number", **extra}
    if description:
        schema["description"] = description
    return schema


def _json_content(schema: Schema) -> dict[str, Any]:
    return {"application/json": {"schema": schema}}


def _ok(description: str, schema: Schema | None = None) -> dict[str, Any]:
    response: dict[str, Any] = {"description": description}
    if schema is not None:
        response["content"] = _json_content(schema)
    return response


def _responses(ok: dict[str, Any], *errors: int) -> dict[str, Any]:
    responses: dict[str, Any] = {"200": ok}
    for status in sorted(errors):
        responses[str(status)] = _ref(f"Error{status}", "responses")
    return responses


def _body(schema: Schema, description: str, *, required: bool = True) -> dict[str, Any]:
    return {"description": description, "required": required, "content": _json_content(schema)}


def _operation(
    operation_id: str,
    tag: str,
    summary: str,
    responses: dict[str, Any],
    *,
    body: dict[str, Any] | None = None,
    parameters: list[Schema] | None = None,
    description: str = "",
) -> dict[str, Any]:
    operation: dict[str, Any] = {"operationId": operation_id, "tags": [tag], "summary": summary}
    if description:
        operation["description"] = description
    if parameters:
        operation["parameters"] = parameters
    if body is not None:
        operation["requestBody"] = body
    operation["responses"] = responses
    return operation


def _camel(*words: str) -> str:
    parts = [part for word in words for part in word.replace("/", " ").replace("_", " ").split()]
    return parts[0] + "".join(part.capitalize() for part in parts[1:])


# -- schemas ---------------------------------------------------------------------------------


def _version_schema(description: str) -> Schema:
    return _integer(description, minimum=1)


def _inference_schemas() -> dict[str, Schema]:
    parameters = {
        "type": "object",
        "description": "Free-form parameters; values are strings, numbers or booleans.",
        "additionalProperties": {"type": ["string", "number", "integer", "boolean"]},
    }
    shape = _array(_integer(minimum=0), description="Actual dimensions, row-major.")
    data = {
        "description": "The tensor's elements, flat or nested row-major; BYTES elements are strings. "
        "Left out when the tensor travels as binary data (parameters.binary_data_size).",
        "type": "array",
    }
    return {
        "Error": _object({"error": _string("What was wrong.")}, ("error",)),
        "Parameters": parameters,
        "Datatype": _string("A tensor datatype of the Open Inference Protocol.", enum=list(NUMPY_DTYPE)),
        "TensorMetadata": _object(
            {
                "name": _string(),
                "datatype": _ref("Datatype"),
                "shape": _array(_integer(minimum=-1), description="-1 marks a variable dimension (batch first)."),
            },
            ("name", "datatype", "shape"),
        ),
        "ServerMetadata": _object(
            {"name": _string(), "version": _string(), "extensions": _array(_string())},
            ("name", "version", "extensions"),
        ),
        "ModelMetadata": _object(
            {
                "name": _string(),
                "versions": _array(_string(), description="The loaded versions."),
                "platform": _string("Triton's name of the runtime, e.g. onnxruntime_onnx."),
                "inputs": _array(_ref("TensorMetadata")),
                "outputs": _array(_ref("TensorMetadata")),
            },
            ("name", "versions", "platform", "inputs", "outputs"),
        ),
        "ModelConfig": {
            "type": "object",
            "description": "Triton's model configuration (model_config.proto as JSON); dims leave out the "
            "batch dimension when max_batch_size > 0.",
            "properties": {
                "name": _string(),
                "platform": _string(),
                "backend": _string(),
                "max_batch_size": _integer(minimum=0),
                "input": _array({"type": "object"}),
                "output": _array({"type": "object"}),
                "version_policy": {"type": "object"},
                "instance_group": _array({"type": "object"}),
                "dynamic_batching": {"type": "object"},
            },
            "additionalProperties": True,
        },
        "Duration": _object({"count": _integer(minimum=0), "ns": _integer(minimum=0)}, ("count", "ns")),
        "ModelStatistics": _object({"model_stats": _array(_ref("ModelStat"))}, ("model_stats",)),
        "ModelStat": _object(
            {
                "name": _string(),
                "version": _string(),
                "last_inference": _integer("Milliseconds since the epoch of the last request."),
                "inference_count": _integer(minimum=0),
                "execution_count": _integer(minimum=0),
                "inference_stats": {
                    "type": "object",
                    "additionalProperties": _ref("Duration"),
                    "description": "success, fail, queue, compute_input, compute_infer, compute_output, "
                    "cache_hit, cache_miss.",
                },
                "batch_stats": _array(
                    _object(
                        {
                            "batch_size": _integer(minimum=1),
                            "compute_input": _ref("Duration"),
                            "compute_infer": _ref("Duration"),
                            "compute_output": _ref("Duration"),
                        }
                    )
                ),
            },
            ("name", "version", "inference_stats"),
        ),
        "RequestInput": _object(
            {
                "name": _string(),
                "shape": shape,
                "datatype": _ref("Datatype"),
                "parameters": _ref("Parameters"),
                "data": data,
            },
            ("name", "shape", "datatype"),
        ),
        "RequestOutput": _object(
            {
                "name": _string(),
                "parameters": _ref("Parameters"),
            },
            ("name",),
            description="parameters.binary_data (boolean) asks for binary output; parameters.classification "
            "(integer N) returns the top N as 'value:index' strings.",
        ),
        "InferenceRequest": _object(
            {
                "id": _string("Echoed in the response."),
                "parameters": _ref("Parameters"),
                "inputs": _array(_ref("RequestInput"), minItems=1),
                "outputs": _array(_ref("RequestOutput")),
            },
            ("inputs",),
            description="Request parameters: binary_data_output (boolean), timeout (microseconds in the queue); "
            "a deployment's A/B sticky key (e.g. user_id) may also come here.",
        ),
        "ResponseOutput": _object(
            {
                "name": _string(),
                "shape": shape,
                "datatype": _ref("Datatype"),
                "parameters": _ref("Parameters"),
                "data": data,
            },
            ("name", "shape", "datatype"),
        ),
        "InferenceResponse": _object(
            {
                "model_name": _string(),
                "model_version": _string("The version that answered."),
                "id": _string(),
                "parameters": _ref("Parameters"),
                "outputs": _array(_ref("ResponseOutput")),
            },
            ("model_name", "model_version", "outputs"),
            description="A deployment's responses carry parameters.dhow_variant (the A/B variant, "
            "primary/canary, blue/green).",
        ),
        "RepositoryIndexRequest": _object({"ready": {"type": "boolean", "default": False}}),
        "RepositoryIndexEntry": _object(
            {
                "name": _string(),
                "version": _string("Empty when no version is loaded."),
                "state": _string(examples=["READY", "UNAVAILABLE", "LOADING"]),
                "reason": _string(),
            },
            ("name", "version", "state", "reason"),
        ),
        "ModelControlRequest": _object(
            {"parameters": _ref("Parameters")},
            description='parameters.config: model.yaml fields as JSON; "file:<version>/<name>": base64 model '
            "files (only with --allow-model-upload).",
        ),
    }


def _policy_schemas() -> dict[str, Schema]:
    def policy(kind: str, description: str, properties: dict[str, Schema], required: tuple[str, ...]) -> Schema:
        return _object(
            {"kind": {"const": kind}, **properties},
            ("kind", *required),
            additionalProperties=False,
            description=description,
        )

    return {
        "Policy": {
            "description": "A traffic policy: which versions of the model answer its name.",
            "oneOf": [_ref(schema) for schema in _POLICY_KINDS.values()],
            "discriminator": {
                "propertyName": "kind",
                "mapping": {kind: _ref(schema)["$ref"] for kind, schema in _POLICY_KINDS.items()},
            },
        },
        "PinnedPolicy": policy(
            "pinned",
            "All traffic to one version.",
            {"version": _version_schema("The version that answers.")},
            ("version",),
        ),
        "CanaryPolicy": policy(
            "canary",
            "steps[step] percent of requests go to canary, the rest to primary.",
            {
                "primary": _version_schema("The current version."),
                "canary": _version_schema("The new version (not the primary)."),
                "steps": _array(
                    _integer(minimum=1, maximum=100),
                    minItems=1,
                    default=[5, 25, 50, 100],
                    description="Canary weights in percent, ascending.",
                ),
                "step": _integer("Index of the current step.", minimum=0, default=0),
                "guards": _ref("CanaryGuards"),
                "auto_promote": {"type": "boolean", "default": False},
                "step_interval_s": _number("Least time on a step before an automatic advance.", minimum=0, default=0),
                "state": _string(
                    "Set by the server: a rolled-back canary has weight 0 until a new policy is set.",
                    enum=["progressing", "rolled_back", "promoted"],
                    readOnly=True,
                ),
            },
            ("primary", "canary"),
        ),
        "CanaryGuards": _object(
            {
                "max_error_rate": _number(
                    "Roll back above this canary error rate.", minimum=0, maximum=1, default=0.05
                ),
                "max_p99_ratio": _number("Roll back above this canary/primary p99 ratio.", minimum=0, default=2.0),
                "min_p99_slack_ms": _number(
                    "The p99 guard ignores a canary slower than the primary by less than this.", minimum=0, default=5.0
                ),
                "min_requests": _integer("Canary requests needed before judging a step.", minimum=0, default=50),
            },
            additionalProperties=False,
        ),
        "ABPolicy": policy(
            "ab",
            "Weighted split, sticky by a request key (SHA-256 of the key modulo 100).",
            {
                "variants": _array(_ref("ABVariant"), minItems=1, description="Weights sum to 100; names unique."),
                "sticky_key": _string(
                    "Request parameter, else header, that keeps a caller on one variant.", default="user_id"
                ),
            },
            ("variants",),
        ),
        "ABVariant": _object(
            {
                "name": _string(minLength=1),
                "version": _version_schema("The variant's version."),
                "weight": _integer("Percent of requests.", minimum=0, maximum=100),
            },
            ("name", "version", "weight"),
            additionalProperties=False,
        ),
        "ShadowPolicy": policy(
            "shadow",
            "primary answers; a copy goes to shadow off the hot path and the answers are compared.",
            {
                "primary": _version_schema("The version that answers."),
                "shadow": _version_schema("The compared version (not the primary)."),
                "sample": _number("Fraction of requests copied.", minimum=0, maximum=1, default=1.0),
            },
            ("primary", "shadow"),
        ),
        "BlueGreenPolicy": policy(
            "bluegreen",
            "All traffic to the active colour; the other stays loaded for an instant switch.",
            {
                "blue": _version_schema("The blue version."),
                "green": _version_schema("The green version (not the blue)."),
                "active": _string(enum=["blue", "green"], default="blue"),
            },
            ("blue", "green"),
        ),
    }


def _deployment_schemas() -> dict[str, Schema]:
    nullable_policy = {"oneOf": [_ref("Policy"), {"type": "null"}]}
    reason = _string("Why; recorded in the history.", default="")
    return {
        "Deployment": _object(
            {
                "name": _string("The model name clients call."),
                "policy": _ref("Policy"),
                "revision": _integer("Name it in the next edit.", minimum=1),
                "updated_at": _string("UTC, ISO 8601.", format="date-time"),
                "updated_by": _string("The actor of the last change."),
                "status": _ref("DeploymentStatus"),
            },
            ("name", "policy", "revision", "updated_at", "updated_by"),
        ),
        "DeploymentStatus": {
            "description": "Live figures of the server that answered: a canary's window since its step began, "
            "a shadow's comparison counts; empty for other kinds.",
            "anyOf": [_ref("CanaryStatus"), _ref("ShadowStatus"), {"type": "object", "maxProperties": 0}],
        },
        "CanaryStatus": _object(
            {
                "weight": _integer("Percent of requests the canary gets now.", minimum=0, maximum=100),
                "window": _object(
                    {"primary": _ref("WindowFigures"), "canary": _ref("WindowFigures")}, ("primary", "canary")
                ),
            },
            ("weight", "window"),
        ),
        "WindowFigures": _object(
            {
                "requests": _integer(minimum=0),
                "errors": _integer("Server-side failures.", minimum=0),
                "p99_ms": {"type": ["number", "null"]},
            },
            ("requests", "errors"),
        ),
        "ShadowStatus": _object({"shadow": _ref("ShadowFigures")}, ("shadow",)),
        "ShadowFigures": _object(
            {
                "requests": _integer(minimum=0),
                "agreed": _integer(minimum=0),
                "disagreed": _integer(minimum=0),
                "errors": _integer(minimum=0),
                "dropped": _integer("Copies dropped because the shadow queue was full.", minimum=0),
                "agreement_rate": {"type": ["number", "null"]},
                "mean_abs_difference": {"type": ["number", "null"], "description": "Over float outputs."},
                "primary_p99_ms": {"type": ["number", "null"]},
                "shadow_p99_ms": {"type": ["number", "null"]},
            },
        ),
        "DeploymentList": _object({"deployments": _array(_ref("Deployment"))}, ("deployments",)),
        "PutDeploymentRequest": _object(
            {
                "policy": _ref("Policy"),
                "revision": _integer("The current revision; 0 to create.", minimum=0),
                "reason": reason,
            },
            ("policy", "revision"),
            additionalProperties=False,
        ),
        "DeleteDeploymentRequest": _object(
            {"revision": _integer("The current revision.", minimum=1), "reason": reason},
            ("revision",),
            additionalProperties=False,
        ),
        "ActionRequest": _object(
            {"revision": _integer("When given, must be the current revision.", minimum=1), "reason": reason},
            additionalProperties=False,
        ),
        "HistoryRow": _object(
            {
                "name": _string(),
                "revision": _integer("The revision this change produced.", minimum=1),
                "at": _string("UTC, ISO 8601.", format="date-time"),
                "actor": _string("x-dhow-actor of the request, dhow-analysis for automatic decisions."),
                "action": _string(enum=["create", "edit", "promote", "rollback", "switch", "release", "delete"]),
                "reason": _string(),
                "before": nullable_policy,
                "after": nullable_policy,
            },
            ("revision", "at", "actor", "action", "reason", "before", "after"),
        ),
        "History": _object({"history": _array(_ref("HistoryRow"))}, ("history",)),
        "Event": _object(
            {
                "name": _string(),
                "at": _string("UTC, ISO 8601.", format="date-time"),
                "kind": _string("The automatic analysis's decision.", examples=["rollback", "promote"]),
                "details": {
                    "type": "object",
                    "description": "The reason and the figures: error_rate, p99_ratio, weight, guard, and the "
                    "primary and canary windows.",
                    "additionalProperties": True,
                },
            },
            ("at", "kind", "details"),
        ),
        "Events": _object({"events": _array(_ref("Event"))}, ("events",)),
    }


def _components() -> dict[str, Any]:
    responses: dict[str, Any] = {}
    for status, description in _ERRORS.items():
        response: dict[str, Any] = {"description": description, "content": _json_content(_ref("Error"))}
        if status in _RETRY_AFTER:
            response["headers"] = {"Retry-After": {"description": "Seconds to wait.", "schema": _integer()}}
        responses[f"Error{status}"] = response
    path = {"in": "path", "required": True}
    return {
        "securitySchemes": {
            "bearer": {
                "type": "http",
                "scheme": "bearer",
                "description": "A dhow API key (dhow_<id>_<secret>) or a JWT of the configured issuer.",
            }
        },
        "schemas": {**_inference_schemas(), **_policy_schemas(), **_deployment_schemas()},
        "responses": responses,
        "parameters": {
            "Model": {"name": "model", **path, "schema": _string(), "description": "The model (or deployment)."},
            "Version": {"name": "version", **path, "schema": _string(), "description": "A model version."},
            "Deployment": {"name": "name", **path, "schema": _string(), "description": "The deployment (a model)."},
            "RepositoryModel": {"name": "model", **path, "schema": _string(), "description": "The model."},
            "Actor": {
                "name": "x-dhow-actor",
                "in": "header",
                "required": False,
                "schema": _string(),
                "description": "Who makes the change, for the history (default anonymous).",
            },
            "InferenceHeaderContentLength": {
                "name": "Inference-Header-Content-Length",
                "in": "header",
                "required": False,
                "schema": _integer(minimum=0),
                "description": "Binary tensor data extension: the length of the JSON header that starts the body.",
            },
            "ContentEncoding": {
                "name": "Content-Encoding",
                "in": "header",
                "required": False,
                "schema": _string(enum=["gzip", "x-gzip", "deflate"]),
                "description": "The request body is compressed.",
            },
        },
    }


# -- paths -----------------------------------------------------------------------------------

_EMPTY_OK = _ok("Yes (empty body).")
_BINARY_NOTE = (
    "Binary tensor data extension: send the JSON header, then the raw little-endian tensors of the inputs "
    "that carry parameters.binary_data_size (BYTES elements are a 4-byte little-endian length then the bytes), "
    "with the header Inference-Header-Content-Length giving the JSON's length. Outputs come back binary where "
    "asked (output parameters.binary_data or request parameter binary_data_output); the answer then has the "
    "content type application/octet-stream and the same header."
)


def _server_paths() -> dict[str, Any]:
    def health(which: str) -> dict[str, Any]:
        operation = _operation(_camel("server", which), "health", f"Is the server {which}?", _responses(_EMPTY_OK, 503))
        operation["security"] = []  # open: probes and load balancers carry no credentials
        return {"get": operation}

    return {
        "/v2": {
            "get": _operation(
                "serverMetadata", "server", "Server metadata", _responses(_ok("Metadata.", _ref("ServerMetadata")))
            )
        },
        "/v2/health/live": health("live"),
        "/v2/health/ready": health("ready"),
        "/v2/models/stats": {
            "get": _operation(
                "allModelStatistics",
                "models",
                "Statistics of every loaded model version",
                _responses(_ok("Statistics (Triton's form).", _ref("ModelStatistics"))),
            )
        },
        "/metrics": {
            "get": _operation(
                "metrics",
                "server",
                "Prometheus metrics",
                _responses(
                    {
                        "description": "The Prometheus text exposition format.",
                        "content": {"text/plain": {"schema": _string()}},
                    },
                    404,
                ),
            )
        },
        "/v2/repository/index": {
            "post": _operation(
                "repositoryIndex",
                "repository",
                "The models of the repository and their state",
                _responses(_ok("One entry per model version.", _array(_ref("RepositoryIndexEntry"))), 400, 413),
                body=_body(_ref("RepositoryIndexRequest"), "ready: true lists only ready ones.", required=False),
            )
        },
        **{
            f"/v2/repository/models/{{model}}/{action}": {
                "post": _operation(
                    _camel("repository", "model", action),
                    "repository",
                    f"{action.capitalize()} a model (explicit model control)",
                    _responses(_EMPTY_OK, 400, 403, 404, 413, 503),
                    body=_body(_ref("ModelControlRequest"), "Optional parameters.", required=False),
                    parameters=[_ref("RepositoryModel", "parameters")],
                )
            }
            for action in ("load", "unload")
        },
    }


#: the read-only model routes: path suffix -> (operation name, summary, 200 answer)
_MODEL_READS: dict[str, tuple[str, str, dict[str, Any]]] = {
    "": ("metadata", "Metadata of {which}", _ok("Metadata.", _ref("ModelMetadata"))),
    "/ready": ("ready", "Is {which} ready?", _EMPTY_OK),
    "/config": ("config", "Triton configuration of {which}", _ok("The configuration.", _ref("ModelConfig"))),
    "/stats": ("statistics", "Statistics of {which}", _ok("Statistics (Triton's form).", _ref("ModelStatistics"))),
}


def _model_operation(suffix: str, versioned: bool) -> dict[str, Any]:
    parameters = [_ref("Model", "parameters")]
    if versioned:
        parameters.append(_ref("Version", "parameters"))
    name = "modelVersion" if versioned else "model"
    which = "a version of a model" if versioned else "a model (its newest loaded version, or its deployment)"
    read = _MODEL_READS.get(suffix)
    if read is not None:
        operation, summary, answer = read
        return {
            "get": _operation(
                _camel(name, operation),
                "models",
                summary.format(which=which),
                _responses(answer, 404, 503),
                parameters=parameters,
            )
        }
    routing = (
        "An explicit version bypasses the deployment's traffic policy."
        if versioned
        else "With a deployment, its traffic policy picks the version."
    )
    binary = {"application/octet-stream": {"schema": _string(contentMediaType="application/octet-stream")}}
    return {
        "post": _operation(
            _camel(name, "infer"),
            "inference",
            f"Infer with {which}",
            _responses(
                {
                    "description": "The outputs; with binary outputs, the JSON header then the raw tensors.",
                    "headers": {
                        "Inference-Header-Content-Length": {
                            "description": "Only on binary answers: the length of the JSON header.",
                            "schema": _integer(minimum=0),
                        }
                    },
                    "content": {**_json_content(_ref("InferenceResponse")), **binary},
                },
                400,
                404,
                413,
                415,
                429,
                500,
                503,
                504,
            ),
            body={
                "required": True,
                "description": "A JSON inference request, or the JSON header followed by binary tensor data.",
                "content": {**_json_content(_ref("InferenceRequest")), **binary},
            },
            parameters=[
                *parameters,
                _ref("InferenceHeaderContentLength", "parameters"),
                _ref("ContentEncoding", "parameters"),
            ],
            description=f"{routing} {_BINARY_NOTE}",
        )
    }


def _model_paths() -> dict[str, Any]:
    paths: dict[str, Any] = {}
    for versioned in (False, True):
        base = "/v2/models/{model}/versions/{version}" if versioned else "/v2/models/{model}"
        for suffix in _MODEL_SUFFIXES:
            paths[base + suffix] = _model_operation(suffix, versioned)
    return paths


def _admin_paths() -> dict[str, Any]:
    name = [_ref("Deployment", "parameters")]
    actor = _ref("Actor", "parameters")
    deployment = _ok("The deployment.", _ref("Deployment"))
    paths: dict[str, Any] = {
        "/v2/admin/openapi.json": {
            "get": _operation(
                "openapi",
                "admin",
                "This document",
                _responses(_ok("The OpenAPI 3.1 document of the REST API.", {"type": "object"})),
            )
        },
        "/v2/admin/deployments": {
            "get": _operation(
                "listDeployments",
                "deployments",
                "Every deployment",
                _responses(_ok("The deployments.", _ref("DeploymentList")), 404, 503),
            )
        },
        "/v2/admin/deployments/{name}": {
            "get": _operation(
                "getDeployment",
                "deployments",
                "A deployment, with this server's live figures",
                _responses(deployment, 404, 503),
                parameters=name,
            ),
            "put": _operation(
                "putDeployment",
                "deployments",
                "Create (revision 0) or replace a deployment's policy",
                _responses(deployment, 400, 404, 409, 413, 503),
                body=_body(_ref("PutDeploymentRequest"), "The policy and the revision it replaces."),
                parameters=[*name, actor],
                description="The versions the policy names are loaded before traffic moves; a refused edit "
                "changes neither the registry nor the traffic. 404: the model is not in the repository; "
                "503: a version failed to load or the registry is unavailable.",
            ),
            "delete": _operation(
                "deleteDeployment",
                "deployments",
                "Delete a deployment (the model is served as before)",
                _responses(_ok("Deleted.", _object({}, maxProperties=0)), 400, 404, 409, 413, 503),
                body=_body(_ref("DeleteDeploymentRequest"), "The revision being deleted."),
                parameters=[*name, actor],
            ),
        },
        "/v2/admin/deployments/{name}/history": {
            "get": _operation(
                "deploymentHistory",
                "deployments",
                "Every change of a deployment, oldest first",
                _responses(_ok("The history.", _ref("History")), 404, 503),
                parameters=name,
            )
        },
        "/v2/admin/deployments/{name}/events": {
            "get": _operation(
                "deploymentEvents",
                "deployments",
                "The automatic analysis's decisions with their figures, oldest first",
                _responses(_ok("The events.", _ref("Events")), 404, 503),
                parameters=name,
            )
        },
    }
    for action, summary in _ACTIONS.items():
        paths[f"/v2/admin/deployments/{{name}}/{action}"] = {
            "post": _operation(
                _camel(action, "deployment"),
                "deployments",
                summary,
                _responses(deployment, 400, 404, 409, 413, 503),
                body=_body(_ref("ActionRequest"), "Optional revision and reason.", required=False),
                parameters=[*name, actor],
                description="400 when the action does not apply to the deployment's kind or state.",
            )
        }
    return paths


def _access_paths() -> dict[str, Any]:
    key_id = [{"name": "id", "in": "path", "required": True, "schema": _string(), "description": "The key's id."}]
    key = _object(
        {
            "id": _string(),
            "kind": _string(enum=["key", "cert"]),
            "name": _string(),
            "tenant": _string(),
            "roles": _array(_string()),
            "region": _string(),
            "rate": _number(),
            "burst": _integer(),
            "concurrency": _integer(),
            "created_at": _string(),
            "created_by": _string(),
            "expires_at": {"type": ["string", "null"]},
            "revoked_at": {"type": ["string", "null"]},
            "replaced_by": {"type": ["string", "null"]},
            "active": {"type": "boolean"},
            "key": _string("The secret API key: only in the answer that makes it."),
        }
    )
    new_key = _object(
        {
            "name": _string("What the key is for."),
            "roles": _array(_string("admin, deployer, invoker or auditor, optionally 'role:model-pattern'.")),
            "tenant": _string("Default: the caller's tenant."),
            "region": _string("The data region of its requests when they name none."),
            "rate": _number("Requests per second (0 = unlimited)."),
            "burst": _integer(minimum=0),
            "concurrency": _integer(minimum=0),
            "expires_in_s": _number(exclusiveMinimum=0),
        },
        ("name", "roles"),
        additionalProperties=False,
    )
    query = [
        {"name": n, "in": "query", "required": False, "schema": schema, "description": d}
        for n, schema, d in (
            ("since", _integer(minimum=0), "Records after this sequence number."),
            ("limit", _integer(minimum=1, maximum=10_000), "At most this many (default 1000)."),
            ("actor", _string(), "Only this principal's."),
            ("model", _string(), "Only this model's."),
            ("kind", _string(enum=["admin", "inference", "denial"]), "Only this kind."),
            ("outcome", _string(), "Only this outcome (success or an error code)."),
            ("region", _string(), "The audit store of this data region (default: this server's)."),
        )
    ]
    record = {"type": "object", "description": "An audit record with its seq, prev_hash and hash."}
    return {
        "/v2/admin/keys": {
            "get": _operation(
                "listKeys", "access", "API keys and certificate identities (never secrets)",
                _responses(_ok("The keys.", _object({"keys": _array(key)})), 401, 403, 503),
            ),
            "post": _operation(
                "createKey", "access", "Make an API key; the answer holds its secret, shown this once",
                _responses(_ok("The key, with its secret in 'key'.", key), 400, 401, 403, 503),
                body=_body(new_key, "The key's name, roles, tenant and quotas."),
            ),
        },
        "/v2/admin/keys/{id}": {
            "delete": _operation(
                "revokeKey", "access", "Revoke a key at once",
                _responses(_ok("The revoked key.", key), 401, 403, 404, 503), parameters=key_id,
            )
        },
        "/v2/admin/keys/{id}/rotate": {
            "post": _operation(
                "rotateKey", "access", "Replace a key by a new one with the same roles; the old one ends after grace_s",
                _responses(_ok("The new key, with its secret in 'key'.", key), 400, 401, 403, 404, 503),
                body=_body(_object({"grace_s": _number(minimum=0)}), "Seconds the old key works.", required=False),
                parameters=key_id,
            )
        },
        "/v2/admin/audit": {
            "get": _operation(
                "readAudit", "access", "Audit records, oldest first",
                _responses(_ok("The records.", _object({"records": _array(record)})), 400, 401, 403, 503),
                parameters=query,
            )
        },
        "/v2/admin/audit/verify": {
            "get": _operation(
                "verifyAudit", "access", "Check the audit trail's hash chain",
                _responses(
                    _ok("The verdict.", _object({"ok": {"type": "boolean"}, "problems": _array(_string())})),
                    401, 403, 503,
                ),
                parameters=[query[-1]],
            )
        },
    }  # fmt: skip


def openapi_document() -> dict[str, Any]:
    """The OpenAPI 3.1 document of every REST route of dhow."""
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "dhow",
            "version": __version__,
            "description": "Model serving over the Open Inference Protocol v2 (KServe/Triton), with Triton's "
            "binary tensor data, classification, model repository, configuration and statistics extensions, "
            'and the admin API of deployments and their traffic policies. Errors answer {"error": "..."}.',
            "license": {"name": "Apache-2.0", "identifier": "Apache-2.0"},
        },
        "tags": [
            {"name": name, "description": description}
            for name, description in (
                ("health", "Liveness and readiness."),
                ("server", "Server metadata and metrics."),
                ("models", "Model metadata, readiness, configuration and statistics."),
                ("inference", "Inference (Open Inference Protocol v2)."),
                ("repository", "The model repository and model control."),
                ("deployments", "Deployments: traffic policies over model versions (docs/rollouts.md)."),
                ("admin", "About the API itself."),
                ("access", "API keys and the audit trail (docs/security.md)."),
            )
        ],
        "paths": {**_server_paths(), **_model_paths(), **_admin_paths(), **_access_paths()},
        "components": _components(),
        # every route but the health checks needs a credential (unless the server runs with --auth none)
        "security": [{"bearer": []}],
    }
