"""The component schemas of inference: tensors, requests and answers, metadata, statistics, the repository."""

from __future__ import annotations

from dhow.core.datatypes import NUMPY_DTYPE
from dhow.protocols.rest.openapi.schema import Schema, array, integer, obj, ref, string

__all__ = ["inference_schemas"]


def inference_schemas() -> dict[str, Schema]:
    """The shapes of the Open Inference Protocol v2 and the repository routes, and the error answer."""
    parameters = {
        "type": "object",
        "description": "Free-form parameters; values are strings, numbers or booleans.",
        "additionalProperties": {"type": ["string", "number", "integer", "boolean"]},
    }
    shape = array(integer(minimum=0), description="Actual dimensions, row-major.")
    data = {
        "description": "The tensor's elements, flat or nested row-major; BYTES elements are strings. "
        "Left out when the tensor travels as binary data (parameters.binary_data_size).",
        "type": "array",
    }
    return {
        "Error": obj({"error": string("What was wrong.")}, ("error",)),
        "Parameters": parameters,
        "Datatype": string("A tensor datatype of the Open Inference Protocol.", enum=list(NUMPY_DTYPE)),
        "TensorMetadata": obj(
            {
                "name": string(),
                "datatype": ref("Datatype"),
                "shape": array(integer(minimum=-1), description="-1 marks a variable dimension (batch first)."),
            },
            ("name", "datatype", "shape"),
        ),
        "ServerMetadata": obj(
            {"name": string(), "version": string(), "extensions": array(string())},
            ("name", "version", "extensions"),
        ),
        "ModelMetadata": obj(
            {
                "name": string(),
                "versions": array(string(), description="The loaded versions."),
                "platform": string("Triton's name of the runtime, e.g. onnxruntime_onnx."),
                "inputs": array(ref("TensorMetadata")),
                "outputs": array(ref("TensorMetadata")),
            },
            ("name", "versions", "platform", "inputs", "outputs"),
        ),
        "ModelConfig": {
            "type": "object",
            "description": "Triton's model configuration (model_config.proto as JSON); dims leave out the "
            "batch dimension when max_batch_size > 0.",
            "properties": {
                "name": string(),
                "platform": string(),
                "backend": string(),
                "max_batch_size": integer(minimum=0),
                "input": array({"type": "object"}),
                "output": array({"type": "object"}),
                "version_policy": {"type": "object"},
                "instance_group": array({"type": "object"}),
                "dynamic_batching": {"type": "object"},
            },
            "additionalProperties": True,
        },
        "Duration": obj({"count": integer(minimum=0), "ns": integer(minimum=0)}, ("count", "ns")),
        "ModelStatistics": obj({"model_stats": array(ref("ModelStat"))}, ("model_stats",)),
        "ModelStat": obj(
            {
                "name": string(),
                "version": string(),
                "last_inference": integer("Milliseconds since the epoch of the last request."),
                "inference_count": integer(minimum=0),
                "execution_count": integer(minimum=0),
                "inference_stats": {
                    "type": "object",
                    "additionalProperties": ref("Duration"),
                    "description": "success, fail, queue, compute_input, compute_infer, compute_output, "
                    "cache_hit, cache_miss.",
                },
                "batch_stats": array(
                    obj(
                        {
                            "batch_size": integer(minimum=1),
                            "compute_input": ref("Duration"),
                            "compute_infer": ref("Duration"),
                            "compute_output": ref("Duration"),
                        }
                    )
                ),
            },
            ("name", "version", "inference_stats"),
        ),
        "RequestInput": obj(
            {
                "name": string(),
                "shape": shape,
                "datatype": ref("Datatype"),
                "parameters": ref("Parameters"),
                "data": data,
            },
            ("name", "shape", "datatype"),
        ),
        "RequestOutput": obj(
            {
                "name": string(),
                "parameters": ref("Parameters"),
            },
            ("name",),
            description="parameters.binary_data (boolean) asks for binary output; parameters.classification "
            "(integer N) returns the top N as 'value:index' strings.",
        ),
        "InferenceRequest": obj(
            {
                "id": string("Echoed in the response."),
                "parameters": ref("Parameters"),
                "inputs": array(ref("RequestInput"), minItems=1),
                "outputs": array(ref("RequestOutput")),
            },
            ("inputs",),
            description="Request parameters: binary_data_output (boolean), timeout (microseconds in the queue); "
            "a deployment's A/B sticky key (e.g. user_id) may also come here, or in the x-dhow-ab-key header.",
        ),
        "ResponseOutput": obj(
            {
                "name": string(),
                "shape": shape,
                "datatype": ref("Datatype"),
                "parameters": ref("Parameters"),
                "data": data,
            },
            ("name", "shape", "datatype"),
        ),
        "InferenceResponse": obj(
            {
                "model_name": string(),
                "model_version": string("The version that answered."),
                "id": string(),
                "parameters": ref("Parameters"),
                "outputs": array(ref("ResponseOutput")),
            },
            ("model_name", "model_version", "outputs"),
            description="A deployment's responses carry parameters.dhow_variant (the A/B variant, "
            "primary/canary, blue/green).",
        ),
        "RepositoryIndexRequest": obj({"ready": {"type": "boolean", "default": False}}),
        "RepositoryIndexEntry": obj(
            {
                "name": string(),
                "version": string("Empty when no version is loaded."),
                "state": string(examples=["READY", "UNAVAILABLE", "LOADING"]),
                "reason": string(),
            },
            ("name", "version", "state", "reason"),
        ),
        "ModelControlRequest": obj(
            {"parameters": ref("Parameters")},
            description='parameters.config: model.yaml fields as JSON; "file:<version>/<name>": base64 model '
            "files (only with --allow-model-upload).",
        ),
        "RepositoryIndex": array(ref("RepositoryIndexEntry"), description="One entry per model version."),
        "Metrics": string("The Prometheus text exposition format."),
        "OpenApiDocument": {"type": "object", "description": "The OpenAPI 3.1 document of the REST API."},
        "EmptyObject": obj({}, maxProperties=0),
    }
