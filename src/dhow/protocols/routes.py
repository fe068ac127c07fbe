"""Every route of dhow's API, declared once.

Each route says its HTTP method and path, the access it needs (a permission and the action's name in the
audit trail), the REST handler that serves it, whether its path names a model (admission then checks the
model's scope and tenant), the gRPC methods that do the same, and what the OpenAPI document says of it.
The REST router, the REST app's handlers, the OpenAPI document and the gRPC method-to-access map are all
derived from ``ROUTES``, so a route cannot be served without a permission or left out of the document.

Path templates name their parameters ``{model}``, ``{name}`` (a deployment), ``{id}`` (an API key) and
``{version}``; ``[/versions/{version}]`` marks the optional version of the model routes. A template may end in a
verb after its last parameter, as Google's API style and TensorFlow Serving write it: ``{model}:predict``.

Besides the Open Inference Protocol (``/v2``), the table holds the doors of the peers whose clients should work
unchanged: KServe v1 / TensorFlow Serving's REST API (``/v1``) and TorchServe's inference API (``/predictions``,
``/ping``). Each route says which of these it speaks (``protocol``), which decides the shape of its errors.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Literal

from dhow.access.actions import ACTIONS, Access

__all__ = ["DEPLOYMENT_ACTIONS", "GRPC_ACCESS", "PUBLIC", "ROUTES", "Doc", "Protocol", "Route"]

#: the protocol a route speaks: the Open Inference Protocol, KServe v1 / TensorFlow Serving, or TorchServe
Protocol = Literal["v2", "v1", "torchserve"]


@dataclass(frozen=True, slots=True)
class Doc:
    """What the OpenAPI document says of a route; schema and parameter names are its components'."""

    summary: str
    tag: str
    #: the schema of the 200 answer ("": an empty body)
    response: str = ""
    #: the schema of the JSON body ("": no body)
    request: str = ""
    body_required: bool = False
    #: the error statuses it answers, besides 401 and 403 (which every guarded route answers)
    errors: tuple[int, ...] = ()
    #: header and query parameters (the path's own are added from the template)
    parameters: tuple[str, ...] = ()
    #: the media type of the 200 answer
    answers: str = "application/json"
    #: the body and the answer may also be binary tensor data (Inference-Header-Content-Length)
    binary: bool = False
    description: str = ""


# eq=False: routes are compared and hashed by identity (cheap on the hot path), and each is declared once
@dataclass(frozen=True, slots=True, eq=False)
class Route:
    #: unique; the OpenAPI operationId is its camelCase form
    name: str
    method: str
    path: str
    #: None only for the routes of ``PUBLIC``
    access: Access | None
    #: the name of the ``RestApp`` method that serves it
    handler: str
    doc: Doc
    #: the path's first parameter names a model (or a deployment, which is a model's name)
    names_model: bool = False
    #: the methods of ``inference.GRPCInferenceService`` that do the same, with the same access
    grpc: tuple[str, ...] = ()
    #: the protocol it speaks; its errors take that protocol's shape (all of them carry ``error``)
    protocol: Protocol = "v2"

    @property
    def templates(self) -> tuple[str, ...]:
        """The path without, then with, its optional part."""
        if "[" not in self.path:
            return (self.path,)
        return (_OPTIONAL.sub("", self.path), self.path.replace("[", "").replace("]", ""))


_OPTIONAL = re.compile(r"\[[^\]]*\]")

#: the routes open to anyone: probes and load balancers carry no credentials (KServe v1's liveness is ``GET /``,
#: TorchServe's health check ``GET /ping``)
PUBLIC = frozenset({"server_live", "server_ready", "v1_server_live", "torchserve_ping"})

#: what a deployment's actions do: ``POST /v2/admin/deployments/{name}/<deployment action>``
DEPLOYMENT_ACTIONS: dict[str, str] = {
    "promote": "Canary: advance to the next step; past the last step the canary is promoted.",
    "rollback": "Canary: send all traffic back to the primary (weight 0, state rolled_back).",
    "switch": "Blue/green: swap the active colour.",
    "release": "Blue/green: pin the deployment to the active version, releasing the other.",
}

_MODEL = "/v2/models/{model}[/versions/{version}]"
_DEPLOYMENT = "/v2/admin/deployments/{name}"
_A = ACTIONS
_MODEL_ERRORS = (404, 503)
_EDIT_ERRORS = (400, 404, 409, 413, 503)
_INFER_ERRORS = (400, 404, 413, 415, 429, 500, 503, 504)
_AUDIT_QUERY = ("AuditSince", "AuditLimit", "AuditActor", "AuditModel", "AuditKind", "AuditOutcome", "AuditRegion")
_BINARY_NOTE = (
    "Binary tensor data extension: send the JSON header, then the raw little-endian tensors of the inputs "
    "that carry parameters.binary_data_size (BYTES elements are a 4-byte little-endian length then the bytes), "
    "with the header Inference-Header-Content-Length giving the JSON's length. Outputs come back binary where "
    "asked (output parameters.binary_data or request parameter binary_data_output); the answer then has the "
    "content type application/octet-stream and the same header."
)

_SERVER = (
    Route("server_live", "GET", "/v2/health/live", None, "_live",
          Doc("Is the server live?", "health", "ServerLive", errors=(503,)), grpc=("ServerLive",)),
    Route("server_ready", "GET", "/v2/health/ready", None, "_ready",
          Doc("Is the server ready?", "health", "ServerReady", errors=(503,)), grpc=("ServerReady",)),
    Route("server_metadata", "GET", "/v2", _A["server.metadata"], "_server_metadata",
          Doc("Server metadata", "server", "ServerMetadata"), grpc=("ServerMetadata",)),
    Route("metrics", "GET", "/metrics", _A["metrics.read"], "_metrics",
          Doc("Prometheus metrics", "server", "Metrics", errors=(404,), answers="text/plain")),
    Route("openapi", "GET", "/v2/admin/openapi.json", _A["server.openapi"], "_openapi",
          Doc("This document", "admin", "OpenApiDocument")),
)  # fmt: skip

_MODELS = (
    Route("all_model_statistics", "GET", "/v2/models/stats", _A["stats.read"], "_statistics",
          Doc("Statistics of every loaded model version", "models", "ModelStatistics")),
    Route("model_metadata", "GET", _MODEL, _A["model.metadata"], "_model_metadata",
          Doc("Metadata of {which}", "models", "ModelMetadata", errors=_MODEL_ERRORS),
          names_model=True, grpc=("ModelMetadata",)),
    Route("model_ready", "GET", f"{_MODEL}/ready", _A["model.ready"], "_model_ready",
          Doc("Is {which} ready?", "models", "ModelReady", errors=_MODEL_ERRORS),
          names_model=True, grpc=("ModelReady",)),
    Route("model_config", "GET", f"{_MODEL}/config", _A["model.config"], "_model_config",
          Doc("Triton configuration of {which}", "models", "ModelConfig", errors=_MODEL_ERRORS),
          names_model=True, grpc=("ModelConfig",)),
    Route("model_statistics", "GET", f"{_MODEL}/stats", _A["stats.read"], "_statistics",
          Doc("Statistics of {which}", "models", "ModelStatistics", errors=_MODEL_ERRORS),
          names_model=True, grpc=("ModelStatistics",)),
    Route("model_infer", "POST", f"{_MODEL}/infer", _A["infer"], "_infer",
          Doc("Infer with {which}", "inference", "InferenceResponse", "InferenceRequest", body_required=True,
              errors=_INFER_ERRORS, parameters=("InferenceHeaderContentLength", "ContentEncoding"), binary=True,
              description="With a deployment, its traffic policy picks the version; an explicit version "
              f"bypasses it. {_BINARY_NOTE}"),
          names_model=True, grpc=("ModelInfer", "ModelStreamInfer")),
    Route("model_drift", "GET", f"{_MODEL}/drift", _A["model.drift"], "_drift",
          Doc("Live drift of {which} against its reference profile, the worst feature first", "monitoring",
              "DriftReport", errors=_MODEL_ERRORS,
              description="Scores of the version's sampled window (PSI for numbers, Jensen-Shannon distance for "
              "categories; side output: the prediction distribution), as last computed by the background task. "
              "state is no_profile, waiting (too few rows sampled yet), ok or drift."),
          names_model=True),
    Route("model_feedback", "POST", "/v2/models/{model}/feedback", _A["model.feedback"], "_feedback",
          Doc("Ground truth for earlier answers of {which}", "monitoring", "FeedbackResult", "FeedbackRequest",
              body_required=True, errors=(400, 404, 413, 503),
              description="labels maps a request's id (its x-request-id, else the inference request's id: the id "
              "the access and payload logs say) to its label (a list of labels for a request of several rows). "
              "Each is joined to the prediction this server process made; the answer says how many were joined "
              "and the version's quality figures."),
          names_model=True),
)  # fmt: skip

_REPOSITORY = (
    Route("repository_index", "POST", "/v2/repository/index", _A["repository.index"], "_repository_index",
          Doc("The models of the repository and their state", "repository", "RepositoryIndex",
              "RepositoryIndexRequest", errors=(400, 413)),
          grpc=("RepositoryIndex",)),
    Route("repository_model_load", "POST", "/v2/repository/models/{model}/load", _A["model.load"], "_load",
          Doc("Load a model (explicit model control)", "repository", request="ModelControlRequest",
              errors=(400, 404, 413, 503)),
          names_model=True, grpc=("RepositoryModelLoad",)),
    Route("repository_model_unload", "POST", "/v2/repository/models/{model}/unload", _A["model.unload"], "_unload",
          Doc("Unload a model (explicit model control)", "repository", request="ModelControlRequest",
              errors=(400, 404, 413, 503)),
          names_model=True, grpc=("RepositoryModelUnload",)),
)  # fmt: skip

_DEPLOYMENTS = (
    Route("list_deployments", "GET", "/v2/admin/deployments", _A["deployment.read"], "_deployments",
          Doc("Every deployment", "deployments", "DeploymentList", errors=(404, 503))),
    Route("get_deployment", "GET", _DEPLOYMENT, _A["deployment.read"], "_deployment",
          Doc("A deployment, with this server's live figures", "deployments", "Deployment", errors=(404, 503)),
          names_model=True),
    Route("put_deployment", "PUT", _DEPLOYMENT, _A["deployment.put"], "_put_deployment",
          Doc("Create (revision 0) or replace a deployment's policy", "deployments", "Deployment",
              "PutDeploymentRequest", body_required=True, errors=_EDIT_ERRORS, parameters=("Actor",),
              description="The versions the policy names are loaded before traffic moves; a refused edit changes "
              "neither the registry nor the traffic. 404: the model is not in the repository; 503: a version "
              "failed to load or the registry is unavailable."),
          names_model=True),
    Route("delete_deployment", "DELETE", _DEPLOYMENT, _A["deployment.delete"], "_delete_deployment",
          Doc("Delete a deployment (the model is served as before)", "deployments", "EmptyObject",
              "DeleteDeploymentRequest", body_required=True, errors=_EDIT_ERRORS, parameters=("Actor",)),
          names_model=True),
    Route("deployment_history", "GET", f"{_DEPLOYMENT}/history", _A["deployment.read"], "_deployment_history",
          Doc("Every change of a deployment, oldest first", "deployments", "History", errors=(404, 503)),
          names_model=True),
    Route("deployment_events", "GET", f"{_DEPLOYMENT}/events", _A["deployment.read"], "_deployment_events",
          Doc("A model's events with their figures, oldest first: the analysis's decisions, the monitoring's "
              "episodes", "deployments", "Events",
              errors=(404, 503)),
          names_model=True),
    *(
        # the handler reads the deployment action from the path's last segment
        Route(f"{action}_deployment", "POST", f"{_DEPLOYMENT}/{action}", _A["deployment.action"],
              "_deployment_action",
              Doc(summary, "deployments", "Deployment", "ActionRequest", errors=_EDIT_ERRORS, parameters=("Actor",),
                  description="400 when the action does not apply to the deployment's kind or state."),
              names_model=True)
        for action, summary in DEPLOYMENT_ACTIONS.items()
    ),
)  # fmt: skip

_ACCESS = (
    Route("list_keys", "GET", "/v2/admin/keys", _A["key.list"], "_keys",
          Doc("API keys and certificate identities (never secrets)", "access", "KeyList", errors=(503,))),
    Route("create_key", "POST", "/v2/admin/keys", _A["key.create"], "_create_key",
          Doc("Make an API key; the answer holds its secret, shown this once", "access", "ApiKey", "NewKey",
              body_required=True, errors=(400, 503))),
    Route("revoke_key", "DELETE", "/v2/admin/keys/{id}", _A["key.revoke"], "_revoke_key",
          Doc("Revoke a key at once", "access", "ApiKey", errors=(404, 503))),
    Route("rotate_key", "POST", "/v2/admin/keys/{id}/rotate", _A["key.rotate"], "_rotate_key",
          Doc("Replace a key by a new one with the same roles; the old one ends after grace_s", "access", "ApiKey",
              "RotateKeyRequest", errors=(400, 404, 503))),
    Route("read_audit", "GET", "/v2/admin/audit", _A["audit.read"], "_audit",
          Doc("Audit records, oldest first", "access", "AuditRecords", errors=(400, 503), parameters=_AUDIT_QUERY)),
    Route("verify_audit", "GET", "/v2/admin/audit/verify", _A["audit.verify"], "_audit_verify",
          Doc("Check the audit trail's hash chain", "access", "AuditVerdict", errors=(503,),
              parameters=("AuditRegion",))),
)  # fmt: skip

_V1_MODEL = "/v1/models/{model}[/versions/{version}]"
_V1_NOTE = (
    "Inputs map to the model's inputs by name (objects keyed by input name); a model with one input takes the "
    'value as is. BYTES values are strings, or {"b64": "..."} for binary data. signature_name, if sent, '
    "must be serving_default. A body in the Open Inference Protocol's shape (inputs as a list of tensors, as "
    "KServe's InferRequest sends it) is answered in that shape."
)
_TORCHSERVE_NOTE = (
    "A JSON body (Content-Type application/json, or any body that parses as JSON for a model without a BYTES "
    "input) is one instance (a value, or an object keyed by input name), answered unwrapped, or a list of "
    "instances, answered as a list; an instance may leave out trailing dimensions of size 1. Any other body is the "
    "one element of the model's single BYTES input (curl -T file). Errors carry TorchServe's code, type and message."
)
_PEERS = (
    Route("v1_server_live", "GET", "/", None, "_v1_live",
          Doc("Is the server live? (KServe v1)", "kserve-v1", "V1Live"), protocol="v1"),
    Route("v1_list_models", "GET", "/v1/models", _A["repository.index"], "_v1_models",
          Doc("The models this caller may see (KServe v1)", "kserve-v1", "V1Models"), protocol="v1"),
    Route("v1_model_status", "GET", _V1_MODEL, _A["model.ready"], "_v1_status",
          Doc("Status of {which} (TensorFlow Serving's GetModelStatus; KServe v1's model readiness)", "kserve-v1",
              "V1ModelStatus", errors=_MODEL_ERRORS,
              description="503 (with the same body) while no version of the model can answer."),
          names_model=True, protocol="v1"),
    Route("v1_model_metadata", "GET", f"{_V1_MODEL}/metadata", _A["model.metadata"], "_v1_metadata",
          Doc("Signature of {which} (TensorFlow Serving's GetModelMetadata)", "kserve-v1", "V1ModelMetadata",
              errors=_MODEL_ERRORS),
          names_model=True, protocol="v1"),
    Route("v1_model_predict", "POST", f"{_V1_MODEL}:predict", _A["infer"], "_v1_predict",
          Doc("Predict with {which} (TensorFlow Serving / KServe v1)", "kserve-v1", "V1PredictResponse",
              "V1PredictRequest", body_required=True, errors=_INFER_ERRORS, parameters=("ContentEncoding",),
              description="Row format ({\"instances\": [...]}) answers {\"predictions\": [...]}; columnar format "
              f"({{\"inputs\": ...}}) answers {{\"outputs\": ...}}. {_V1_NOTE}"),
          names_model=True, protocol="v1"),
    Route("v1_model_classify", "POST", f"{_V1_MODEL}:classify", _A["infer"], "_v1_classify",
          Doc("Classify with {which} (TensorFlow Serving)", "kserve-v1", "V1ResultsResponse", "V1ExamplesRequest",
              body_required=True, errors=_INFER_ERRORS,
              description="For a model with one floating-point output of shape [-1, K] (class scores): each "
              "example's [label, score] pairs, the label being the class's index. Examples are objects keyed by "
              "input name; context holds inputs shared by every example."),
          names_model=True, protocol="v1"),
    Route("v1_model_regress", "POST", f"{_V1_MODEL}:regress", _A["infer"], "_v1_regress",
          Doc("Regress with {which} (TensorFlow Serving)", "kserve-v1", "V1ResultsResponse", "V1ExamplesRequest",
              body_required=True, errors=_INFER_ERRORS,
              description="For a model with one numeric output holding one value per example."),
          names_model=True, protocol="v1"),
    Route("v1_model_explain", "POST", f"{_V1_MODEL}:explain", _A["infer"], "_v1_explain",
          Doc("Explain with {which} (KServe v1): not provided", "kserve-v1", errors=(404, 501),
              description="dhow serves no explainers: the answer is 501, saying so."),
          names_model=True, protocol="v1"),
    Route("torchserve_ping", "GET", "/ping", None, "_torchserve_ping",
          Doc("Is the server healthy? (TorchServe)", "torchserve", "TorchServePing", errors=(503,)),
          protocol="torchserve"),
    *(
        # TorchServe takes both: its documentation's own example, curl -T, sends a PUT
        Route(f"torchserve_model{suffix}_predictions", method, "/predictions/{model}[/{version}]", _A["infer"],
              "_torchserve_predict",
              Doc(f"Predict with {{which}} (TorchServe, {method})", "torchserve", "TorchServePrediction",
                  "TorchServeBody", body_required=True, errors=_INFER_ERRORS, parameters=("ContentEncoding",),
                  description=_TORCHSERVE_NOTE),
              names_model=True, protocol="torchserve")
        for method, suffix in (("POST", ""), ("PUT", "_put"))
    ),
)  # fmt: skip

#: every route, in the order the OpenAPI document lists them
ROUTES: tuple[Route, ...] = (*_SERVER, *_MODELS, *_REPOSITORY, *_DEPLOYMENTS, *_ACCESS, *_PEERS)


def _checked(routes: tuple[Route, ...]) -> tuple[Route, ...]:
    """Refuse a table that would serve a route twice, or leave a route other than ``PUBLIC``'s unguarded."""
    names = [route.name for route in routes]
    duplicates = {name for name in names if names.count(name) > 1}
    if duplicates:
        raise ValueError(f"routes declared twice: {sorted(duplicates)}")
    served = [(route.method, template) for route in routes for template in route.templates]
    if len(served) != len(set(served)):
        raise ValueError("two routes answer the same method on the same path")
    open_routes = {route.name for route in routes if route.access is None}
    if open_routes != PUBLIC:
        raise ValueError(f"routes without a permission must be exactly {sorted(PUBLIC)}, got {sorted(open_routes)}")
    return routes


def _grpc_access(routes: tuple[Route, ...]) -> dict[str, Access | None]:
    access: dict[str, Access | None] = {}
    for route in routes:
        for method in route.grpc:
            if method in access:
                raise ValueError(f"gRPC method {method} is declared by two routes")
            access[method] = route.access
    return access


_checked(ROUTES)
#: the access of every gRPC method (None: open, as its REST twin); the servicer checks it names all its methods
GRPC_ACCESS: dict[str, Access | None] = _grpc_access(ROUTES)
