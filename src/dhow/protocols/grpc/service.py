"""``inference.GRPCInferenceService`` served by the data plane (grpc.aio).

Every RPC translates a message, calls the ``DataPlane`` and translates the answer back; the
policies (validation, statistics, batching) live in the data plane, once for every door.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable, Mapping
from contextvars import ContextVar
from typing import Any, TypeVar

from google.protobuf import json_format

from dhow.access.authenticator import Credentials
from dhow.access.permissions import Principal
from dhow.core.errors import DhowError
from dhow.core.types import LazyHeaders
from dhow.protocols.grpc.codec import (
    parameters_from_proto,
    request_from_proto,
    request_header,
    response_to_proto,
    tensor_metadata,
)
from dhow.protocols.grpc.errors import Context, abort, guarded, internal_message, log_internal_error
from dhow.protocols.grpc.generated import grpc_service_pb2 as pb
from dhow.protocols.grpc.generated import model_config_pb2 as mc
from dhow.serving.dataplane import DataPlane
from dhow.serving.guard import ACTIONS, AccessGuard, Admission

_Message = TypeVar("_Message")


class InferenceServicer:
    """The RPCs of ``grpc_service.proto``; ``create_grpc_server`` registers it.

    Method names are the RPC names: grpc's generated registration looks them up by name.
    """

    def __init__(self, dataplane: DataPlane, guard: AccessGuard | None = None) -> None:
        self.dataplane = dataplane
        #: authentication, authorization, quotas and audit; None lets every call through
        self.guard = guard

    # -- access control (see ``guarded``) -----------------------------------------------

    async def admit(self, rpc: str, request: Any, context: Context) -> Admission | None:
        action = METHOD_ACTIONS[rpc]
        if self.guard is None or action is None:
            return None
        model = getattr(request, "model_name", "") or getattr(request, "name", "")
        admission = await self.guard.admit(credentials_of(context), ACTIONS[action], model)
        _ADMISSION.set(admission)
        return admission

    async def finish(self, admission: object, outcome: str, message: str = "") -> None:
        if isinstance(admission, Admission) and self.guard is not None:
            await self.guard.finish(admission, outcome, message)

    # -- health and metadata ------------------------------------------------------------

    @guarded
    async def ServerLive(self, request: pb.ServerLiveRequest, context: Context) -> pb.ServerLiveResponse:
        return pb.ServerLiveResponse(live=self.dataplane.live())

    @guarded
    async def ServerReady(self, request: pb.ServerReadyRequest, context: Context) -> pb.ServerReadyResponse:
        return pb.ServerReadyResponse(ready=self.dataplane.ready())

    @guarded
    async def ModelReady(self, request: pb.ModelReadyRequest, context: Context) -> pb.ModelReadyResponse:
        return pb.ModelReadyResponse(ready=self.dataplane.model_ready(request.name, request.version))

    @guarded
    async def ServerMetadata(self, request: pb.ServerMetadataRequest, context: Context) -> pb.ServerMetadataResponse:
        metadata = self.dataplane.server_metadata()
        return pb.ServerMetadataResponse(
            name=metadata["name"], version=metadata["version"], extensions=metadata.get("extensions", [])
        )

    @guarded
    async def ModelMetadata(self, request: pb.ModelMetadataRequest, context: Context) -> pb.ModelMetadataResponse:
        metadata = self.dataplane.model_metadata(request.name, request.version)
        return pb.ModelMetadataResponse(
            name=metadata["name"],
            versions=metadata.get("versions", []),
            platform=metadata.get("platform", ""),
            inputs=tensor_metadata(metadata.get("inputs", [])),
            outputs=tensor_metadata(metadata.get("outputs", [])),
        )

    @guarded
    async def ModelConfig(self, request: pb.ModelConfigRequest, context: Context) -> pb.ModelConfigResponse:
        config = self.dataplane.model_config(request.name, request.version)
        # the dict is Triton's JSON form of model_config.proto; fields our subset lacks are dropped
        return pb.ModelConfigResponse(config=_parsed(config, mc.ModelConfig()))

    @guarded
    async def ModelStatistics(self, request: pb.ModelStatisticsRequest, context: Context) -> pb.ModelStatisticsResponse:
        statistics = self.dataplane.model_statistics(request.name, request.version, _visible())
        return _parsed(statistics, pb.ModelStatisticsResponse())

    # -- the repository -----------------------------------------------------------------

    @guarded
    async def RepositoryIndex(self, request: pb.RepositoryIndexRequest, context: Context) -> pb.RepositoryIndexResponse:
        # dhow serves one repository: repository_name is not consulted
        rows = self.dataplane.repository_index(request.ready, _visible())
        return pb.RepositoryIndexResponse(models=[_model_index(row) for row in rows])

    @guarded
    async def RepositoryModelLoad(
        self, request: pb.RepositoryModelLoadRequest, context: Context
    ) -> pb.RepositoryModelLoadResponse:
        # "config" arrives as string_param, uploaded "file:<path>" contents as bytes_param
        await self.dataplane.load_model(request.model_name, parameters_from_proto(request.parameters))
        return pb.RepositoryModelLoadResponse()

    @guarded
    async def RepositoryModelUnload(
        self, request: pb.RepositoryModelUnloadRequest, context: Context
    ) -> pb.RepositoryModelUnloadResponse:
        await self.dataplane.unload_model(request.model_name, parameters_from_proto(request.parameters))
        return pb.RepositoryModelUnloadResponse()

    # -- inference ----------------------------------------------------------------------

    @guarded
    async def ModelInfer(self, request: pb.ModelInferRequest, context: Context) -> pb.ModelInferResponse:
        inference = request_from_proto(request)
        inference.headers = LazyHeaders(lambda: _metadata(context))
        admission = _ADMISSION.get()
        if admission is not None:
            inference.caller = admission.caller
        response = await self.dataplane.infer(inference)
        return response_to_proto(response)

    async def ModelStreamInfer(
        self, requests: AsyncIterator[pb.ModelInferRequest], context: Context
    ) -> AsyncIterator[pb.ModelStreamInferResponse]:
        """Answer each request of the stream as soon as it is computed, in completion order.

        Requests run concurrently, as in Triton; clients match answers by ``id``. A failed request
        yields an ``error_message`` (with the request's model and id) and the stream goes on.
        """
        principal = None
        if self.guard is not None:
            # one authentication per stream; each request is authorized, limited and audited on its own
            try:
                principal = await self.guard.authenticate(credentials_of(context), ACTIONS["infer"])
            except DhowError as exc:
                await abort(context, exc)
        answers: asyncio.Queue[pb.ModelStreamInferResponse | None] = asyncio.Queue()
        reader = asyncio.create_task(self._serve_stream(requests, answers, principal))
        try:
            while (answer := await answers.get()) is not None:
                yield answer
            await reader  # raises if reading the stream failed
        finally:
            reader.cancel()  # the client went away: stop the requests still running

    async def _serve_stream(
        self,
        requests: AsyncIterator[pb.ModelInferRequest],
        answers: asyncio.Queue[pb.ModelStreamInferResponse | None],
        principal: Principal | None,
    ) -> None:
        try:
            async with asyncio.TaskGroup() as group:
                async for request in requests:
                    group.create_task(self._stream_answer(request, answers, principal))
        finally:
            answers.put_nowait(None)

    async def _stream_answer(
        self,
        request: pb.ModelInferRequest,
        answers: asyncio.Queue[pb.ModelStreamInferResponse | None],
        principal: Principal | None,
    ) -> None:
        admission = None
        try:
            inference = request_from_proto(request)
            if self.guard is not None and principal is not None:
                admission = await self.guard.authorize(principal, ACTIONS["infer"], request.model_name)
                inference.caller = admission.caller
            response = response_to_proto(await self.dataplane.infer(inference))
            answer = pb.ModelStreamInferResponse(infer_response=response)
            await self.finish(admission, "success")
        except DhowError as exc:
            await self.finish(admission, exc.code.value, exc.message)
            answer = pb.ModelStreamInferResponse(error_message=exc.message, infer_response=request_header(request))
        except Exception:
            error_id = log_internal_error("ModelStreamInfer")
            await self.finish(admission, "INTERNAL", f"internal error (id {error_id})")
            answer = pb.ModelStreamInferResponse(
                error_message=internal_message(error_id), infer_response=request_header(request)
            )
        answers.put_nowait(answer)


def _parsed(data: Mapping[str, Any], message: _Message) -> _Message:
    """Fill ``message`` from its JSON form (enum names as strings, as Triton writes them)."""
    json_format.ParseDict(data, message, ignore_unknown_fields=True)
    return message


def _model_index(row: Mapping[str, Any]) -> pb.RepositoryIndexResponse.ModelIndex:
    return pb.RepositoryIndexResponse.ModelIndex(
        name=row["name"],
        version=str(row.get("version") or ""),
        state=str(row.get("state") or ""),
        reason=str(row.get("reason") or ""),
    )


#: the action (see ``dhow.serving.guard.ACTIONS``) of every RPC; None: open to anyone (health checks)
METHOD_ACTIONS: dict[str, str | None] = {
    "ServerLive": None,
    "ServerReady": None,
    "ModelReady": "model.ready",
    "ServerMetadata": "server.metadata",
    "ModelMetadata": "model.metadata",
    "ModelConfig": "model.config",
    "ModelStatistics": "stats.read",
    "RepositoryIndex": "repository.index",
    "RepositoryModelLoad": "model.load",
    "RepositoryModelUnload": "model.unload",
    "ModelInfer": "infer",
    "ModelStreamInfer": "infer",
}

#: the admission of the unary call being served (each call runs in its own task, so its own context)
_ADMISSION: ContextVar[Admission | None] = ContextVar("dhow_grpc_admission", default=None)


def _visible() -> Callable[[str], bool] | None:
    """Which models the caller of this call may see (None: no access control)."""
    admission = _ADMISSION.get()
    return admission.visible if admission is not None else None


def credentials_of(context: Context) -> Credentials:
    """Who the call says it is: its authorization metadata, and the verified client certificate's name."""
    sent = [value for key, value in context.invocation_metadata() or () if key == "authorization"]
    authorization = sent[0] if sent and isinstance(sent[0], str) else ""
    names = list((context.auth_context() or {}).get("x509_common_name") or ())
    client_cn = names[0].decode("utf-8", "replace") if names else ""
    return Credentials(authorization, client_cn, repeated_authorization=len(sent) > 1)


def _metadata(context: Context) -> list[tuple[str, str]]:
    """The call's metadata as text headers (binary ``-bin`` entries left out)."""
    return [(key, value) for key, value in (context.invocation_metadata() or ()) if isinstance(value, str)]
