"""``dhow batch run --server HOST:PORT``: the batches of a job sent to a running server over gRPC, raw contents.

The job's reading, parts and resumption are the batch package's (``dhow.batch.remote``); this is only the
transport, which lives here, above the doors, because a door may not know another (``dhow.batch`` and
``dhow.protocols`` are siblings). The server admits, checks and audits every batch as the key's ``infer``.
"""

from __future__ import annotations

import grpc
import grpc.aio

from dhow.core.datatypes import array_from_buffer, array_to_bytes
from dhow.core.errors import DhowError, ErrorCode, InvalidInput
from dhow.core.model_config import ModelConfig, TensorSpec
from dhow.core.types import InferenceRequest, InferenceResponse, Tensor
from dhow.protocols.grpc.codec import parameter_to_proto
from dhow.protocols.grpc.generated import grpc_service_pb2 as pb
from dhow.protocols.grpc.generated.grpc_service_pb2_grpc import GRPCInferenceServiceStub
from dhow.serving.composition import PinnedModel

__all__ = ["GrpcModel", "RemoteError"]

_MESSAGE_BYTES = 256 * 1024 * 1024


class RemoteError(DhowError):
    """What the server answered, with the server's status (so that a refused row splits its batch, an overload
    is retried and a refusal of the job ends it, as with the local core)."""

    def __init__(self, code: ErrorCode, message: str) -> None:
        super().__init__(message)
        self.code = code


class GrpcModel:
    """One model of a server, over one gRPC channel, as the job's key."""

    def __init__(self, target: str, api_key: str) -> None:
        target = target.removeprefix("grpc://")  # the URL form of the issue's --server URL
        if not target or "://" in target:
            raise InvalidInput(
                f"--server expects the server's gRPC address HOST:PORT (or grpc://HOST:PORT), got {target!r}"
            )
        options = [
            ("grpc.max_send_message_length", _MESSAGE_BYTES),
            ("grpc.max_receive_message_length", _MESSAGE_BYTES),
        ]
        self.channel = grpc.aio.insecure_channel(target, options=options)
        self.stub = GRPCInferenceServiceStub(self.channel)
        self.metadata = (("authorization", f"Bearer {api_key}"),) if api_key else ()
        self.target = target

    async def describe(self, name: str, version: int | None) -> tuple[PinnedModel, int]:
        label = str(version) if version is not None else ""
        try:
            meta = await self.stub.ModelMetadata(
                pb.ModelMetadataRequest(name=name, version=label), metadata=self.metadata
            )
            config = await self.stub.ModelConfig(
                pb.ModelConfigRequest(name=name, version=label), metadata=self.metadata
            )
        except grpc.aio.AioRpcError as exc:
            raise _error(exc, self.target) from None
        number = version if version is not None else max(int(v) for v in meta.versions)
        inputs = tuple(TensorSpec(t.name, t.datatype, tuple(t.shape)) for t in meta.inputs)
        outputs = tuple(TensorSpec(t.name, t.datatype, tuple(t.shape)) for t in meta.outputs)
        largest = int(config.config.max_batch_size)
        model = ModelConfig(name, meta.platform, inputs, outputs, max_batch_size=largest)
        return PinnedModel(model, number, artifact_digest=""), largest

    async def infer(self, request: InferenceRequest) -> InferenceResponse:
        message = pb.ModelInferRequest(model_name=request.model_name, model_version=request.model_version)
        for tensor in request.inputs:
            message.inputs.add(name=tensor.name, datatype=tensor.datatype, shape=tensor.shape)
            message.raw_input_contents.append(array_to_bytes(tensor.data, tensor.datatype))
        for key, value in request.parameters.items():
            message.parameters[key].CopyFrom(parameter_to_proto(value))
        try:
            answer = await self.stub.ModelInfer(message, metadata=self.metadata)
        except grpc.aio.AioRpcError as exc:
            raise _error(exc, self.target) from None
        outputs = [
            Tensor(o.name, o.datatype, list(o.shape), array_from_buffer(raw, o.datatype, list(o.shape)))
            for o, raw in zip(answer.outputs, answer.raw_output_contents, strict=True)
        ]
        return InferenceResponse(answer.model_name, answer.model_version, outputs)

    async def close(self) -> None:
        await self.channel.close(None)


def _error(exc: grpc.aio.AioRpcError, target: str) -> RemoteError:
    status = exc.code()
    name = status.name if status is not None else "UNAVAILABLE"
    code = ErrorCode[name] if name in ErrorCode.__members__ else ErrorCode.UNAVAILABLE
    return RemoteError(code, f"the server {target} answered {name}: {exc.details()}")
