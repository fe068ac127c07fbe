"""The component schemas of the peers' protocols: KServe v1 / TensorFlow Serving's REST API, TorchServe's
inference API, and the health answers KServe's clients read."""

from __future__ import annotations

from dhow.protocols.rest.openapi.schema import Schema, array, obj, string

__all__ = ["peer_schemas"]

_BOOLEAN: Schema = {"type": "boolean"}
_ANY: Schema = {"description": "A value, nested lists, or an object keyed by input (output) name."}


def peer_schemas() -> dict[str, Schema]:
    return {**_health(), **_v1(), **_torchserve()}


def _health() -> dict[str, Schema]:
    return {
        "ServerLive": obj({"live": _BOOLEAN}, ("live",), description="KServe's clients read 'live'."),
        "ServerReady": obj({"ready": _BOOLEAN}, ("ready",), description="KServe's clients read 'ready'."),
        "ModelReady": obj({"name": string(), "ready": _BOOLEAN}, ("name", "ready")),
    }


def _v1() -> dict[str, Schema]:
    status = obj({"error_code": string(examples=["OK", "UNAVAILABLE"]), "error_message": string()})
    version_status = obj(
        {"version": string(), "state": string(enum=["AVAILABLE", "LOADING", "END", "UNKNOWN"]), "status": status},
        ("version", "state", "status"),
    )
    return {
        "V1Live": obj({"status": string(const="alive")}, ("status",)),
        "V1Models": obj({"models": array(string())}, ("models",)),
        "V1ModelStatus": obj(
            {"name": string(), "ready": _BOOLEAN, "model_version_status": array(version_status)},
            ("name", "ready", "model_version_status"),
            description="TensorFlow Serving's GetModelStatus, with KServe v1's name and ready.",
        ),
        "V1ModelMetadata": obj(
            {"model_spec": {"type": "object"}, "metadata": {"type": "object"}},
            ("model_spec", "metadata"),
            description="TensorFlow Serving's GetModelMetadata: metadata.signature_def.signature_def.serving_default "
            "holds inputs and outputs (dtype, tensor_shape, name).",
        ),
        "V1PredictRequest": obj(
            {"signature_name": string(const="serving_default"), "instances": array(_ANY, minItems=1), "inputs": _ANY},
            description="Either instances (row format) or inputs (columnar format).",
        ),
        "V1PredictResponse": obj(
            {"predictions": array(_ANY), "outputs": _ANY},
            description="predictions answers the row format, outputs the columnar format.",
        ),
        "V1ExamplesRequest": obj(
            {
                "signature_name": string(),
                "context": {"type": "object", "description": "Inputs shared by every example."},
                "examples": array({"type": "object"}, minItems=1),
            },
            ("examples",),
        ),
        "V1ResultsResponse": obj(
            {"results": array({}, description="classify: [[label, score], ...] per example; regress: a number each.")},
            ("results",),
        ),
    }


def _torchserve() -> dict[str, Schema]:
    return {
        "TorchServePing": obj({"status": string(enum=["Healthy", "Unhealthy"])}, ("status",)),
        "TorchServeBody": {
            "description": "One instance (a value, or an object keyed by input name) or a list of instances; or, "
            "for a model whose one input is BYTES, any non-JSON body as that input's element."
        },
        "TorchServePrediction": {
            "description": "One instance's outputs, unwrapped (the one output's value, or an object keyed by output "
            "name), or a list of them for a list of instances."
        },
    }
