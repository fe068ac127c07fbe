"""The routes of the peers' protocols, so that their clients work unchanged: KServe v1 / TensorFlow Serving's REST
API (``/``, ``/v1/models/...``) and TorchServe's inference API (``/ping``, ``/predictions/...``).

They are ``RestApp``'s handlers like the others (this class is one of its bases): each request has passed the
same admission point, each inference goes through ``Call.infer`` to the same batcher, statistics, metrics and
audit trail as a v2 request. They translate only: bodies to the model's inputs (by the model's metadata) and the
answer back (``tfserving``, ``torchserve``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import orjson

from dhow.core.errors import InvalidInput, Unsupported
from dhow.core.types import InferenceRequest, InferenceResponse, LazyHeaders, RequestedOutput, Tensor
from dhow.core.wire.v2 import decode_request, encode_response
from dhow.protocols.rest import tfserving, torchserve
from dhow.protocols.rest.body import json_object
from dhow.serving.dataplane import DataPlane

if TYPE_CHECKING:
    from dhow.protocols.rest.app import Answer, Request
    from dhow.serving.service import Call

__all__ = ["PeerRoutes"]

_JSON = [(b"content-type", b"application/json")]
_OCTET_STREAM = (b"content-type", b"application/octet-stream")
_NUMPY = orjson.OPT_SERIALIZE_NUMPY
_PREDICT_SIGNATURES = ("serving_default",)


class PeerRoutes:
    """KServe v1 / TensorFlow Serving and TorchServe handlers of the REST door (a base of ``RestApp``)."""

    dataplane: DataPlane

    # -- KServe v1 / TensorFlow Serving ---------------------------------------------------------

    async def _v1_live(self, request: Request, call: Call) -> Answer:
        return _json({"status": "alive"})

    async def _v1_models(self, request: Request, call: Call) -> Answer:
        """KServe v1's list: the models with a version ready, of those the caller may see."""
        names = {row["name"] for row in self.dataplane.repository_index(True, call.visible)}
        return _json({"models": sorted(names)})

    async def _v1_status(self, request: Request, call: Call) -> Answer:
        """200 while a version answers, 503 (the same body) while none does: KServe's readiness, TF's status."""
        model, version = request.match.model, request.match.version
        ready = self.dataplane.model_ready(model, version)
        index = [
            row
            for row in self.dataplane.repository_index()
            if row["name"] == model and (not version or row["version"] == version)
        ]
        body = tfserving.model_status(model, index, ready)
        if ready:
            return _json(body)
        body["error"] = f"model '{model}' is not ready: no version of it can answer yet (see model_version_status)"
        return 503, _JSON, orjson.dumps(body)

    async def _v1_metadata(self, request: Request, call: Call) -> Answer:
        metadata = self.dataplane.model_metadata(request.match.model, request.match.version)
        version = request.match.version or max(metadata["versions"], key=int, default="")
        return _json(tfserving.model_signature(metadata, version))

    async def _v1_predict(self, request: Request, call: Call) -> Answer:
        body = await request.body()
        header_length = request.header_length
        document = None if header_length is not None else json_object(body, '{"instances": [...]}')
        if document is None or _is_v2_request(document):
            # KServe's client posts its InferRequest (the v2 shape) to :predict; KServe answers it in v2's shape
            return await self._v2_answer(request, call, body, header_length)
        tfserving.check_signature(document.get("signature_name"), _PREDICT_SIGNATURES)
        specs = self._inputs(request)
        booleans = _booleans_possible(body)
        if "instances" in document:
            if "inputs" in document:
                raise InvalidInput("send either 'instances' (row format) or 'inputs' (columnar format), not both")
            tensors = tfserving.row_tensors(document["instances"], specs, booleans)
            response = await call.infer(self._request(request, tensors))
            return _json({"predictions": tfserving.predictions(response)})
        if "inputs" in document:
            tensors = tfserving.columnar_tensors(document["inputs"], specs, booleans)
            response = await call.infer(self._request(request, tensors))
            return _json({"outputs": tfserving.columnar_outputs(response)})
        raise InvalidInput(
            "the body needs 'instances' (row format: a list with one item per row) or 'inputs' (columnar format: "
            f"the whole tensor of each input); it has {sorted(document) or 'no member'}"
        )

    async def _v1_classify(self, request: Request, call: Call) -> Answer:
        response = await self._examples(request, call, "classify")
        return _json({"results": tfserving.classify_results(response)})

    async def _v1_regress(self, request: Request, call: Call) -> Answer:
        response = await self._examples(request, call, "regress")
        return _json({"results": tfserving.regress_results(response)})

    async def _v1_explain(self, request: Request, call: Call) -> Answer:
        raise Unsupported(
            f"dhow serves no explainers, so model '{request.match.model}' has no :explain; ask :predict for its outputs"
        )

    async def _examples(self, request: Request, call: Call, verb: str) -> InferenceResponse:
        """Run a classify or regress request, asking only for the output its answer is made of."""
        document = json_object(await request.body(), '{"examples": [...]}')
        tfserving.check_signature(document.get("signature_name"), ("serving_default", f"tensorflow/serving/{verb}"))
        model = request.match.model
        inputs, outputs = self.dataplane.tensor_specs(model, request.match.version)
        pick = tfserving.scores_output if verb == "classify" else tfserving.value_output
        wanted = pick(model, outputs)
        tensors = tfserving.row_tensors(tfserving.example_instances(document), inputs)
        return await call.infer(self._request(request, tensors, [wanted]))

    async def _v2_answer(self, request: Request, call: Call, body: bytes, header_length: bytes | None) -> Answer:
        length = None
        if header_length is not None:
            if not header_length.isdigit():
                raise InvalidInput("Inference-Header-Content-Length must be an integer")
            length = int(header_length)
        inference = decode_request(body, request.match.model, request.match.version, length)
        raw_headers = request.raw_headers
        inference.headers = LazyHeaders(lambda: raw_headers)
        inference.gone = request.gone
        encoded, json_length = encode_response(await call.infer(inference), inference)
        if json_length is None:
            return 200, _JSON, encoded
        return 200, [_OCTET_STREAM, (b"inference-header-content-length", str(json_length).encode())], encoded

    # -- TorchServe -------------------------------------------------------------------------------

    async def _torchserve_ping(self, request: Request, call: Call) -> Answer:
        if self.dataplane.ready():
            return _json({"status": "Healthy"})
        return 503, _JSON, orjson.dumps({"status": "Unhealthy", "error": self.dataplane.not_ready_reason()})

    async def _torchserve_predict(self, request: Request, call: Call) -> Answer:
        body = await request.body()
        model = request.match.model
        specs = self._inputs(request)
        content_type = _content_type(request)
        torchserve.refuse_forms(content_type)
        if torchserve.takes_raw(specs, content_type):
            tensors, single = [torchserve.raw_tensor(body, specs[0])], True
        else:
            instances, single = torchserve.instances_of(body, model, specs)
            tensors = tfserving.row_tensors(instances, specs, _booleans_possible(body))
        rows = tfserving.rows(await call.infer(self._request(request, tensors)))
        return _json(rows[0] if single else rows)

    # -------------------------------------------------------------------------------------------

    def _inputs(self, request: Request) -> tfserving.Specs:
        """The inputs the request's model (version) declares (a look-up in memory: no metadata built)."""
        return self.dataplane.tensor_specs(request.match.model, request.match.version)[0]

    @staticmethod
    def _request(
        request: Request, tensors: list[Tensor], outputs: list[RequestedOutput] | None = None
    ) -> InferenceRequest:
        match, raw_headers = request.match, request.raw_headers
        return InferenceRequest(
            match.model,
            tensors,
            model_version=match.version,
            outputs=outputs,
            headers=LazyHeaders(lambda: raw_headers),
            gone=request.gone,
        )


def _is_v2_request(document: dict[str, Any]) -> bool:
    """Whether ``inputs`` is a list of v2 tensors (``name``, ``datatype``), not TensorFlow's columnar inputs."""
    inputs = document.get("inputs")
    return (
        isinstance(inputs, list)
        and bool(inputs)
        and isinstance(inputs[0], dict)
        and "name" in inputs[0]
        and "datatype" in inputs[0]
    )


def _booleans_possible(body: bytes) -> bool:
    return b"true" in body or b"false" in body


def _content_type(request: Request) -> bytes:
    for name, value in request.raw_headers:
        if name == b"content-type":
            return value
    return b""


def _json(document: Any) -> Answer:
    return 200, _JSON, orjson.dumps(document, default=_default, option=_NUMPY)


def _default(value: Any) -> Any:
    # orjson falls through here for numpy values it does not write natively (e.g. non-native byte order)
    if hasattr(value, "tolist"):
        return value.tolist()
    raise TypeError(f"cannot serialize {type(value).__name__}")
