"""The gRPC door: ``inference.GRPCInferenceService`` (Open Inference Protocol plus the Triton
additions that tritonclient and perf_analyzer use), served over the data plane.

The names below are imported on first use, so that ``python -m dhow.protocols.grpc.codegen`` can
regenerate stubs that no longer import (for example after a protobuf upgrade).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from dhow.protocols.grpc.server import GrpcConnectionLimits, GrpcServer, create_grpc_server
    from dhow.protocols.grpc.service import InferenceServicer

__all__ = ["GrpcConnectionLimits", "GrpcServer", "InferenceServicer", "create_grpc_server"]

_HOMES = {
    "GrpcConnectionLimits": "dhow.protocols.grpc.server",
    "GrpcServer": "dhow.protocols.grpc.server",
    "create_grpc_server": "dhow.protocols.grpc.server",
    "InferenceServicer": "dhow.protocols.grpc.service",
}


def __getattr__(name: str) -> Any:
    if name not in _HOMES:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(_HOMES[name]), name)
