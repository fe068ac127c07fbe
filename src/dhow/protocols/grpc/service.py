"""``inference.GRPCInferenceService`` served by the data plane (grpc.aio).

Every RPC translates a message, calls the ``DataPlane`` and translates the answer back; the
policies (validation, statistics, batching) live in the data plane, once for every door.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Mapping
from typing import Any, TypeVar

from google.protobuf import json_format

from dhow.access.permissions import Principal
from dhow.core.errors import DhowError
from dhow.core.ids import is_client_request_id, new_request_id
from dhow.core.types import LazyHeaders
from dhow.protocols.grpc.codec import (
    parameters_from_proto,
    request_from_proto,
    request_header,
    response_bytes,
    stream_response_bytes,
    tensor_metadata,
)
from dhow.protocols.grpc.decoding import answers_bytes
from dhow.protocols.grpc.errors import Context, abort, credentials, guarded, request_id
from dhow.protocols.grpc.generated import grpc_service_pb2 as pb
from dhow.protocols.grpc.generated import model_config_pb2 as mc
from dhow.protocols.grpc.h2.calls import CallContext
from dhow.protocols.routes import GRPC_ACCESS
from dhow.serving.service import Access, Call, CoreService

_Message = TypeVar("_Message")


class InferenceServicer:
    """The RPCs of ``grpc_service.proto``; ``create_grpc_server`` registers it.

    Method names are the RPC names: grpc's generated registration looks them up by name. Every RPC enters the
    core service's admission point (``guarded``; the stream per message) and reads through the admitted call.
    """

    def __init__(self, service: CoreService) -> None:
        self.service = service
        self.dataplane = service.dataplane

    # -- health and metadata ------------------------------------------------------------

    @guarded
    async def ServerLive(self, request: pb.ServerLiveRequest, context: Context, call: Call) -> pb.ServerLiveResponse:
        return pb.ServerLiveResponse(live=self.dataplane.live())

    @guarded
    async def ServerReady(self, request: pb.ServerReadyRequest, context: Context, call: Call) -> pb.ServerReadyResponse:
        return pb.ServerReadyResponse(ready=self.dataplane.ready())

    @guarded
    async def ModelReady(self, request: pb.ModelReadyRequest, context: Context, call: Call) -> pb.ModelReadyResponse:
        return pb.ModelReadyResponse(ready=self.dataplane.model_ready(request.name, request.version))

    @guarded
    async def ServerMetadata(
        self, request: pb.ServerMetadataRequest, context: Context, call: Call
    ) -> pb.ServerMetadataResponse:
        metadata = self.dataplane.server_metadata()
        return pb.ServerMetadataResponse(
            name=metadata["name"], version=metadata["version"], extensions=metadata.get("extensions", [])
        )

    @guarded
    async def ModelMetadata(
        self, request: pb.ModelMetadataRequest, context: Context, call: Call
    ) -> pb.ModelMetadataResponse:
        metadata = self.dataplane.model_metadata(request.name, request.version)
        return pb.ModelMetadataResponse(
            name=metadata["name"],
            versions=metadata.get("versions", []),
            platform=metadata.get("platform", ""),
            inputs=tensor_metadata(metadata.get("inputs", [])),
            outputs=tensor_metadata(metadata.get("outputs", [])),
        )

    @guarded
    async def ModelConfig(self, request: pb.ModelConfigRequest, context: Context, call: Call) -> pb.ModelConfigResponse:
        config = self.dataplane.model_config(request.name, request.version)
        # the dict is Triton's JSON form of model_config.proto; fields our subset lacks are dropped
        return pb.ModelConfigResponse(config=_parsed(config, mc.ModelConfig()))

    @guarded
    async def ModelStatistics(
        self, request: pb.ModelStatisticsRequest, context: Context, call: Call
    ) -> pb.ModelStatisticsResponse:
        statistics = self.dataplane.model_statistics(request.name, request.version, call.visible)
        return _parsed(statistics, pb.ModelStatisticsResponse())

    # -- the repository -----------------------------------------------------------------

    @guarded
    async def RepositoryIndex(
        self, request: pb.RepositoryIndexRequest, context: Context, call: Call
    ) -> pb.RepositoryIndexResponse:
        # dhow serves one repository: repository_name is not consulted
        rows = self.dataplane.repository_index(request.ready, call.visible)
        return pb.RepositoryIndexResponse(models=[_model_index(row) for row in rows])

    @guarded
    async def RepositoryModelLoad(
        self, request: pb.RepositoryModelLoadRequest, context: Context, call: Call
    ) -> pb.RepositoryModelLoadResponse:
        # "config" arrives as string_param, uploaded "file:<path>" contents as bytes_param
        await self.dataplane.load_model(request.model_name, parameters_from_proto(request.parameters))
        return pb.RepositoryModelLoadResponse()

    @guarded
    async def RepositoryModelUnload(
        self, request: pb.RepositoryModelUnloadRequest, context: Context, call: Call
    ) -> pb.RepositoryModelUnloadResponse:
        await self.dataplane.unload_model(request.model_name, parameters_from_proto(request.parameters))
        return pb.RepositoryModelUnloadResponse()

    # -- inference ----------------------------------------------------------------------

    @answers_bytes
    @guarded
    async def ModelInfer(self, request: pb.ModelInferRequest, context: Context, call: Call) -> bytes:
        """The answer is a serialized ``ModelInferResponse``."""
        inference = request_from_proto(request)
        inference.headers = _headers(context)
        response = await call.infer(inference)
        return response_bytes(response)

    @answers_bytes
    async def ModelStreamInfer(
        self, requests: AsyncIterator[pb.ModelInferRequest], context: Context
    ) -> AsyncIterator[bytes]:
        """Answer each request of the stream as soon as it is computed, in completion order.

        Requests run concurrently, as in Triton; clients match answers by ``id``. A failed request
        yields an ``error_message`` (with the request's model and id) and the stream goes on. The answers are
        serialized ``ModelStreamInferResponse`` messages.

        Each request has its own id (``dhow.core.ids``), in its audit record, payload log event, trace and feedback
        join: its own ``id`` when that is a plain token, else ``<stream id>.<n>``, the stream's id (its
        ``x-request-id`` metadata, else one made here) and its place in the stream, counted from 1.
        """
        # one authentication per stream; each request is authorized, limited and audited on its own
        try:
            principal = await self.service.authenticate(credentials(context), _STREAM_ACCESS)
        except DhowError as exc:
            await abort(context, exc)
        answers: asyncio.Queue[bytes | None] = asyncio.Queue()
        stream_id = request_id(context) or new_request_id()
        reader = asyncio.create_task(self._serve_stream(requests, answers, principal, stream_id))
        try:
            while (answer := await answers.get()) is not None:
                yield answer
            await reader  # raises if reading the stream failed
        finally:
            reader.cancel()  # the client went away: stop the requests still running

    async def _serve_stream(
        self,
        requests: AsyncIterator[pb.ModelInferRequest],
        answers: asyncio.Queue[bytes | None],
        principal: Principal,
        stream_id: str,
    ) -> None:
        try:
            async with asyncio.TaskGroup() as group:
                n = 0
                async for request in requests:
                    n += 1
                    named = request.id if is_client_request_id(request.id) else f"{stream_id}.{n}"
                    group.create_task(self._stream_answer(request, answers, principal, named))
        finally:
            answers.put_nowait(None)

    async def _stream_answer(
        self,
        request: pb.ModelInferRequest,
        answers: asyncio.Queue[bytes | None],
        principal: Principal,
        named: str,
    ) -> None:
        try:
            async with self.service.call(principal, _STREAM_ACCESS, request.model_name, named) as call:
                inference = request_from_proto(request)
                response = response_bytes(await call.infer(inference))
            answer = stream_response_bytes(response)
        except DhowError as exc:
            failed = pb.ModelStreamInferResponse(error_message=exc.message, infer_response=request_header(request))
            answer = failed.SerializeToString()
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


def _headers(context: Context) -> Mapping[str, str]:
    """The call's text metadata as the request's headers: the native front keeps them with the call's header
    block (read once for every call that sends the block again); grpcio's are decoded on first use."""
    if isinstance(context, CallContext):
        return context.headers()
    return LazyHeaders(lambda: _metadata(context))


def _metadata(context: Context) -> list[tuple[str, str]]:
    """The call's metadata as text headers (binary ``-bin`` entries left out)."""
    return [(key, value) for key, value in (context.invocation_metadata() or ()) if isinstance(value, str)]


def _stream_access() -> Access:
    """The access of ``ModelStreamInfer``'s requests (the stream is not ``guarded``: it admits each one)."""
    access = GRPC_ACCESS["ModelStreamInfer"]
    if access is None:
        raise RuntimeError("ModelStreamInfer must need a permission: see dhow.protocols.routes")
    return access


def _check_methods() -> None:
    """Every RPC of the service has an access in the route table, and a method here to serve it."""
    rpcs = {method.name for method in pb.DESCRIPTOR.services_by_name["GRPCInferenceService"].methods}
    unmapped, unknown = rpcs - set(GRPC_ACCESS), set(GRPC_ACCESS) - rpcs
    if unmapped or unknown:
        raise RuntimeError(
            f"dhow.protocols.routes must map every RPC of GRPCInferenceService: unmapped {sorted(unmapped)}, "
            f"not RPCs {sorted(unknown)}"
        )
    unserved = sorted(rpc for rpc in rpcs if not callable(getattr(InferenceServicer, rpc, None)))
    if unserved:
        raise RuntimeError(f"InferenceServicer does not serve {unserved}")


_check_methods()
_STREAM_ACCESS = _stream_access()
