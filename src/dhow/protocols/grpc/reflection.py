"""gRPC server reflection (``grpc.reflection.v1alpha``), so that grpcurl and Postman list the services.

Reflection tells what the port serves, as ``ServerMetadata`` does, so it asks what ``ServerMetadata`` asks:
credentials with the server.read permission (every role has it). Without access control (``--auth none``)
it is open.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from typing import Any

import grpc.aio
from google.protobuf import descriptor_pb2
from google.protobuf.descriptor import FileDescriptor
from google.protobuf.descriptor_pool import DescriptorPool
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from grpc_reflection.v1alpha._async import ReflectionServicer

from dhow.core.errors import DhowError
from dhow.protocols.grpc.decoding import Methods
from dhow.protocols.grpc.errors import abort, credentials
from dhow.serving.service import ACTIONS, CoreService

__all__ = ["GuardedReflection", "add_reflection"]


class GuardedReflection:
    """grpc's reflection servicer, behind the core service's admission point (permission ``server.read``)."""

    def __init__(self, files: Sequence[FileDescriptor], service: CoreService) -> None:
        names = [service.full_name for file in files for service in file.services_by_name.values()]
        self._reflection = ReflectionServicer(names, pool=_pool_of(files))
        self._service = service

    async def ServerReflectionInfo(
        self, requests: AsyncIterator[Any], context: grpc.aio.ServicerContext[Any, Any]
    ) -> AsyncIterator[Any]:
        try:
            async with self._service.call(credentials(context), ACTIONS["server.metadata"]):
                async for answer in self._reflection.ServerReflectionInfo(requests, context):
                    yield answer
        except DhowError as exc:
            await abort(context, exc)


def add_reflection(server: Methods, files: Sequence[FileDescriptor], service: CoreService) -> None:
    """Serve reflection for the services of ``files`` (dependencies first; reflection's own file is added)."""
    described = (*files, reflection_pb2.DESCRIPTOR)
    reflection_pb2_grpc.add_ServerReflectionServicer_to_server(GuardedReflection(described, service), server)


def _pool_of(files: Sequence[FileDescriptor]) -> DescriptorPool:
    """One pool holding ``files``: dhow's own stubs live in a private pool (see ``generated``), the rest in
    protobuf's default one, and reflection reads a single pool."""
    pool = DescriptorPool()
    for file in files:
        proto = descriptor_pb2.FileDescriptorProto()
        file.CopyToProto(proto)
        pool.Add(proto)
    return pool
