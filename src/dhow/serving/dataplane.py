"""The transport-neutral data plane: every door (REST, gRPC, batch, stream) calls this.

Answers are plain data (dicts ready for JSON, or ``InferenceResponse``), so that a door
only translates; validation, statistics and metrics live here once.
"""

from __future__ import annotations

import asyncio
import logging
import random
import secrets
import time
import traceback
from collections.abc import Awaitable, Callable, Mapping
from typing import Any, NamedTuple

from dhow import __version__
from dhow.core.errors import CallCancelled, DhowError, InvalidInput, ModelFault, Unavailable
from dhow.core.model_config import ModelConfig, TensorSpec
from dhow.core.types import Caller, InferenceRequest, InferenceResponse, Outcome, RequestedOutput
from dhow.governance.masking import Masker, parse_masking
from dhow.governance.residency import ResidencyPolicy
from dhow.monitoring.payload_log import PayloadLog
from dhow.serving.lifecycle import ModelLifecycle
from dhow.serving.model_version import ModelVersion
from dhow.serving.signature import response_outputs, validate_inputs
from dhow.serving.traffic import Routing, TrafficRouter
from dhow.serving.triton_config import PLATFORMS, triton_model_config
from dhow.serving.watch import ModelWatch

log = logging.getLogger("dhow.dataplane")

#: how the in-process service identities are named (``dhow:shadow``, ``dhow:repository-poll``)
SERVICE_PREFIX = "dhow:"

#: the header (gRPC metadata key) naming a request's data region
DATA_REGION_HEADER = "x-dhow-data-region"

EXTENSIONS = [
    "binary_tensor_data",
    "classification",
    "model_repository",
    "model_repository(unload_dependents)",
    "model_configuration",
    "schedule_policy",
    "statistics",
]


class Placement(NamedTuple):
    """Where a request's data belongs, decided before it runs (so that a refusal can name the region)."""

    config: ModelConfig
    region: str
    #: the version the request names (or the newest), unless a traffic policy picks another
    model: ModelVersion
    #: who sent it (the payload log names them)
    caller: Caller | None = None


class DataPlane:
    """Serves what admission let in: metadata, the repository, inference (placed, routed, validated, counted)."""

    def __init__(
        self,
        models: ModelLifecycle,
        *,
        router: TrafficRouter | None = None,
        region: str = "default",
        residency: ResidencyPolicy | None = None,
        masking_key: bytes = b"",
        server_name: str = "dhow",
        strict_readiness: bool = True,
        payload_log: PayloadLog | None = None,
        watch: ModelWatch | None = None,
    ) -> None:
        self.models = models
        self.server_name = server_name
        #: set by the server once the models to load at start are loaded, cleared on shutdown
        self.is_ready = False
        #: ready only while every model the server should serve is loaded (else: once the start-up loads ended)
        self.strict_readiness = strict_readiness
        #: the deployments' traffic policies; None serves every model's newest version
        self.router = router
        #: where this server runs, and which data regions may be processed here
        self.region = region
        self.residency = residency or ResidencyPolicy()
        #: the keyed-hash secret of PII masking (payload samples)
        self.masking_key = masking_key
        #: per model: the config its masker was built from, and the masker
        self._maskers: dict[str, tuple[ModelConfig, Masker]] = {}
        #: every request's masked payload and every error, to the ``--payload-log`` sink (None: off)
        self.payload_log = payload_log
        if payload_log is not None:
            payload_log.use_masking(self._masker)
        #: drift sampling, latency anomalies and feedback (None: not watched, as in a batch job)
        self.watch = watch

    # -- health and metadata ------------------------------------------------------------

    def live(self) -> bool:
        return True

    def ready(self) -> bool:
        """Whether to send this server traffic (REST health/ready and gRPC ServerReady both ask here)."""
        return self.is_ready and not (self.strict_readiness and self.models.unready_models())

    def not_ready_reason(self) -> str:
        """Why ``ready`` is False, in words that name no model (the health checks are open to anyone)."""
        if not self.is_ready:
            return "the server is not ready: it is starting or stopping"
        return (
            "the server is not ready: a model it should serve has no version loaded (loading, or its load failed; "
            "--strict-readiness); the repository index (POST /v2/repository/index) says which and why"
        )

    def warn_if_unready(self) -> None:
        """Once start-up's loads are done: say in the log which models keep the server from being ready."""
        unready = self.models.unready_models() if self.strict_readiness else []
        if unready:
            log.warning(
                "not ready while model(s) %s have no version loaded (see their load errors above): health/ready "
                "answers 503 until they do (--strict-readiness false: ready whatever the loads' outcome)",
                ", ".join(unready),
            )

    def server_metadata(self) -> dict[str, Any]:
        return {"name": self.server_name, "version": __version__, "extensions": EXTENSIONS}

    def model_ready(self, name: str, version: str = "") -> bool:
        """Whether the model (version) serves; a model that is loading or failed is not ready (False), an
        unknown one or a malformed version is an error (404, 400), as for any other request."""
        try:
            self.models.resolve(name, version)
        except Unavailable:
            return False
        return True

    def model_metadata(self, name: str, version: str = "") -> dict[str, Any]:
        model = self.models.resolve(name, version)
        entry = self.models.entries[name]
        return {
            "name": name,
            "versions": [str(v) for v in sorted(entry.versions)],
            "platform": PLATFORMS[model.config.runtime],
            "inputs": [_spec_json(s) for s in model.inputs.values()],
            "outputs": [_spec_json(s) for s in model.outputs.values()],
        }

    def tensor_specs(self, name: str, version: str = "") -> tuple[list[TensorSpec], list[TensorSpec]]:
        """The inputs and outputs a model (version) declares, as held in memory: what a door that matches JSON
        values to inputs by name reads for each request (no metadata document built)."""
        model = self.models.resolve(name, version)
        return list(model.inputs.values()), list(model.outputs.values())

    def max_batch_size(self, name: str, version: str = "") -> int:
        """The most rows one request to the model (version) may carry (0: it does not batch)."""
        return self.models.resolve(name, version).config.max_batch_size

    def model_config(self, name: str, version: str = "") -> dict[str, Any]:
        return triton_model_config(self.models.resolve(name, version).config)

    def model_statistics(
        self, name: str = "", version: str = "", visible: Callable[[str], bool] | None = None
    ) -> dict[str, Any]:
        """One model's statistics, or (no name) those of every model ``visible`` lets the caller see."""
        if name:
            self.models.resolve(name, version)
            entries = [self.models.entries[name]]
        else:
            names = [n for n in sorted(self.models.entries) if visible is None or visible(n)]
            entries = [self.models.entries[n] for n in names]
        stats = [
            model.stats.as_dict(entry.name, str(number))
            for entry in entries
            for number, model in sorted(entry.versions.items())
            if not version or str(number) == version
        ]
        return {"model_stats": stats}

    # -- the repository -----------------------------------------------------------------

    def repository_index(
        self, ready_only: bool = False, visible: Callable[[str], bool] | None = None
    ) -> list[dict[str, Any]]:
        """The repository's models, only those ``visible`` lets the caller see."""
        rows = self.models.index(ready_only)
        return rows if visible is None else [row for row in rows if visible(row["name"])]

    async def load_model(self, name: str, parameters: dict[str, Any] | None = None) -> None:
        await self.models.request_load(name, parameters or {})

    async def unload_model(self, name: str, parameters: dict[str, Any] | None = None) -> None:
        await self.models.request_unload(name)

    # -- inference ----------------------------------------------------------------------

    def place(self, request: InferenceRequest, caller: Caller) -> Placement:
        """Decide the request's data region: the request's ``data_region`` parameter, the
        ``x-dhow-data-region`` header, the caller's default, or the model's ``region:``."""
        model = self.models.resolve(request.model_name, request.model_version)
        config = model.config
        region = request.parameters.get("data_region")
        if region is None:
            region = request.headers.get(DATA_REGION_HEADER) or caller.default_region or config.region
        if not isinstance(region, str):
            raise InvalidInput(f"request parameter 'data_region' must be a string like 'ae', got {region!r}")
        return Placement(config, region, model, caller)

    def check_residency(self, name: str, version: str, data_region: str) -> str:
        """Refuse at start a source of data (a stream) that this server may not process; its region (the model's
        when the source names none)."""
        region = data_region or self.models.resolve(name, version).config.region
        self.residency.check(region, self.region)
        return region

    async def infer(self, request: InferenceRequest, placement: Placement) -> tuple[InferenceResponse, Outcome]:
        """Run one placed request, if this server may process its data region (residency), and route it.

        A deployment's traffic policy picks the version when the request names none. What was decided (the
        version that answered, the data region, a masked payload sample when the model samples payloads) is
        returned beside the response, for the admission point's audit record. With a payload log, the request
        and its answer or error are offered to it (unless the model's ``payload_log`` is off).
        """
        config, region, model, caller = placement
        payloads = self.payload_log if config.payload_log else None
        # with a payload log, the request's start (its event is made with the others when they are handed over)
        start = time.perf_counter() if payloads is not None else 0.0
        try:
            self.residency.check(region, self.region)
            response = await self._route(request, model)
        except BaseException as exc:
            if payloads is not None:
                outcome, message = _error_of(exc)
                version = request.model_version or model.version_label
                self._log_payload(payloads, request, placement, start, version, outcome, message, None)
            raise
        if payloads is not None:
            if caller is not None:
                payloads.answered(placement, start, request, response)
            else:
                outputs = [[t.name, t.datatype, t.shape, t.data] for t in response.outputs]
                self._log_payload(payloads, request, placement, start, response.model_version, "success", "", outputs)
        # copies made by in-process identities (a shadow's, with the original's id) are not the clients' traffic
        if self.watch is not None and caller is not None and not caller.principal.startswith(SERVICE_PREFIX):
            self.watch.observe(config, request, response, caller)
        payload = None
        if config.payload_sample_rate and random.random() < config.payload_sample_rate:
            payload = self._payload_sample(config, request, response)
        return response, Outcome(response.model_version, region, payload)

    def _log_payload(
        self,
        payloads: PayloadLog,
        request: InferenceRequest,
        placement: Placement,
        start: float,
        version: str,
        outcome: str,
        error: str,
        outputs: list[list[Any]] | None,
    ) -> None:
        """Offer the payload log the event of a request that ended (``payload_log.FIELDS``: its time is the
        ``perf_counter`` of its start), built at once with its values. A JSON body goes as the client sent it: its
        numbers are not written again here, and with it the number of tensors decoded from it."""
        config, region, _, caller = placement
        body = request.json_body
        inputs = (
            (body, len(request.inputs))
            if body is not None
            else [[t.name, t.datatype, t.shape, t.data] for t in request.inputs]
        )
        payloads.offer([
            caller.request_id if caller is not None else request.id, config.name, version,
            caller.principal if caller is not None else "", caller.tenant if caller is not None else "", region,
            outcome, error, start, time.perf_counter() - start, request.parameters, inputs, outputs,
        ], self._masker(config))  # fmt: skip

    def _masker(self, config: ModelConfig) -> Masker:
        """The model's PII masking, built once per config (a reload builds it again)."""
        cached = self._maskers.get(config.name)
        if cached is not None and cached[0] is config:
            return cached[1]
        masker = Masker(parse_masking(config.pii, f"{config.name}/model.yaml: pii"), self.masking_key)
        self._maskers[config.name] = (config, masker)
        return masker

    def _payload_sample(
        self, config: ModelConfig, request: InferenceRequest, response: InferenceResponse
    ) -> dict[str, Any]:
        masker = self._masker(config)
        return {
            "inputs": masker.mask_tensors({t.name: t.data for t in request.inputs}),
            "outputs": masker.mask_tensors({t.name: t.data for t in response.outputs}),
        }

    def _route(self, request: InferenceRequest, placed: ModelVersion) -> Awaitable[InferenceResponse]:
        """The request's run: on the placed version, or on the one a traffic policy picks (not a coroutine
        itself: a request without a policy awaits one frame fewer, on its way in and on every resumption)."""
        router = self.router
        routing = None if router is None or request.model_version else router.route(request)
        if routing is None:
            return self.infer_version(request, placed)
        return self._routed(request, routing)

    async def _routed(self, request: InferenceRequest, routing: Routing) -> InferenceResponse:
        request.model_version = str(routing.version)
        start = time.perf_counter()
        try:
            response = await self.infer_version(request)
        except DhowError as exc:
            routing.observe(request, None, exc.code.value, time.perf_counter() - start)
            raise
        routing.observe(request, response, "success", time.perf_counter() - start)
        response.parameters["dhow_variant"] = routing.variant
        return response

    async def infer_version(self, request: InferenceRequest, model: ModelVersion | None = None) -> InferenceResponse:
        """Run one request on the version it names (or the newest; ``model`` when already resolved), bypassing
        traffic policies."""
        start = time.monotonic_ns()
        if model is None:
            model = self.models.resolve(request.model_name, request.model_version)
        rows = 0
        try:
            inputs, rows = validate_inputs(model, request)
            wanted = _validate_outputs(model, request.outputs) if request.outputs else None
            timeout_ns = _timeout_ns(request.parameters) if request.parameters else 0
            # every output by default: the version's own tuple, the same object for every request of a batch
            names = model.output_names if wanted is None else tuple(o.name for o in wanted)
            # asked for some outputs only (or for classes), a model that takes feedback computes its feedback
            # output too, kept as it answered it: a label must not depend on the client's choice of outputs
            kept = model.feedback_output if wanted is not None else ""
            computed = (*names, kept) if kept and kept not in names else names
            results = await model.batcher.submit(inputs, computed, rows or 1, timeout_ns, request.gone, request.trace)
            outputs = response_outputs(model, results, names, wanted)
            prediction = response_outputs(model, results, (kept,), None)[0].data if kept else None
        except ModelFault as exc:
            error_id = secrets.token_hex(4)
            log.error(
                "model %s version %s failed (error id %s): %s\n%s",
                model.name, model.version, error_id, exc, _model_trace(exc),
            )  # fmt: skip
            self._account(model, start, rows, exc.code.value)
            raise ModelFault(
                f"model '{model.name}' version {model.version} failed while computing "
                f"(error id {error_id}; see the server log)"
            ) from None
        except BaseException as exc:  # a refusal, a client that went away (CANCELLED), a fault of the server's
            self._account(model, start, rows, _error_of(exc)[0])
            raise
        self._account(model, start, rows, "success")
        return InferenceResponse(model.name, model.version_label, outputs, id=request.id, prediction=prediction)

    @staticmethod
    def _account(model: ModelVersion, start: int, rows: int, outcome: str) -> None:
        elapsed = time.monotonic_ns() - start
        model.stats.record_request(outcome == "success", elapsed, max(rows, 1))
        model.count_request(outcome)
        model.request_seconds.observe(elapsed / 1e9)


def _error_of(exc: BaseException) -> tuple[str, str]:
    """An error's code and message as the client gets them (an unexpected exception: INTERNAL, nothing of its text)."""
    if isinstance(exc, DhowError):
        return exc.code.value, exc.message
    if isinstance(exc, CallCancelled | asyncio.CancelledError):
        return "CANCELLED", "the client went away before its answer"
    return "INTERNAL", "internal error (the server log has it)"


def _spec_json(spec: TensorSpec) -> dict[str, Any]:
    return {"name": spec.name, "datatype": spec.datatype, "shape": list(spec.shape)}


def _validate_outputs(model: ModelVersion, outputs: list[RequestedOutput] | None) -> list[RequestedOutput] | None:
    if not outputs:
        return None
    for output in outputs:
        if output.name not in model.outputs:
            known = ", ".join(model.outputs)
            raise InvalidInput(f"model '{model.name}' has no output '{output.name}'; its outputs are: {known}")
        classes = output.parameters.get("classification")
        if classes is not None and (not isinstance(classes, int) or isinstance(classes, bool) or classes < 1):
            raise InvalidInput(f"output '{output.name}': classification must be a positive integer, got {classes!r}")
    return outputs


def _timeout_ns(parameters: Mapping[str, Any]) -> int:
    timeout = parameters.get("timeout")
    if timeout is None:
        return 0
    if not isinstance(timeout, (int, float)) or isinstance(timeout, bool) or timeout < 0:
        raise InvalidInput(f"request parameter 'timeout' must be microseconds (a number >= 0), got {timeout!r}")
    return int(timeout * 1000)


def _model_trace(fault: ModelFault) -> str:
    """Where the model failed: its traceback sent by an instance process, or the exception chain in this one."""
    return fault.trace or "".join(traceback.format_exception(fault)).rstrip()
