"""The committed gRPC stubs match the .proto files, and the protos match what Triton clients send."""

from __future__ import annotations

import importlib.util
import os
from typing import Any

import pytest

IN_CI = os.environ.get("CI") == "true"


def _require(module: str, why: str) -> None:
    if importlib.util.find_spec(module) is None:
        if IN_CI:
            pytest.fail(f"{module} is not installed; CI must run this check ({why})")
        pytest.skip(f"{module} is not installed ({why}); install the dev extra to run this check")


def test_generated_stubs_are_current() -> None:
    _require("grpc_tools", "it regenerates the stubs to compare them with the committed ones")
    from dhow.protocols.grpc import codegen

    stale = codegen.stale_files()
    assert not stale, f"stale stubs {stale}; run: python -m dhow.protocols.grpc.codegen --write"


def _fields(message: Any) -> dict[str, tuple[int, int, str]]:
    return {f.name: (f.number, f.type, f.message_type.full_name if f.message_type else "") for f in message.fields}


def _compare(ours: Any, theirs: Any, path: str) -> list[str]:
    """Every field, nested message and enum value of ours exists in theirs with the same number and type."""
    problems = []
    their_fields = _fields(theirs)
    for name, spec in _fields(ours).items():
        if their_fields.get(name) != spec:
            problems.append(f"{path}.{name}: ours {spec}, Triton's {their_fields.get(name)}")
    for nested in ours.nested_types:
        problems += _compare(nested, theirs.nested_types_by_name[nested.name], f"{path}.{nested.name}")
    for enum in ours.enum_types:
        problems += _compare_enum(enum, theirs.enum_types_by_name[enum.name], f"{path}.{enum.name}")
    return problems


def _compare_enum(ours: Any, theirs: Any, path: str) -> list[str]:
    their_values = {v.name: v.number for v in theirs.values}
    return [f"{path}.{v.name}" for v in ours.values if their_values.get(v.name) != v.number]


def test_protos_are_wire_compatible_with_tritonclient() -> None:
    _require("tritonclient.grpc", "its protos are the reference for wire compatibility")
    from tritonclient.grpc import model_config_pb2 as triton_config
    from tritonclient.grpc import service_pb2 as triton_service

    from dhow.protocols.grpc.generated import grpc_service_pb2, model_config_pb2

    problems: list[str] = []
    for ours, theirs in ((grpc_service_pb2, triton_service), (model_config_pb2, triton_config)):
        for name, message in ours.DESCRIPTOR.message_types_by_name.items():
            problems += _compare(message, theirs.DESCRIPTOR.message_types_by_name[name], name)
        for name, enum in ours.DESCRIPTOR.enum_types_by_name.items():
            problems += _compare_enum(enum, theirs.DESCRIPTOR.enum_types_by_name[name], name)
    assert not problems, "\n".join(problems)

    our_service = grpc_service_pb2.DESCRIPTOR.services_by_name["GRPCInferenceService"]
    their_service = triton_service.DESCRIPTOR.services_by_name["GRPCInferenceService"]
    for method in our_service.methods:
        theirs = their_service.methods_by_name[method.name]
        assert (method.full_name, method.input_type.full_name, method.output_type.full_name) == (
            theirs.full_name,
            theirs.input_type.full_name,
            theirs.output_type.full_name,
        )
        assert method.client_streaming == theirs.client_streaming
        assert method.server_streaming == theirs.server_streaming


def test_stubs_live_in_their_own_descriptor_pool() -> None:
    from google.protobuf import descriptor_pool

    from dhow.protocols.grpc.generated import POOL, grpc_service_pb2

    assert grpc_service_pb2.DESCRIPTOR.pool is POOL
    assert POOL is not descriptor_pool.Default()
