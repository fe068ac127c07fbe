"""``grpc.health.v1.Health`` on the gRPC port: what load balancers and Kubernetes' gRPC probes ask.

The status is the server's readiness, the same as ``GET /v2/health/ready`` and ``ServerReady``: SERVING when
ready, NOT_SERVING otherwise (loading, or shutting down). The service names ``""`` (the server) and
``inference.GRPCInferenceService`` are known; models have no service name, so that a caller without
credentials cannot learn which models exist. Like the REST health routes, it needs no credentials.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from typing import Any

import grpc
import grpc.aio
from grpc_health.v1 import health_pb2, health_pb2_grpc

from dhow.protocols.grpc.decoding import Methods

__all__ = ["KNOWN_SERVICES", "ReadinessHealth", "add_health"]

#: the service names Check and Watch answer for
KNOWN_SERVICES = frozenset({"", "inference.GRPCInferenceService"})
#: how often a Watch looks at readiness again; a change reaches watchers within this time
WATCH_INTERVAL_S = 1.0


class ReadinessHealth:
    """The Health service's two RPCs, answering from ``ready`` (the data plane's readiness) each time."""

    def __init__(self, ready: Callable[[], bool], watch_interval_s: float = WATCH_INTERVAL_S) -> None:
        self._ready = ready
        self._watch_interval_s = watch_interval_s

    def status(self, service: str) -> int:
        """A ``HealthCheckResponse.ServingStatus`` value."""
        answer = health_pb2.HealthCheckResponse
        if service not in KNOWN_SERVICES:
            return int(answer.SERVICE_UNKNOWN)
        return int(answer.SERVING if self._ready() else answer.NOT_SERVING)

    async def Check(
        self, request: health_pb2.HealthCheckRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> health_pb2.HealthCheckResponse:
        if request.service not in KNOWN_SERVICES:
            known = ", ".join(repr(name) for name in sorted(KNOWN_SERVICES))
            await context.abort(grpc.StatusCode.NOT_FOUND, f"unknown service {request.service[:200]!r}; known: {known}")
        return health_pb2.HealthCheckResponse(status=self.status(request.service))

    async def Watch(
        self, request: health_pb2.HealthCheckRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> AsyncIterator[health_pb2.HealthCheckResponse]:
        """The status now, then each change (an unknown service is SERVICE_UNKNOWN, as the protocol says)."""
        last = None
        while True:
            status = self.status(request.service)
            if status != last:
                yield health_pb2.HealthCheckResponse(status=status)
                last = status
            await asyncio.sleep(self._watch_interval_s)


def add_health(server: Methods, ready: Callable[[], bool]) -> None:
    health_pb2_grpc.add_HealthServicer_to_server(ReadinessHealth(ready), server)
